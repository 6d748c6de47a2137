"""One image, one process: what a shell loop of ``capcli caption one.jpg`` pays each time.

``capcli benchmark --sections startup`` times, from process start to exit with the caption
on stdout, ``python -m capcli caption IMAGE --checkpoint CKPT`` (imports, settings, model
load, one caption at beams 5) against ``python -c "import torch"``, the floor any PyTorch
command pays, the two taking turns. Both run with this process's environment (so its thread
settings) and Python. ``startup_imports`` in the context names the modules whose imports took
longest in one more caption process (``python -X importtime``), for whoever shortens the path.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from capcli.bench.measure import interleaved

FLOOR = ("-c", "import torch")


def caption_command(image: Path, checkpoint: Path, device: str) -> list[str]:
    """The command a shell script runs for one image (``capcli`` is ``python -m capcli``)."""
    return [sys.executable, "-m", "capcli", "caption", str(image), "--checkpoint", str(checkpoint),
            "--device", device, "--quiet"]


def wall_seconds(command: list[str], caption: bool = True) -> float:
    """Seconds from starting ``command`` to its exit; its failure (or, with ``caption``, an empty
    stdout) is an error naming its stderr."""
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy(), check=False)
    seconds = time.perf_counter() - start
    if done.returncode != 0 or (caption and not done.stdout.strip()):
        tail = " ".join(done.stderr.split())[-300:]
        raise RuntimeError(f"{' '.join(command[1:4])} exited {done.returncode} with no caption: {tail}")
    return seconds


def slowest_imports(command: list[str], count: int = 8) -> dict[str, float]:
    """The ``count`` top-level packages whose first import took longest in ``command``, in seconds
    (``-X importtime``'s cumulative column: a package's own imports included, those already
    imported by an earlier package not)."""
    done = subprocess.run([command[0], "-X", "importtime", *command[1:]], capture_output=True, text=True,
                          env=os.environ.copy(), check=False)
    packages: dict[str, float] = {}
    for line in done.stderr.splitlines():
        parts = line.removeprefix("import time:").split("|")
        if not line.startswith("import time:") or len(parts) != 3 or not parts[1].strip().isdigit():
            continue  # not an import line, or the header
        name = parts[2].strip()
        if "." not in name:
            packages[name] = max(packages.get(name, 0.0), int(parts[1]) / 1e6)
    return dict(sorted(packages.items(), key=lambda kv: -kv[1])[:count])


def bench_startup(report: Any, checkpoint: Path, image: Path, device: str, repeats: int,
                  log: Callable[[str], None]) -> None:
    """``startup_torch_s``, ``startup_caption_s`` and their ratio ``startup_caption_over_torch``."""
    log(f"benchmark: one image, one process ({repeats} repeats after a warm-up)")
    caption = caption_command(image, checkpoint, device)
    floors, captions = interleaved([partial(wall_seconds, [sys.executable, *FLOOR], caption=False),
                                    partial(wall_seconds, caption)], repeats)
    report.add("startup_torch_s", floors)
    report.add("startup_caption_s", captions)
    report.add("startup_caption_over_torch", [c / f for c, f in zip(captions, floors, strict=True)])
    report.context["startup_command"] = "python -m capcli caption IMAGE --checkpoint CKPT --device " + device
    report.context["startup_imports"] = slowest_imports(caption)
