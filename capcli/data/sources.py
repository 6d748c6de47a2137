"""Data sources, named by a spec string: ``synthetic`` or ``imagefolder:PATH`` (DESIGN §5).

Each source returns named splits as Hugging Face ``datasets`` with two columns the rest of
capcli relies on: ``image`` (left undecoded, so capcli's own safe loader decodes it) and
``captions`` (a list of strings), plus any others the source has (``scene`` for
synthetic). New sources register themselves in ``SOURCES``.
"""

from __future__ import annotations

import glob
import os
import re
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


def concept_words(spec: str) -> tuple[str, ...]:
    """The words a source's captions use for what an image shows, for the concept head; () when it does not know them.

    ``synthetic``: its six shapes, eight colours and two sizes, each a word of its own. Separate
    factors, not colour-shape pairs ("red circle"): a pair is a label of its own that the head
    can only memorise, and test_novel's pairs never occur in training; read from each patch
    (``model.concept_source`` patches), the factors of one object meet at its place in the image.
    """
    if spec == "synthetic":
        from capcli.scenes.vocabulary import COLOURS, SHAPES, SIZES

        return (*SHAPES, *COLOURS, *SIZES)
    return ()


def load_splits(settings: DataSettings) -> Splits:
    """Load the source named by ``settings.source`` and cut each split to its size limit."""
    kind, _, arg = settings.source.partition(":")
    if kind not in SOURCES:
        raise ConfigError(f"unknown data source '{settings.source}' (allowed: {', '.join(f'{k}[:ARG]' for k in SOURCES)})")
    if settings.streaming and kind != "hf":
        raise ConfigError(f"data.streaming applies to hf: sources, not '{settings.source}'")
    splits = SOURCES[kind](arg, settings)
    limits = {"train": settings.train_size, "val": settings.val_size,
              "test": settings.test_size, "test_novel": settings.test_size}
    splits = {name: split if isinstance(split, datasets.IterableDataset)  # a stream is limited by its source
              else split.select(range(min(len(split), limits.get(name, len(split)))))
              for name, split in splits.items()}
    train = splits.get("train")
    if train is None or (not isinstance(train, datasets.IterableDataset) and len(train) == 0):
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
    for path in named.values():
        check_metadata(path)
    # One load per folder: a single call would demand the same inferred metadata schema in every split.
    splits = {
        name: _group_by_file(_standardise(datasets.load_dataset("imagefolder", data_files=str(path / "**"),
                                                                split="train"), settings, path))
        for name, path in named.items()
    }
    return _ensure_eval_splits(splits, settings)


HUB_HELP = ("go online once so it is cached, set HF_HOME to a cache that holds it, "
            "or pass a local path (hf:DIR, or disk:PATH for a save_to_disk copy)")


@source("hf")
def _hf(arg: str, settings: DataSettings) -> Splits:
    """``datasets.load_dataset(NAME, CONFIG)``: a hub name (or its cache), or a local dataset folder."""
    name, _, config = arg.partition(":")
    if not name:
        raise ConfigError("hf: needs a dataset name or folder (hf:NAME[:CONFIG])")
    try:
        loaded = datasets.load_dataset(name, config or None, streaming=settings.streaming)
    except Exception as err:  # noqa: BLE001 - the hub, the cache and the builders raise many types
        raise ConfigError(f"cannot load dataset '{arg}' ({type(err).__name__}: {first_line(err)}); {HUB_HELP}") from None
    if settings.streaming:
        return _streamed(dict(loaded), settings, f"hf:{arg}")
    return _named(dict(loaded), settings, f"hf:{arg}")


