"""On-policy alignment: the judges by hand, the pair builder, mDPO's terms, rounds and their resume.

The judges' scores are checked on small scene graphs worked out by hand and against
pycocoevalcap's CIDEr-D; the pair builder never pairs equal scores and respects the gap;
the image-conditional term and the anchor equal their formulas on the model's own
log-probabilities; align with on-policy pairs runs end to end on the synthetic source
(grounding judge) and on an image folder without scene graphs (CIDEr-D judge), and its
rounds resume exactly after Ctrl-C.
"""

from __future__ import annotations

import json
import math
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pycocoevalcap.cider.cider import Cider
from test_align import align_settings, start_checkpoint, trained_rows  # noqa: F401 - the module's fixture, reused
from test_sources import _write_folder
from torch.testing import assert_close

from capcli.data.batches import PreferenceDataset, other_images
from capcli.errors import ConfigError, TrainingInterrupted
from capcli.metrics.grounding import grounding_reward
from capcli.metrics.ptb import simple_ptb_tokenize
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings, candidate_captions
from capcli.objectives import score_pairs
from capcli.phases import ROUND_FILE, ROUNDS_DIR, align, policy_spec, prepare_align
from capcli.phases.policy import Candidate, pair_candidates
from capcli.phases.rewards import cider_d
from capcli.scenes import Scene, SceneObject, compute_relations
from capcli.settings import override
from capcli.train.runlog import read_metrics
from capcli.train.sampler import SampleKey


def scene(*objects: tuple[str, str, str, float, float]) -> Scene:
    """Objects as (size, colour, shape, x, y)."""
    objs = tuple(SceneObject(shape=s, colour=c, size=z, x=x, y=y) for z, c, s, x, y in objects)
    return Scene(objs, compute_relations(objs), "white")


TWO = scene(("small", "red", "circle", 0.2, 0.5), ("large", "blue", "square", 0.8, 0.5))


# --- the grounding judge, by hand ---------------------------------------------------------------------------------


@pytest.mark.parametrize(("caption", "expected"), [
    ("a red circle and a blue square", 1.0),  # both objects, nothing false
    ("a red circle", 0.5),  # half the objects, nothing false
    ("a red circle and a green star", 0.5 - 1.0),  # one covered, one invented object
    ("a red circle and a green square", 0.5 - 1.0),  # a square is there, but not a green one
    ("two red circles and a blue square", 1.0 - 1.0),  # both covered, the count is wrong
    ("a red circle right of a blue square", 1.0 - 1.0),  # both covered, the relation is wrong
    ("a red circle left of a blue square", 1.0),
    ("", -1.0 - 0.5),  # says nothing: one invented object, no recall, outside the grammar
    ("a red circle circle and a blue square", 1.0 - 0.5),  # outside the grammar: read word by word, charged 0.5
])
def test_grounding_reward_by_hand(caption, expected):
    assert grounding_reward(caption, TWO) == pytest.approx(expected)


def test_grounding_reward_can_pay_for_true_relations():
    assert grounding_reward("a red circle left of a blue square", TWO, relation_credit=0.5) == pytest.approx(1.5)
    assert grounding_reward("a blue square right of a red circle", TWO, relation_credit=0.5) == pytest.approx(1.5)
    assert grounding_reward("a red circle right of a blue square", TWO, relation_credit=0.5) == pytest.approx(0.0)
    assert grounding_reward("a red circle and a blue square", TWO, relation_credit=0.5) == pytest.approx(1.0)


def test_the_grounding_judge_pays_the_relation_credit_of_the_settings():
    """``align.policy.relation_credit`` reaches the judge that on-policy pairs are drawn with."""
    import datasets

    from capcli.phases.rewards import load_judge
    from capcli.settings import load_settings

    split = datasets.Dataset.from_dict({"captions": [["a red circle left of a blue square"]],
                                        "scene": [TWO.to_dict()]})
    settings = load_settings(environ={"CAPCLI_ALIGN__POLICY__RELATION_CREDIT": "0.5"})
    judge = load_judge("grounding", "", split, torch.device("cpu"), 10**6, settings.align.policy.relation_credit)
    plain = load_judge("grounding", "", split, torch.device("cpu"), 10**6)
    caption = [["a red circle left of a blue square", "a red circle right of a blue square"]]
    assert judge.score([0], caption) == [[pytest.approx(1.5), pytest.approx(0.0)]]
    assert plain.score([0], caption) == [[pytest.approx(1.0), pytest.approx(0.0)]]


