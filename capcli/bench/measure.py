"""How ``capcli benchmark`` measures: each figure's median and range, runs taking turns, peak memory and
the peak of a large matmul (MFU's denominator).

Each figure is taken ``repeats`` times after one warm-up, the fast side and its baseline taking turns
(:func:`interleaved`) so that a busy machine slows both alike.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch


@dataclass
class Report:
    """Medians by figure, with the min and max of the repeats behind each."""

    figures: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, values: list[float]) -> None:
        self.figures[key] = statistics.median(values)
        self.ranges[key] = (min(values), max(values))

    def as_dict(self) -> dict[str, Any]:
        """Figures at the top level (``mfu``, ``caption_beam5_speedup``...), then ``range`` and ``context``."""
        return {**self.figures, "range": {k: list(v) for k, v in self.ranges.items()}, "context": self.context}


def interleaved(runs: list[Callable[[], Any]], repeats: int) -> list[list[Any]]:
    """Each run's results over ``repeats`` turns after one warm-up turn, the runs taking turns."""
    for run in runs:
        run()
    results: list[list[Any]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results, strict=True):
            out.append(run())
    return results


def seconds_of(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """The peak memory inside the block, in MiB, under ``out["mb"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's peak resident
    set (``VmHWM``), reset on entry through ``/proc/self/clear_refs`` where Linux allows it;
    elsewhere the peak since the process started (``ru_maxrss``), which can only be higher.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    resettable = _reset_peak_rss()
    yield out
    out["mb"] = _peak_rss_kb(resettable) / 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_kb(from_proc: bool) -> float:
    if from_proc:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def alone(run: Callable[[], Any], device: torch.device, dropped: list) -> dict[str, float]:
    """Peak memory of one more ``run`` on its own, after the other runs (baselines holding their
    own models) are dropped: the memory a run of the fast side needs, not the benchmark's."""
    dropped.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with peak_memory(device) as memory:
        run()
    return memory


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a ``size``² matmul in ``dtype`` on ``device``: the median of ``repeats`` timings."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


def percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)
