"""Ctrl-C and SIGTERM during training: a request to stop at the next safe point."""

from __future__ import annotations

import signal
from typing import Any


class StopOnInterrupt:
    """The first Ctrl-C (or SIGTERM: SLURM's scancel, a preemption, torchrun stopping its workers)
    asks the loop to stop at the next safe point; a second one stops at once."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopOnInterrupt:
        try:
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        except ValueError:  # not the main thread: leave signals alone
            self._previous = {}
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
