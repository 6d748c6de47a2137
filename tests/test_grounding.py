"""Grounding metrics: hand-worked captions, describe()'s true captions, corrupted negatives, garbage.

Scenes are scene graphs only (no rendering). The expected values of the hand-built cases
are worked out in comments as numerator/denominator per metric.
"""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from capcli.data.synthetic import generate
from capcli.metrics import (
    GROUNDING_METRICS,
    bootstrap_interval,
    caption_errors,
    grounding_intervals,
    grounding_metrics,
    read_caption,
    resample_indices,
)
from capcli.scenes import (
    BACKGROUNDS,
    COLOURS,
    SHAPE_PLURALS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    compute_relations,
)
from capcli.scenes.corrupt import scene_negatives
from capcli.scenes.reader import is_true

NAN = math.nan


def _scene(*objects: tuple[str, str, str, float, float], background: str = "white") -> Scene:
    objs = tuple(SceneObject(shape, colour, size, x, y) for shape, colour, size, x, y in objects)
    return Scene(objs, compute_relations(objs), background)


# A small red circle on the left, a large blue square on the right, on white.
PAIR = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.7, 0.5))
# Two small red circles on the left (one above the other), a blue square on the right.
TWINS = _scene(("circle", "red", "small", 0.2, 0.25), ("circle", "red", "small", 0.2, 0.75),
               ("square", "blue", "small", 0.8, 0.5))


def _values(caption: str, scene: Scene = PAIR, lenient: bool = True) -> dict[str, float]:
    scores = grounding_metrics([caption], [scene], lenient=lenient)
    return {name: float(scores.per_image[name][0]) for name in GROUNDING_METRICS}


def _expect(got: dict[str, float], **want: float) -> None:
    assert set(want) == set(GROUNDING_METRICS)
    for name, value in want.items():
        if math.isnan(value):
            assert math.isnan(got[name]), (name, got[name])
        else:
            assert got[name] == pytest.approx(value), (name, got[name], value)


# --- hand-worked cases ---------------------------------------------------------------------


def test_a_true_caption_scores_perfectly():
    # object 2/2, attribute 2/2, count 2/2, relation 1/1, recall 2/2, no hallucination.
    caption = "a red circle to the left of a blue square"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=1, count_accuracy=1,
            relation_accuracy=1, recall=1, hallucination_rate=0, hallucinated_mentions=0,
            caption_accuracy=1, unparsed=0, relations_stated=1)
    assert caption_errors(caption, PAIR) == []


def test_a_caption_without_relations_has_no_relation_score():
    _expect(_values("a red circle and a blue square"), object_accuracy=1, attribute_accuracy=1,
            count_accuracy=1, relation_accuracy=NAN, recall=1, hallucination_rate=0,
            hallucinated_mentions=0, caption_accuracy=1, unparsed=0, relations_stated=0)


def test_a_wrong_colour_binding_is_an_attribute_error_and_a_hallucination():
    # Both shapes exist (object 2/2) but neither binding (attribute 0/2); with no matching
    # object nothing is left to count or cover: count -, recall 0/2, hallucinated 2/2.
    caption = "a blue circle and a red square"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=0, count_accuracy=NAN,
            relation_accuracy=NAN, recall=0, hallucination_rate=1, hallucinated_mentions=1,
            caption_accuracy=0, unparsed=0, relations_stated=0)
    assert caption_errors(caption, PAIR) == ["no blue circle in the image", "no red square in the image"]


def test_a_wrong_size_is_an_attribute_error():
    # "large red circle": the red circle is small. object 2/2, attribute 1/2, count 1/1
    # (the square), recall 1/2, hallucinated 1/2.
    caption = "a large red circle and a blue square"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=0.5, count_accuracy=1,
            relation_accuracy=NAN, recall=0.5, hallucination_rate=1, hallucinated_mentions=0.5,
            caption_accuracy=0, unparsed=0, relations_stated=0)
    assert caption_errors(caption, PAIR) == ["no large red circle in the image"]


