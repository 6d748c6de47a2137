"""Checkpoint directories: atomic writes, safe loads, and resolving what a user pointed at.

A checkpoint is a directory (DESIGN §7): the model's own files (``model.safetensors``,
``model.json``, tokenizer files) plus ``state.pt`` with the training state. ``state.pt``
holds only tensors and plain Python values and is loaded with ``weights_only=True``, so
nothing is unpickled from a file a user was handed.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import sys
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from capcli import faults
from capcli.errors import CheckpointError, ConfigError

STATE_FILE = "state.pt"
_WEIGHTS_FILE = "model.safetensors"  # the model's (Captioner.save_pretrained)
_OLD_PREFIX = ".old-"
# Where a command with no --checkpoint looks, in order: aligned beats pretrained (DESIGN §9).
DEFAULT_RUNS: tuple[Path, ...] = (Path("runs/align"), Path("runs/pretrain"))


class Checkpointable(Protocol):
    """A model that writes and reads its own files (weights, architecture, tokenizer)."""

    def save_pretrained(self, directory: Path) -> None: ...
    def load_weights(self, directory: Path) -> None: ...


class Described:
    """The model as ``save_checkpoint`` writes it, with the phase's own files added to each checkpoint."""

    def __init__(self, model: nn.Module, describe: Callable[[Path, dict[str, Any]], None] | None,
                 state: dict[str, Any]):
        self.model, self.describe, self.state = model, describe, state

    def save_pretrained(self, directory: Path) -> None:
        self.model.save_pretrained(directory)
        if self.describe is not None:
            self.describe(Path(directory), self.state)


def save_checkpoint(directory: Path, model: Checkpointable, state: dict[str, Any],
                    same_as: Path | None = None) -> Path:
    """Write a checkpoint so that a kill at any moment leaves a loadable one behind.

    The new checkpoint is written into a temporary sibling, then swapped in with two
    renames. Between them only the previous checkpoint exists, under ``.old-<name>``,
    and ``resolve_checkpoint`` falls back to it. Temporary folders left by a write that
    was killed are removed first (one run writes a run directory: ``runlock``).

    ``same_as`` names a checkpoint just written from this same model and ``state`` (``best``
    and then ``last`` at one step): its weights and training state, the large files (a
    full-size model with its optimizer is gigabytes), are hard-linked instead of written
    again, and its other files copied. Neither large file is ever changed in place, so the two
    checkpoints stay independent; where the file system has no hard links they are copied.

    Raises:
        CheckpointError: the write failed (a full disk, a read-only folder); the message
            names the folder and the reason, and the previous checkpoint is left as it was.
    """
    directory = Path(directory)
    for stale in directory.parent.glob(f".tmp-{directory.name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = None
    old = directory.parent / f"{_OLD_PREFIX}{directory.name}"
    try:
        directory.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".tmp-{directory.name}-"))
        faults.point("checkpoint.start")
        if same_as is None:
            model.save_pretrained(tmp)
            faults.point("checkpoint.weights")
            torch.save(state, tmp / STATE_FILE)
        else:
            _same_files(Path(same_as), tmp)
            faults.point("checkpoint.weights")
        faults.point("checkpoint.state")
        if old.exists() and directory.exists():
            shutil.rmtree(old)  # a stale backup from an earlier kill; the current one is complete
        if directory.exists():
            directory.rename(old)
        faults.point("checkpoint.between")
        tmp.rename(directory)
        faults.point("checkpoint.after")
        shutil.rmtree(old, ignore_errors=True)
    except Exception as err:
        _undo(tmp, old, directory)
        raise CheckpointError(f"cannot write the checkpoint {directory}: {_write_failure(err, directory.parent)}; "
                              f"the previous checkpoint there is unchanged") from err
    except BaseException:
        _undo(tmp, old, directory)
        raise
    return directory


def _same_files(source: Path, target: Path) -> None:
    """Fills ``target`` with ``source``'s files: the weights and the training state hard-linked
    (copied where the file system has no links), the small files copied, so that a later edit of
    one checkpoint's card (evaluate adds its results) leaves the other's as it was."""
    for path in source.iterdir():
        if path.is_dir():
            shutil.copytree(path, target / path.name)
            continue
        if path.name in (_WEIGHTS_FILE, STATE_FILE):
            try:
                os.link(path, target / path.name)
                continue
            except OSError:
                pass
        shutil.copy2(path, target / path.name)


