"""Given preference pairs: JSON lines, TRL-format datasets from the hub or disk, UltraFeedback.

Each reader registers itself with ``preferences.preference_source`` under its spec's kind
(``jsonl:``, ``hf:``, ``disk:``, ``ultrafeedback``) and returns splits with the columns of
``PAIR_FEATURES``; the module docstring of ``capcli.data.preferences`` describes the formats.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from capcli.data.preferences import (
    GIVEN,
    PAIR_FEATURES,
    PROBLEM,
    PairReport,
    clean_pairs,
    ensure_val,
    preference_source,
    subset_rows,
)
from capcli.data.sources import Splits, first_line
from capcli.errors import ConfigError
from capcli.settings import DataSettings

ULTRAFEEDBACK = "openbmb/UltraFeedback"
HUB_HELP = ("go online once so it is cached, set HF_HOME to a cache that holds it, "
            "or use a local copy with disk:PATH or jsonl:PATH")
_CONVERT_FEATURES = datasets.Features({**PAIR_FEATURES, PROBLEM: datasets.Value("string")})
_SPLIT_NAMES = {"train": "train", "train_prefs": "train", "val": "val", "validation": "val", "valid": "val",
                "dev": "val", "test": "test", "test_prefs": "test"}


@preference_source("jsonl", "jsonl:PATH")
def _jsonl(arg: str, data: DataSettings, caption_splits: Splits, report: PairReport) -> Splits:
    path = Path(arg).expanduser()
    if arg and path.is_dir():
        files = [(p, _SPLIT_NAMES[p.stem]) for p in sorted(path.glob("*.jsonl")) if p.stem in _SPLIT_NAMES]
    elif arg and path.is_file():
        files = [(path, None)]
    else:
        raise ConfigError(f"jsonl: '{arg}' is not a file or folder (use jsonl:PATH)")
    rows: dict[str, list[dict[str, Any]]] = {}
    for file, file_split in files:
        with open(file, "rb") as lines:
            for number, raw in enumerate(lines, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as err:
                    raise ConfigError(f"{file}:{number}: not UTF-8 text (byte {err.start} of the line)") from None
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ConfigError(f"{file}:{number}: not valid JSON ({err.msg})") from None
                if not isinstance(row, dict):
                    raise ConfigError(f"{file}:{number}: expected an object with 'chosen' and 'rejected'")
                split = file_split or _SPLIT_NAMES.get(str(row.get("split") or "train").lower())
                if split is None:
                    raise ConfigError(f"{file}:{number}: unknown split {row['split']!r} (use train, val or test)")
                rows.setdefault(split, []).append(_pair(row, file.parent))
    raw = {split: datasets.Dataset.from_list(r, features=_CONVERT_FEATURES) for split, r in rows.items()}
    return _given(raw, data, report, lambda split: split, f"jsonl:{arg}")


@preference_source("hf", "hf:NAME[:CONFIG]")
def _hub(arg: str, data: DataSettings, caption_splits: Splits, report: PairReport) -> Splits:
    name, _, config = arg.partition(":")
    if not name:
        raise ConfigError("hf: needs a dataset name (use hf:NAME[:CONFIG])")
    what = f"hf:{arg}"
    return _given(_load_hub(name, config or None), data, report, partial(_from_trl, what=what), what)


@preference_source("disk", "disk:PATH")
def _disk(arg: str, data: DataSettings, caption_splits: Splits, report: PairReport) -> Splits:
    what = f"disk:{arg}"
    return _given(_load_disk(arg, "disk"), data, report, partial(_from_trl, what=what), what)


@preference_source("ultrafeedback", "ultrafeedback[:NAME]")
def _ultrafeedback(arg: str, data: DataSettings, caption_splits: Splits, report: PairReport) -> Splits:
    name = arg or ULTRAFEEDBACK
    what = f"ultrafeedback:{name}"
    local = Path(name).expanduser()
    saved = (local / "dataset_dict.json").is_file() or (local / "state.json").is_file()
    raw = _load_disk(name, "ultrafeedback") if saved else _load_hub(name, None)

    def convert(split: datasets.Dataset) -> datasets.Dataset:
        if "completions" not in split.column_names:  # the binarised layout is TRL's
            return _from_trl(split, what)
        return split.map(_ultrafeedback_row, remove_columns=split.column_names, features=_CONVERT_FEATURES)

    return _given(raw, data, report, convert, what)


def _load_hub(name: str, config: str | None) -> Splits:
    try:
        loaded = datasets.load_dataset(name, config)
    except Exception as err:  # noqa: BLE001 - the hub, the cache and the builders raise many types
        raise ConfigError(
            f"cannot load preference dataset '{name}' ({type(err).__name__}: {first_line(err)}); {HUB_HELP}"
        ) from None
    return dict(loaded)


def _load_disk(path: str, kind: str) -> Splits:
    try:
        loaded = datasets.load_from_disk(str(Path(path).expanduser()))
    except Exception as err:  # noqa: BLE001 - FileNotFoundError if missing, others if foreign
        raise ConfigError(
            f"{kind}: '{path}' is not a dataset saved with save_to_disk ({type(err).__name__}: {first_line(err)})"
        ) from None
    return {"train": loaded} if isinstance(loaded, datasets.Dataset) else dict(loaded)


def _given(raw: Splits, data: DataSettings, report: PairReport,
           convert: Callable[[datasets.Dataset], datasets.Dataset], what: str) -> Splits:
    """Name, limit, convert, clean and complete the splits of a given pair dataset."""
    named: Splits = {}
    for name, split in raw.items():
        if name in _SPLIT_NAMES:
            named.setdefault(_SPLIT_NAMES[name], split)
    if "train" not in named:
        raise ConfigError(f"{what} has no train split (found: {', '.join(raw) or 'none'})")
    # Spare enough rows for a carved val before converting: conversion copies the images.
    limits = {"train": data.train_size + (0 if "val" in named else data.val_size),
              "val": data.val_size, "test": data.test_size}
    splits = {name: clean_pairs(convert(subset_rows(split, limits[name], data.seed, name)), report)
              for name, split in named.items() if limits[name] > 0}
    splits = ensure_val(splits, data)
    splits["train"] = subset_rows(splits["train"], data.train_size, data.seed, "train")
    return splits


def _from_trl(split: datasets.Dataset, what: str) -> datasets.Dataset:
    """TRL's preference format, with images left undecoded, to ``PAIR_FEATURES`` plus a problem."""
    missing = [c for c in ("chosen", "rejected") if c not in split.column_names]
    if missing:
        raise ConfigError(f"{what} has no {' or '.join(missing)} column (columns: {', '.join(split.column_names)}); "
                          "expected TRL's preference format: image(s), prompt, chosen, rejected")
    for column in ("image", "images"):
        feature = split.features.get(column)
        if isinstance(feature, datasets.Image):
            split = split.cast_column(column, datasets.Image(decode=False))
        elif isinstance(feature, (datasets.List, datasets.Sequence)) and isinstance(feature.feature, datasets.Image):
            split = split.cast_column(column, datasets.List(datasets.Image(decode=False)))
    return split.map(_pair, remove_columns=split.column_names, features=_CONVERT_FEATURES)


