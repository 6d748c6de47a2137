"""Data-parallel training under torchrun: the process group, and the few collectives capcli needs.

capcli writes no launcher. ``torchrun --nproc-per-node N -m capcli pretrain ...`` starts N
copies of the command and sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
variables; :func:`setup` sees them and joins the process group (NCCL on CUDA, gloo on the
CPU). Without them everything here is a no-op and capcli runs as one process.

- The engine wraps the model in DDP, shards each global batch across ranks, reduces the logged
  losses and validation sums, and lets rank 0 alone write (engine.py).
- The contrastive loss sees the global batch: :func:`gather_with_grad` all-gathers image and
  text embeddings with their gradients (open_clip's ``gather_with_grad``), so every rank
  computes the loss over all ranks' negatives.
"""

from __future__ import annotations

import atexit
import functools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from capcli.errors import ConfigError

# A rank that fails is stopped by torchrun, which then stops the others; this bounds how long a
# collective can wait for a peer that will never come, should that ever not happen.
COLLECTIVE_TIMEOUT = timedelta(minutes=10)


@dataclass(frozen=True)
class World:
    """This process's place: its rank among ``size`` processes, and its GPU on the node.

    ``distributed`` is true for any process torchrun started, even alone (``--nproc-per-node
    1``): it then runs the whole DDP path, which is how that path is checked on one GPU.
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, logs, progress and results."""
        return self.rank == 0


def launched() -> World:
    """The place torchrun gave this process (from its environment), or a world of one."""
    try:
        return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)),
                     int(os.environ.get("LOCAL_RANK", 0)), distributed="WORLD_SIZE" in os.environ)
    except ValueError:
        raise ConfigError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None


def setup(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group if torchrun started this process; return the world and this rank's device.

    Idempotent. On CUDA each rank takes GPU ``LOCAL_RANK``; on the CPU all ranks share it.
    """
    world = launched()
    if not world.distributed:
        return world, device
    if device.type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {world.local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                              f"start at most that many processes per node")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    elif device.type != "cpu":
        raise ConfigError(f"distributed training runs on cuda (NCCL) or cpu (gloo), not {device.type}")
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT,
                                device_id=device if device.type == "cuda" else None)
        _patient_group()  # now, while every rank is here: creating a group is itself a collective
        atexit.register(_shutdown)
    return world, device


def _shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    """The world of the joined process group, or a world of one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)), distributed=True)


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Every rank's rows of ``x``, in rank order, differentiable back to each rank's own rows.

    Returns the gathered (Σ B_r, ...) tensor and the row where this rank's rows start. Ranks
    may hold different numbers of rows (a batch that lost unreadable images, the last
    validation batch): each pads to the largest, and the padding is cut off after the gather.
    The backward of ``torch.distributed.nn.all_gather`` sums each chunk's gradient over the
    ranks, so with the same loss computed on every rank and DDP averaging the parameter
    gradients, the update equals one process's on the whole batch.
    """
    world = current()
    if not world.distributed:
        return x, 0
    from torch.distributed.nn.functional import all_gather

    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(world.size)]
    dist.all_gather(sizes, size)
    rows = [int(s) for s in sizes]
    padded = torch.nn.functional.pad(x, (0, 0) * (x.dim() - 1) + (0, max(rows) - x.shape[0]))
    chunks = all_gather(padded.contiguous())
    return torch.cat([chunk[:n] for chunk, n in zip(chunks, rows, strict=True)]), sum(rows[: world.rank])


def all_sum(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over the ranks (one collective for the whole list)."""
    if not current().distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def all_objects(obj: object) -> list[object]:
    """Every rank's ``obj``, in rank order (picklable objects, such as RNG states)."""
    world = current()
    if not world.distributed:
        return [obj]
    out: list[object] = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if current().distributed:
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Rank 0 runs the block first (materialising or downloading data, say), then the others find it done.

    The wait has no 10-minute limit: preparing a large dataset the first time takes longer.
    """
    world = current()
    if world.distributed and not world.main:
        dist.barrier(group=_patient_group())
    yield
    if world.distributed and world.main:
        dist.barrier(group=_patient_group())


@functools.cache
def _patient_group() -> dist.ProcessGroup:
    """A gloo group over all ranks whose collectives may wait a day (created once, on every rank alike)."""
    return dist.new_group(backend="gloo", timeout=timedelta(days=1))