def _undo(tmp: Path | None, old: Path, directory: Path) -> None:
    """After a failed write: remove its temporary folder, and put the previous checkpoint back
    under its own name if it had already been moved aside."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    if old.exists() and not directory.exists():
        try:
            old.rename(directory)
        except OSError:
            pass  # it stays loadable under its backup name


def _write_failure(err: Exception, folder: Path) -> str:
    """Why a write failed, in words: the OS's reason, or (torch hides it behind its own message)
    a full disk when the folder's file system has no room left."""
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    try:
        if shutil.disk_usage(folder).free < 1024 * 1024:
            return "No space left on device"
    except OSError:
        pass
    return first_line(err)


def first_line(err: BaseException) -> str:
    """The first line of an error's message (or its type), cut to 200 characters."""
    return ((str(err).strip().splitlines() or [type(err).__name__])[0])[:200]


def load_state(directory: Path) -> dict[str, Any]:
    """The training state of a checkpoint, read with ``weights_only=True``: a pickled object that
    is not plain tensors and values is refused, never executed.

    Raises:
        CheckpointError: ``state.pt`` is missing, damaged or holds anything else.
    """
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a checkpoint without its training state cannot be resumed)")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - torch raises UnpicklingError, RuntimeError, EOFError...
        raise CheckpointError(f"{path}: cannot be read as a training state ({type(err).__name__}: "
                              f"{first_line(err)})") from None


def resolve_checkpoint(path: Path, which: str = "best") -> Path:
    """Turn what a user passed into a checkpoint directory, checked to be complete.

    Accepts a checkpoint directory, or a run directory (meaning ``checkpoints/<which>``).
    If a write was killed between its two renames, the previous checkpoint is found under
    its backup name and used.

    Raises:
        ConfigError: no checkpoint there (exit 2: the user named a wrong path).
        CheckpointError: one is there but damaged (``check_checkpoint`` names the file).
    """
    path = Path(path)
    for candidate in (path, path / "checkpoints" / which):
        if (candidate / "model.json").is_file():
            check_checkpoint(candidate)
            return candidate
        backup = candidate.parent / f"{_OLD_PREFIX}{candidate.name}"
        if (backup / "model.json").is_file():
            check_checkpoint(backup)
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


# ---------------------------------------------------------------------------- integrity

_TOKENIZER_SETS = (("tokenizer.json",), ("vocab.json", "merges.txt"))


def check_checkpoint(directory: Path, state: bool = False) -> None:
    """Check that a checkpoint directory is complete, without unpickling or building anything.

    Reads ``model.json`` (a JSON object with every architecture key and a known preset), the
    header of ``model.safetensors`` (well formed, and the file as long as the header says),
    the tokenizer files, and with ``state`` the archive of ``state.pt`` (every member's CRC).
    Flipped bits inside the weights are not detected: safetensors keeps no checksum.

    Raises:
        CheckpointError: naming the first file that is missing or damaged, and how.
    """
    directory = Path(directory)
    problem = (_config_problem(directory / "model.json") or _weights_problem(directory / "model.safetensors")
               or _tokenizer_problem(directory) or (state and _state_problem(directory / STATE_FILE)))
    if problem:
        raise CheckpointError(f"damaged checkpoint {directory}: {problem}")


def _config_problem(path: Path) -> str | None:
    from dataclasses import MISSING, fields

    from capcli.model.captioner import CaptionerConfig
    from capcli.model.presets import PREFIX_LENGTH

    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path.name} is not valid JSON ({first_line(err)})"
    if not isinstance(config, dict):
        return f"{path.name} must hold a JSON object, not {type(config).__name__}"
    needed = [f.name for f in fields(CaptionerConfig) if f.default is MISSING and f.default_factory is MISSING]
    missing = [key for key in needed if key not in config]
    if missing:
        return f"{path.name} lacks {', '.join(missing)}"
    known = {f.name for f in fields(CaptionerConfig)}
    unknown = sorted(set(config) - known)
    if unknown:
        return f"{path.name} has unknown keys {', '.join(unknown)} (written by a newer capcli?)"
    if config["preset"] not in PREFIX_LENGTH:
        return f"{path.name} names an unknown preset {config['preset']!r} (known: {', '.join(PREFIX_LENGTH)})"
    return None


