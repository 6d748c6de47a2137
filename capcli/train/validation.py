"""Validation: the sample-weighted means of an objective's values over a split, on every rank."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader

from capcli.train import distributed
from capcli.train.contracts import Objective
from capcli.train.runtime import Runtime


def total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    """The sum of the keys ending in ``_loss``: what is minimised."""
    return sum(v for k, v in losses.items() if k.endswith("_loss"))


def validate(model: nn.Module, objective: Objective, loader: DataLoader, runtime: Runtime,
             progress: float) -> dict[str, float]:
    """Sample-weighted means of every value the objective returns, plus ``loss``, their sum.

    Under data parallelism each rank validates its shard and the sums are reduced over the
    ranks, so every rank gets the means over the whole split (and takes the same early-stopping
    decision).
    """
    sums: dict[str, float] = {}
    count = 0
    device = runtime.device
    with runtime.inference(model):
        for batch in loader:
            # Empty: every image of it unreadable. All ranks skip it together, or the others would
            # wait in its gathers (with one process the sum is this batch's own flag).
            if distributed.all_sum([float(len(batch) == 0)], device)[0] > 0:
                continue
            batch = batch.to(device)
            out = objective(model, batch, progress)
            for key, value in {"loss": total_loss(out), **out}.items():
                sums[key] = sums.get(key, 0.0) + float(value) * len(batch)
            count += len(batch)
    keys = sorted({k for ks in distributed.all_objects(list(sums)) for k in ks})  # a rank may have no batch
    *totals, count = distributed.all_sum([sums.get(k, 0.0) for k in keys] + [count], device)
    sums = dict(zip(keys, totals, strict=True))
    return {k: v / count for k, v in sums.items()} if count else {}
