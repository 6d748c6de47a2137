"""AdamW and the cosine learning-rate schedule with linear warmup."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from capcli.errors import ConfigError
from capcli.settings import OptimizerSettings


def build_optimizer(model: nn.Module, settings: OptimizerSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases, gains and scalars do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter of the model is frozen")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    # The fused kernel updates every parameter in one pass; it exists for CUDA and the CPU.
    fused = settings.fused and device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=fused or None)


def cosine_with_warmup(total_steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup × total`` steps, then a cosine decay to ``min_ratio``."""
    warmup_steps = int(round(warmup * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


def build_scheduler(optimizer: torch.optim.Optimizer, settings: OptimizerSettings,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, settings.warmup, settings.min_lr_ratio)
    )
