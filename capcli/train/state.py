"""The training state a checkpoint saves: the loop's counters and the random number generators'
states, so that a resumed run draws what the uninterrupted one would have drawn."""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch


@dataclass
class TrainingState:
    """Everything the loop counts: saved in ``state.pt`` (as plain keys beside the optimizer's
    state) and restored by ``--resume``."""

    step: int = 0  # optimizer steps taken
    epoch: int = 0
    batch_in_epoch: int = 0  # this rank's micro-batches of the epoch consumed
    samples: int = 0  # trained on, over all ranks
    skipped: int = 0  # unreadable samples dropped
    best_val_loss: float = math.inf  # of the objective's monitor
    bad_validations: int = 0  # since the best one, for early stopping
    first_val: dict[str, float] = field(default_factory=dict)  # the validation before training
    bad_steps: int = 0  # non-finite steps whose update was dropped

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> TrainingState:
        """The counters of a saved state; a key an older checkpoint lacks keeps its default."""
        return cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})


def seed_rng(seed: int, rank: int) -> None:
    """The generators of a new run."""
    random.seed(seed)
    if rank > 0:  # each rank its own dropout masks, as one process's rows would have
        torch.manual_seed(seed * 1_000_003 + rank)


def rng_state() -> dict[str, Any]:
    """This process's generators, as a checkpoint saves them."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a saved state may come back with lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value


def restore_rng(rng: dict[str, Any] | list[dict[str, Any]], rank: int, world_size: int) -> None:
    """Put back the generators a checkpoint saved: this rank's own, where it saved one per rank."""
    if isinstance(rng, list):  # one state per rank of the run that saved it
        rng = rng[rank] if len(rng) == world_size else rng[0]
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
