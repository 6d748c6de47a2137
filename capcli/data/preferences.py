"""Preference pairs for ``capcli align`` (DESIGN §5): from files, from the hub, or generated.

``load_preferences(spec, data, caption_splits)`` returns named splits (``train``, ``val`` and
sometimes ``test``) as ``datasets.Dataset`` with the columns of ``PAIR_FEATURES``:

- ``image``: undecoded, as the caption sources store it, or None for a text-only pair;
- ``prompt``: the instruction of a text-only pair, "" when there is none;
- ``chosen`` and ``rejected``: the preferred and the dispreferred text;
- ``corruption``: how ``rejected`` was made, one of ``CORRUPTIONS``, or "given" for pairs
  read from a file or the hub.

It also returns a ``PairReport`` of the pairs kept and dropped. A spec names its kind
(``PREFERENCE_SOURCES``):

- None or ``generated``: pairs for each image of the caption source, with train, val and
  test pairs from the source's own splits: ``pairs_per_image`` for a training image (at
  most one per reference caption, each of a different corruption kind while its captions
  allow), and ``PAIRS_PER_IMAGE`` for a held-out one whatever the training setting, so
  that held-out scores compare across runs. (A source too small to have a ``val`` split gets
  one carved from the training pairs, below.) Chosen is one of the
  image's reference captions. Rejected is the same caption with one fact corrupted
  (``capcli.scenes.corrupt``). When the image has a scene graph, the corruption is proven
  false, and names only colour-shape pairs that the training scenes show (``known_pairs``);
  otherwise it is a lexicon word swap. Failing both, rejected is another image's caption.
- ``jsonl:PATH``: JSON lines with ``chosen``, ``rejected`` and optionally ``image`` (a path,
  relative to the file's folder), ``prompt`` and ``split``. PATH may be one file, whose
  rows go to ``train`` unless their ``split`` says otherwise, or a folder holding
  ``train.jsonl``, ``val.jsonl`` and ``test.jsonl``.
- ``hf:NAME[:CONFIG]`` (the hub or its cache) and ``disk:PATH`` (``save_to_disk``): TRL's
  preference format, that is ``images`` (a list) or ``image``, ``prompt``, ``chosen`` and
  ``rejected``. Each of these is text or a list of chat messages; the assistant's text is
  taken.
- ``ultrafeedback[:NAME]`` (default ``openbmb/UltraFeedback``; a hub name or a local
  copy): text-only pairs. Chosen is the highest-scored completion and rejected the
  lowest. The binarised layout (``prompt``, ``chosen``, ``rejected`` messages) is read too.

Held out: a source without a ``val`` split has one carved from ``train``. The carve is
seeded by ``data.seed``, takes at most ``data.val_size`` pairs and never more than a
tenth, and keeps all pairs of one image (or one prompt) on the same side. Pairs that
are empty, identical after stripping, or whose image file is missing are dropped and
counted.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import datasets

from capcli.data.sources import Splits, first_line
from capcli.errors import ConfigError, DataError
from capcli.scenes.corrupt import CORRUPTIONS, scene_negatives, text_negatives
from capcli.scenes.graph import Scene
from capcli.scenes.reader import parse
from capcli.settings import DataSettings

PAIR_FEATURES = datasets.Features({
    "image": datasets.Image(decode=False),
    "prompt": datasets.Value("string"),
    "chosen": datasets.Value("string"),
    "rejected": datasets.Value("string"),
    "corruption": datasets.Value("string"),
})
GIVEN = "given"
PAIRS_PER_IMAGE = 2  # generated pairs per held-out image, and per training image by default
ULTRAFEEDBACK = "openbmb/UltraFeedback"
HUB_HELP = ("go online once so it is cached, set HF_HOME to a cache that holds it, "
            "or use a local copy with disk:PATH or jsonl:PATH")
_KINDS = tuple(k for k in CORRUPTIONS if k != "other_image")
_PROBLEM = "problem"  # a converter's reason to drop a row, "" for none; removed by _clean
_CONVERT_FEATURES = datasets.Features({**PAIR_FEATURES, _PROBLEM: datasets.Value("string")})
_SPLIT_NAMES = {"train": "train", "train_prefs": "train", "val": "val", "validation": "val", "valid": "val",
                "dev": "val", "test": "test", "test_prefs": "test"}


@dataclass
class PairReport:
    """Pairs kept per split, and pairs dropped per reason ("identical", "missing image", ...)."""

    splits: dict[str, int] = field(default_factory=dict)
    dropped: Counter[str] = field(default_factory=Counter)

    @property
    def kept(self) -> int:
        return sum(self.splits.values())

    def summary(self) -> str:
        """One line: "preferences: 5000 pairs kept, 3 dropped (2 identical, 1 missing image)"."""
        line = f"preferences: {self.kept} pairs kept, {sum(self.dropped.values())} dropped"
        reasons = ", ".join(f"{n} {reason}" for reason, n in self.dropped.most_common())
        return f"{line} ({reasons})" if reasons else line


Loader = Callable[[str, DataSettings, Splits, PairReport], Splits]
PREFERENCE_SOURCES: dict[str, Loader] = {}
_USAGE: dict[str, str] = {}


def preference_source(name: str, usage: str):
    """Register a loader for specs ``name`` or ``name:ARG``; ``usage`` shows the form in errors."""

    def register(loader: Loader) -> Loader:
        PREFERENCE_SOURCES[name], _USAGE[name] = loader, usage
        return loader

    return register


def load_preferences(spec: str | None, data: DataSettings, caption_splits: Splits,
                     pairs_per_image: int = PAIRS_PER_IMAGE) -> tuple[Splits, PairReport]:
    """Load the preference pairs named by ``spec``.

    Args:
        spec: A spec string (see the module docstring); None means ``generated``.
        data: Supplies the seed of generation and carving, and the size limits of given pairs.
        caption_splits: The caption source's splits (``load_splits``); only ``generated`` reads them.
        pairs_per_image: Generated pairs per training image (``generated`` only).

    Returns:
        The splits of pairs, with the columns of ``PAIR_FEATURES``, and the report.

    Raises:
        ConfigError: For an unknown spec, a missing file, or a dataset that is not cached offline.
        DataError: If no training pair is left.
    """
    spec = spec or "generated"
    kind, _, arg = spec.partition(":")
    if kind not in PREFERENCE_SOURCES:
        raise ConfigError(f"unknown preference source '{spec}' (allowed: {', '.join(_USAGE.values())})")
    report = PairReport()
    loader = PREFERENCE_SOURCES[kind]
    if kind == "generated":
        loader = partial(_generated, train_per_image=pairs_per_image)
    splits = loader(arg, data, caption_splits, report)
    report.splits = {name: len(split) for name, split in splits.items()}
    if not report.splits.get("train"):
        raise DataError(f"preference source '{spec}' has no training pairs ({report.summary()})")
    return splits, report


# --- generated from captions ----------------------------------------------------


@preference_source("generated", "generated")
def _generated(arg: str, data: DataSettings, caption_splits: Splits, report: PairReport,
               train_per_image: int = PAIRS_PER_IMAGE) -> Splits:
    if arg:
        raise ConfigError(f"generated preferences take no argument, got 'generated:{arg}'")
    per_image = {"train": train_per_image}
    known = known_pairs(caption_splits["train"]) if "train" in caption_splits else None
    splits = {name: _clean(generate_pairs(caption_splits[name], data.seed, name, report,
                                          per_image.get(name, PAIRS_PER_IMAGE), known), report)
              for name in ("train", "val", "test") if name in caption_splits}
    return _ensure_val(splits, data)


def known_pairs(split: datasets.Dataset) -> frozenset[tuple[str, str]] | None:
    """The colour-shape pairs that a split's scene graphs show; None for a split without scene graphs."""
    if not isinstance(split, datasets.Dataset) or "scene" not in split.column_names:
        return None
    return frozenset((o["colour"], o["shape"]) for scene in split["scene"] if scene for o in scene["objects"])