def _weights_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header of tensor offsets, then the data."""
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            (length,) = struct.unpack("<Q", head)
            if length > min(size - 8, 100 * 1024 * 1024):
                return f"{path.name} is truncated or not a safetensors file (header of {length} bytes, file of {size})"
            header = json.loads(f.read(length))
    except FileNotFoundError:
        return f"{path.name} is missing"
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"{path.name} has a damaged header ({first_line(err)})"
    try:
        end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError, ValueError, AttributeError):
        return f"{path.name} has a damaged header (no tensor offsets)"
    if size < 8 + length + end:
        return f"{path.name} is truncated ({size} bytes of {8 + length + end})"
    return None


def _tokenizer_problem(directory: Path) -> str | None:
    if not (directory / "tokenizer_config.json").is_file():
        return "tokenizer_config.json is missing (the tokenizer files are written with the weights)"
    if not any(all((directory / name).is_file() for name in names) for names in _TOKENIZER_SETS):
        return "the tokenizer files are missing (tokenizer.json, or vocab.json and merges.txt)"
    for name in ("tokenizer_config.json", "tokenizer.json"):
        if (directory / name).is_file():
            try:
                json.loads((directory / name).read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
                return f"{name} is not valid JSON ({first_line(err)})"
    return None


_STATE_CHECKED: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime): the answer, read once


def _state_problem(path: Path) -> str | None:
    """``torch.save`` writes a zip archive; a truncated, overwritten or foreign file is not one."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _STATE_CHECKED:
        try:
            with zipfile.ZipFile(path) as archive:
                bad = archive.testzip()
                names = archive.namelist()
            if bad is not None:
                _STATE_CHECKED[key] = f"{STATE_FILE} is damaged (member {bad} fails its CRC)"
            elif not any(name.endswith("/data.pkl") for name in names):
                _STATE_CHECKED[key] = f"{STATE_FILE} is not a torch.save archive (no data.pkl)"
            else:
                _STATE_CHECKED[key] = None
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as err:
            _STATE_CHECKED[key] = f"{STATE_FILE} is truncated or not a torch.save archive ({first_line(err)})"
    return _STATE_CHECKED[key]


_WARNED: set[tuple[Path, Path]] = set()


def resume_checkpoint(run_dir: Path) -> Path:
    """The checkpoint ``--resume`` continues from: the newest complete one of the run.

    ``checkpoints/last``, else its backup ``.old-last`` (a kill between the renames), else
    ``best`` (an earlier step of the same run: training repeats the steps after it exactly).
    A damaged ``last`` is passed over with a warning naming what is wrong with it.

    Raises:
        ConfigError: the run holds no checkpoint at all.
        CheckpointError: it holds some, and every one is damaged.
    """
    run_dir = Path(run_dir)
    folder = run_dir / "checkpoints"
    candidates = [folder / name for name in ("last", f"{_OLD_PREFIX}last", "best", f"{_OLD_PREFIX}best")]
    present = [c for c in candidates if c.is_dir() and any(c.iterdir())]
    if not present:
        raise ConfigError(f"--resume: no checkpoint to resume in {folder / 'last'}")
    problems = []
    for candidate in present:
        try:
            check_checkpoint(candidate, state=True)
        except CheckpointError as err:
            problems.append(str(err))
            continue
        if problems and (run_dir, candidate) not in _WARNED and os.environ.get("RANK", "0") == "0":
            _WARNED.add((run_dir, candidate))
            print(f"warning: {problems[0]}; resuming from {candidate} instead "
                  f"(the steps after it are trained again)", file=sys.stderr)
        return candidate
    raise CheckpointError(f"--resume: no complete checkpoint in {folder}: {'; '.join(problems)}")


def has_checkpoint(run_dir: Path) -> bool:
    """Whether a run directory holds a checkpoint ``--resume`` could start from (complete or not:
    ``resume_checkpoint`` checks it), including one a kill left under its backup name."""
    folder = Path(run_dir) / "checkpoints"
    return any((folder / name / "model.json").is_file() for name in ("last", f"{_OLD_PREFIX}last", "best",
                                                                     f"{_OLD_PREFIX}best"))
