"""``capcli caption``: files, folders, globs and stdin lists in; one line per image out, batch by batch.

:func:`expand_inputs` turns the command's arguments into an ordered list of images,
:func:`caption_items` loads them through the safe loader and decodes them a batch at a
time through the Python API (``api.ImageCaptioner``, one path for both), and
:func:`format_record` writes one result as text, TSV or JSON. Nothing here imports torch at
module level, so option errors answer at once.
"""

from __future__ import annotations

import contextlib
import glob
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from capcli.errors import CapcliError, CheckpointError, ConfigError

if TYPE_CHECKING:
    from capcli.api import ImageCaptioner
    from capcli.model.generation import DecodeSettings, ScoredCaption
    from capcli.settings import Settings

TSV_HEADER = ("path", "caption", "score", "logprob", "tokens")
# What a folder is searched for (case-insensitive); a file named on the command line is tried whatever its name.
IMAGE_SUFFIXES = frozenset({".bmp", ".gif", ".jpeg", ".jpg", ".png", ".tif", ".tiff", ".webp"})
_GLOB_CHARS = frozenset("*?[")
_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


@dataclass(frozen=True)
class Item:
    """One image to caption, named as the user will see it; ``problem`` when the input named none."""

    path: str
    problem: str | None = None


def expand_inputs(args: Sequence[str], stdin: TextIO | None = None) -> list[Item]:
    """The images the arguments name, in order.

    - ``-`` reads one path per line from ``stdin`` (blank lines skipped; each line is a file
      or a folder, taken literally, never as a glob).
    - An existing folder gives the images under it, recursively, sorted by path; names
      starting with ``.`` are skipped, and only files with an image suffix are taken.
    - A path that does not exist but holds ``*``, ``?`` or ``[`` is a glob (``**`` recurses),
      expanded here because a quoted pattern reaches us unexpanded; its matches are sorted.
    - Anything else is a file, tried whatever its name; a missing one fails when loaded.

    A folder with no images, a glob that matches nothing, or an empty stdin becomes an
    :class:`Item` with a ``problem``: it is reported, and the rest is still captioned.
    Duplicates are kept: an image named twice is captioned twice.

    Raises:
        ConfigError: no arguments, or ``-`` given more than once.
    """
    if not args:
        raise ConfigError("no images given: pass image files, folders or globs, or - to read paths from stdin")
    if list(args).count("-") > 1:
        raise ConfigError("- (read paths from stdin) can be given only once")
    items: list[Item] = []
    for arg in args:
        if arg == "-":
            lines = [line.rstrip("\r\n") for line in (stdin or sys.stdin)]
            paths = [line for line in lines if line.strip()]
            items += [item for line in paths for item in _expand_path(line)]
            if not paths:
                items.append(Item("<stdin>", "no paths were read from stdin"))
        elif not os.path.lexists(arg) and _GLOB_CHARS & set(arg):
            matches = sorted(glob.glob(arg, recursive=True))
            items += [item for match in matches for item in _expand_path(match)]
            if not matches:
                items.append(Item(arg, "no files match this pattern"))
        else:
            items += _expand_path(arg)
    return items


def _expand_path(path: str) -> list[Item]:
    if not os.path.isdir(path):
        return [Item(path)]
    found = []
    for root, dirs, files in os.walk(path):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found += [os.path.join(root, name) for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_SUFFIXES]
    if not found:
        allowed = ", ".join(sorted(IMAGE_SUFFIXES))
        return [Item(path, f"folder holds no images (looked for {allowed})")]
    return [Item(name) for name in sorted(found, key=lambda name: Path(os.path.relpath(name, path)).parts)]


def escape(field: str) -> str:
    """Backslash-escape ``\\``, tab, newline and CR, so a field never breaks a line or a column."""
    return field.translate(_ESCAPES)


def one_line(caption: str) -> str:
    """The caption with every run of whitespace (newlines included) made one space."""
    return " ".join(caption.split())


def _number(value: float) -> float | None:
    return round(value, 6) if math.isfinite(value) else None


def format_header(fmt: str) -> str | None:
    """The first line of the output: the column names for ``tsv``, nothing for the others."""
    return "\t".join(TSV_HEADER) if fmt == "tsv" else None


def format_record(fmt: str, path: str, caption: ScoredCaption) -> str:
    """One output line, without its newline.

    ``text``: ``path<TAB>caption``. ``tsv``: the :data:`TSV_HEADER` columns. ``jsonl``: an
    object with the same keys. In text and TSV, paths and captions are escaped with
    :func:`escape`; JSON escapes by itself. A non-finite score is ``null`` (JSON) or empty (TSV).
    """
    text = one_line(caption.text)
    if fmt == "text":
        return f"{escape(path)}\t{escape(text)}"
    score, logprob = _number(caption.score), _number(caption.logprob)
    if fmt == "jsonl":
        record = {"path": path, "caption": text, "score": score, "logprob": logprob, "tokens": caption.tokens}
        return json.dumps(record, ensure_ascii=False)
    cells = [escape(path), escape(text), "" if score is None else str(score),
             "" if logprob is None else str(logprob), str(caption.tokens)]
    return "\t".join(cells)


def report(message: str) -> None:
    """One line on stderr, printed cleanly above a progress bar when one is drawn."""
    from capcli.train.progress import stderr

    stderr.print(message, markup=False, highlight=False, emoji=False, soft_wrap=True)