def test_an_absent_shape_is_an_object_error_only():
    # object 1/2; the star is not scored for attributes or counts: attribute 1/1, count 1/1;
    # recall 1/2 (the square is not mentioned), hallucinated 1/2.
    caption = "a red circle and a green star"
    _expect(_values(caption), object_accuracy=0.5, attribute_accuracy=1, count_accuracy=1,
            relation_accuracy=NAN, recall=0.5, hallucination_rate=1, hallucinated_mentions=0.5,
            caption_accuracy=0, unparsed=0, relations_stated=0)
    assert caption_errors(caption, PAIR) == ["no star in the image"]


def test_a_wrong_relation_is_a_relation_error_only():
    caption = "a red circle is to the right of a blue square"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=1, count_accuracy=1,
            relation_accuracy=0, recall=1, hallucination_rate=0, hallucinated_mentions=0,
            caption_accuracy=0, unparsed=0, relations_stated=1)
    assert caption_errors(caption, PAIR) == ["the red circle is not right of the blue square"]


def test_a_relation_about_an_absent_object_is_not_scored():
    # The star is already an object error; "left of" it has nothing to be checked on.
    got = _values("a red circle is to the left of a green star")
    assert math.isnan(got["relation_accuracy"]) and got["object_accuracy"] == 0.5


def test_group_relations_hold_for_every_pair_and_name_the_group():
    assert caption_errors("two red circles are to the left of a blue square", TWINS) == []
    assert _values("two red circles are to the left of a blue square", TWINS)["relation_accuracy"] == 1
    wrong = "two red circles are to the right of a blue square"
    assert _values(wrong, TWINS)["relation_accuracy"] == 0
    assert caption_errors(wrong, TWINS) == ["the red circles are not right of the blue square"]
    # One circle is above the other, but a group is never above itself (no pair (i, i)).
    assert _values("two red circles are above two red circles", TWINS)["relation_accuracy"] == 0


def test_a_wrong_count_is_a_count_error_only():
    # count: "two red circles" 0 (one exists), "a blue square" 1 → 1/2.
    caption = "two red circles and a blue square"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=1, count_accuracy=0.5,
            relation_accuracy=NAN, recall=1, hallucination_rate=0, hallucinated_mentions=0,
            caption_accuracy=0, unparsed=0, relations_stated=0)
    assert caption_errors(caption, PAIR) == ["the image has 1 red circle, not 2"]
    # Undercounting twins: "a red circle" matches two.
    assert caption_errors("a red circle and a blue square", TWINS) == ["the image has 2 red circles, not 1"]


def test_repeated_mentions_add_up_to_one_count_claim():
    # "a red circle and a red circle" says two red circles: one count claim, true of TWINS.
    caption = "a red circle and a red circle and a blue square"
    assert caption_errors(caption, TWINS) == []
    assert _values(caption, TWINS)["count_accuracy"] == 1  # 2 claims: the red circles once, the square
    assert caption_errors(caption, PAIR) == ["the image has 1 red circle, not 2"]
    assert _values(caption, PAIR)["count_accuracy"] == pytest.approx(1 / 2)


def test_a_wrong_total_is_a_count_error():
    # Mentions 2/2 right, the total "three" wrong: count 2/3.
    caption = "three shapes: a red circle and a blue square"
    assert _values(caption)["count_accuracy"] == pytest.approx(2 / 3)
    assert caption_errors(caption, PAIR) == ["the image has 2 objects, not 3"]
    assert _values("two shapes: a red circle and a blue square")["count_accuracy"] == 1


def test_a_wrong_background_fails_only_caption_accuracy():
    caption = "a red circle and a blue square on a black background"
    got = _values(caption)
    assert got["caption_accuracy"] == 0
    assert all(got[k] == 1 for k in ("object_accuracy", "attribute_accuracy", "count_accuracy", "recall"))
    assert got["hallucination_rate"] == 0
    assert caption_errors(caption, PAIR) == ["the background is white, not black"]