def _pair(row: dict[str, Any], base: Path | None = None) -> dict[str, Any]:
    """One given pair: the image (paths resolved against ``base``), the texts, and any problem."""
    image, problem = row.get("image"), ""
    images = row.get("images")
    if isinstance(images, list):
        problem = "multiple images" if len(images) > 1 else ""
        image = images[0] if images else None
    return {"image": _image(image, base), "prompt": _message_text(row.get("prompt"), "user"),
            "chosen": _message_text(row.get("chosen"), "assistant"),
            "rejected": _message_text(row.get("rejected"), "assistant"), "corruption": GIVEN, PROBLEM: problem}


def _image(value: Any, base: Path | None) -> dict[str, Any] | None:
    if isinstance(value, str):
        path = Path(value).expanduser()
        return {"bytes": None, "path": str(path if path.is_absolute() or base is None else base / path)}
    if isinstance(value, dict) and (value.get("bytes") is not None or value.get("path")):
        return {"bytes": value.get("bytes"), "path": value.get("path")}
    return None


def _message_text(value: Any, role: str) -> str:
    """The text of a plain string, or of the last ``role`` message of a chat (else its last message)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        value = [value]
    messages = [m for m in value if isinstance(m, dict)] if isinstance(value, list) else []
    said = [m for m in messages if m.get("role") == role] or messages
    if not said:
        return ""
    content = said[-1].get("content", said[-1].get("text"))
    if isinstance(content, list):  # parts: {"type": "text", "text": ...}, {"type": "image"}
        return " ".join(p["text"].strip() for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return content.strip() if isinstance(content, str) else ""


def _ultrafeedback_row(row: dict[str, Any]) -> dict[str, Any]:
    """openbmb/UltraFeedback: the best and the worst scored completion of an instruction."""
    scored = []
    for completion in row.get("completions") or []:
        try:
            score = float(completion.get("overall_score"))
        except (TypeError, ValueError):
            continue
        text = (completion.get("response") or "").strip()
        if text and not math.isnan(score):
            scored.append((score, text))
    best = max(scored, key=lambda s: s[0], default=None)
    worst = min(scored, key=lambda s: s[0], default=None)
    problem = ("too few responses" if len(scored) < 2 else "tied scores" if best[0] == worst[0] else "")
    return {"image": None, "prompt": (row.get("instruction") or "").strip(),
            "chosen": best[1] if best and not problem else "", "rejected": worst[1] if worst and not problem else "",
            "corruption": GIVEN, PROBLEM: problem}


# --- shared steps -----------------------------------------------------------------