def _streamed(raw: dict[str, datasets.IterableDataset], settings: DataSettings, where: str) -> Splits:
    """A streamed source: train stays a stream (the engine reads ``train_size`` samples of it an
    epoch); val and test, which are read whole and often, are their streams' first rows, kept in
    memory. A stream cannot be carved (its rows split across ranks and workers by shard, so no
    held-out head could be skipped reliably): the source must bring its own validation split."""
    raw = _pick_train(raw, settings, where)
    named = {_SPLIT_ALIASES.get(k, k): v for k, v in raw.items()}
    if "val" not in named:
        raise ConfigError(f"{where} has no validation split to stream (found: {', '.join(raw)}); a stream "
                          f"cannot be carved: use a source with one, or load it without --streaming")
    splits: Splits = {"train": _standardise(named["train"], settings, where)}
    for name, size in (("val", settings.val_size), ("test", settings.test_size)):
        if name in named and size:
            head = _standardise(named[name], settings, where)
            splits[name] = datasets.Dataset.from_list(list(head.take(size)), features=head.features)
    return splits


@source("disk")
def _disk(arg: str, settings: DataSettings) -> Splits:
    """``datasets.load_from_disk(PATH)``: a Dataset or DatasetDict written by ``save_to_disk``."""
    try:
        loaded = datasets.load_from_disk(str(Path(arg).expanduser()))
    except Exception as err:  # noqa: BLE001 - FileNotFoundError if missing, others if foreign
        raise ConfigError(f"disk: '{arg}' is not a dataset saved with save_to_disk "
                          f"({type(err).__name__}: {first_line(err)})") from None
    splits = {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)
    return _named(splits, settings, f"disk:{arg}")


_WDS_IMAGE_KEYS = ("jpg", "jpeg", "png", "webp")
_WDS_CAPTION_KEYS = ("txt", "caption", "json")


@source("wds")
def _wds(arg: str, settings: DataSettings) -> Splits:
    """WebDataset tar shards: ``wds:shards/{000..099}.tar`` or a glob; ``jpg``/``png`` images with
    ``txt`` or ``json`` (its ``caption`` field) captions, read by datasets' ``webdataset`` builder."""
    files = sorted({f for pattern in expand_braces(arg) for f in glob.glob(str(Path(pattern).expanduser()))})
    if not files:
        raise ConfigError(f"wds: no tar shard matches '{arg}' (use wds:PATTERN, e.g. wds:shards/{{000..099}}.tar)")
    try:
        split = datasets.load_dataset("webdataset", data_files={"train": files}, split="train")
    except Exception as err:  # noqa: BLE001 - a foreign or broken tar raises many types
        raise ConfigError(f"wds: cannot read the shards of '{arg}' ({type(err).__name__}: {first_line(err)})") from None
    image = settings.image_column or next((k for k in _WDS_IMAGE_KEYS if k in split.column_names), None)
    caption = settings.caption_column or next((k for k in _WDS_CAPTION_KEYS if k in split.column_names), None)
    if caption == "json" and settings.caption_column is None:
        split = split.map(lambda row: {"caption": (row["json"] or {}).get("caption")}, remove_columns=["json"])
        caption = "caption"
    settings = settings.model_copy(update={"image_column": image, "caption_column": caption})
    return _named({"train": split}, settings, f"wds:{arg}")


def expand_braces(pattern: str) -> list[str]:
    """WebDataset's shard notation: ``a{000..002}b`` → ``a000b a001b a002b`` (zero padding kept)."""
    match = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not match:
        return [pattern]
    first, last = match.group(1), match.group(2)
    width = len(first) if first.startswith("0") else 0
    head, tail = pattern[: match.start()], pattern[match.end() :]
    return [p for i in range(int(first), int(last) + 1) for p in expand_braces(f"{head}{i:0{width}d}{tail}")]


def _pick_train(raw: dict, settings: DataSettings, where: str) -> dict:
    """The source's splits, with ``data.train_split`` (``--split``) renamed to ``train``."""
    if settings.train_split is None:
        return raw
    if settings.train_split not in raw:
        raise ConfigError(f"{where} has no split '{settings.train_split}' (found: {', '.join(raw)}); "
                          f"set data.train_split (--split)")
    return {"train": raw[settings.train_split],
            **{k: v for k, v in raw.items() if k not in ("train", settings.train_split)}}


