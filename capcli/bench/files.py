"""The caption command on a folder of full-size JPEGs: reading overlapped with captioning, or not.

``capcli benchmark --sections caption_files`` writes ``benchmark.caption_files`` JPEGs (the test
split's scenes at 1024 × 768, quality 90, as a camera folder would hold them) and times
:func:`capcli.inference.captioning.write_captions`, what ``capcli caption FOLDER`` runs after its
imports (listing the folder, loading the checkpoint, reading, resizing, beam search, writing the
lines), with ``caption.workers`` DataLoader workers reading the images ahead against none, the
two taking turns. Reading alone (the same loader and resize, no model) is timed too: it is what
the overlap can hide at most.
"""

from __future__ import annotations

import io
import os
from functools import partial
from pathlib import Path
from typing import Any

from PIL import Image

from capcli.bench.measure import interleaved, seconds_of
from capcli.inference.captioning import (
    ImageReader,
    checkpoint_image_size,
    expand_inputs,
    write_captions,
)
from capcli.settings import Settings, override

SIZE = (1024, 768)


def write_jpegs(split: Any, count: int, folder: Path) -> Path:
    """``count`` JPEGs of the split's images, in turn, upscaled to :data:`SIZE`; the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    images = split.select(range(min(count, len(split))))["image"]
    for i in range(count):
        value = images[i % len(images)]
        image = value if isinstance(value, Image.Image) else Image.open(
            value["path"] if value.get("path") else io.BytesIO(value["bytes"]))
        image.convert("RGB").resize(SIZE, Image.BICUBIC).save(folder / f"{i:05d}.jpg", quality=90)
    return folder


def default_workers() -> int:
    """One reader per core this process may use beyond the first, at least one and at most 4
    (``caption_items`` takes the readers' cores from the model's threads)."""
    return max(1, min(4, len(os.sched_getaffinity(0)) - 1))


def bench_caption_files(report: Any, settings: Settings, checkpoint: Path, test: Any, count: int, repeats: int,
                        work: Path) -> None:
    """``caption_files_images_per_s`` (read ahead by workers), ``caption_files_serial_images_per_s``
    (read between batches), their ratio ``caption_files_overlap_speedup``, and
    ``caption_files_read_images_per_s`` (reading alone)."""
    folder = write_jpegs(test, count, work / "caption-files")
    items = expand_inputs([str(folder)])
    workers = settings.caption.workers or default_workers()
    quiet = {"runtime.quiet": True}
    overlapped = override(settings, {**quiet, "caption.workers": workers})
    serial = override(settings, {**quiet, "caption.workers": 0})

    def caption(options: Settings) -> None:
        out = io.StringIO()
        if write_captions(items, checkpoint, options, out=out) or out.getvalue().count("\n") != len(items):
            raise RuntimeError("benchmark: not every image of the caption_files folder was captioned")

    reader = ImageReader(items, checkpoint_image_size(checkpoint), settings.data.max_pixels)
    fast, slow, read = interleaved([partial(seconds_of, partial(caption, overlapped)),
                                    partial(seconds_of, partial(caption, serial)),
                                    partial(seconds_of, lambda: [reader[i] for i in range(len(reader))])], repeats)
    report.add("caption_files_images_per_s", [len(items) / t for t in fast])
    report.add("caption_files_serial_images_per_s", [len(items) / t for t in slow])
    report.add("caption_files_overlap_speedup", [s / f for f, s in zip(fast, slow, strict=True)])
    report.add("caption_files_read_images_per_s", [len(items) / t for t in read])
    report.context.update(caption_files=len(items), caption_files_size=list(SIZE), caption_files_workers=workers,
                          caption_files_beams=settings.caption.decode.beams,
                          caption_files_batch=settings.caption.batch_size)