def test_grounding_reward_ranks_truth_over_length_and_takes_scene_rows():
    assert grounding_reward("a red circle", TWO.to_dict()) > grounding_reward("a red circle and a blue star", TWO)
    assert grounding_reward("a red circle", TWO) > grounding_reward("", TWO)


# --- the CIDEr-D judge against pycocoevalcap -------------------------------------------------------------------------


def test_cider_judge_equals_pycocoevalcaps_cider_on_the_same_tokens():
    refs = [["a red circle and a blue square", "there is a red circle", "a blue square right of a red circle"],
            ["a green star", "a single green star", "one shape: a green star"],
            ["two yellow hearts", "a picture of two yellow hearts", "yellow hearts on a white background"]]
    captions = ["a red circle", "a green star on a white background", "two hearts"]
    gts = {i: [simple_ptb_tokenize(r) for r in rs] for i, rs in enumerate(refs)}
    res = {i: [simple_ptb_tokenize(c)] for i, c in enumerate(captions)}
    _, expected = Cider().compute_score(gts, res)
    assert_close(torch.tensor(cider_d(list(zip(captions, refs, strict=True)))), torch.tensor(expected))
    # Several captions of one image: each scores as it would alone, one caption per image.
    others = ["a blue circle", "a green star", "two yellow hearts on a white background"]
    _, expected_others = Cider().compute_score(gts, {i: [simple_ptb_tokenize(c)] for i, c in enumerate(others)})
    entries = [(c, refs[i]) for i in range(3) for c in (captions[i], others[i])]
    both = cider_d(entries, images=[i for i in range(3) for _ in range(2)])
    assert_close(torch.tensor(both[0::2]), torch.tensor(expected))
    assert_close(torch.tensor(both[1::2]), torch.tensor(expected_others))


# --- the pair builder ----------------------------------------------------------------------------------------------


def samples(*scored: tuple[str, float]) -> list[Candidate]:
    return [Candidate(t, s) for t, s in scored]


def test_pairs_take_the_best_against_the_worst_beyond_the_gap():
    pool = samples(("a", 1.0), ("b", 0.2), ("c", -1.0), ("d", 0.8), ("e", 0.6))
    pairs = pair_candidates(pool, [], per_image=3, min_gap=0.3)
    assert [(c.text, r.text) for c, r in pairs] == [("a", "c"), ("a", "b"), ("a", "e")]  # d is within 0.3 of a
    assert all(c.score - r.score >= 0.3 for c, r in pairs)


def test_pairs_never_join_equal_scores_even_with_no_gap():
    pool = samples(("a", 0.5), ("b", 0.5), ("c", 0.5), ("d", 0.5))
    assert pair_candidates(pool, [], per_image=3, min_gap=0.0) == []
    pairs = pair_candidates(samples(("a", 0.5), ("b", 0.5), ("c", 0.1)), [], per_image=3, min_gap=0.0)
    assert [(c.text, r.text) for c, r in pairs] == [("a", "c")]


def test_duplicate_and_empty_captions_pair_once():
    pool = samples(("a", 1.0), ("b", 0.0), ("b", 0.0), ("", -1.0), ("  ", -1.0))
    assert [(c.text, r.text) for c, r in pair_candidates(pool, [], per_image=5, min_gap=0.5)] == [("a", "b")]


def test_a_reference_is_chosen_only_where_every_sample_is_worse():
    refs = [Candidate("ref one", 1.0, True), Candidate("ref two", 0.9, True)]
    worse = samples(("a", 0.5), ("b", -1.0))
    pairs = pair_candidates(worse, refs, per_image=2, min_gap=0.5)
    assert [(c.text, r.text) for c, r in pairs] == [("ref one", "b"), ("ref one", "a")] and pairs[0][0].reference
    assert pair_candidates(worse, refs, per_image=2, min_gap=0.5, use_references=False)[0][0].text == "a"
    level = samples(("a", 1.0), ("b", -1.0))  # a sample as good as the best reference stays chosen: on-policy
    assert pair_candidates(level, refs, per_image=1, min_gap=0.5)[0][0].text == "a"


