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
import os
import random
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import datasets

from capcli.data.sources import Splits
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
_KINDS = tuple(k for k in CORRUPTIONS if k != "other_image")
PROBLEM = "problem"  # a converter's reason to drop a row, "" for none; removed by _clean


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
    splits = {name: clean_pairs(generate_pairs(caption_splits[name], data.seed, name, report,
                                          per_image.get(name, PAIRS_PER_IMAGE), known), report)
              for name in ("train", "val", "test") if name in caption_splits}
    return ensure_val(splits, data)


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


def subset_rows(split: datasets.Dataset, limit: int, seed: int, name: str) -> datasets.Dataset:
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


def clean_pairs(split: datasets.Dataset, report: PairReport) -> datasets.Dataset:
    """Drops bad pairs (a converter's problem, empty, identical, missing image) and counts them."""
    has_problem = PROBLEM in split.column_names
    problems = []
    columns = ["image", "chosen", "rejected"] + ([PROBLEM] if has_problem else [])
    for batch in split.select_columns(columns).iter(batch_size=1000):
        for i, (image, chosen, rejected) in enumerate(zip(batch["image"], batch["chosen"], batch["rejected"])):
            problems.append((batch[PROBLEM][i] if has_problem else "") or _problem(image, chosen, rejected))
    report.dropped.update(p for p in problems if p)
    if has_problem:
        split = split.remove_columns(PROBLEM)
    keep = [i for i, p in enumerate(problems) if not p]
    return split if len(keep) == len(split) else split.select(keep)


def ensure_val(splits: Splits, data: DataSettings) -> Splits:
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


# The given-pair readers register themselves on import; imported last, as they use the above.
from capcli.data import pair_files  # noqa: E402, F401
