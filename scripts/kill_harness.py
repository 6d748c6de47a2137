"""Kill -9 anywhere: SIGKILL a short run again and again, resume it each time, compare with an uninterrupted one.

Runs ``capcli pretrain`` (or ``align``) as a user's batch job would: a real process, killed with
SIGKILL at random moments and at each stage of a checkpoint write (through the fault points
of ``capcli.faults``), then continued with ``--resume`` (or started again with ``--overwrite``
when the kill came before the first checkpoint), until a process finishes: one round. Each
round must end with the same final weights as an uninterrupted run, bit for bit, and a
``metrics.jsonl`` with every step once (the same lines but for their times); rounds go on
until ``--kills`` kills were made.

    python scripts/kill_harness.py --kills 20 --seed 0 --out /tmp/kills            # pretrain
    python scripts/kill_harness.py --phase align --kills 10 --out /tmp/kills-align

Prints one JSON document: faults injected by kind, kills survived, data lost (weights that
differ, steps missing or repeated), and the seconds it took. Exit 0 when nothing was lost.
The tests run a short fixed list of kills (tests/test_kill.py); this script is the long form.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

STAGE_FAULTS = {
    "pretrain": ["checkpoint.start@1", "checkpoint.weights@2", "checkpoint.state@3", "checkpoint.between@2",
                 "checkpoint.after@1", "checkpoint.between@1", "pixel_cache.put@5", "pixel_cache.put@20"],
    "align": ["caches.features@1", "checkpoint.start@1", "checkpoint.weights@2", "checkpoint.between@2",
              "checkpoint.after@3", "checkpoint.state@1"],
}
SIZES = ["--train-size", "32", "--val-size", "8", "--test-size", "8", "--batch-size", "8", "--epochs", "3"]


def run_env(cache: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CAPCLI_", "_CAPCLI_"))}
    env.update({"CAPCLI_DATA__CACHE_DIR": str(cache), "CAPCLI_RUNTIME__DEVICE": "cpu",
                "CAPCLI_PRETRAIN__ENGINE__GRAD_ACCUM": "1", "CAPCLI_ALIGN__ENGINE__GRAD_ACCUM": "1",
                "CAPCLI_PRETRAIN__ENGINE__LOG_EVERY": "1", "CAPCLI_ALIGN__ENGINE__LOG_EVERY": "1",
                "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    return env


def command(phase: str, output: Path, start: Path | None) -> list[str]:
    args = [sys.executable, "-m", "capcli", phase, "--output", str(output), *SIZES, "--quiet", "--json"]
    return args + (["--checkpoint", str(start)] if phase == "align" else [])


def has_checkpoint(output: Path) -> bool:
    folder = output / "checkpoints"
    return any((folder / name / "model.json").is_file() for name in ("last", ".old-last", "best", ".old-best"))


def launch(args: list[str], env: dict[str, str], fault: str | None, kill_after: float | None,
           timeout: float) -> int:
    """Run one process; SIGKILL it after ``kill_after`` seconds, or let ``fault`` kill it from inside."""
    env = {**env, **({"_CAPCLI_FAULT": fault} if fault else {})}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=kill_after if kill_after is not None else timeout)
    except subprocess.TimeoutExpired:
        if kill_after is None:
            proc.kill()
            raise
        os.kill(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    if proc.returncode not in (0, -signal.SIGKILL):
        raise RuntimeError(f"{' '.join(args[2:4])} {' '.join(args[4:])} (fault {fault}) exited {proc.returncode}: {err}")
    return proc.returncode


def run_to_completion(args, output, env, plan, timeout=600.0) -> tuple[Counter, int]:
    """Run, killing the process with each fault of ``plan`` in turn, resuming after each; then finish."""
    injected, kills = Counter(), 0
    for fault in [*plan, None]:
        resume = ["--resume"] if has_checkpoint(output) else (["--overwrite"] if output.exists() else [])
        kind = (fault if isinstance(fault, str) else "random-time") if fault is not None else None
        started = time.monotonic()
        code = launch(args + resume, env, fault if isinstance(fault, str) else None,
                      fault if isinstance(fault, float) else None, timeout)
        if fault is None:
            if code != 0:
                raise RuntimeError("the final, unkilled process was killed")
            break
        if code == -signal.SIGKILL:
            kills += 1
            injected[kind.split("@")[0]] += 1
        elif code == 0:  # the run finished before the fault came: start the rest again from the top
            print(f"note: {kind} did not come ({time.monotonic() - started:.1f}s): the run finished first",
                  file=sys.stderr)
            break
    return injected, kills


def compare(whole: Path, killed: Path) -> dict[str, object]:
    from safetensors.torch import load_file

    from capcli.train.runlog import read_metrics

    lost: dict[str, object] = {}
    for name in ("last", "best"):
        a = load_file(str(whole / "checkpoints" / name / "model.safetensors"))
        b = load_file(str(killed / "checkpoints" / name / "model.safetensors"))
        differ = [k for k in a if k not in b or not a[k].equal(b[k])]
        if differ or a.keys() != b.keys():
            lost[f"{name}_weights_differ"] = differ[:5]
    def steps(run, split):
        return [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == split]
    for split in ("train", "val"):
        if steps(killed, split) != steps(whole, split):
            lost[f"{split}_steps"] = {"expected": steps(whole, split), "got": steps(killed, split)}
    def values(run):
        return [{k: v for k, v in r.items() if k not in ("time", "samples_per_s")} for r in read_metrics(run / "metrics.jsonl")]
    if not lost and values(killed) != values(whole):
        lost["metrics_differ"] = True
    return lost


def leftovers(killed: Path) -> list[str]:
    """Folders a kill inside the run's last checkpoint write left (no later write came to remove them)."""
    return sorted(p.name for p in (killed / "checkpoints").iterdir() if p.name.startswith((".tmp-", ".old-")))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--phase", choices=("pretrain", "align"), default="pretrain")
    parser.add_argument("--kills", type=int, default=12, help="kills in all, over as many rounds as they take")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True, help="a scratch folder (emptied)")
    args = parser.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    cache = args.out / "cache"  # the killed runs': each round empties its pixel cache, to be killed in its first fill
    env = run_env(cache)
    started = time.monotonic()
    start = None
    if args.phase == "align":  # both align runs start from one pretrain checkpoint
        start = args.out / "pretrain"
        launch(command("pretrain", start, None) + ["--max-steps", "4"], env, None, None, 600)
    whole, killed = args.out / "whole", args.out / "killed"
    t0 = time.monotonic()
    if launch(command(args.phase, whole, start), run_env(args.out / "cache-whole"), None, None, 600) != 0:
        raise RuntimeError("the uninterrupted run failed")
    seconds = time.monotonic() - t0
    rng = random.Random(args.seed)
    stages = [fault.split("@")[0] + "@1" for fault in STAGE_FAULTS[args.phase]]
    injected, kills, rounds, lost = Counter(), 0, 0, []
    while kills < args.kills:
        # One round: a run from scratch, killed by a stage fault (the first time its point comes in that
        # process) or at a random moment, resumed, again and again until a process finishes.
        rounds += 1
        shutil.rmtree(killed, ignore_errors=True)
        shutil.rmtree(cache / "pixels", ignore_errors=True)
        plan = []
        first_fill = [f for f in stages if f.startswith(("pixel_cache", "caches"))]
        if first_fill and rng.random() < 0.5:  # the first process of a round fills the caches: kill it there
            point = rng.choice(first_fill).split("@")[0]
            plan.append(f"{point}@{rng.randint(1, 30) if point == 'pixel_cache.put' else 1}")
        for _ in range(args.kills - kills - len(plan)):
            plan.append(rng.choice(stages) if rng.random() < 0.6 else round(rng.uniform(0.5, seconds), 2))
        done, n = run_to_completion(command(args.phase, killed, start), killed, env, plan)
        injected += done
        kills += n
        found = compare(whole, killed)
        if found:
            lost.append({"round": rounds, "kills": n, **found})
    report = {"phase": args.phase, "faults_injected": dict(injected), "kills": kills, "rounds": rounds,
              "survived": kills - sum(r["kills"] for r in lost), "data_lost": lost or 0, "leftover_folders": leftovers(killed),
              "uninterrupted_seconds": round(seconds, 1), "seconds": round(time.monotonic() - started, 1)}
    print(json.dumps(report, indent=2))
    return 0 if not lost else 1


if __name__ == "__main__":
    sys.exit(main())