def generate_pairs(split: datasets.Dataset, seed: int, name: str, report: PairReport | None = None,
                   per_image: int = PAIRS_PER_IMAGE,
                   known: frozenset[tuple[str, str]] | None = None) -> datasets.Dataset:
    """Pairs for every image of a caption split (``image``, ``captions``, optional ``scene``).

    A pure function of ``(seed, name, row index)`` for each image. When no pair can be made
    for an image, it is counted in ``report`` as "no negative". ``known``: the colour-shape
    pairs a rejected caption may name (``corrupt.scene_negatives``); align passes those of
    its training scenes.
    """
    captions = list(split["captions"])
    images = list(split["image"])
    scenes = list(split["scene"]) if "scene" in split.column_names else [None] * len(captions)
    rows: dict[str, list[Any]] = {column: [] for column in PAIR_FEATURES}
    for index, refs in enumerate(captions):
        rng = random.Random(f"{seed}:preferences:{name}:{index}")
        scene = Scene.from_dict(scenes[index]) if scenes[index] else None
        for chosen, rejected, kind in pairs_for_image(refs, scene, rng, per_image, known):
            if rejected is None:
                rejected = _other_caption(captions, index, chosen, rng)
            if rejected is None:
                if report is not None:
                    report.dropped["no negative"] += 1
                continue
            for column, value in zip(PAIR_FEATURES, (images[index], "", chosen, rejected, kind)):
                rows[column].append(value)
    return datasets.Dataset.from_dict(rows, features=PAIR_FEATURES)


