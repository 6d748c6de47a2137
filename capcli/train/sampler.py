"""The order in which the engine visits data: a pure function of (seed, epoch).

Datasets are indexed by ``SampleKey(index, epoch)`` so that any per-sample randomness (which
of an image's captions to use) is a function of the same numbers. That is what makes a
resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch.utils.data import DataLoader, Dataset, Sampler


class SampleKey(NamedTuple):
    """What the sampler hands a dataset: the row, and the epoch for per-sample randomness."""

    index: int
    epoch: int


def micro_batches_per_epoch(n: int, batch_size: int, accum: int, world: int = 1) -> int:
    """Micro-batches each rank takes in an epoch of ``n`` samples: whole optimizer steps only."""
    return (n // (batch_size * accum * world)) * accum


def planned_steps(n: int, batch_size: int, accum: int, epochs: int, max_steps: int | None, world: int = 1) -> int:
    """Optimizer steps a run of ``n`` training samples takes if nothing stops it early."""
    total = micro_batches_per_epoch(n, batch_size, accum, world) // accum * epochs
    return min(total, max_steps) if max_steps else total


def planned_rows(n: int, batch_size: int, accum: int, seed: int, steps: int, world: int = 1) -> list[int]:
    """The rows, over all ranks, that the first ``steps`` optimizer steps visit (``StepBatchSampler``'s
    orders of epochs 0, 1, ...), sorted: all a per-row cache must hold for the run to train.

    A run shorter than an epoch visits fewer rows than the split has (align's default visits
    44% of its pairs), so a cache built for these alone costs that much less.
    """
    per_epoch = micro_batches_per_epoch(n, batch_size, accum, world) // accum
    rows: set[int] = set()
    epoch = 0
    while steps > 0 and per_epoch > 0:
        take = min(steps, per_epoch)
        rows.update(_order(n, seed, epoch)[: take * accum * world * batch_size])
        steps, epoch = steps - take, epoch + 1
    return sorted(rows)


def _order(n: int, seed: int, epoch: int) -> list[int]:
    """Epoch ``epoch``'s permutation of ``n`` rows: a pure function of (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=generator).tolist()


class StepBatchSampler(Sampler[list[SampleKey]]):
    """One epoch's micro-batches, in a seeded order, skipping those already consumed.

    Only whole optimizer steps are yielded: the tail that cannot fill ``batch_size × accum``
    (× ``world`` processes) is dropped, so every step sees the same number of samples.

    Under data parallelism every rank draws the same permutation and takes its own slice of
    each global micro-batch: rank r gets rows ``[r·B, (r+1)·B)`` of global micro-batch b of
    ``world·B`` rows. So ``world`` ranks of batch B visit exactly the samples, step by step,
    that one process of batch ``world·B`` visits. This is ``DistributedSampler`` with
    ``set_epoch``, plus two things it lacks: whole steps (it pads with repeated samples, which
    a contrastive batch must not have) and skipping the batches a resumed run has consumed.
    """

    def __init__(self, n: int, batch_size: int, accum: int, seed: int, epoch: int, skip_batches: int = 0,
                 rank: int = 0, world: int = 1):
        self.batch_size, self.epoch, self.rank, self.world = batch_size, epoch, rank, world
        self.order = _order(n, seed, epoch)
        self.num_batches = micro_batches_per_epoch(n, batch_size, accum, world)
        self.skip = skip_batches

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for b in range(self.skip, self.num_batches):
            start = (b * self.world + self.rank) * self.batch_size
            rows = self.order[start : start + self.batch_size]
            yield [SampleKey(i, self.epoch) for i in rows]


@dataclass(frozen=True)
class EpochLayout:
    """How the engine cuts an epoch into micro-batches, and how it loads them."""

    batch_size: int  # per micro-batch, per rank
    grad_accum: int  # micro-batches to an optimizer step
    seed: int
    rank: int = 0
    world: int = 1
    collate: Callable[[list[Any]], Any] | None = None
    num_workers: int = 0
    pin_memory: bool = False


@dataclass
class EpochLoader:
    """One epoch of a training split, from a given micro-batch on."""

    batches: Iterable[Any]  # this rank's collated micro-batches, those already consumed left out
    num_batches: int  # this rank's micro-batches in the whole epoch, those consumed included


class IndexedDataset(Dataset):
    """A map-style dataset indexed by ``SampleKey``: each epoch visits it in a seeded order
    (``StepBatchSampler``). A streamed split gives the same ``epoch_loader`` its own way."""

    def epoch_loader(self, epoch: int, start: int, layout: EpochLayout) -> EpochLoader:
        """The loader of epoch ``epoch`` from its micro-batch ``start`` on."""
        sampler = StepBatchSampler(len(self), layout.batch_size, layout.grad_accum, layout.seed, epoch, start,
                                   layout.rank, layout.world)
        loader = DataLoader(self, batch_sampler=sampler, collate_fn=layout.collate, num_workers=layout.num_workers,
                            pin_memory=layout.pin_memory)
        return EpochLoader(loader, sampler.num_batches)


def in_order(n: int, batch_size: int, rank: int = 0, world: int = 1) -> list[list[SampleKey]]:
    """Every row once, in order, for evaluation (the last batch may be short).

    With ``world`` processes the rows are cut into global batches of ``world × batch_size``,
    and rank r takes the r-th slice of each: the global batches are one process's batches of
    ``world × batch_size``. Every rank must get the same number of batches, none empty (a
    rank that skipped a batch would leave the others waiting in its collectives), so the last
    partial global batch is split evenly, or, when it has fewer rows than ranks, joined to
    the one before.

    Raises:
        ValueError: fewer rows than ranks.
    """
    if world == 1:
        return [[SampleKey(i, 0) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]
    if n < world:
        raise ValueError(f"{n} rows cannot give each of {world} processes a batch")
    step = batch_size * world
    starts = list(range(0, n, step))
    if n - starts[-1] < world and len(starts) > 1:
        starts.pop()  # too few rows left for every rank: the previous global batch takes them
    out = []
    for g, start in enumerate(starts):
        end = starts[g + 1] if g + 1 < len(starts) else n
        size = end - start
        lo, hi = start + size * rank // world, start + size * (rank + 1) // world
        out.append([SampleKey(i, 0) for i in range(lo, hi)])
    return out