def test_an_unreadable_caption_counts_as_one_hallucinated_mention():
    # No shape can be read: object 0/1, hallucinated 1/1, recall 0/2, nothing else scored.
    for caption in ("", "the the the", "a red", "a red and a blue"):
        _expect(_values(caption), object_accuracy=0, attribute_accuracy=NAN, count_accuracy=NAN,
                relation_accuracy=NAN, recall=0, hallucination_rate=1, hallucinated_mentions=1,
                caption_accuracy=0, unparsed=1, relations_stated=0)
        assert caption_errors(caption, PAIR) == ["outside the grammar, and no object can be read from it"]


def test_a_stuttering_caption_is_read_word_by_word():
    # "a red circle circle": mentions "a red circle" and a bare "circle" → object 2/2,
    # attribute 1/1 (the bare shape gives no colour), count 1/1, recall 1/2, no hallucination;
    # but it is outside the grammar.
    caption = "a red circle circle"
    _expect(_values(caption), object_accuracy=1, attribute_accuracy=1, count_accuracy=1,
            relation_accuracy=NAN, recall=0.5, hallucination_rate=0, hallucinated_mentions=0,
            caption_accuracy=0, unparsed=1, relations_stated=0)
    assert caption_errors(caption, PAIR) == ["outside the grammar; read word by word"]
    # Strictly, the same caption says nothing.
    _expect(_values(caption, lenient=False), object_accuracy=0, attribute_accuracy=NAN,
            count_accuracy=NAN, relation_accuracy=NAN, recall=0, hallucination_rate=1,
            hallucinated_mentions=1, caption_accuracy=0, unparsed=1, relations_stated=0)


def test_the_word_by_word_reading_finds_relations_totals_and_hallucinations():
    reading = read_caption("two shapes: a red circle is left of a blue square square .. on a black background")
    assert not reading.parsed
    assert [(m.shape, m.colour, m.count) for m in reading.mentions] == [
        ("circle", "red", 1), ("square", "blue", 1), ("square", None, None)]
    assert [(r.subject, r.relation, r.object) for r in reading.relations] == [(0, "left of", 1)]
    assert reading.total == 2 and reading.background == "black"
    assert _values("a red circle right of a blue square square")["relation_accuracy"] == 0
    chained = grounding_metrics(["a red circle left of a blue square, which is right of a red circle circle"], [PAIR])
    assert chained.numerator["relation_accuracy"][0] == chained.denominator["relation_accuracy"][0] == 2
    assert _values("a red circle circle and a green green star")["hallucination_rate"] == 1
    assert caption_errors("a red circle, which is above a green star star", PAIR) == [
        "outside the grammar; read word by word", "no star in the image"]