def _named(raw: Splits, settings: DataSettings, where: str) -> Splits:
    """Standardise a loaded dataset's splits and name them capcli's way (validation → val)."""
    raw = _pick_train(raw, settings, where)
    splits: Splits = {}
    for name, split in raw.items():
        ours = _SPLIT_ALIASES.get(name, name)
        if ours in SPLITS:
            splits[ours] = _standardise(split, settings, where)
    if "train" not in splits:
        raise ConfigError(f"{where} has no train split (found: {', '.join(raw) or 'none'})")
    return _ensure_eval_splits(splits, settings)


def first_line(err: BaseException) -> str:
    """The first line of an error's message, cut to 160 characters: enough to say what failed."""
    return (str(err).splitlines() or [""])[0][:160]


def _group_by_file(split: datasets.Dataset) -> datasets.Dataset:
    """Rows naming the same image file become one row with all their captions, in file order:
    metadata may give an image once per caption (as COCO's annotation files do)."""
    first: dict[str, int] = {}
    captions: dict[str, list[str]] = {}
    for i, (image, caps) in enumerate(zip(split["image"], split["captions"], strict=True)):
        first.setdefault(image["path"], i)
        captions.setdefault(image["path"], []).extend(caps)
    if len(first) == len(split):
        return split
    return split.select(sorted(first.values())).map(lambda row: {"captions": captions[row["image"]["path"]]})


def check_metadata(folder: Path) -> None:
    """Refuse an image folder's metadata before ``datasets`` reads it: every ``metadata.jsonl`` line
    a JSON object, and every ``file_name`` (``metadata.csv`` too) a relative path inside the folder.

    A row naming ``../../etc/passwd`` or an absolute path would make a training set of files
    outside the folder a user handed over; a broken line would fail deep inside ``datasets``.

    Raises:
        ConfigError: naming the file, the line and what is wrong with it.
    """
    import csv
    import json

    jsonl, table = folder / "metadata.jsonl", folder / "metadata.csv"
    rows: list[tuple[str, int, object]] = []
    try:
        if jsonl.is_file():
            with jsonl.open(encoding="utf-8") as f:
                for number, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except (json.JSONDecodeError, RecursionError) as err:
                        raise ConfigError(f"{jsonl} line {number}: not valid JSON ({err})") from None
                    if not isinstance(row, dict):
                        raise ConfigError(f"{jsonl} line {number}: a row must be a JSON object, "
                                          f"not {type(row).__name__}")
                    rows.append((jsonl.name, number, row))
        if table.is_file():
            with table.open(encoding="utf-8", newline="") as f:
                for number, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                    rows.append((table.name, number, row))
    except UnicodeDecodeError as err:
        raise ConfigError(f"{folder}: its metadata is not UTF-8 text (byte {err.start})") from None
    except csv.Error as err:
        raise ConfigError(f"{table}: not valid CSV ({err})") from None
    root = folder.resolve()
    for name, number, row in rows:
        where = f"{folder / name} line {number}"
        # datasets' convention: the image's path is under file_name, or a key ending in _file_name
        named = [v for k, v in row.items() if isinstance(k, str) and (k == "file_name" or k.endswith("_file_name"))]
        names = [n for v in named for n in (v if isinstance(v, list) else [v])]
        if not names or not all(isinstance(n, str) and n.strip() for n in names):
            raise ConfigError(f"{where}: no file_name (each row names its image file, relative to the folder)")
        for file_name in names:
            _check_file_name(file_name, where, folder, root)


def _check_file_name(file_name: str, where: str, folder: Path, root: Path) -> None:
    """Refuse a metadata file name that is absolute or leads out of ``folder`` (``root``: it resolved)."""
    if "\0" in file_name:
        raise ConfigError(f"{where}: file_name holds a NUL character")
    relative = Path(file_name)
    if relative.is_absolute() or file_name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", file_name):
        raise ConfigError(f"{where}: file_name {file_name!r} is an absolute path; name files relative to {folder}")
    try:
        inside = (root / relative).resolve().is_relative_to(root)
    except (OSError, RuntimeError, ValueError):
        inside = False
    if not inside or ".." in relative.parts:
        raise ConfigError(f"{where}: file_name {file_name!r} points outside {folder}; "
                          f"the metadata may name only files inside its folder")


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
