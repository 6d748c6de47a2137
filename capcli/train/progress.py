"""What a run shows while it works: rich bars on a terminal, plain lines otherwise.

Everything goes to stderr (DESIGN §8): stdout is kept for results, so ``capcli ... --json``
can be piped while a run reports its progress.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

stderr = Console(stderr=True, highlight=False)


def format_metrics(metrics: dict[str, Any]) -> str:
    """``loss 2.31  lr 9.1e-04  samples/s 118`` from a dict of numbers."""
    parts = []
    for key, value in metrics.items():
        if isinstance(value, float):
            value = f"{value:.2e}" if key == "lr" else f"{value:.4g}"
        parts.append(f"{key} {value}")
    return "  ".join(parts)


class ProgressDisplay:
    """A step counter with live metrics. Bars when stderr is a terminal, else a line every ``every`` seconds."""

    def __init__(self, title: str, total: int, quiet: bool = False, every: float = 10.0, start: int = 0):
        self.title, self.total, self.every = title, total, every
        self.quiet = quiet
        self._last_line = 0.0
        self._bar: Progress | None = None
        if not quiet and stderr.is_terminal:
            self._bar = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=stderr, transient=False,
            )
            self._task = self._bar.add_task(title, total=total, completed=start, metrics="")

    def __enter__(self) -> ProgressDisplay:
        if self._bar is not None:
            self._bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, metrics=format_metrics(metrics))
        elif not self.quiet and (time.monotonic() - self._last_line >= self.every or step == self.total):
            self._last_line = time.monotonic()
            self.print(f"{self.title} step {step}/{self.total}  {format_metrics(metrics)}")

    def print(self, message: str) -> None:
        """A line of its own, above the bar when there is one."""
        if self.quiet:
            return
        if self._bar is not None:
            self._bar.console.print(message)
        else:
            print(message, file=sys.stderr, flush=True)