def pairs_for_image(captions: list[str], scene: Scene | None, rng: random.Random, per_image: int = PAIRS_PER_IMAGE,
                    known: frozenset[tuple[str, str]] | None = None) -> list[tuple[str, str | None, str]]:
    """Up to ``per_image`` ``(chosen, rejected, corruption)`` for one image's reference captions.

    Each pair draws a corruption kind first, uniformly among the kinds the image's captions
    allow and not yet used for this image, then a caption that allows it, so that rare
    kinds (relation, swap) are not crowded out. A caption in ``describe``'s grammar is
    corrupted against ``scene``; any other caption gets lexicon swaps. ``rejected`` is None
    where nothing applies: the caller uses another image's caption ("other_image").
    """
    refs = [c for c in dict.fromkeys(captions) if c and c.strip()]
    memo: dict[tuple[str, str], list[str]] = {}

    def options(caption: str, kind: str) -> list[str]:
        if (caption, kind) not in memo:
            if scene is not None and parse(caption) is not None:
                memo[caption, kind] = scene_negatives(caption, scene, (kind,), known).get(kind, [])
            else:
                found = text_negatives(caption)
                memo.update({(caption, k): found.get(k, []) for k in _KINDS})
        return memo[caption, kind]

    pairs: list[tuple[str, str | None, str]] = []
    used_kinds: set[str] = set()
    used_captions: set[str] = set()
    for _ in range(min(per_image, len(refs))):
        kinds = sorted(rng.sample(_KINDS, len(_KINDS)), key=lambda k: k in used_kinds)  # unused first
        order = sorted(rng.sample(refs, len(refs)), key=lambda c: c in used_captions)
        for kind in kinds:
            chosen = next((c for c in order if options(c, kind)), None)
            if chosen is not None:
                pairs.append((chosen, rng.choice(options(chosen, kind)), kind))
                break
        else:
            chosen, kind = order[0], "other_image"
            pairs.append((chosen, None, kind))
        used_kinds.add(kind)
        used_captions.add(chosen)
    return pairs


def _other_caption(captions: list[list[str]], index: int, chosen: str, rng: random.Random) -> str | None:
    """A caption of another image of the split that differs from ``chosen``, or None."""
    if len(captions) < 2:
        return None
    for _ in range(8):
        other = rng.randrange(len(captions) - 1)
        other += other >= index
        if captions[other]:
            caption = rng.choice(captions[other])
            if caption.strip() and caption.strip() != chosen.strip():
                return caption
    return None


