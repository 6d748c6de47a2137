"""The order in which the engine visits data: a pure function of (seed, epoch).

Datasets are indexed by ``SampleKey(index, epoch)`` so that any per-sample randomness (which
of an image's captions to use) is a function of the same numbers. That is what makes a
resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch.utils.data import Sampler


class SampleKey(NamedTuple):
    """What the sampler hands a dataset: the row, and the epoch for per-sample randomness."""

    index: int
    epoch: int


class StepBatchSampler(Sampler[list[SampleKey]]):
    """One epoch's micro-batches, in a seeded order, skipping those already consumed.

    Only whole optimizer steps are yielded: the tail that cannot fill ``batch_size × accum``
    is dropped, so every step sees the same number of samples.
    """

    def __init__(self, n: int, batch_size: int, accum: int, seed: int, epoch: int, skip_batches: int = 0):
        self.batch_size, self.epoch = batch_size, epoch
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = torch.randperm(n, generator=generator).tolist()
        self.num_batches = (n // (batch_size * accum)) * accum
        self.skip = skip_batches

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for b in range(self.skip, self.num_batches):
            rows = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [SampleKey(i, self.epoch) for i in rows]


def in_order(n: int, batch_size: int) -> list[list[SampleKey]]:
    """Every row once, in order, for evaluation (the last batch may be short)."""
    return [[SampleKey(i, 0) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]
