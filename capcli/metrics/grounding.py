"""Grounding of generated captions in synthetic scene graphs (DESIGN §6): the synthetic CHAIR.

A caption is read into what it says about objects (``read_caption``), and every checkable
statement is one *claim*, true or false against the scene graph. An object "matches" a
mention when its shape is the same, and its colour and size too where the caption gives
them (``reader.matches``; a count word is not part of matching).

Metrics. Each is a ratio, per image ``numerator / denominator`` (NaN where the denominator
is 0: the caption makes no claim of that kind), and for the corpus the ratio of the sums
over images. So the claim-level accuracies are micro-averages over claims, as CHAIR-i is
over mentioned objects, and the caption-level rates (denominator 1) are means over images.

- ``object_accuracy``: of the object mentions, the share whose shape is in the image.
- ``attribute_accuracy``: of the mentions whose shape is in the image and that give a colour
  or size, the share that some object matches (the colour-shape binding, and the size when
  stated: "a green star" with only a blue star present is wrong here, not above).
- ``count_accuracy``: of the count claims whose objects exist (a mention with a count word
  and at least one match) plus a stated total ("three shapes: ..."), the share that are
  right: exactly ``count`` objects match, or the scene has ``total`` objects. Mentions with
  the same words add up to one claim ("a red circle and a red circle": two red circles).
- ``relation_accuracy``: of the stated relations whose two mentions both match objects, the
  share recorded in the scene graph for every pair of matching objects
  (``reader.relation_holds``). Captions with no relation contribute nothing.
- ``relations_stated``: of the captions of scenes whose graph records a relation (two or more
  objects clearly apart), the share that state one, true or not: with ``relation_accuracy``,
  how often a caption says where things are, and how often rightly.
- ``recall``: of the scene's objects, the share that some mention matches (coverage; it is
  what stops a caption from scoring well by saying nothing).
- ``hallucination_rate`` (CHAIR-s): the share of captions with at least one mention that no
  object matches.
- ``hallucinated_mentions`` (CHAIR-i): of the mentions, the share that no object matches.
- ``caption_accuracy``: the share of captions in ``describe``'s grammar of which everything
  is true, the background and the total included (``reader.is_true``).
- ``unparsed``: the share of captions outside ``describe``'s grammar.

Each error is charged once, at the first level it fails: an absent shape is an object error
and is then not scored for attributes, counts or relations about it; a wrong colour on a
present shape is an attribute error, and so on. Hallucination counts both. The background
is not an object: a wrong one only fails ``caption_accuracy`` (and ``caption_errors`` names
it).

Captions outside the grammar. Generated captions may be cut short or stutter ("a red circle
circle", "a red circle and a"). ``parse`` rejects them, and they count in ``unparsed``. With
``lenient=True`` (the default) their content is then read word by word, as CHAIR reads free
text: every shape word is a mention, with the colour, size and count words directly before
it, and a relation phrase directly between two mentions is a relation. So the grounding
metrics measure whether what was said is true, and ``unparsed`` measures fluency, rather
than one number mixing both. A caption from which no shape can be read ("", "a red",
garbage) says nothing checkable, and saying nothing must not score better than saying
something false: it counts as one mention of an object that is not in the image (object
accuracy 0, hallucinating, recall 0). With ``lenient=False`` every caption outside the
grammar is treated that way.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from capcli.metrics.bootstrap import resample_counts, resample_indices
from capcli.scenes.graph import Scene
from capcli.scenes.reader import Claims, Mention, matches, read_caption, relation_holds
from capcli.scenes.vocabulary import SHAPE_PLURALS

__all__ = [
    "GROUNDING_METRICS",
    "GroundingScores",
    "caption_errors",
    "grounding_intervals",
    "grounding_metrics",
    "read_caption",
]

GROUNDING_METRICS = (
    "object_accuracy",
    "attribute_accuracy",
    "count_accuracy",
    "relation_accuracy",
    "relations_stated",
    "recall",
    "hallucination_rate",
    "hallucinated_mentions",
    "caption_accuracy",
    "unparsed",
)
"""Result keys, in report order."""

def _phrase(said: Mention, count: int = 1) -> str:
    """"large red circle", "red circles": the words of a mention, without a count."""
    noun = said.shape if count == 1 else SHAPE_PLURALS[said.shape]
    return " ".join(w for w in (said.size, said.colour, noun) if w)


Tally = dict[str, tuple[int, int]]  # metric → (numerator, denominator) for one caption


def _judge(reading: Claims, scene: Scene) -> tuple[Tally, list[str]]:
    """Every claim of ``reading`` checked against ``scene``: the tally and what is wrong."""
    errors = [] if reading.parsed or not reading.mentions else ["outside the grammar; read word by word"]
    tally: dict[str, list[int]] = {name: [0, 0] for name in GROUNDING_METRICS}

    def score(name: str, correct: bool) -> None:
        tally[name][0] += int(correct)
        tally[name][1] += 1

    shapes = {o.shape for o in scene.objects}
    groups = [matches(scene, m) for m in reading.mentions]
    # "an orange diamond and an orange diamond" says two orange diamonds: the counts of mentions
    # with the same words add up, and that sum is scored once.
    claimed: dict[tuple, int] = {}
    for said in reading.mentions:
        if said.count is not None:
            key = (said.shape, said.colour, said.size)
            claimed[key] = claimed.get(key, 0) + said.count
    counted: set[tuple] = set()
    if not reading.mentions:
        errors.append("outside the grammar, and no object can be read from it")
        score("object_accuracy", False)
        score("hallucinated_mentions", True)
    for said, group in zip(reading.mentions, groups):
        score("object_accuracy", said.shape in shapes)
        score("hallucinated_mentions", not group)
        if said.shape not in shapes:
            errors.append(f"no {said.shape} in the image")
            continue
        if said.colour is not None or said.size is not None:
            score("attribute_accuracy", bool(group))
            if not group:
                errors.append(f"no {_phrase(said)} in the image")
                continue
        key = (said.shape, said.colour, said.size)
        if said.count is not None and key not in counted:
            counted.add(key)
            score("count_accuracy", len(group) == claimed[key])
            if len(group) != claimed[key]:
                errors.append(f"the image has {len(group)} {_phrase(said, len(group))}, not {claimed[key]}")
    if reading.total is not None:
        n = len(scene.objects)
        score("count_accuracy", reading.total == n)
        if reading.total != n:
            errors.append(f"the image has {n} object{'s' if n != 1 else ''}, not {reading.total}")
    for rel in reading.relations:
        a, b = groups[rel.subject], groups[rel.object]
        if not (a and b):
            continue  # an end that is not in the image is already an error
        true = relation_holds(scene, a, rel.relation, b)
        score("relation_accuracy", true)
        if not true:
            subject = _phrase(reading.mentions[rel.subject], len(a))
            verb = "is" if len(a) == 1 else "are"
            errors.append(f"the {subject} {verb} not {rel.relation} the "
                          f"{_phrase(reading.mentions[rel.object], len(b))}")
    if reading.background is not None and reading.background != scene.background:
        errors.append(f"the background is {scene.background}, not {reading.background}")

    covered = set().union(*groups) if groups else set()
    relational = bool(scene.relations)  # a scene without one: nothing to state, counted nowhere
    tally["relations_stated"] = [int(bool(reading.relations) and relational), int(relational)]
    tally["recall"] = [len(covered), len(scene.objects)]
    tally["hallucination_rate"] = [int(not reading.mentions or not all(groups)), 1]
    tally["caption_accuracy"] = [int(not errors), 1]
    tally["unparsed"] = [int(not reading.parsed), 1]
    return {name: (top, bottom) for name, (top, bottom) in tally.items()}, list(dict.fromkeys(errors))


def _as_scene(scene: Scene | Mapping[str, Any]) -> Scene:
    return scene if isinstance(scene, Scene) else Scene.from_dict(dict(scene))


def caption_errors(caption: str, scene: Scene | Mapping[str, Any], lenient: bool = True) -> list[str]:
    """What is wrong in ``caption`` about ``scene``, one short sentence each; [] if nothing.

    For example "no green star in the image", "the image has 1 red circle, not 2", "the
    red circle is not left of the blue square"; each sentence once. A caption outside the
    grammar gets a note saying so first. ``[]`` exactly when ``reader.is_true(caption,
    scene)``.
    """
    return _judge(read_caption(caption, lenient), _as_scene(scene))[1]


FALSE_CLAIMS = ("object_accuracy", "attribute_accuracy", "count_accuracy", "relation_accuracy")
"""The claim-level metrics whose misses are false statements: what ``grounding_reward`` charges."""
UNPARSED_COST = 0.5
"""What ``grounding_reward`` charges a caption outside the grammar (a stutter, a cut-off end)."""


def grounding_reward(caption: str, scene: Scene | Mapping[str, Any], relation_credit: float = 0.0) -> float:
    """A caption's truth about ``scene`` as one number, the judge of on-policy pairs:
    recall + relation_credit·true relations − false claims − UNPARSED_COST if unparsed.

    Objects covered earn (recall, 0..1), and each false claim costs 1: an absent object, a
    wrong colour or size, a wrong count, a wrong relation, each charged once as in
    ``grounding_metrics``. So a true caption that names every object scores 1, a true one
    naming half of them 0.5, one that names all and invents one 0, and an empty caption −1.5
    (one invented object, and outside the grammar): saying nothing never beats saying
    something true. Captions outside the grammar are read word by word and lose
    ``UNPARSED_COST`` besides, so that fluent captions win between equally true ones. The
    background is not charged, as CHAIR does not charge it.

    ``relation_credit`` pays each true relation, to make the model say where things are. It
    is 0 by default: at 0.5, on the README job, align's captions came to state a relation in
    63% of the test scenes that have one, but only 18% of them rightly (docs/training.md).
    """
    tally, _ = _judge(read_caption(caption, lenient=True), _as_scene(scene))
    covered, objects = tally["recall"]
    false = sum(bottom - top for name, (top, bottom) in tally.items() if name in FALSE_CLAIMS)
    true_relations = tally["relation_accuracy"][0]
    return covered / objects + relation_credit * true_relations - false - UNPARSED_COST * tally["unparsed"][0]


@dataclass(frozen=True)
class GroundingScores:
    """Corpus and per-image grounding metrics of one evaluated set (see the module docstring)."""

    corpus: dict[str, float]  # metric → sum(numerator) / sum(denominator); NaN if no claims at all
    per_image: dict[str, np.ndarray]  # metric → (n,) numerator / denominator, NaN where it is 0
    numerator: dict[str, np.ndarray]  # metric → (n,) int: true claims (or hits) per image
    denominator: dict[str, np.ndarray]  # metric → (n,) int: claims per image
    lenient: bool  # whether captions outside the grammar were read word by word
    errors: list[list[str]] = field(default_factory=list)  # per image, caption_errors' sentences

    @property
    def n(self) -> int:
        """The number of images scored."""
        return len(self.errors)

    def summary(self) -> dict[str, Any]:
        """The JSON-able part: n, corpus values (NaN as None) and how many claims each counts."""
        return {"n": self.n, "lenient": self.lenient,
                "metrics": {k: None if math.isnan(v) else v for k, v in self.corpus.items()},
                "claims": {k: int(v.sum()) for k, v in self.denominator.items()}}


def grounding_metrics(
    captions: Sequence[str],
    scenes: Sequence[Scene | Mapping[str, Any]],
    lenient: bool = True,
) -> GroundingScores:
    """Grounding metrics of one caption per image against its scene graph.

    Args:
        captions: (n,) generated captions; any strings, however malformed.
        scenes: (n,) the images' scene graphs, as ``Scene`` or as ``Scene.to_dict()`` rows
            (the ``"scene"`` column of the synthetic dataset).
        lenient: read captions outside the grammar word by word (see the module docstring).

    Returns:
        GroundingScores with every metric of ``GROUNDING_METRICS``.
    """
    if len(captions) != len(scenes):
        raise ValueError(f"grounding_metrics: {len(captions)} captions for {len(scenes)} scenes")
    if not captions:
        raise ValueError("grounding_metrics: no images to score")
    bad = next((i for i, c in enumerate(captions) if not isinstance(c, str)), None)
    if bad is not None:
        raise TypeError(f"grounding_metrics: caption {bad} is a {type(captions[bad]).__name__}, not a string")
    judged = [_judge(read_caption(c, lenient), _as_scene(s)) for c, s in zip(captions, scenes)]
    numerator, denominator, per_image, corpus = {}, {}, {}, {}
    for name in GROUNDING_METRICS:
        top = np.array([tally[name][0] for tally, _ in judged], dtype=np.int64)
        bottom = np.array([tally[name][1] for tally, _ in judged], dtype=np.int64)
        numerator[name], denominator[name] = top, bottom
        per_image[name] = np.divide(top, bottom, out=np.full(len(top), np.nan), where=bottom > 0)
        corpus[name] = float(top.sum() / bottom.sum()) if bottom.sum() else math.nan
    return GroundingScores(corpus, per_image, numerator, denominator, lenient, [e for _, e in judged])


def grounding_intervals(
    scores: GroundingScores, n_resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals over images for every grounding metric.

    Each resample recomputes the corpus value as it is made: the ratio of the resampled
    images' summed numerators and denominators (for the caption-level rates, the mean).
    All metrics share the resamples of ``capcli.metrics.bootstrap.resample_indices`` for
    ``(n, n_resamples, seed)``, so intervals are paired across metrics and checkpoints. A
    resample that draws no claim of a kind (possible only when few captions make one) has no
    value for it and is left out; a metric with no claims at all gets (NaN, NaN).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    counts = resample_counts(resample_indices(scores.n, n_resamples, seed), scores.n)  # (R, n)
    alpha = 1.0 - confidence
    intervals = {}
    for name in scores.corpus:
        tops, bottoms = counts @ scores.numerator[name], counts @ scores.denominator[name]  # (R,)
        drawn = bottoms > 0
        if not drawn.any():
            intervals[name] = (math.nan, math.nan)
            continue
        low, high = np.quantile(tops[drawn] / bottoms[drawn], [alpha / 2, 1 - alpha / 2])
        intervals[name] = (float(low), float(high))
    return intervals