def test_corpus_values_are_micro_averages_over_claims():
    captions = [
        "a red circle to the left of a blue square",  # object 2/2, relation 1/1
        "a blue circle and a red square",  # object 2/2, attribute 0/2
        "a red circle and a green star",  # object 1/2, attribute 1/1
        "a red circle is to the right of a blue square",  # object 2/2, relation 0/1
        "two red circles and a blue square",  # object 2/2, count 1/2
        "the the the",  # object 0/1
        "a red circle circle",  # object 2/2, attribute 1/1, recall 1/2
    ]
    scores = grounding_metrics(captions, [PAIR] * len(captions))
    # object: (2+2+1+2+2+0+2) / (2+2+2+2+2+1+2) = 11/13, not the mean of per-image 5.5/7.
    assert scores.corpus["object_accuracy"] == pytest.approx(11 / 13)
    assert np.nanmean(scores.per_image["object_accuracy"]) == pytest.approx(5.5 / 7)
    # attribute: 2 + 0 + 1 + 2 + 2 + - + 1 = 8 of 2 + 2 + 1 + 2 + 2 + 0 + 1 = 10.
    assert scores.corpus["attribute_accuracy"] == pytest.approx(8 / 10)
    # count: 2 + - + 1 + 2 + 1 + - + 1 = 7 of 2 + 0 + 1 + 2 + 2 + 0 + 1 = 8.
    assert scores.corpus["count_accuracy"] == pytest.approx(7 / 8)
    assert scores.corpus["relation_accuracy"] == pytest.approx(1 / 2)
    # recall: 2 + 0 + 1 + 2 + 2 + 0 + 1 = 8 of 14 scene objects.
    assert scores.corpus["recall"] == pytest.approx(8 / 14)
    assert scores.corpus["hallucination_rate"] == pytest.approx(3 / 7)
    # hallucinated mentions: 0 + 2 + 1 + 0 + 0 + 1 + 0 = 4 of 13.
    assert scores.corpus["hallucinated_mentions"] == pytest.approx(4 / 13)
    assert scores.corpus["caption_accuracy"] == pytest.approx(1 / 7)
    assert scores.corpus["unparsed"] == pytest.approx(2 / 7)
    assert scores.denominator["relation_accuracy"].tolist() == [1, 0, 0, 1, 0, 0, 0]
    assert math.isnan(scores.per_image["relation_accuracy"][1])
    assert scores.errors[3] == ["the red circle is not right of the blue square"]
    summary = scores.summary()
    assert summary["n"] == 7 and summary["claims"]["object_accuracy"] == 13
    json.dumps(summary, allow_nan=False)


def test_scenes_may_be_rows_and_inputs_are_checked():
    caption = ["a red circle to the left of a blue square", "two red circles"]
    as_rows = grounding_metrics(caption, [PAIR.to_dict(), TWINS.to_dict()])
    as_scenes = grounding_metrics(caption, [PAIR, TWINS])
    assert as_rows.corpus == as_scenes.corpus
    with pytest.raises(ValueError, match="2 captions for 1 scenes"):
        grounding_metrics(caption, [PAIR])
    with pytest.raises(ValueError, match="no images"):
        grounding_metrics([], [])
    with pytest.raises(TypeError, match="caption 1"):
        grounding_metrics(["a red circle", None], [PAIR, PAIR])


def test_summary_writes_a_metric_without_claims_as_null():
    summary = grounding_metrics(["a red circle"], [PAIR]).summary()
    assert summary["metrics"]["relation_accuracy"] is None
    assert summary["claims"]["relation_accuracy"] == 0
    json.dumps(summary, allow_nan=False)


# --- describe() and its corruptions -----------------------------------------------------------


