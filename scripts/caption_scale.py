"""Caption at scale: ``capcli caption`` over thousands of small files, 2% of them bad.

For each size (default 2,000 and 20,000 files) the script writes a folder of small PNGs in
which every 50th file is broken (random bytes, a truncated PNG, a text file, an empty file),
captions it in one real process, and checks what a batch job relies on:

- every good file gets exactly one line, in input order; every bad one is named on stderr;
- the exit code is 1 (some files failed);
- the peak resident memory of the process (``ru_maxrss`` from ``wait4``), to compare across sizes.

With ``--interrupt`` it also sends SIGINT part-way through the largest folder and checks that
stdout holds only whole JSON lines and the exit code is 130.

    python scripts/caption_scale.py --checkpoint runs/pretrain --sizes 2000 20000 --out /tmp/scale

Prints one JSON document with the figures.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from PIL import Image

BAD_EVERY = 50  # 2%


def write_folder(folder: Path, count: int, seed: int = 0) -> tuple[list[str], list[str]]:
    """``count`` files named in order; returns the good and the bad paths, in input order."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    good, bad = [], []
    buf = io.BytesIO()
    Image.new("RGB", (24, 24), (10, 20, 30)).save(buf, format="PNG")
    png = buf.getvalue()
    for i in range(count):
        path = folder / f"{i:06d}.png"
        if i % BAD_EVERY == BAD_EVERY - 1:
            kind = i // BAD_EVERY % 4
            path.write_bytes([os.urandom(200), png[: len(png) // 2], b"not an image\n", b""][kind])
            bad.append(str(path))
        else:
            colour = tuple(rng.randrange(256) for _ in range(3))
            Image.new("RGB", (24, 24), colour).save(path, format="PNG")
            good.append(str(path))
    return good, bad


def caption(folder: Path, checkpoint: Path, env: dict[str, str], interrupt_after: int | None = None) -> dict:
    """One ``capcli caption`` process over ``folder``: its lines, stderr, exit code, peak RSS and time."""
    args = [sys.executable, "-m", "capcli", "caption", str(folder), "--checkpoint", str(checkpoint),
            "--beams", "1", "--format", "jsonl", "--batch-size", "64", "--max-length", "16", "--quiet"]
    started = time.monotonic()
    # A shell's background job (`cmd &`) ignores SIGINT, and its children inherit that: give the
    # process the default handling back, as a terminal's Ctrl-C would find it.
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    out = bytearray()
    if interrupt_after is not None:  # read until N lines came, then Ctrl-C
        while out.count(b"\n") < interrupt_after:
            chunk = proc.stdout.read1(65536)
            if not chunk:
                break
            out += chunk
        proc.send_signal(signal.SIGINT)
    rest_out, err = proc.stdout.read(), proc.stderr.read()
    out += rest_out
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {"stdout": bytes(out), "stderr": err.decode(), "code": proc.returncode,
            "peak_rss_mb": round(usage.ru_maxrss / 1024, 1), "seconds": round(time.monotonic() - started, 1)}


def check(result: dict, good: list[str], bad: list[str]) -> dict:
    lines = result["stdout"].decode().splitlines()
    paths = [json.loads(line)["path"] for line in lines]
    named = [line for line in result["stderr"].splitlines() if line.startswith("error: ")]
    return {
        "files": len(good) + len(bad), "bad": len(bad), "exit_code": result["code"],
        "lines": len(lines), "every_good_file_once_in_order": paths == good,
        "every_bad_file_named": all(any(p in line for line in named) for p in bad),
        "peak_rss_mb": result["peak_rss_mb"], "seconds": result["seconds"],
        "images_per_s": round(len(good) / max(result["seconds"], 1e-9), 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000])
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder for the images")
    parser.add_argument("--interrupt", action="store_true", help="also Ctrl-C a run part-way")
    args = parser.parse_args(argv)
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "CAPCLI_RUNTIME__DEVICE": "cpu"}
    report: dict = {"runs": []}
    ok = True
    for size in args.sizes:
        folder = args.out / f"images-{size}"
        good, bad = write_folder(folder, size)
        row = check(caption(folder, args.checkpoint, env), good, bad)
        report["runs"].append(row)
        ok &= row["exit_code"] == 1 and row["every_good_file_once_in_order"] and row["every_bad_file_named"]
    if len(report["runs"]) > 1:
        low, high = report["runs"][0]["peak_rss_mb"], report["runs"][-1]["peak_rss_mb"]
        report["peak_rss_growth"] = round(high / low - 1, 3)
        ok &= report["peak_rss_growth"] <= 0.10
    if args.interrupt:
        folder = args.out / f"images-{args.sizes[-1]}"
        result = caption(folder, args.checkpoint, env, interrupt_after=200)
        lines = result["stdout"].decode().split("\n")
        whole = all(json.loads(line) for line in lines[:-1]) and lines[-1] == ""
        report["interrupt"] = {"exit_code": result["code"], "lines": len(lines) - 1, "only_whole_lines": whole}
        ok &= result["code"] == 130 and whole
    report["ok"] = bool(ok)
    print(json.dumps(report, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
