"""The synthetic scenes: a small world of coloured shapes, the captions that describe it, and
the reader that checks a caption against it.

- ``vocabulary``: shapes, colours, sizes, relations, backgrounds, and the words captions use.
- ``graph``: the scene graph (``Scene``), its relations, and the scene sampler.
- ``captions``: ``describe``, five true reference captions of a scene.
- ``render``: the scene drawn as an image.
- ``reader``: a caption read back into what it claims (``parse``, ``read_caption``), and
  those claims checked against a scene (``holds``, ``is_true``).
- ``corrupt``: one-fact corruptions of a caption, the rejected side of generated pairs.

The dataset made of them is ``capcli.data.synthetic``; the grounding metric that scores
generated captions with the reader is ``capcli.metrics.grounding``.
"""

from capcli.scenes.captions import describe
from capcli.scenes.graph import (
    SIZE_RADIUS,
    Relation,
    Scene,
    SceneObject,
    compute_relations,
    sample_scene,
)
from capcli.scenes.render import render
from capcli.scenes.vocabulary import (
    BACKGROUNDS,
    COLOURS,
    COUNT_WORDS,
    NOVEL_COMBOS,
    RELATION_PHRASES,
    RELATIONS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
)

__all__ = [
    "BACKGROUNDS", "COLOURS", "COUNT_WORDS", "NOVEL_COMBOS", "RELATIONS", "RELATION_PHRASES",
    "SHAPES", "SHAPE_PLURALS", "SIZES", "SIZE_RADIUS", "Relation", "Scene", "SceneObject",
    "compute_relations", "describe", "render", "sample_scene",
]
