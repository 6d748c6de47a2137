"""The run's metrics log, ``metrics.jsonl``: one JSON object a line, appended as training goes.

This is the one seam every training number passes through, so another sink (TensorBoard)
can be added here without touching the engine.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.jsonl"


TENSORBOARD_DIR = "tensorboard"


class RunLog:
    """Appends records to ``<run_dir>/metrics.jsonl``, and, with ``tensorboard``, to TensorBoard
    event files in ``<run_dir>/tensorboard`` (each number as ``SPLIT/KEY`` at its step)."""

    def __init__(self, run_dir: Path, resume_step: int | None = None, tensorboard: bool = False):
        self.writer = _tensorboard(Path(run_dir) / TENSORBOARD_DIR, resume_step) if tensorboard else None
        self.path = Path(run_dir) / METRICS_FILE
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            self.path.write_text("", encoding="utf-8")
        elif self.path.exists():
            # Lines written after the checkpoint we resume from would be written again: drop them.
            kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= resume_step]
            self.path.write_text("".join(json.dumps(line) + "\n" for line in kept), encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **record}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            split, step = record.get("split", "train"), record.get("step", 0)
            for key, value in record.items():
                if key not in ("time", "split", "step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key.removeprefix('val_')}", value, step)
            self.writer.flush()


class NoLog:
    """The metrics log of ranks other than 0: they train, rank 0 writes."""

    def write(self, record: dict[str, Any]) -> None:
        pass


def _tensorboard(directory: Path, resume_step: int | None):
    """A SummaryWriter; a resumed run tells TensorBoard to drop what was logged after its step."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        from capcli.errors import ConfigError

        raise ConfigError("runtime.log tensorboard needs the tensorboard package: pip install tensorboard "
                          "(or pip install 'capcli[tensorboard]')") from None
    if resume_step is None and directory.exists():  # a new run: the old curves go, as metrics.jsonl's lines do
        shutil.rmtree(directory)
    writer = SummaryWriter(str(directory))
    if resume_step is not None:
        # TensorBoard's restart marker drops the points at this step and after: those metrics.jsonl
        # dropped too (it keeps lines up to the checkpoint's step, hence the + 1).
        from tensorboard.compat.proto.event_pb2 import Event, SessionLog

        writer.file_writer.add_event(Event(session_log=SessionLog(status=SessionLog.START)), step=resume_step + 1)
    return writer


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All records of a metrics file, skipping a torn last line left by a kill."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