def test_other_images_point_each_pair_at_another_image():
    keys = ["x", "x", "y", "z", "z", "w"]
    other = other_images(keys, seed=3)
    assert all(keys[o] != k for k, o in zip(keys, other, strict=True))
    assert other[0] == other[1] and other[3] == other[4]  # pairs of one image share their other image
    assert {keys[o] for o in other} == set(keys)  # a cycle: each image is someone's other
    assert other_images(["x", "x"], seed=0) is None


# --- sampling --------------------------------------------------------------------------------------------------------


def test_candidates_are_beams_then_samples_and_a_seed_repeats_them(start_checkpoint):  # noqa: F811
    model = Captioner.from_pretrained(start_checkpoint)
    features = model.image_features(torch.zeros(3, 3, model.image_size, model.image_size, dtype=torch.uint8))
    decode = DecodeSettings(max_length=8)
    torch.manual_seed(0)
    first = candidate_captions(model, features, decode, beams=2, samples=3)
    torch.manual_seed(0)
    again = candidate_captions(model, features, decode, beams=2, samples=3)
    assert first == again and [len(c) for c in first] == [5, 5, 5]
    beam = candidate_captions(model, features, DecodeSettings(max_length=8, beams=2), beams=2, samples=0)
    assert [c[:2] for c in first] == beam
    assert model.training  # left as found


# --- mDPO's terms ----------------------------------------------------------------------------------------------------


def test_image_conditional_term_and_anchor_equal_their_formulas(settings_factory, start_checkpoint):  # noqa: F811
    settings = align_settings(settings_factory, start_checkpoint, **{"align.image_weight": 0.7,
                                                                      "align.anchor_weight": 0.4})
    phase = prepare_align(settings)
    data: PreferenceDataset = phase.data.train
    assert data.other is not None and data.reference.shape[1] == 3
    model = phase.model
    with torch.no_grad():  # move the policy off the reference, so that rewards are not all zero
        model.decoder.lm_head.weight.add_(0.01 * torch.randn_like(model.decoder.lm_head.weight))
    batch = phase.data.collate([data[SampleKey(i, 0)] for i in trained_rows(data, 6)])
    out = phase.objective(model, batch, progress=0.25)
    alpha, beta = 0.7 + (0.3 - 0.7) * 0.25, 0.1
    with torch.no_grad():
        chosen, _, chosen_other = score_pairs(model, batch)
        own = model.caption_logits(batch.features, batch.chosen_ids, batch.chosen_mask)
        alone = torch.log_softmax(own, -1).gather(-1, batch.chosen_ids.unsqueeze(-1)).squeeze(-1)
        assert_close(chosen, (alone * batch.chosen_mask).sum(1), rtol=1e-4, atol=1e-4)
        ref = batch.reference
        reward, reward_other = beta * (chosen - ref[:, 0]), beta * (chosen_other - ref[:, 2])
        image_term = -F.logsigmoid(reward - reward_other).mean()
        anchor = -F.logsigmoid(reward).mean()
    assert_close(out["image_preference_loss"].detach(), (1 - alpha) * 0.7 * image_term, rtol=1e-4, atol=1e-6)
    assert_close(out["anchor_loss"].detach(), (1 - alpha) * 0.4 * anchor, rtol=1e-4, atol=1e-6)


def test_at_the_reference_the_image_term_is_ln2(settings_factory, start_checkpoint):  # noqa: F811
    phase = prepare_align(align_settings(settings_factory, start_checkpoint, **{"align.image_weight": 1.0}))
    batch = phase.data.collate([phase.data.train[SampleKey(i, 0)] for i in trained_rows(phase.data.train, 4)])
    out = phase.objective(phase.model.eval(), batch, progress=1.0)
    assert float(out["image_preference_loss"].detach()) == pytest.approx((1 - 0.3) * math.log(2), abs=1e-4)
    assert "anchor_loss" not in out


# --- align on on-policy pairs ---------------------------------------------------------------------------------------


def policy_settings(settings_factory, start, name="policy", **overrides):
    return align_settings(settings_factory, start, name, **{
        "align.preferences": "policy", "align.policy.beams": 2, "align.policy.samples": 2,
        "align.policy.images": 24, "align.policy.min_gap": 0.1, "align.engine.max_steps": 2, **overrides})


def test_policy_spec_grammar():
    assert policy_spec("policy") == ("", "") and policy_spec("policy:cider") == ("cider", "")
    assert policy_spec("policy:clip:weights.bin") == ("clip", "weights.bin")
    assert policy_spec(None) is None and policy_spec("generated") is None
    with pytest.raises(ConfigError, match="unknown judge"):
        policy_spec("policy:bleu")