# --- given pairs: JSONL, the hub, disk, UltraFeedback ------------------------------


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
    splits = {name: _clean(convert(_subset(split, limits[name], data.seed, name)), report)
              for name, split in named.items() if limits[name] > 0}
    splits = _ensure_val(splits, data)
    splits["train"] = _subset(splits["train"], data.train_size, data.seed, "train")
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
            "rejected": _message_text(row.get("rejected"), "assistant"), "corruption": GIVEN, _PROBLEM: problem}


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
            "corruption": GIVEN, _PROBLEM: problem}


# --- shared steps -----------------------------------------------------------------


def _subset(split: datasets.Dataset, limit: int, seed: int, name: str) -> datasets.Dataset:
    """At most ``limit`` rows: a seeded random subset in the original order, as sources may be sorted."""
    if len(split) <= limit:
        return split
    keep = sorted(random.Random(f"{seed}:preferences:{name}").sample(range(len(split)), limit))
    return split.select(keep)


def _problem(image: dict[str, Any] | None, chosen: str | None, rejected: str | None) -> str:
    chosen, rejected = (chosen or "").strip(), (rejected or "").strip()
    if not chosen or not rejected:
        return "empty"
    if chosen == rejected:
        return "identical"
    if image and image.get("bytes") is None and image.get("path") and not os.path.isfile(image["path"]):
        return "missing image"
    return ""


def _clean(split: datasets.Dataset, report: PairReport) -> datasets.Dataset:
    """Drops bad pairs (a converter's problem, empty, identical, missing image) and counts them."""
    has_problem = _PROBLEM in split.column_names
    problems = []
    columns = ["image", "chosen", "rejected"] + ([_PROBLEM] if has_problem else [])
    for batch in split.select_columns(columns).iter(batch_size=1000):
        for i, (image, chosen, rejected) in enumerate(zip(batch["image"], batch["chosen"], batch["rejected"])):
            problems.append((batch[_PROBLEM][i] if has_problem else "") or _problem(image, chosen, rejected))
    report.dropped.update(p for p in problems if p)
    if has_problem:
        split = split.remove_columns(_PROBLEM)
    keep = [i for i, p in enumerate(problems) if not p]
    return split if len(keep) == len(split) else split.select(keep)


def _ensure_val(splits: Splits, data: DataSettings) -> Splits:
    """Carve ``val`` out of ``train`` when there is none, keeping an image's pairs together."""
    if "val" in splits or "train" not in splits:
        return splits
    train = splits["train"]
    take = min(data.val_size, len(train) // 10)  # never more than a tenth of the training pairs
    if take == 0:
        return splits
    keys = _group_keys(train)
    groups = sorted(set(keys))
    random.Random(f"{data.seed}:preferences:val").shuffle(groups)
    held, count = set(), 0
    sizes = Counter(keys)
    for group in groups:
        if count >= take:
            break
        held.add(group)
        count += sizes[group]
    val = [i for i, key in enumerate(keys) if key in held]
    rest = [i for i, key in enumerate(keys) if key not in held]
    return {**splits, "train": train.select(rest), "val": train.select(val)}


def _group_keys(split: datasets.Dataset) -> list[str]:
    """Which pairs belong together: the image's path or bytes, else the prompt, else the row."""
    keys = []
    for batch in split.select_columns(["image", "prompt"]).iter(batch_size=1000):
        for image, prompt in zip(batch["image"], batch["prompt"]):
            if image and image.get("path"):
                keys.append("path:" + image["path"])
            elif image and image.get("bytes"):
                keys.append("bytes:" + hashlib.sha1(image["bytes"]).hexdigest())
            elif prompt:
                keys.append("prompt:" + prompt)
            else:
                keys.append(f"row:{len(keys)}")
    return keys
