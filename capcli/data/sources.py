"""Data sources, named by a spec string: ``synthetic`` or ``imagefolder:PATH`` (DESIGN §5).

Each source returns named splits as Hugging Face ``datasets`` with two columns the rest of
capcli relies on: ``image`` (left undecoded, so capcli's own safe loader decodes it) and
``captions`` (a list of strings), plus any others the source has (``scene`` for
synthetic). New sources register themselves in ``SOURCES``.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import datasets

from capcli.errors import ConfigError, DataError
from capcli.settings import DataSettings

# Loading local folders is quick; the progress bars datasets draws for it would only be noise on stderr.
datasets.disable_progress_bars()
datasets.logging.set_verbosity_error()

SPLITS = ("train", "val", "test", "test_novel")
_SPLIT_ALIASES = {"validation": "val", "valid": "val", "dev": "val"}
_CAPTION_COLUMNS = ("captions", "caption", "text")

Splits = dict[str, datasets.Dataset]
SOURCES: dict[str, Callable[[str, DataSettings], Splits]] = {}


def source(name: str):
    """Register a loader for specs ``name`` or ``name:ARG``."""

    def register(loader: Callable[[str, DataSettings], Splits]):
        SOURCES[name] = loader
        return loader

    return register


def load_splits(settings: DataSettings) -> Splits:
    """Load the source named by ``settings.source`` and cut each split to its size limit."""
    kind, _, arg = settings.source.partition(":")
    if kind not in SOURCES:
        raise ConfigError(f"unknown data source '{settings.source}' (allowed: {', '.join(f'{k}[:ARG]' for k in SOURCES)})")
    splits = SOURCES[kind](arg, settings)
    limits = {"train": settings.train_size, "val": settings.val_size,
              "test": settings.test_size, "test_novel": settings.test_size}
    splits = {name: split.select(range(min(len(split), limits.get(name, len(split))))) for name, split in splits.items()}
    if len(splits.get("train", [])) == 0:
        raise DataError(f"data source '{settings.source}' has no training examples")
    return splits


def cache_root(settings: DataSettings) -> Path:
    """Where generated data lives: the setting, else ``$XDG_CACHE_HOME/capcli``, else ``~/.cache/capcli``."""
    if settings.cache_dir is not None:
        return Path(settings.cache_dir)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "capcli"


@source("synthetic")
def _synthetic(arg: str, settings: DataSettings) -> Splits:
    from capcli.data.synthetic import materialise

    if arg:
        raise ConfigError(f"the synthetic source takes no argument, got 'synthetic:{arg}'")
    sizes = {"train": settings.train_size, "val": settings.val_size,
             "test": settings.test_size, "test_novel": settings.test_size}
    folder = materialise(cache_root(settings), sizes, seed=settings.seed, image_size=settings.image_size or 64)
    return _imagefolder(str(folder), settings)


@source("imagefolder")
def _imagefolder(arg: str, settings: DataSettings) -> Splits:
    """Images with ``metadata.jsonl``/``.csv``; split sub-folders (train/, val/, test/...) if present."""
    root = Path(arg).expanduser()
    if not arg or not root.is_dir():
        raise ConfigError(f"imagefolder: '{arg}' is not a directory (use imagefolder:PATH)")
    subdirs = {_SPLIT_ALIASES.get(p.name, p.name): p for p in sorted(root.iterdir()) if p.is_dir()}
    named = {name: path for name, path in subdirs.items() if name in SPLITS and _has_metadata(path)}
    if not named:
        if not _has_metadata(root):
            raise ConfigError(f"imagefolder: {root} has no metadata.jsonl or metadata.csv naming the captions")
        named = {"train": root}
    # One load per folder: a single call would demand the same inferred metadata schema in every split.
    splits = {
        name: _standardise(datasets.load_dataset("imagefolder", data_files=str(path / "**"), split="train"),
                           settings, path)
        for name, path in named.items()
    }
    return _ensure_eval_splits(splits, settings)


def _has_metadata(folder: Path) -> bool:
    return (folder / "metadata.jsonl").is_file() or (folder / "metadata.csv").is_file()


def _standardise(split: datasets.Dataset, settings: DataSettings, where: Path) -> datasets.Dataset:
    """Rename to ``image``/``captions``, captions as a list, rows without a caption dropped."""
    image_col = settings.image_column or "image"
    caption_col = settings.caption_column or next((c for c in _CAPTION_COLUMNS if c in split.column_names), None)
    for wanted, what in ((image_col, "image"), (caption_col, "caption")):
        if wanted not in split.column_names:
            raise ConfigError(
                f"{where}: no {what} column '{wanted or '/'.join(_CAPTION_COLUMNS)}' "
                f"(columns: {', '.join(split.column_names)}); set data.{what}_column"
            )
    split = split.cast_column(image_col, datasets.Image(decode=False))
    if image_col != "image":
        split = split.rename_column(image_col, "image")
    split = split.map(lambda row: {"captions": _as_caption_list(row[caption_col])},
                      remove_columns=[caption_col] if caption_col != "captions" else [])
    return split.filter(lambda row: len(row["captions"]) > 0)


def _as_caption_list(value: object) -> list[str]:
    values = value if isinstance(value, list) else [value]
    return [str(v).strip() for v in values if v is not None and str(v).strip()]


def _ensure_eval_splits(splits: Splits, settings: DataSettings) -> Splits:
    """Carve val (and test) out of train, deterministically, when the source has none."""
    if "train" not in splits:
        raise ConfigError(f"data source '{settings.source}' has no train split (found: {', '.join(splits)})")
    for name, size in (("val", settings.val_size), ("test", settings.test_size)):
        if name in splits or size == 0:
            continue
        train = splits["train"]
        take = min(size, len(train) // 10)  # never more than a tenth of the training data
        if take == 0:
            continue
        parts = train.train_test_split(test_size=take, seed=settings.seed, shuffle=True)
        splits["train"], splits[name] = parts["train"], parts["test"]
    return splits