def test_on_policy_pairs_are_drawn_judged_and_kept_with_the_run(settings_factory, start_checkpoint):  # noqa: F811
    settings = policy_settings(settings_factory, start_checkpoint)
    phase = prepare_align(settings)
    run = Path(settings.align.engine.output)
    train = phase.data.train.pairs
    assert set(train["corruption"]) == {"policy"} and len(train) > 0
    assert all(c != r for c, r in zip(train["chosen"], train["rejected"], strict=True))
    assert set(phase.data.val.pairs["corruption"]) != {"policy"}  # held out: the generated corruption pairs
    draw = json.loads((run / "draw.json").read_text())
    assert draw["judge"] == "grounding" and draw["images"] == 24 and draw["captions"] == 24 * 4
    assert draw["pairs"] == len(train) and draw["judge_chosen"] > draw["judge_rejected"]
    assert (run / "pairs" / "dataset_info.json").exists()


@pytest.mark.slow(seconds=28)
def test_rounds_resume_exactly_after_ctrl_c(settings_factory, start_checkpoint):  # noqa: F811
    """Two rounds; Ctrl-C in the second; --resume skips round 1, reads round 2's pairs back and
    repeats the uninterrupted run's losses."""
    rounds = {"align.policy.rounds": 2, "align.policy.reference": "previous", "align.engine.max_steps": 3}
    whole = policy_settings(settings_factory, start_checkpoint, "whole", **rounds)
    result = align(whole)
    run = Path(whole.align.engine.output)
    assert (run / ROUNDS_DIR / "1" / ROUND_FILE).exists() and (run / ROUND_FILE).exists()
    logged = [r for r in read_metrics(run / "metrics.jsonl") if r["split"] == "round"]
    assert [r["round"] for r in logged] == [1, 2] and all(r["pairs"] > 0 and r["steps"] == 3 for r in logged)
    assert result.fit.steps == 3

    parted = policy_settings(settings_factory, start_checkpoint, "parted", **rounds)
    calls = []

    def stop_in_round_two(step, _):
        calls.append(step)
        if len(calls) == 5:  # round 1 took steps 1-3; this is round 2's step 2
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted, match="round 2 of 2"):
        align(parted, on_step=stop_in_round_two)
    align(override(parted, {"align.engine.resume": True}))

    def losses(run: Path) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]

    for sub in (Path(ROUNDS_DIR) / "1", Path(".")):
        expected, got = losses(run / sub), losses(Path(parted.align.engine.output) / sub)
        assert [s for s, _ in got] == [s for s, _ in expected] == [1, 2, 3]
        assert_close(torch.tensor([v for _, v in got]), torch.tensor([v for _, v in expected]), rtol=1e-5, atol=1e-6)


@pytest.mark.slow(seconds=30)
def test_policy_pairs_with_the_cider_judge_on_an_image_folder(settings_factory, tmp_path):
    """A source without scene graphs: pretrain on an image folder, align on pairs the CIDEr-D
    judge picked, and evaluate CIDEr-D before and after."""
    from capcli.evaluate.evaluation import evaluate
    from capcli.phases import pretrain

    folder = _write_folder(tmp_path / "photos", 40)
    settings = settings_factory("folder", **{"data.source": f"imagefolder:{folder}", "data.val_size": 8,
                                             "data.test_size": 8, "pretrain.engine.max_steps": 4})
    start = pretrain(settings).best_checkpoint
    aligned = policy_settings(settings_factory, start, "folder-align", **{
        "data.source": f"imagefolder:{folder}", "data.val_size": 8, "data.test_size": 8,
        "align.preferences": "policy:cider", "align.policy.min_gap": 0.0})
    with pytest.raises(ConfigError, match="scene graphs"):
        prepare_align(override(aligned, {"align.preferences": "policy:grounding"}))
    result = align(aligned)
    draw = json.loads((Path(aligned.align.engine.output) / "draw.json").read_text())
    assert draw["judge"] == "cider" and draw["pairs"] > 0
    scores = {}
    for name, checkpoint in (("pretrain", start), ("align", result.fit.best_checkpoint)):
        greedy = override(aligned, {"evaluate.split": "test", "evaluate.decode.beams": 1})
        scores[name] = evaluate(greedy, checkpoint, log=lambda _: None)["metrics"]["cider_d"]["value"]
    assert all(math.isfinite(v) for v in scores.values())
