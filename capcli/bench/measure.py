"""How ``capcli benchmark`` measures: each figure's median and range, runs taking turns, peak memory and
the peak of a large matmul (MFU's denominator), and of the matrix products a step runs, at their own shapes.

Each figure is taken ``repeats`` times after one warm-up, the fast side and its baseline taking turns
(:func:`interleaved`) so that a busy machine slows both alike.
"""

from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


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


# The matrix products of a step as ATen runs them (nn.Linear and GPT-2's Conv1D become addmm or mm,
# batched ones bmm), with the FLOPs of one call from its operands' shapes.
_MATMULS: dict[Any, Callable[[list[tuple[int, ...]]], int]] = {
    aten.mm.default: lambda s: 2 * s[0][0] * s[0][1] * s[1][1],
    aten.addmm.default: lambda s: 2 * s[1][0] * s[1][1] * s[2][1],
    aten.bmm.default: lambda s: 2 * s[0][0] * s[0][1] * s[0][2] * s[1][2],
    aten.baddbmm.default: lambda s: 2 * s[1][0] * s[1][1] * s[1][2] * s[2][2],
}


class MatmulShapes(TorchDispatchMode):
    """Counts the matrix products run inside the block, by op, operand shapes and dtype, forward and backward."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in _MATMULS:
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            self.counts[(func, tuple(tuple(t.shape) for t in tensors), tensors[-1].dtype)] += 1
        return func(*args, **(kwargs or {}))


def matmul_flops(counts: Counter) -> int:
    """FLOPs of the counted matrix products."""
    return sum(count * _MATMULS[func](list(shapes)) for (func, shapes, _), count in counts.items())


def shapes_peak(counts: Counter, device: torch.device, repeats: int = 5) -> float:
    """FLOP/s of the counted matrix products, each timed alone at its own shapes and dtype.

    Σ count·FLOPs / Σ count·seconds: the rate the step's products reach with nothing else running,
    the peak a step of these shapes could reach, where ``matmul_peak`` is one large square product's.
    Each product is timed over enough calls to take about a millisecond (the median of ``repeats``).
    """
    flops = seconds = 0.0
    for (func, shapes, dtype), count in counts.items():
        operands = [torch.randn(shape, device=device, dtype=dtype) for shape in shapes]
        func(*operands)  # warm: the first call of a shape may pick its kernel
        synchronize(device)
        start = time.perf_counter()
        func(*operands)
        synchronize(device)
        calls = max(1, min(1000, round(1e-3 / max(time.perf_counter() - start, 1e-7))))
        times = []
        for _ in range(repeats):
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls):
                func(*operands)
            synchronize(device)
            times.append((time.perf_counter() - start) / calls)
        flops += count * _MATMULS[func](list(shapes))
        seconds += count * statistics.median(times)
    return flops / seconds
