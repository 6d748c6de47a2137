"""What a phase hands the engine and what it gets back: the batch, objective and data
protocols, and the run's result."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.utils.data import Dataset

from capcli.train.sampler import EpochLayout, EpochLoader


class Batch(Protocol):
    """What a collate function must return: a sized batch that moves to a device."""

    skipped: int  # samples dropped while loading (unreadable images), counted against max_bad_fraction

    def __len__(self) -> int: ...
    def to(self, device: torch.device) -> Batch: ...


class Objective(Protocol):
    """Turns a batch into named losses. Keys ending in ``_loss`` are summed into the loss to
    minimise; other 0-d tensors are logged as metrics. ``progress`` runs from 0 to 1 over
    the phase's optimizer steps (for schedules such as align's α(t)). ``monitor`` names the
    validation value (lower is better) that picks the best checkpoint and drives early
    stopping: ``loss`` for most."""

    monitor: str

    def __call__(self, model: nn.Module, batch: Any, progress: float) -> dict[str, torch.Tensor]: ...


class EpochData(Protocol):
    """A training split, indexed or streamed: what the engine reads of it, epoch by epoch."""

    def __len__(self) -> int: ...
    def epoch_loader(self, epoch: int, start: int, layout: EpochLayout) -> EpochLoader: ...


@dataclass
class TrainData:
    """The datasets of a phase and how to batch them. ``val`` is indexed by ``SampleKey``."""

    train: EpochData
    val: Dataset | None
    collate: Callable[[list[Any]], Batch]
    num_workers: int = 0
    max_bad_fraction: float = 0.01


@dataclass
class FitResult:
    """What a finished (or early-stopped) run reports."""

    run_dir: Path
    steps: int = 0
    epochs: int = 0
    samples: int = 0
    seconds: float = 0.0
    stopped_early: bool = False
    train: dict[str, float] = field(default_factory=dict)  # means over the last logging window
    val: dict[str, float] = field(default_factory=dict)  # the last validation
    first_val: dict[str, float] = field(default_factory=dict)  # the validation before training
    best_val_loss: float = math.inf
    best_checkpoint: Path | None = None
    skipped: int = 0
