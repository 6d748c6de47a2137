"""The preprocessing cache: each image decoded and resized once, then read back as uint8.

Decoding a PNG or JPEG and resizing it costs more than a small model's training step spends
on the image, and it is the same work every epoch and every phase. The cache keeps the
result, the (3, S, S) uint8 tensor the model reads, in one memory-mapped file per split and
resolution:

- ``<cache_dir>/pixels/<split fingerprint>-<S>px.u8``: the images, row i for sample i;
- ``...u8.filled``: one byte per row, set to 1 only after its row is written.

Rows fill as samples are first read, so the first epoch costs what an uncached one does and
the cache needs no pass of its own. The files are opened in each process on first use (never
pickled), so DataLoader workers and several runs share one cache: each writes whole rows and
marks them after, and a process killed between the two leaves a row that is simply read
again. Unreadable images are never marked, so they are retried, warned about and counted
every epoch, as without the cache.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from capcli import faults

BYTES_PER_GB = 1024**3


class PixelCache:
    """Rows of (3, size, size) uint8 pixels for the samples of one split, kept on disk.

    Args:
        path: the data file; ``path.filled`` holds the row marks.
        rows: the number of samples in the split.
        size: the model's input resolution.
    """

    def __init__(self, path: Path, rows: int, size: int):
        self.path, self.rows, self.size = Path(path), rows, size
        self._pixels: np.ndarray | None = None
        self._filled: np.ndarray | None = None

    @property
    def nbytes(self) -> int:
        return self.rows * 3 * self.size * self.size

    def get(self, index: int) -> torch.Tensor | None:
        """Row ``index`` as a fresh (3, S, S) uint8 tensor, or None when it was never filled."""
        self._open()
        if not self._filled[index]:
            return None
        return torch.from_numpy(np.array(self._pixels[index]))  # a copy: the map stays read-only to callers

    def put(self, index: int, pixels: torch.Tensor) -> None:
        """Write row ``index``, then mark it: a reader never sees a half-written row as filled."""
        self._open()
        self._pixels[index] = pixels.numpy()
        faults.point("pixel_cache.put")
        self._filled[index] = 1

    def filled(self) -> int:
        """How many rows hold an image."""
        self._open()
        return int(self._filled.sum())

    def _open(self) -> None:
        if self._pixels is None:
            self._pixels = _map(self.path, (self.rows, 3, self.size, self.size))
            self._filled = _map(self.path.with_name(self.path.name + ".filled"), (self.rows,))

    def __getstate__(self) -> dict:
        # A worker process maps the files itself; pickling a memmap would copy the whole array.
        return {**self.__dict__, "_pixels": None, "_filled": None}


def _map(path: Path, shape: tuple[int, ...]) -> np.ndarray:
    """A shared, writable map of a uint8 file, created (zero-filled) at the right size if needed.

    The file is grown in place and never truncated, so processes that open it at the same
    time cannot wipe each other's rows. Its blocks are reserved when it is created: a disk
    that fills up then fails here, with an error, instead of killing a process with SIGBUS
    when it first writes into a hole of the mapping.
    """
    size = int(np.prod(shape))
    faults.point("pixel_cache.create", path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size < size:
            if hasattr(os, "posix_fallocate"):
                os.posix_fallocate(fd, 0, size)
            else:  # macOS and Windows: a sparse file
                os.ftruncate(fd, size)
    finally:
        os.close(fd)
    return np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)


FORMAT = "v1"  # bump when the pixels a row holds change (resizing, cropping): old files are then not read


def pixel_cache_for(split, cache_dir: Path, size: int, max_gb: float) -> tuple[PixelCache | None, str]:
    """The cache of a ``datasets`` split at one resolution, or None and why there is none.

    None when the split has no fingerprint to name its file by (it is not a ``datasets``
    split), when its cache would exceed ``max_gb``, or when its file cannot be made (a full
    disk); the files are created here, in the calling process, so that failure is seen once.
    """
    fingerprint = getattr(split, "_fingerprint", None)
    if not fingerprint:
        return None, ""
    cache = PixelCache(Path(cache_dir) / "pixels" / f"{FORMAT}-{fingerprint}-{size}px.u8", len(split), size)
    if cache.nbytes > max_gb * BYTES_PER_GB:
        return None, f"{len(split)} images at {size}px exceed data.pixel_cache_max_gb {max_gb}"
    try:
        cache.filled()  # maps, and so creates, both files
    except OSError as err:
        return None, f"cannot make the pixel cache in {cache.path.parent} ({err.strerror or err})"
    return cache, ""
