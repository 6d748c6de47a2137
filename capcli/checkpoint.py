"""Checkpoint directories: atomic writes, safe loads, and resolving what a user pointed at.

A checkpoint is a directory (DESIGN §7): the model's own files (``model.safetensors``,
``model.json``, tokenizer files) plus ``state.pt`` with the training state. ``state.pt``
holds only tensors and plain Python values and is loaded with ``weights_only=True``, so
nothing is unpickled from a file a user was handed.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Protocol

import torch

from capcli.errors import ConfigError

STATE_FILE = "state.pt"
_OLD_PREFIX = ".old-"
# Where a command with no --checkpoint looks, in order: aligned beats pretrained (DESIGN §9).
DEFAULT_RUNS: tuple[Path, ...] = (Path("runs/align"), Path("runs/pretrain"))


class Checkpointable(Protocol):
    """A model that writes and reads its own files (weights, architecture, tokenizer)."""

    def save_pretrained(self, directory: Path) -> None: ...
    def load_weights(self, directory: Path) -> None: ...


def save_checkpoint(directory: Path, model: Checkpointable, state: dict[str, Any]) -> Path:
    """Write a checkpoint so that a kill at any moment leaves a loadable one behind.

    The new checkpoint is written into a temporary sibling, then swapped in with two
    renames. Between them only the previous checkpoint exists, under ``.old-<name>``,
    and ``resolve_checkpoint`` falls back to it.
    """
    directory = Path(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
    try:
        model.save_pretrained(tmp)
        torch.save(state, tmp / STATE_FILE)
        old = directory.parent / f"{_OLD_PREFIX}{directory.name}"
        if old.exists() and directory.exists():
            shutil.rmtree(old)  # a stale backup from an earlier kill; the current one is complete
        if directory.exists():
            directory.rename(old)
        tmp.rename(directory)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return directory


def load_state(directory: Path) -> dict[str, Any]:
    """The training state of a checkpoint, read with ``weights_only=True``."""
    return torch.load(Path(directory) / STATE_FILE, map_location="cpu", weights_only=True)


def resolve_checkpoint(path: Path, which: str = "best") -> Path:
    """Turn what a user passed into a checkpoint directory.

    Accepts a checkpoint directory, or a run directory (meaning ``checkpoints/<which>``).
    If a write was killed between its two renames, the previous checkpoint is found under
    its backup name and used.
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints" / which):
        if (candidate / "model.json").is_file():
            return candidate
        backup = candidate.parent / f"{_OLD_PREFIX}{candidate.name}"
        if (backup / "model.json").is_file():
            return backup
    raise ConfigError(f"no checkpoint at {path} (expected model.json there or in {path / 'checkpoints' / which})")


def default_checkpoint(runs: tuple[Path, ...] = DEFAULT_RUNS) -> Path:
    """The checkpoint a command uses when none is given: the best align checkpoint if
    ``runs/align`` holds one, else the best pretrain checkpoint (paths relative to the
    working directory).

    Raises:
        ConfigError: neither run holds a checkpoint; the message names what was looked for.
    """
    for run in runs:
        try:
            return resolve_checkpoint(run, "best")
        except ConfigError:
            continue
    looked = " or ".join(str(Path(run) / "checkpoints" / "best") for run in runs)
    raise ConfigError(f"no checkpoint given and none found (looked for {looked}); "
                      f"pass --checkpoint DIR, or train one with `capcli pretrain`")
