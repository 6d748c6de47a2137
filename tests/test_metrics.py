"""Metrics against values worked out by hand, values pinned from pycocoevalcap, and the Java PTB tokenizer."""

from __future__ import annotations

import math
import shutil
import stat
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from capcli.errors import CapcliError
from capcli.metrics import (
    bootstrap_interval,
    caption_intervals,
    caption_metrics,
    captions,
    clip_score,
    corpus_bleu,
    pairwise_outcomes,
    preference_accuracy,
    ref_clip_score,
    resample_counts,
    resample_indices,
    simple_ptb_tokenize,
    tokenize,
    win_rate,
)

needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="needs Java (PTBTokenizer, METEOR)")

# --- caption metrics ---------------------------------------------------------------------

# Tokenized, the references have these lengths (punctuation dropped, "dog's" → "dog 's"):
#   circle 7, 4, 5   shapes 9, 7, 8   triangle 3, 6, 6   dog 7, 6, 5
REFERENCES = {
    "circle": ["A red circle on a white background.", "A small red circle", "There is a red circle."],
    "shapes": ["Two shapes: a blue square and a green star.", "a blue square and a green star",
               "A green star next to a blue square."],
    "triangle": ["a yellow triangle", "An image of a yellow triangle.", "One shape: a large yellow triangle"],
    "dog": ["A dog's ball on the grass.", "a brown dog's red ball", "The ball isn't moving."],
}
PREDICTIONS = {
    "circle": "a red circle.",  # 3 tokens, all matched; closest reference length 4
    "shapes": "A blue square and a red star",  # 7 tokens, 6 matched ("red" is not); closest 7
    "triangle": "a yellow triangle on gray",  # 5 tokens, 3 matched; closest 6
    "dog": "The dog's ball",  # 4 tokens (the dog 's ball), all matched; closest 5
}


@pytest.fixture
def no_java(monkeypatch):
    """Make ``java`` look absent, whatever this machine has."""
    monkeypatch.setattr(captions.shutil, "which", lambda *args, **kwargs: None)


@pytest.fixture(scope="module")
def python_scores():
    """The fixture scored with the Python tokenizer and without METEOR, once per module."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(captions.shutil, "which", lambda *args, **kwargs: None)
        return caption_metrics(PREDICTIONS, REFERENCES, tokenizer="python")


def test_corpus_bleu_1_by_hand(python_scores):
    """Clipped unigram matches 3 + 6 + 3 + 4 = 16 of 19 candidate tokens; closest reference
    lengths 4 + 7 + 6 + 5 = 22 > 19, so the brevity penalty is exp(1 - 22/19)."""
    expected = 16 / 19 * math.exp(1 - 22 / 19)  # ≈ 0.719107
    assert python_scores.corpus["bleu_1"] == pytest.approx(expected, rel=1e-8)


def test_per_image_bleu_1_by_hand(python_scores):
    """"a red circle": precision 3/3, 3 tokens against a closest reference of 4: exp(1 - 4/3)."""
    assert python_scores.per_image["bleu_1"][0] == pytest.approx(math.exp(-1 / 3), rel=1e-8)


def test_bleu_counts_by_hand(python_scores):
    """Row "circle": test length 3, reference length 4, guessed 3/2/1/0 n-grams, all of them matched."""
    np.testing.assert_array_equal(python_scores.bleu_stats[0], [3, 4, 3, 2, 1, 0, 3, 2, 1, 0])
    np.testing.assert_array_equal(python_scores.bleu_stats[:, :2].sum(axis=0), [19, 22])


def test_rouge_l_by_hand(python_scores):
    """"a red circle" against each reference: LCS 3 every time, so precision 1 and the best
    recall 3/4 ("a small red circle"). F with β = 1.2: (1 + β²)·P·R / (R + β²·P)."""
    p, r, beta2 = 1.0, 3 / 4, 1.2**2
    assert python_scores.per_image["rouge_l"][0] == pytest.approx((1 + beta2) * p * r / (r + beta2 * p))
    assert python_scores.corpus["rouge_l"] == pytest.approx(python_scores.per_image["rouge_l"].mean())


def test_pinned_pycocoevalcap_values(python_scores):
    """Computed once with pycocoevalcap 1.2 (this fixture, python tokenizer); any change in the
    tokenizer, the scorers or their wiring moves them. CIDEr-D is high because its IDF comes
    from only 4 images."""
    corpus = python_scores.corpus
    assert [corpus[f"bleu_{n}"] for n in (2, 3, 4)] == pytest.approx([0.6398302, 0.5755792, 0.4644282], abs=1e-6)
    assert corpus["cider_d"] == pytest.approx(3.5186007, abs=1e-6)
    assert python_scores.per_image["cider_d"] == pytest.approx([3.6004751, 4.8420349, 3.2349740, 2.3969188], abs=1e-6)
    assert python_scores.per_image["rouge_l"] == pytest.approx([0.8356164, 0.8571429, 0.7854077, 0.5791139], abs=1e-6)
    assert corpus["cider_d"] == pytest.approx(python_scores.per_image["cider_d"].mean())


def test_cider_d_by_hand_on_two_images(no_java):
    """CIDEr-D (Vedantam et al. 2015, as pycocoevalcap computes it) worked out on two images.

    For n = 1..4, each caption is a vector of its n-grams' tf·idf, with
    idf(g) = ln(N) − ln(max(1, df(g))): N = 2 images, df(g) the number of images whose
    references hold g. So an n-gram in both images' references ("a", "square") weighs 0, and
    every other one, in one image's references or in none ("star"), weighs L = ln 2. Then
    sim_n(c, r) = Σ_g min(c_g, r_g)·r_g / (|c|·|r|) (candidate counts clipped at the
    reference's), times the length penalty exp(−(len c − len r)² / (2·6²)); an image scores
    10 · mean over n of Σ_r sim_n / (number of references). L cancels in every ratio below.

    Image 0, "a red circle circle" (4 words) against "a red circle" and "a red square"
    (3 words each, penalty p = exp(−1/72) for both):
      n=1: c = {a:0, red:L, circle:2L}, |c| = L√5
           r1 = {a:0, red:L, circle:L}, |r1| = L√2: (L·L + min(2L, L)·L) / (L√5·L√2) = 2/√10
           r2 = {a:0, red:L, square:0}, |r2| = L:   L·L / (L√5·L) = 1/√5
      n=2: c = {a red, red circle, circle circle} all L, |c| = L√3
           r1 = {a red, red circle}: 2/√6;  r2 = {a red, red square}: 1/√6
      n=3: c = {a red circle, red circle circle}, |c| = L√2; r1 = {a red circle}: 1/√2; r2: 0
      n=4: c = {a red circle circle}; no reference has a 4-gram (|r| = 0): 0
    Image 1, "a blue star" (3 words) against "a blue square" (3, penalty 1) and
    "one small blue square" (4, penalty p):
      n=1: c = {a:0, blue:L, star:L}, |c| = L√2; r1 = {a:0, blue:L, square:0}: 1/√2;
           r2 = {one:L, small:L, blue:L, square:0}, |r2| = L√3: 1/√6, times p
      n=2: c = {a blue, blue star}; r1 = {a blue, blue square}: 1/2; r2 = {one small, small blue, blue square}: 0
      n=3, n=4: nothing shared: 0
    """
    references = {0: ["a red circle", "a red square"], 1: ["a blue square", "one small blue square"]}
    predictions = {0: "a red circle circle", 1: "a blue star"}
    p = math.exp(-1 / (2 * 6**2))
    per_n_0 = [p * (2 / math.sqrt(10) + 1 / math.sqrt(5)), p * 3 / math.sqrt(6), p / math.sqrt(2), 0.0]
    per_n_1 = [1 / math.sqrt(2) + p / math.sqrt(6), 1 / 2, 0.0, 0.0]
    expected = [10 * sum(per_n) / 4 / 2 for per_n in (per_n_0, per_n_1)]  # ≈ 3.712479, 2.012155
    scores = caption_metrics(predictions, references, tokenizer="python")
    assert scores.per_image["cider_d"] == pytest.approx(expected, abs=1e-6)
    assert scores.corpus["cider_d"] == pytest.approx(sum(expected) / 2, abs=1e-6)


def test_corpus_bleu_reproduces_pycocoevalcap(python_scores):
    """Our vectorised BLEU (used by the bootstrap) equals pycocoevalcap's, corpus and per image.
    Per-image BLEU-4 of "a red circle" is not 0 although it has no 4-gram: pycocoevalcap's
    1e-15 / 1e-9 guard makes that precision 1e-6."""
    stats = python_scores.bleu_stats
    ours = corpus_bleu(stats.sum(axis=0))
    assert ours == pytest.approx([python_scores.corpus[f"bleu_{n}"] for n in range(1, 5)], rel=1e-12)
    per_image = np.stack([python_scores.per_image[f"bleu_{n}"] for n in range(1, 5)], axis=1)
    np.testing.assert_allclose(corpus_bleu(stats), per_image, rtol=1e-12)
    assert per_image[0, 3] == pytest.approx(0.0226587, abs=1e-6)


def test_without_java_python_tokenizer_and_no_meteor(no_java):
    scores = caption_metrics(PREDICTIONS, REFERENCES)  # tokenizer="auto"
    assert scores.tokenizer == "python"
    assert "meteor" not in scores.corpus and "meteor" not in scores.per_image
    assert "Java" in scores.skipped["meteor"]
    assert scores.n == 4 and scores.keys == list(REFERENCES)
    assert scores.summary()["tokenizer"] == "python"
    with pytest.raises(CapcliError, match="Java"):
        caption_metrics(PREDICTIONS, REFERENCES, tokenizer="ptb")


@pytest.mark.skipif(sys.platform == "win32", reason="the fake java is a POSIX shell script")
def test_broken_java_falls_back_with_a_notice(tmp_path, monkeypatch, python_scores):
    """A ``java`` that starts and fails: Python tokenization and no METEOR, each with the reason."""
    fake = tmp_path / "java"
    fake.write_text("#!/bin/sh\necho 'Error: this java is broken' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", str(tmp_path))
    scores = caption_metrics(PREDICTIONS, REFERENCES)
    assert scores.tokenizer == "python"
    assert any("PTBTokenizer (Java) failed" in note and "this java is broken" in note for note in scores.notes)
    assert scores.skipped["meteor"].startswith("METEOR (Java) failed")
    assert scores.corpus == python_scores.corpus
    with pytest.warns(RuntimeWarning, match="PTBTokenizer"):
        assert tokenize({"a": ["It's red."]}) == ({"a": ["it 's red"]}, "python")
    with pytest.raises(CapcliError, match="PTBTokenizer"):
        tokenize({"a": ["It's red."]}, tokenizer="ptb")


@pytest.fixture
def meteor_starts(monkeypatch) -> list:
    """Each METEOR JVM started, as its process, outside the session's ``keep_meteor`` (conftest)."""
    started = []
    start = captions._Meteor.__init__

    def recording_start(self):
        start(self)
        started.append(self.meteor_p)

    monkeypatch.setattr(captions._Meteor, "__init__", recording_start)
    monkeypatch.setattr(captions, "_keeping", 0)
    monkeypatch.setattr(captions, "_kept", None)
    return started


@needs_java
def test_with_java_ptb_and_meteor(meteor_starts, python_scores):
    """The jar tokenizes this fixture as the Python tokenizer does, METEOR is computed, and its
    JVM is shut down. METEOR values pinned from meteor-1.5.jar as shipped with pycocoevalcap 1.2;
    the corpus value aggregates statistics, so it is not the mean of the per-image scores."""
    started = meteor_starts
    scores = caption_metrics(PREDICTIONS, REFERENCES)
    assert scores.tokenizer == "ptb" and not scores.skipped and not scores.notes
    assert {k: v for k, v in scores.corpus.items() if k != "meteor"} == python_scores.corpus
    assert scores.corpus["meteor"] == pytest.approx(0.4028869, abs=1e-6)
    assert scores.per_image["meteor"] == pytest.approx([0.4170673, 0.4146841, 0.4774323, 0.3399406], abs=1e-6)
    assert len(started) == 1 and started[0].returncode is not None  # the METEOR JVM has exited
    # The interval is the per-image mean's, shifted onto the corpus value: it contains it.
    low, high = caption_intervals(scores, n_resamples=200)["meteor"]
    unshifted = bootstrap_interval(scores.per_image["meteor"], 200, seed=0)
    assert low <= scores.corpus["meteor"] <= high
    assert (low, high) == pytest.approx(tuple(v + 0.4028869 - 0.4122811 for v in unshifted), abs=1e-6)


@needs_java
def test_keep_meteor_starts_one_jvm_for_every_call_and_shuts_it_down_at_the_end(meteor_starts):
    started = meteor_starts
    with captions.keep_meteor():
        first = caption_metrics(PREDICTIONS, REFERENCES)
        with captions.keep_meteor():  # nested: the outer block still owns the JVM
            second = caption_metrics(PREDICTIONS, REFERENCES)
        assert len(started) == 1 and started[0].poll() is None  # one JVM, still running
        started[0].kill()  # a JVM that died is not reused: the next call starts another
        started[0].wait()
        third = caption_metrics(PREDICTIONS, REFERENCES)
    assert first.corpus == second.corpus == third.corpus and first.corpus["meteor"] == pytest.approx(0.4028869, abs=1e-6)
    assert list(first.per_image["meteor"]) == list(second.per_image["meteor"])  # a reused JVM scores alike
    assert len(started) == 2 and all(p.returncode is not None for p in started)  # both shut down
    assert captions._kept is None


def test_caption_metrics_rejects_mismatched_inputs(no_java):
    with pytest.raises(ValueError, match="without a prediction"):
        caption_metrics({"circle": "a red circle"}, REFERENCES, tokenizer="python")
    with pytest.raises(ValueError, match="non-empty list"):
        caption_metrics({"x": "a"}, {"x": []}, tokenizer="python")


def test_caption_intervals_cover_every_metric_and_are_ordered(python_scores):
    intervals = caption_intervals(python_scores, n_resamples=200)
    assert list(intervals) == list(python_scores.corpus)
    assert all(low <= high for low, high in intervals.values())
    assert intervals == caption_intervals(python_scores, n_resamples=200)  # same seed, same draws


# --- the PTB tokenizer -------------------------------------------------------------------

# Outputs of pycocoevalcap's PTBTokenizer (stanford-corenlp-3.4.1.jar, -preserveLines -lowerCase,
# then its PUNCTUATIONS dropped), obtained by running the jar on these captions.
# Note "-lrb-" and "!!": the jar lowercases its bracket escapes, and pycocoevalcap's filter
# only lists "-LRB-" and single "!", so both survive.
PTB_CASES = [
    ("A man riding a wave on top of a surfboard.", "a man riding a wave on top of a surfboard"),
    ("Don't touch the dog; it's sleeping!", "do n't touch the dog it 's sleeping"),
    ("The cat isn't happy, and they're leaving.", "the cat is n't happy and they 're leaving"),
    ("I'm sure he'd've won't, can't, cannot.", "i 'm sure he 'd 've wo n't ca n't can not"),
    ("A black-and-white photo of a 1950s car -- taken in New York.",
     "a black-and-white photo of a 1950s car taken in new york"),
    ('"Look," she said, "it\'s 3.5 miles away (roughly)."', "look she said it 's 3.5 miles away -lrb- roughly -rrb-"),
    ("Two dogs' toys and the children's books on a 12-inch shelf at 5:30 p.m.",
     "two dogs toys and the children 's books on a 12-inch shelf at 5:30 p.m."),
    ("The U.S. flag, Mr. Smith's dog, etc.", "the u.s. flag mr. smith 's dog etc."),
    ("A woman with an umbrella... and a hat?", "a woman with an umbrella and a hat"),
    ("Is this a cat? Yes!! It is.", "is this a cat yes !! it is"),
    ("A 1/2 price sale: $5.99 & 10% off [today].", "a 1/2 price sale $ 5.99 & 10 % off -lsb- today -rsb-"),
    ("Café “fancy” don’t — it’s 'quoted' `tick`", "café fancy do n't it 's quoted tick"),
    ("1,000 people at 3,000.5 km; the 2nd o'clock rock'n'roll",
     "1,000 people at 3,000.5 km the 2nd o'clock rock 'n' roll"),
    ("A  red\tcircle   and a BLUE SQUARE.", "a red circle and a blue square"),
    ("IT'S MR. SMITH'S DOG, WON'T YOU?", "it 's mr. smith 's dog wo n't you"),
    ("a - b a--b ---- x-ray {braces} <b>tag</b>", "a b a b x-ray -lcb- braces -rcb- <b> tag </b>"),
    ("gonna wanna gotta y'all 'em 'til '90s", "gon na wan na got ta y' all 'em 'til '90s"),
    ("...", ""),
    ("", ""),
    ("they're", "they 're"),  # last on purpose: the jar's last input line needs a newline (see _ptb_java)
]


@pytest.mark.parametrize(("caption", "expected"), PTB_CASES)
def test_python_tokenizer_matches_pinned_ptb_output(caption, expected):
    assert simple_ptb_tokenize(caption) == expected


@needs_java
def test_java_ptb_tokenizer_gives_the_pinned_output():
    tokens, name = tokenize({i: [caption] for i, (caption, _) in enumerate(PTB_CASES)}, tokenizer="ptb")
    assert name == "ptb"
    assert [tokens[i][0] for i in range(len(PTB_CASES))] == [expected for _, expected in PTB_CASES]


@needs_java
def test_java_tokenizer_keeps_captions_on_their_images():
    """A carriage return would be a line break to the jar and shift every later caption."""
    tokens, _ = tokenize({"a": ["one\rtwo", "three"], "b": [], "c": ["four"]}, tokenizer="ptb")
    assert tokens == {"a": ["one two", "three"], "b": [], "c": ["four"]}


def test_tokenize_python_keeps_keys_and_order():
    tokens, name = tokenize({"b": ["B!", "it's"], "a": []}, tokenizer="python")
    assert name == "python" and tokens == {"b": ["b", "it 's"], "a": []}
    with pytest.raises(ValueError, match="tokenizer"):
        tokenize({"a": ["x"]}, tokenizer="spacy")


# --- bootstrap ---------------------------------------------------------------------------


def test_bootstrap_of_constant_values_is_that_value():
    assert bootstrap_interval([0.1] * 7) == (0.1, 0.1)


def test_bootstrap_of_two_values():
    """n = 2: resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4, so the 2.5th and
    97.5th percentiles of 1000 resamples are 0 and 1."""
    assert bootstrap_interval([0.0, 1.0]) == (0.0, 1.0)


def test_bootstrap_interval_brackets_the_mean():
    """0..19: mean 9.5, standard error 5.77/√20 ≈ 1.29, so a 95% interval of about ±2.5."""
    low, high = bootstrap_interval(np.arange(20))
    assert 6.0 < low < 9.5 < high < 13.0
    narrow = bootstrap_interval(np.arange(20), confidence=0.5)
    assert low < narrow[0] < narrow[1] < high


def test_bootstrap_is_deterministic_from_the_seed():
    values = np.random.default_rng(0).normal(size=50)
    assert bootstrap_interval(values, seed=3) == bootstrap_interval(values, seed=3)
    assert bootstrap_interval(values, seed=3) != bootstrap_interval(values, seed=4)


def test_bootstrap_statistic_function_sees_the_same_resamples():
    values = np.random.default_rng(1).uniform(size=30)
    as_function = bootstrap_interval(lambda idx: values[idx].mean(axis=1), n=30)
    assert as_function == pytest.approx(bootstrap_interval(values), abs=1e-12)
    with pytest.raises(ValueError, match="pass n"):
        bootstrap_interval(lambda idx: values[idx].mean(axis=1))


def test_resample_counts_match_the_indices():
    idx = resample_indices(5, n_resamples=4, seed=0)
    counts = resample_counts(idx, 5)
    np.testing.assert_array_equal(counts, [np.bincount(row, minlength=5) for row in idx])
    np.testing.assert_array_equal(counts.sum(axis=1), [5] * 4)


# --- CLIP score --------------------------------------------------------------------------


def test_clip_score_hand_values():
    """Rows: orthogonal → 0; same direction (text scaled ×2) → 2.5; opposite → 0 (clipped);
    image (3, 4) with text (10, 0): cos = 3/5 → 2.5 · 0.6 = 1.5."""
    image = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0], [3.0, 4.0]], dtype=torch.float64)
    text = torch.tensor([[0.0, 1.0], [2.0, 0.0], [-1.0, 0.0], [10.0, 0.0]], dtype=torch.float64)
    assert_close(clip_score(image, text), torch.tensor([0.0, 2.5, 0.0, 1.5], dtype=torch.float64))
    assert_close(clip_score(image, text, w=1.0), torch.tensor([0.0, 1.0, 0.0, 0.6], dtype=torch.float64))


def test_ref_clip_score_hand_values():
    """Image (3, 4), candidate (1, 0): CLIP-S = 2.5 · 3/5 = 1.5. References (0, 1) and (4, 3):
    cosines 0 and 4/5, so the text term is 0.8 (no factor w). H-mean = 2·1.5·0.8 / 2.3.
    Second image: its only reference points away from the candidate, the text term is 0 and so
    is the harmonic mean. Third: candidate orthogonal to the image, CLIP-S 0, score 0 (not NaN)."""
    image = torch.tensor([[3.0, 4.0], [1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    cand = torch.tensor([[1.0, 0.0], [1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
    refs = [torch.tensor([[0.0, 1.0], [4.0, 3.0]], dtype=torch.float64),
            torch.tensor([[-1.0, 0.0]], dtype=torch.float64),
            torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)[1:]]
    expected = torch.tensor([2 * 1.5 * 0.8 / 2.3, 0.0, 0.0], dtype=torch.float64)
    assert_close(ref_clip_score(image, cand, refs), expected)
    with pytest.raises(ValueError, match="reference sets"):
        ref_clip_score(image, cand, refs[:2])


# --- preference --------------------------------------------------------------------------


def test_preference_accuracy_counts_ties_as_told():
    """2 > 1 right, 1 = 1 tie, 3 < 4 wrong, 0 > -1 right: 2 of 4 with ties wrong, 2.5 of 4 with ties half."""
    chosen, rejected = torch.tensor([2.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, -1.0])
    assert float(preference_accuracy(chosen, rejected, tie=0.0)) == 0.5
    assert float(preference_accuracy(chosen, rejected, tie=0.5)) == 0.625
    assert preference_accuracy(chosen, rejected, tie=0.5, reduction="none").tolist() == [1.0, 0.5, 0.0, 1.0]
    assert float(preference_accuracy(torch.ones(3, requires_grad=True), torch.ones(3), tie=0.0)) == 0.0
    assert float(preference_accuracy(torch.zeros(3), torch.zeros(3), tie=0.5)) == 0.5  # policy = reference: chance


def test_win_rate_counts_ties_half():
    """Same pairs: 1 + ½ + 0 + 1 = 2.5 of 4; swapping the sides gives the complement."""
    a, b = torch.tensor([2.0, 1.0, 3.0, 0.0]), torch.tensor([1.0, 1.0, 4.0, -1.0])
    assert win_rate(a, b) == 0.625
    assert win_rate(b, a) == 0.375
    np.testing.assert_array_equal(pairwise_outcomes(a, b, tie=0.5), [1.0, 0.5, 0.0, 1.0])


def test_preference_rejects_nan_and_mismatched_shapes():
    with pytest.raises(ValueError, match="finite"):
        win_rate([1.0, float("nan")], [0.0, 0.0])
    with pytest.raises(ValueError, match="same length"):
        preference_accuracy(torch.tensor([1.0, 2.0]), torch.tensor([1.0]), tie=0.0)