def _generated(n: int) -> list[tuple[Scene, list[str]]]:
    return [generate(split, i, seed=0) for i in range(n // 2) for split in ("train", "test_novel")]


def test_every_true_caption_of_300_scenes_scores_perfectly():
    pairs = _generated(300)
    captions = [c for _, caps in pairs for c in caps]
    scenes = [s.to_dict() for s, caps in pairs for _ in caps]
    scores = grounding_metrics(captions, scenes, lenient=False)
    # At most one reference in five states a relation where the scene has one (describe's "relation"
    # family; none where no relation holds between whole groups of like objects).
    stated = scores.per_image.pop("relations_stated")
    relational = np.array([bool(s["relations"]) for s in scenes])
    assert np.isnan(stated[~relational]).all() and set(stated[relational]) == {0.0, 1.0}
    assert 0.1 < scores.corpus.pop("relations_stated") <= 0.2
    for name in scores.corpus:
        want = 0.0 if name in ("hallucination_rate", "hallucinated_mentions", "unparsed") else 1.0
        assert scores.corpus[name] == want, name
        values = scores.per_image[name]
        assert np.all(values[~np.isnan(values)] == want), name
    assert all(errors == [] for errors in scores.errors)
    # Every kind of claim was exercised, so the 1.0s are not vacuous.
    for name in ("attribute_accuracy", "count_accuracy", "relation_accuracy"):
        assert scores.denominator[name].sum() > 100, name
    lenient = grounding_metrics(captions, scenes).corpus
    assert lenient.pop("relations_stated") == pytest.approx(stated[relational].mean())
    assert scores.corpus == lenient


KIND_METRICS = {  # the metrics a corruption of that kind must lower
    "object": ("object_accuracy", "attribute_accuracy"),
    "colour": ("attribute_accuracy",),
    "size": ("attribute_accuracy",),
    "swap": ("attribute_accuracy",),
    "count": ("count_accuracy",),
    "relation": ("relation_accuracy",),
}


def test_every_corrupted_caption_is_caught_by_the_metric_of_its_kind():
    captions, scenes, kinds = [], [], []
    for scene, caps in _generated(120):
        for caption in caps:
            for kind, negatives in scene_negatives(caption, scene).items():
                captions += negatives
                scenes += [scene] * len(negatives)
                kinds += [kind] * len(negatives)
    assert set(kinds) == set(KIND_METRICS)
    scores = grounding_metrics(captions, scenes)
    assert scores.corpus["unparsed"] == 0  # corruptions stay in the grammar
    for i, kind in enumerate(kinds):
        lowered = [scores.per_image[name][i] < 1 for name in KIND_METRICS[kind]]
        assert any(lowered), (kind, captions[i])
        assert scores.per_image["caption_accuracy"][i] == 0
        assert scores.errors[i], captions[i]
        if kind in ("object", "colour", "size", "swap"):
            assert scores.per_image["hallucination_rate"][i] == 1, captions[i]


def test_caption_errors_is_empty_exactly_when_the_caption_is_true():
    for scene, caps in _generated(40):
        candidates = caps + [n for negatives in scene_negatives(caps[0], scene).values() for n in negatives]
        for caption in candidates:
            assert (caption_errors(caption, scene) == []) == is_true(caption, scene), caption


# --- robustness --------------------------------------------------------------------------------

GARBAGE = [
    "", " ", ".", ",", ":", "a", "an", "two", "a red", "red red red", "circle", "CIRCLE!!!", "circles circles",
    "a red circle and a", "a red circle circle", "a red circle to the left of", "left of left of",
    "which is above", "three shapes:", "shapes: shapes:", "background", "a light gray background with",
    "on a background", "\x00\n\t", "🙂 circle", "İstanbul red", "2 red circles", "a red circle." * 50,
    "a" * 10_000, "A Red Circle To The Left Of A Blue Square", "a single", "a single large",
    "a small large red circle", "is are is are", ", and , and", "which which is left of a red circle",
]
_VOCAB = [*SHAPES, *SHAPE_PLURALS.values(), *COLOURS, *SIZES, *BACKGROUNDS, "a", "an", "one", "two",
          "three", "single", "is", "are", "which", "and", ",", ":", "to", "the", "left", "right", "of",
          "above", "below", "over", "under", "on", "background", "with", "shapes", "objects", "there"]


def _soup(rng: random.Random) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(rng.randint(0, 14)))


def test_garbage_never_crashes_and_scores_stay_in_range():
    rng = random.Random(0)
    captions = GARBAGE + [_soup(rng) for _ in range(600)]
    scenes = [generate("train", i % 50, seed=0)[0] for i in range(len(captions))]
    for lenient in (True, False):
        scores = grounding_metrics(captions, scenes, lenient=lenient)
        for name in GROUNDING_METRICS:
            values = scores.per_image[name]
            finite = values[~np.isnan(values)]
            assert np.all((finite >= 0) & (finite <= 1)), name
            assert 0 <= scores.corpus[name] <= 1 or math.isnan(scores.corpus[name]), name
            # Every caption counts: caption-level metrics, objects and recall are never NaN.
            if name not in ("attribute_accuracy", "count_accuracy", "relation_accuracy", "relations_stated"):
                assert not np.isnan(values).any(), name
        hallucinating = scores.per_image["hallucinated_mentions"] > 0
        assert np.array_equal(hallucinating, scores.per_image["hallucination_rate"] == 1)
        for i, caption in enumerate(captions):
            true = is_true(caption, scenes[i])
            assert (scores.per_image["caption_accuracy"][i] == 1) == true, caption
            assert all(isinstance(e, str) for e in scores.errors[i])
        for low, high in grounding_intervals(scores, n_resamples=50).values():
            assert (0 <= low <= high <= 1) or (math.isnan(low) and math.isnan(high))


def test_a_caption_in_the_grammar_reads_the_same_either_way():
    rng = random.Random(1)
    for _ in range(2000):
        caption = _soup(rng)
        strict = read_caption(caption, lenient=False)
        if strict.parsed:
            assert read_caption(caption) == strict


# --- intervals ---------------------------------------------------------------------------------


def test_intervals_are_paired_with_the_house_bootstrap():
    rng = random.Random(2)
    pairs = _generated(60)
    captions = [rng.choice(caps + _soup_list(rng)) for _, caps in pairs]
    scores = grounding_metrics(captions, [s for s, _ in pairs])
    intervals = grounding_intervals(scores, n_resamples=300, seed=3)
    assert list(intervals) == list(GROUNDING_METRICS)
    # A caption-level rate is a mean: the house bootstrap of the per-image values gives the same.
    for name in ("hallucination_rate", "caption_accuracy", "unparsed"):
        assert intervals[name] == pytest.approx(bootstrap_interval(scores.per_image[name], 300, seed=3))
    # A claim-level accuracy is a ratio of resampled sums, on the same draws.
    idx = resample_indices(scores.n, 300, seed=3)
    num, den = scores.numerator["object_accuracy"], scores.denominator["object_accuracy"]
    ratios = [num[row].sum() / den[row].sum() for row in idx]
    assert intervals["object_accuracy"] == pytest.approx(tuple(np.quantile(ratios, [0.025, 0.975])))
    for low, high in intervals.values():
        assert 0 <= low <= high <= 1


def _soup_list(rng: random.Random) -> list[str]:
    return [_soup(rng), "a green star and a purple cross"]


def test_intervals_of_perfect_scores_are_points_and_missing_claims_give_nan():
    scores = grounding_metrics(["a red circle and a blue square"] * 5, [PAIR] * 5)
    intervals = grounding_intervals(scores, n_resamples=100)
    assert intervals["object_accuracy"] == (1.0, 1.0)
    assert intervals["hallucination_rate"] == (0.0, 0.0)
    assert all(math.isnan(v) for v in intervals["relation_accuracy"])
    with pytest.raises(ValueError, match="confidence"):
        grounding_intervals(scores, confidence=1.0)


def test_resamples_without_a_claim_are_left_out():
    # Only the first of two captions states a relation (a false one): a quarter of the
    # resamples draw the second twice and have no relation to score.
    scores = grounding_metrics(["a red circle is to the right of a blue square", "a red circle"], [PAIR, PAIR])
    assert grounding_intervals(scores, n_resamples=200)["relation_accuracy"] == (0.0, 0.0)


def test_relations_stated_counts_only_scenes_that_have_a_relation():
    # A relation said of a lone circle is wrong (an object error), but there was no relation to state:
    # that caption counts in neither part of the rate, which stays a share of the relational scenes.
    alone = _scene(("circle", "red", "small", 0.5, 0.5))
    captions = ["a red circle to the left of a blue square", "a red circle to the left of a blue square",
                "a red circle and a blue square"]
    scores = grounding_metrics(captions, [alone, PAIR, PAIR])
    assert math.isnan(scores.per_image["relations_stated"][0])
    assert list(scores.per_image["relations_stated"][1:]) == [1.0, 0.0]
    assert scores.corpus["relations_stated"] == 0.5
