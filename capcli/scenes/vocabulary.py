"""The words of the synthetic scenes: what can be drawn, and how captions may say it.

One place for the vocabulary that the scene sampler, the caption writer (``captions``), the
caption reader (``reader``), the corruptions (``corrupt``) and the grounding metric share.
"""

from __future__ import annotations

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

COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
"""The count words captions use for groups of identical objects and for totals."""
RELATION_PHRASES = {
    "left of": ("to the left of", "left of", "on the left of"),
    "right of": ("to the right of", "right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
}
"""Each relation of the scene graph and the phrasings captions may state it with."""
LEADS = ("a picture of", "an image of", "a drawing of", "a render of")
"""The openings of the "picture" phrasing family."""
SHAPE_OF_NOUN = {shape: shape for shape in SHAPES} | {plural: shape for shape, plural in SHAPE_PLURALS.items()}
"""Every shape noun, singular or plural, to its shape."""
TOTAL_NOUNS = ("object", "objects", "shape", "shapes")
"""The nouns of a stated total: "two shapes: ..."."""


def article(word: str) -> str:
    """"a" or "an" before ``word``."""
    return "an" if word[0] in "aeiou" else "a"
