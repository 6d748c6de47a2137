"""The embedded procedural dataset "synthetic": coloured shapes with true captions.

Each scene holds 1-3 coloured objects on a neutral background. For every scene
this module can produce a scene graph (``Scene``), five varied reference
captions that are all true for it (``describe``) and a rendered image
(``render``). ``generate`` ties these together deterministically from
``(seed, split, index)`` and ``materialise`` writes whole splits to disk as a
Hugging Face "imagefolder" directory.

The vocabulary constants (``SHAPES``, ``COLOURS``, ``SIZES``, ``RELATIONS``,
``BACKGROUNDS``, ``NOVEL_COMBOS``) are public so that preference-pair
generators and grounding metrics can share them.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from capcli.errors import ConfigError

DATASET_VERSION = "v2"  # bump whenever scenes, captions or pixels change
SPLITS = ("train", "val", "test", "test_novel")

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
SHAPE_PLURALS = {shape: shape + ("es" if shape.endswith("s") else "s") for shape in SHAPES}
# Saturated and far apart in hue, so they survive LANCZOS downsampling to 64 px.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 25, 35),
    "green": (20, 170, 50),
    "blue": (25, 75, 235),
    "yellow": (250, 220, 20),
    "purple": (135, 45, 200),
    "orange": (255, 140, 0),
    "pink": (255, 110, 200),
    "cyan": (0, 205, 225),
}
SIZES = ("small", "large")
RELATIONS = ("left of", "right of", "above", "below")
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (250, 250, 250),
    "light gray": (200, 200, 200),
    "dark gray": (70, 70, 70),
    "beige": (235, 222, 195),
    "black": (15, 15, 15),
}
# Each colour and each shape at most once, so every colour and shape is still
# seen in training with other partners (compositional generalisation test).
NOVEL_COMBOS: frozenset[tuple[str, str]] = frozenset(
    {
        ("red", "triangle"),
        ("green", "star"),
        ("blue", "cross"),
        ("yellow", "circle"),
        ("purple", "square"),
        ("cyan", "diamond"),
    }
)

# Half-extent of an object's bounding box as a fraction of the image side: a small circle
# is ~14 px across at 64 px, a large one ~26 px. Smaller shapes blur together at 64 px (v1's
# 11.5 px hexagon was within a pixel of a circle); from a large radius of 0.24, two large
# objects no longer fit apart with their margins.
SIZE_RADIUS = {"small": 0.11, "large": 0.2}
_EDGE = 0.01  # gap kept between an object and the image border
_MARGIN = 0.03  # gap kept between two objects' bounding boxes
_RELATION_RATIO = 1.5  # one axis must dominate by this much to name a relation
_SUPERSAMPLE = 4
_MAX_WORDS = 20
_COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
_RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
_ALLOWED = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in NOVEL_COMBOS]
_ALL_COMBOS = [(c, s) for c in COLOURS for s in SHAPES]


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``x``, ``y`` are its centre in [0, 1], y pointing down."""

    shape: str
    colour: str
    size: str
    x: float
    y: float


@dataclass(frozen=True)
class Relation:
    """``objects[subject]`` is ``relation`` ``objects[object]``, e.g. 0 "left of" 1."""

    subject: int
    relation: str
    object: int


@dataclass(frozen=True)
class Scene:
    """A scene graph: objects, the unambiguous pairwise relations, and the background."""

    objects: tuple[SceneObject, ...]
    relations: tuple[Relation, ...]
    background: str

    def to_dict(self) -> dict[str, Any]:
        """Returns the JSON-serialisable form stored in ``metadata.jsonl``."""
        return {
            "background": self.background,
            "objects": [
                {"shape": o.shape, "colour": o.colour, "size": o.size,
                 "x": round(o.x, 3), "y": round(o.y, 3)}
                for o in self.objects
            ],
            "relations": [
                {"subject": r.subject, "relation": r.relation, "object": r.object}
                for r in self.relations
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Scene:
        """Inverse of ``to_dict``."""
        return cls(
            objects=tuple(SceneObject(**o) for o in data["objects"]),
            relations=tuple(Relation(**r) for r in data["relations"]),
            background=data["background"],
        )


def compute_relations(objects: tuple[SceneObject, ...]) -> tuple[Relation, ...]:
    """Returns every ordered-pair relation whose direction is unambiguous.

    Pairs lying roughly on a diagonal (neither axis dominating by
    ``_RELATION_RATIO``) get no relation, so no caption can claim one.
    """
    relations = []
    for i, a in enumerate(objects):
        for j, b in enumerate(objects):
            if i == j:
                continue
            dx, dy = b.x - a.x, b.y - a.y
            if abs(dx) >= _RELATION_RATIO * abs(dy):
                relations.append(Relation(i, "left of" if dx > 0 else "right of", j))
            elif abs(dy) >= _RELATION_RATIO * abs(dx):
                relations.append(Relation(i, "above" if dy > 0 else "below", j))
    return tuple(relations)


def _boxes_apart(a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
    """True when two (x, y, radius) bounding boxes are separated by the margin."""
    gap = a[2] + b[2] + _MARGIN
    return abs(a[0] - b[0]) >= gap or abs(a[1] - b[1]) >= gap


def _place(rng: random.Random, sizes: list[str]) -> list[tuple[float, float]]:
    """Rejection-samples non-overlapping centres, restarting the layout if stuck."""
    # Large objects first: they are the hard ones to fit once the small ones are down.
    order = sorted(range(len(sizes)), key=lambda i: -SIZE_RADIUS[sizes[i]])
    for _ in range(200):
        placed: dict[int, tuple[float, float, float]] = {}
        for i in order:
            r = SIZE_RADIUS[sizes[i]]
            for _ in range(50):
                x = round(rng.uniform(r + _EDGE, 1 - r - _EDGE), 3)
                y = round(rng.uniform(r + _EDGE, 1 - r - _EDGE), 3)
                if all(_boxes_apart((x, y, r), box) for box in placed.values()):
                    placed[i] = (x, y, r)
                    break
            else:
                break
        if len(placed) == len(sizes):
            return [placed[i][:2] for i in range(len(sizes))]
    raise RuntimeError(f"could not place objects of sizes {sizes}")


def sample_scene(rng: random.Random, novel: bool = False) -> Scene:
    """Draws a random scene.

    Args:
        rng: The source of randomness; the scene is a pure function of its state.
        novel: If True, at least one object has a (colour, shape) in
            ``NOVEL_COMBOS`` and the others may have any combination; if False,
            no object has a novel combination.
    """
    n = rng.choice((1, 2, 3))
    pool = _ALL_COMBOS if novel else _ALLOWED
    kinds = [(*rng.choice(pool), rng.choice(SIZES)) for _ in range(n)]
    if novel:
        kinds[0] = (*rng.choice(sorted(NOVEL_COMBOS)), rng.choice(SIZES))
    if n >= 2 and rng.random() < 0.2:
        kinds[1] = kinds[0]  # identical twins give "two small red circles"
    rng.shuffle(kinds)
    centres = _place(rng, [size for _, _, size in kinds])
    objects = tuple(
        SceneObject(shape=s, colour=c, size=z, x=x, y=y)
        for (c, s, z), (x, y) in zip(kinds, centres)
    )
    return Scene(objects, compute_relations(objects), rng.choice(tuple(BACKGROUNDS)))


# --- captions ---------------------------------------------------------------


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _phrase(count: int, obj: SceneObject, sized: bool) -> str:
    """"a small red circle", "an orange star", "two red circles"."""
    words = ([obj.size] if sized else []) + [obj.colour]
    words.append(obj.shape if count == 1 else SHAPE_PLURALS[obj.shape])
    head = _article(words[0]) if count == 1 else _COUNT_WORDS[count]
    return " ".join([head, *words])


def _groups(scene: Scene, sized: bool) -> list[list[int]]:
    """Indices of objects a phrase cannot tell apart, so they are counted together."""
    groups: dict[tuple[str | None, str, str], list[int]] = {}
    for i, o in enumerate(scene.objects):
        groups.setdefault((o.size if sized else None, o.colour, o.shape), []).append(i)
    return list(groups.values())


def _join(phrases: list[str]) -> str:
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _relation_caption(scene: Scene, rng: random.Random, sized: bool) -> str | None:
    """A caption built on recorded relations, or None if no group pair has one."""
    groups = _groups(scene, sized)
    known = {(r.subject, r.object): r.relation for r in scene.relations}

    def between(a: list[int], b: list[int]) -> str | None:
        # A group relation is only true if it holds for every member pair.
        found = {known.get((i, j)) for i in a for j in b}
        return next(iter(found)) if len(found) == 1 else None

    pairs = [(a, b, rel) for a in range(len(groups)) for b in range(len(groups))
             if a != b and (rel := between(groups[a], groups[b]))]
    if not pairs:
        return None
    a, b, rel = rng.choice(pairs)

    def noun(g: int) -> str:
        return _phrase(len(groups[g]), scene.objects[groups[g][0]], sized)

    def verb(g: int) -> str:
        return "is" if len(groups[g]) == 1 else "are"

    link = rng.choice(_RELATION_PHRASES[rel])
    text = f"{noun(a)} {verb(a) + ' ' if rng.random() < 0.5 else ''}{link} {noun(b)}"
    rest = [g for g in range(len(groups)) if g not in (a, b)]
    if rest:
        c = rest[0]
        chained = between(groups[b], groups[c])
        if chained:
            text += f", which {verb(b)} {rng.choice(_RELATION_PHRASES[chained])} {noun(c)}"
        else:
            text += f", and {noun(c)}"
    return text


def _family_caption(family: str, scene: Scene, rng: random.Random, sized: bool) -> str | None:
    """One caption of the named phrasing family; every object is always mentioned."""
    if family == "relation":
        return _relation_caption(scene, rng, sized)
    groups = _groups(scene, sized)
    phrases = [_phrase(len(g), scene.objects[g[0]], sized) for g in groups]
    listing = _join(phrases)
    bg = scene.background
    if family == "plain":
        return listing
    if family == "there":
        return f"there {'is' if len(groups[0]) == 1 else 'are'} {listing}"
    if family == "picture":
        lead = rng.choice(("a picture of", "an image of", "a drawing of", "a render of"))
        return f"{lead} {listing}"
    if family == "background":
        if rng.random() < 0.5:
            return f"{listing} on {_article(bg)} {bg} background"
        return f"{_article(bg)} {bg} background with {listing}"
    # family == "count"
    n = len(scene.objects)
    if n == 1:
        bare = listing.split(" ", 1)[1]  # drop the article
        return rng.choice((f"a single {bare}", f"one {rng.choice(('object', 'shape'))}: {listing}"))
    return f"{_COUNT_WORDS[n]} {rng.choice(('objects', 'shapes'))}: {listing}"


def describe(scene: Scene, rng: random.Random) -> list[str]:
    """Returns 5 distinct true captions for ``scene`` (fewer only if impossible).

    Captions are lowercase with no final period, mention every object's colour
    and shape (identical objects via a count, "two red circles"), and mention
    size and background only in some phrasings. If the scene has a usable
    relation, one caption is relational.
    """
    others = ["plain", "there", "picture", "background", "count"]
    rng.shuffle(others)
    families = ["relation", *others]
    captions: list[str] = []
    for attempt in range(40):
        # After one pass over the families, keep trying random ones for variety.
        family = families[attempt] if attempt < len(families) else rng.choice(families)
        text = None
        for sized in (rng.random() < 0.5, False):  # too long with sizes -> retry without
            text = _family_caption(family, scene, rng, sized)
            if text is None or len(text.split()) <= _MAX_WORDS:
                break
        if text and len(text.split()) <= _MAX_WORDS and text not in captions:
            captions.append(text)
        if len(captions) == 5:
            break
    return captions


# --- rendering --------------------------------------------------------------


def _polar(radii: list[float], start_deg: float) -> list[tuple[float, float]]:
    """Points at the given radii, evenly spaced around a circle from ``start_deg``."""
    step = 2 * math.pi / len(radii)
    start = math.radians(start_deg)
    return [(r * math.cos(start + k * step), r * math.sin(start + k * step))
            for k, r in enumerate(radii)]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Polygon vertices of a shape inside the box centre +- r (not for circles)."""
    if shape == "square":
        h = 0.85 * r  # a full-box square would look much heavier than the circle
        pts = [(-h, -h), (h, -h), (h, h), (-h, h)]
    elif shape == "diamond":
        pts = [(0, -r), (0.7 * r, 0), (0, r), (-0.7 * r, 0)]
    elif shape == "triangle":
        pts = [(0, -r), (0.95 * r, 0.8 * r), (-0.95 * r, 0.8 * r)]
    elif shape == "cross":
        w = 0.32 * r  # arm half-width: thick enough to keep its four arms at 64 px
        pts = [(-w, -r), (w, -r), (w, -w), (r, -w), (r, w), (w, w),
               (w, r), (-w, r), (-w, w), (-r, w), (-r, -w), (-w, -w)]
    elif shape == "star":
        # Inner radius fatter than a true pentagram's so small stars keep their arms.
        pts = _polar([r, 0.45 * r] * 5, -90)
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + px, cy + py) for px, py in pts]


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draws ``scene`` as an RGB image of ``image_size`` x ``image_size`` pixels.

    Shapes are drawn at 4x resolution and LANCZOS-downsampled for smooth edges.
    A gentle vertical light gradient and mild grey noise, both seeded from the
    scene itself, add variety while keeping ``render`` deterministic.
    """
    s = image_size * _SUPERSAMPLE
    img = Image.new("RGB", (s, s), BACKGROUNDS[scene.background])
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy, r = o.x * s, o.y * s, SIZE_RADIUS[o.size] * s
        if o.shape == "circle":
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLOURS[o.colour])
        else:
            draw.polygon(_outline(o.shape, cx, cy, r), fill=COLOURS[o.colour])
    # reducing_gap box-averages 4x -> 2x first, which is exact for supersampling
    # and makes the final LANCZOS step about 3x cheaper.
    img = img.resize((image_size, image_size), Image.Resampling.LANCZOS, reducing_gap=2.0)

    # Lighting is smooth, so adding it at the final size loses nothing and is
    # far cheaper than compositing a gradient at 4x.
    noise_rng = np.random.default_rng(zlib.crc32(json.dumps(scene.to_dict()).encode()))
    shift = noise_rng.uniform(-10, 10)
    ramp = np.linspace(shift, -shift, image_size)[:, None, None]
    grain = noise_rng.integers(-4, 5, size=(image_size, image_size, 1))
    pixels = np.asarray(img, dtype=np.float32) + ramp + grain
    return Image.fromarray(np.clip(pixels, 0, 255).round().astype(np.uint8), "RGB")


# --- splits on disk ---------------------------------------------------------


def generate(split: str, index: int, seed: int) -> tuple[Scene, list[str]]:
    """Returns the scene and captions number ``index`` of ``split``.

    A pure function of ``(seed, split, index)``: a string-seeded
    ``random.Random`` is stable across processes, unlike ``hash()``.
    """
    if split not in SPLITS:
        raise ConfigError(f"unknown synthetic split {split!r}; expected one of {SPLITS}")
    rng = random.Random(f"{seed}:{split}:{index}")
    scene = sample_scene(rng, novel=split == "test_novel")
    return scene, describe(scene, rng)


def _is_complete(path: Path) -> bool:
    return (path / ".complete").is_file()


def materialise(root: Path, sizes: dict[str, int], seed: int = 0, image_size: int = 64) -> Path:
    """Writes the dataset under ``root`` once and returns its directory.

    The directory ``synthetic-v2-s{seed}-{image_size}px-{hash}`` holds
    ``train/``, ``val/``, ``test/`` and ``test_novel/``, each with
    ``000000.png``... and a ``metadata.jsonl`` of rows ``{"file_name",
    "captions", "scene"}``. All four split folders are always created; a split
    missing from ``sizes`` or of size 0 gets an empty ``metadata.jsonl``.

    The data is built in a temporary sibling and renamed into place, with the
    ``.complete`` marker written last, so an interrupted run never leaves a
    directory that looks finished. A directory that already has the marker is
    returned untouched; if another process wins a race, its copy is used.

    Raises:
        ConfigError: If ``sizes`` names an unknown split or a negative count.
    """
    unknown = set(sizes) - set(SPLITS)
    if unknown or any(int(n) < 0 for n in sizes.values()):
        raise ConfigError(f"bad synthetic sizes {sizes!r}: splits are {SPLITS}, counts >= 0")
    counts = {split: int(sizes.get(split, 0)) for split in SPLITS}
    digest = hashlib.sha256(json.dumps(counts, sort_keys=True).encode()).hexdigest()[:8]
    root = Path(root)
    final = root / f"synthetic-{DATASET_VERSION}-s{seed}-{image_size}px-{digest}"
    if _is_complete(final):
        return final

    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=".tmp-"))
    try:
        tmp.chmod(0o755)  # mkdtemp's private 0700 would otherwise stick to the dataset
        for split, n in counts.items():
            (tmp / split).mkdir()
            with open(tmp / split / "metadata.jsonl", "w", encoding="utf-8") as rows:
                for index in range(n):
                    scene, captions = generate(split, index, seed)
                    name = f"{index:06d}.png"
                    image = render(scene, image_size)
                    # Fast compression: the grain makes PNGs barely compressible anyway.
                    image.save(tmp / split / name, format="PNG", compress_level=1)
                    row = {"file_name": name, "captions": captions, "scene": scene.to_dict()}
                    rows.write(json.dumps(row) + "\n")
        summary = {"version": DATASET_VERSION, "seed": seed, "image_size": image_size,
                   "sizes": counts, "novel_combos": sorted(map(list, NOVEL_COMBOS))}
        (tmp / ".complete").write_text(json.dumps(summary) + "\n", encoding="utf-8")
        try:
            os.replace(tmp, final)
        except OSError:
            if _is_complete(final):  # another process finished first: use its copy
                shutil.rmtree(tmp, ignore_errors=True)
                return final
            # Only complete directories are ever renamed in, so this is debris
            # (e.g. hand-made or from an older layout): replace it.
            shutil.rmtree(final)
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final
