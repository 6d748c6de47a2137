"""Scene graphs of the synthetic scenes: objects, where they are, and the relations between them."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from capcli.scenes.vocabulary import BACKGROUNDS, COLOURS, NOVEL_COMBOS, SHAPES, SIZES

# Half-extent of an object's bounding box as a fraction of the image side: a small circle
# is ~14 px across at 64 px, a large one ~26 px. Smaller shapes blur together at 64 px (v1's
# 11.5 px hexagon was within a pixel of a circle); from a large radius of 0.24, two large
# objects no longer fit apart with their margins.
SIZE_RADIUS = {"small": 0.11, "large": 0.2}
_EDGE = 0.01  # gap kept between an object and the image border
_MARGIN = 0.03  # gap kept between two objects' bounding boxes
_RELATION_RATIO = 1.5  # one axis must dominate by this much to name a relation
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
    """``objects[subject]`` is ``relation`` ``objects[object]``, e.g. 0 "left of" 1.

    In a caption's claims (``reader.Claims``) the indices are of the caption's mentions.
    """

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
