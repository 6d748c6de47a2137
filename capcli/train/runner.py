"""What a training step calls: the objective as the forward of a module, so that DDP, which hooks
forward and backward, can wrap it; checkpoints save the bare model inside."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from capcli.train.contracts import Objective


def objective_runner(model: nn.Module, distributed: bool, device: torch.device) -> nn.Module:
    """``ObjectiveRunner(model)``, wrapped by DDP when the run is distributed."""
    runner: nn.Module = ObjectiveRunner(model)
    if distributed:
        runner = DistributedDataParallel(
            runner, device_ids=[device] if device.type == "cuda" else None,
            find_unused_parameters=True)  # text-only align pairs leave the image head unused
    return runner


class ObjectiveRunner(nn.Module):
    """The model, with ``objective(model, batch, progress)`` as its forward (what DDP wraps)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, objective: Objective, batch: Any, progress: float) -> dict[str, torch.Tensor]:
        return objective(self.model, batch, progress)