def caption_items(
    items: Sequence[Item], load_model: Callable[[], ImageCaptioner], decode: DecodeSettings,
    batch_size: int, max_pixels: int, on_error: Callable[[str], None], image_size: int, workers: int = 0,
) -> Iterator[list[tuple[str, ScoredCaption]]]:
    """Caption images a batch at a time, in input order.

    Each batch holds ``batch_size`` images that loaded; an item that fails to load, or that
    named no image, is passed to ``on_error`` as ``"PATH: reason"`` and skipped. The model
    comes from ``load_model()`` (an ``ImageCaptioner``), called once, when the first image
    has loaded: a run where every input is bad never loads it. A last,
    possibly empty, batch is always yielded, so a caller sees every failure reported.

    With ``workers`` > 0, that many processes read and resize the images (a DataLoader, in
    order) while the model captions the batch before, so the two overlap instead of taking
    turns (a 1024 × 768 JPEG takes about 11 ms to read, its caption 25 ms with the tiny preset);
    the model's threads make room for them until the generator is closed.

    Yields:
        ``[(path, ScoredCaption), ...]`` for each decoded batch.
    """
    import torch

    model = None
    paths: list[str] = []
    pixels: list[torch.Tensor] = []

    def decode_batch() -> list[tuple[str, ScoredCaption]]:
        captions = model.caption_pixels(torch.stack(pixels), decode)
        out = list(zip(paths, captions, strict=True))
        paths.clear()
        pixels.clear()
        return out

    images = ImageReader(items, image_size, max_pixels)
    threads = torch.get_num_threads()
    if workers:
        from torch.utils.data import DataLoader

        # One image at a time, in order; each worker keeps a batch read ahead. The readers take
        # their cores from the model's threads: on 2 cores, 2 model threads beside a reader ran
        # slower than 2 threads alone (docs/performance.md).
        loaded = DataLoader(images, batch_size=None, num_workers=workers, prefetch_factor=batch_size)
        torch.set_num_threads(max(1, threads - workers))
    else:
        loaded = (images[i] for i in range(len(images)))
    try:
        for path, image, problem in loaded:
            if problem is not None:
                on_error(f"{escape(path)}: {problem}")
                continue
            if model is None:
                model = load_model()
            paths.append(path)
            pixels.append(image)
            if len(pixels) == batch_size:
                yield decode_batch()
        yield decode_batch() if pixels else []
    finally:
        torch.set_num_threads(threads)


class ImageReader:
    """The items as (path, (3, S, S) uint8 pixels, None), or (path, None, reason) where one cannot be read.

    A map-style dataset, so a DataLoader's workers can read it in order.
    """

    def __init__(self, items: Sequence[Item], image_size: int, max_pixels: int):
        self.items, self.image_size, self.max_pixels = list(items), image_size, max_pixels

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        from capcli.data.images import ImageLoadError, load_image, resize_center_crop

        item = self.items[index]
        if item.problem is not None:
            return item.path, None, item.problem
        try:
            image = load_image(item.path, max_pixels=self.max_pixels)
        except ImageLoadError as err:
            return item.path, None, err.reason
        return item.path, resize_center_crop(image, self.image_size), None


def checkpoint_image_size(checkpoint: Path) -> int:
    """The side of the images a checkpoint reads, from its ``model.json``, without loading its weights."""
    from capcli.model.captioner import CONFIG_FILE

    try:
        return int(json.loads((checkpoint / CONFIG_FILE).read_text())["vision"]["arch"]["image_size"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"cannot read the model configuration of checkpoint '{checkpoint}' "
                              f"({type(err).__name__}: {err})") from None


def load_captioner(checkpoint: Path, settings: Settings) -> ImageCaptioner:
    """The checkpoint, loaded through the Python API on the settings' device and precision."""
    from capcli.api import ImageCaptioner
    from capcli.train.runtime import Runtime

    return ImageCaptioner.load(checkpoint, max_pixels=settings.data.max_pixels,
                               runtime=Runtime.from_settings(settings.runtime))


def write_captions(items: Sequence[Item], checkpoint: Path, settings: Settings, out: TextIO | None = None) -> int:
    """Caption every item and write one line per captioned image to ``out`` (stdout), flushed per batch.

    The format, batch size and search are ``settings.caption``'s.

    Returns:
        How many items failed (each reported on stderr as ``error: PATH: reason``).
    """
    from capcli.train.progress import ProgressDisplay

    out = out or sys.stdout
    failed = 0

    def on_error(message: str) -> None:
        nonlocal failed
        failed += 1
        report(f"error: {message}")

    def emit(lines: list[str]) -> None:
        if not lines:
            return
        try:
            out.writelines(line + "\n" for line in lines)
            out.flush()
        except BrokenPipeError:  # the reader went away (`| head`)
            _silence_stdout()
            raise CapcliError("stdout was closed before every caption was written") from None

    options = settings.caption
    header = format_header(options.format)
    emit([header] if header is not None else [])
    done, shown, start = 0, 0, time.monotonic()
    batches = caption_items(items, lambda: load_captioner(checkpoint, settings), options.decode,
                            options.batch_size, settings.data.max_pixels, on_error,
                            checkpoint_image_size(checkpoint), options.workers)
    # Closed on the way out, whatever the way (a closed pipe, Ctrl-C): the readers stop and the
    # model's threads come back at once, not when the generator is collected.
    with ProgressDisplay("caption", len(items), quiet=settings.runtime.quiet) as progress, \
            contextlib.closing(batches):
        for batch in batches:
            emit([format_record(options.format, path, result) for path, result in batch])
            done += len(batch)
            if done + failed > shown:  # the last, empty batch may only count failures already shown
                shown = done + failed
                progress.update(shown, {"images/s": done / max(time.monotonic() - start, 1e-9), "failed": failed})
    return failed


def _silence_stdout() -> None:
    """Point stdout at /dev/null so Python's exit flush cannot raise BrokenPipeError again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass
