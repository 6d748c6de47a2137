"""Fast decoding against a plain reference decoder, on a briefly trained tiny model on CPU.

The fast path (``generate_captions``) decodes a whole batch through transformers'
``generate`` with the KV cache. The reference below shares no code with it: one image at
a time, it re-runs the whole decoder on [prefix; tokens so far] at every step and writes
out the search rules of ``generate`` as capcli calls it (transformers 5.x,
``GenerationMixin._sample`` and ``_beam_search``). The eight images are decoded in one
fast call, so padding and batching must not change a caption either.

Every comparison comes with a check that the setting it tests really changes the captions,
so that a reference which ignored the setting could not pass. ``capcli benchmark``'s naive
baseline, the same ``generate`` with the cache off, must give the same captions: its speedup
compares equal work.
"""

from __future__ import annotations

import math
import warnings
from functools import cache

import pytest
import torch
from conftest import SameCaptionEveryEpoch

from capcli.bench.decoding import bench_caption, naive_generate
from capcli.bench.measure import Report
from capcli.model import Captioner, generation, kvcache
from capcli.model.generation import (
    DecodeSettings,
    candidate_captions,
    generate_captions,
)
from capcli.phases import prepare_pretrain
from capcli.train.engine import fit

GREEDY = DecodeSettings()
BEAM = DecodeSettings(beams=5)
LONG_BEAM = DecodeSettings(beams=5, length_penalty=2.0)  # favours long captions: the stopping rule matters


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> tuple[Captioner, torch.Tensor]:
    """A tiny model trained 30 steps on 8 images, and those 8 images: (model, (8, 3, H, W) uint8).

    After 30 steps the captions are words that end with end-of-text, differ between the
    images, and are uncertain enough that beam search, the length penalty and the stopping
    rule each change some of them. (Five captions per image over 64 images would need
    hundreds of steps before the captions depend on the image at all.)
    """
    from conftest import make_settings

    settings = make_settings(tmp_path_factory.mktemp("decoding") / "pretrain", data_cache, **{
        "data.train_size": 8, "data.val_size": 1, "data.test_size": 1, "pretrain.engine.max_steps": 30,
        "pretrain.engine.epochs": 30, "pretrain.engine.patience": None, "pretrain.contrastive_weight": 0.0,
        "pretrain.concept_weight": 0.0,
        "pretrain.optimizer.lr": 1e-3, "pretrain.optimizer.min_lr_ratio": 1.0,
    })
    phase = prepare_pretrain(settings)
    phase.data.train = SameCaptionEveryEpoch(phase.data.train)
    p = settings.pretrain
    fit(phase.model, phase.objective, phase.data, p.engine, p.optimizer, phase.runtime)
    pixels = torch.stack([phase.data.train[(i, 0)].pixels for i in range(8)])
    return phase.model.eval(), pixels


# --- the reference decoder -----------------------------------------------------------------------------------------


def next_token_logits(model: Captioner, prefix: torch.Tensor, sequences: list[list[int]]) -> torch.Tensor:
    """(R, V) float32 logits of the token after each sequence, by a full forward pass with no cache.

    ``prefix`` is one image's (1, K, D); the sequences all have the same length, so no padding.
    """
    ids = torch.tensor(sequences, dtype=torch.long).view(len(sequences), -1)  # (R, t)
    embeds = torch.cat([prefix.expand(len(sequences), -1, -1), model.decoder.transformer.wte(ids)], dim=1)
    return model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1].float()  # (R, V)


def repeating(tokens: list[int], n: int) -> set[int]:
    """The tokens that, appended, would repeat an ``n``-gram already in ``tokens`` (for ``no_repeat_ngram``)."""
    if n == 0 or len(tokens) < n - 1:
        return set()
    last = tokens[len(tokens) - (n - 1):]
    return {tokens[i + n - 1] for i in range(len(tokens) - n + 1) if tokens[i : i + n - 1] == last}


def has_repeated_ngram(tokens: list[int], n: int) -> bool:
    ngrams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(ngrams)) < len(ngrams)


def reference_greedy(model: Captioner, prefix: torch.Tensor, decode: DecodeSettings) -> list[int]:
    """Greedy search as ``generate`` does it: argmax of the logits, end-of-text barred before
    ``min_length``, and with ``no_repeat_ngram`` every token that would repeat an n-gram barred."""
    eos, tokens = model.tokenizer.eos_token_id, []
    while len(tokens) < decode.max_length:
        logits = next_token_logits(model, prefix, [tokens])[0]
        if len(tokens) < decode.min_length:
            logits[eos] = -math.inf
        for token in repeating(tokens, decode.no_repeat_ngram):
            logits[token] = -math.inf
        token = int(logits.argmax())
        if token == eos:
            break
        tokens.append(token)
    return tokens


def reference_beam(model: Captioner, prefix: torch.Tensor, decode: DecodeSettings,
                   early_stopping: bool | str = False) -> list[int]:
    """Beam search with the rules of transformers' ``_beam_search``, one hypothesis list at a time.

    - A running beam's score is the sum of its tokens' log-softmax (float32); before
      ``min_length`` new tokens, end-of-text gets -inf after the softmax (not renormalised).
    - Each step ranks the ``2·beams`` best (beam, token) continuations of all running beams
      (at the first step there is one beam, the empty caption).
    - A continuation that ends (end-of-text, or the ``max_length``-th token) becomes a
      finished hypothesis scored ``sum / length ** length_penalty``, the length counting
      end-of-text, but only if it ranks among the first ``beams``; the ``beams`` best are kept.
    - The next running beams are the ``beams`` best continuations that did not end.
    - Stop once ``beams`` hypotheses are finished and: the best running beam's sum divided by
      the *current* length ** length_penalty cannot beat the worst finished score
      (``early_stopping=False``, the default: the heuristic of transformers' PR #20901);
      at once (``True``); or, for ``"never"`` with ``length_penalty > 0``, judged at
      ``max_length`` instead of the current length.
    - The answer is the best finished hypothesis, without its end-of-text.
    """
    eos, beams, penalty = model.tokenizer.eos_token_id, decode.beams, decode.length_penalty
    running: list[tuple[list[int], float]] = [([], 0.0)]
    finished: list[tuple[float, list[int]]] = []  # (score, tokens), best first
    for length in range(1, decode.max_length + 1):  # tokens after this step, end-of-text included
        logps = torch.log_softmax(next_token_logits(model, prefix, [tokens for tokens, _ in running]), dim=-1)
        if length - 1 < decode.min_length:
            logps[:, eos] = -math.inf
        sums = logps + torch.tensor([total for _, total in running])[:, None]  # (R, V)
        top, index = sums.flatten().topk(2 * beams)
        vocab = sums.shape[1]
        candidates = [(running[i // vocab][0] + [i % vocab], total) for total, i in zip(top.tolist(), index.tolist())]
        ended = [tokens[-1] == eos or length == decode.max_length for tokens, _ in candidates]
        finished += [(total / length**penalty, tokens)
                     for (tokens, total), end in zip(candidates[:beams], ended) if end]
        finished = sorted(finished, key=lambda hypothesis: -hypothesis[0])[:beams]
        running = [candidate for candidate, end in zip(candidates, ended) if not end][:beams]
        if not running or len(finished) < beams:
            continue
        judged_at = decode.max_length if early_stopping == "never" and penalty > 0 else length
        if early_stopping is True or running[0][1] / judged_at**penalty <= finished[-1][0]:
            break
    tokens = finished[0][1]
    return tokens[:-1] if tokens[-1] == eos else tokens


@torch.no_grad()
def reference_tokens(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings,
                     early_stopping: bool | str = False) -> list[list[int]]:
    """Each image's caption tokens, decoded alone."""
    out = []
    for image in pixels:
        prefix = model.prefix(model.image_features(image[None]))  # (1, K, D)
        if decode.beams == 1:
            out.append(reference_greedy(model, prefix, decode))
        else:
            out.append(reference_beam(model, prefix, decode, early_stopping))
    return out


@pytest.fixture(scope="module")
def reference(trained):
    """``reference(decode, early_stopping=False)`` → the 8 images' reference caption tokens, computed once."""
    model, pixels = trained
    return cache(lambda decode, early_stopping=False: reference_tokens(model, pixels, decode, early_stopping))


def texts(model: Captioner, captions: list[list[int]]) -> list[str]:
    """Tokens → text, as ``generate_captions`` turns its ids into captions."""
    return [model.tokenizer.decode(tokens, skip_special_tokens=True).strip() for tokens in captions]


# --- the fast path equals the reference ----------------------------------------------------------------------------


def test_batched_greedy_equals_the_reference(trained, reference):
    model, pixels = trained
    expected = texts(model, reference(GREEDY))
    assert generate_captions(model, pixels, GREEDY) == expected
    assert all(expected) and len(set(expected)) >= 3, expected  # captions depend on the image: rows cannot swap


def test_batched_beam_search_equals_the_reference(trained, reference):
    model, pixels = trained
    assert generate_captions(model, pixels, BEAM) == texts(model, reference(BEAM))
    assert reference(BEAM) != reference(GREEDY)  # beam search finds other captions than greedy here


@pytest.mark.skipif(not kvcache.SHARES_PREFIX, reason="transformers 4.x: each beam runs its prefix")
def test_beams_and_samples_run_each_images_prefix_once(trained, monkeypatch):
    """At beams 5 (and with 3 samples per image) the K prefix positions of an image go through the
    decoder once, not once per beam: no pass of the first block ever sees B·beams rows of more
    than one position. The captions equal those with the prefix run for every beam."""
    model, pixels = trained
    block, passes = model.decoder.transformer.h[0], []
    original = block.forward
    monkeypatch.setattr(block, "forward", lambda hidden, *a, **k: passes.append(tuple(hidden.shape[:2]))
                        or original(hidden, *a, **k))
    shared = generate_captions(model, pixels, BEAM)
    torch.manual_seed(0)
    shared_samples = candidate_captions(model, model.image_features(pixels), BEAM, beams=0, samples=3)
    k, b = model.config.prefix_length, len(pixels)
    assert passes[0] == (b, k - 1)  # the prefix but its last position, once per image
    assert all(shape == (b, k - 1) or shape[1] == 1 for shape in passes)  # then one position per row and step
    assert {rows for rows, n in passes if n == 1} == {b * BEAM.beams, b * 3}
    monkeypatch.setattr(generation, "SHARES_PREFIX", False)
    assert generate_captions(model, pixels, BEAM) == shared
    torch.manual_seed(0)
    assert candidate_captions(model, model.image_features(pixels), BEAM, beams=0, samples=3) == shared_samples


def test_length_penalty_reaches_the_search_and_equals_the_reference(trained, reference):
    model, pixels = trained
    assert generate_captions(model, pixels, LONG_BEAM) == texts(model, reference(LONG_BEAM))
    assert reference(LONG_BEAM) != reference(BEAM)


def test_beam_search_stops_by_transformers_default_rule(trained, reference):
    """capcli passes no ``early_stopping`` and the decoder's generation config leaves it unset, so
    ``generate`` takes its global default, False; the reference's other two rules give other
    captions here, so the match pins the rule down."""
    model, pixels = trained
    assert model.decoder.generation_config.early_stopping in (None, False)
    fast = generate_captions(model, pixels, LONG_BEAM)
    assert fast == texts(model, reference(LONG_BEAM, False))
    assert fast != texts(model, reference(LONG_BEAM, True))
    assert fast != texts(model, reference(LONG_BEAM, "never"))


@pytest.mark.parametrize("beams", [1, 5])
def test_min_length_equals_the_reference(trained, reference, beams):
    """One token more than the shortest caption: exactly the step where the bound starts to bind."""
    model, pixels = trained
    free = reference(DecodeSettings(beams=beams))
    decode = DecodeSettings(beams=beams, min_length=min(map(len, free)) + 1)
    assert generate_captions(model, pixels, decode) == texts(model, reference(decode))
    assert all(len(tokens) >= decode.min_length for tokens in reference(decode))
    assert reference(decode) != free


@pytest.mark.parametrize("beams", [1, 5])
def test_max_length_cuts_as_the_reference(trained, reference, beams):
    """Captions cut at ``max_length`` end the search as finished ones, with no end-of-text scored."""
    model, pixels = trained
    decode = DecodeSettings(beams=beams, max_length=6)
    assert generate_captions(model, pixels, decode) == texts(model, reference(decode))
    assert any(len(tokens) > 6 for tokens in reference(DecodeSettings(beams=beams)))  # some captions were cut


def test_no_repeat_ngram_changes_the_captions_that_repeat_and_equals_the_reference(trained, reference):
    """Held to 20 tokens, far past where they end, greedy captions go round in circles; with
    ``no_repeat_ngram`` 2 no pair of tokens comes twice, as the reference bars them."""
    model, pixels = trained
    free = DecodeSettings(min_length=20, max_length=20)
    barred = DecodeSettings(min_length=20, max_length=20, no_repeat_ngram=2)
    assert any(has_repeated_ngram(tokens, 2) for tokens in reference(free))  # the case it is for
    assert not any(has_repeated_ngram(tokens, 2) for tokens in reference(barred))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fast = generate_captions(model, pixels, barred)
    assert fast == texts(model, reference(barred))
    assert fast != generate_captions(model, pixels, free)
    # transformers warns that the n-gram rule skips the prompt, here the image prefix: not for the user's stderr
    assert not [str(w.message) for w in caught if "no_repeat_ngram_size" in str(w.message)]


# --- the benchmark's naive baseline decodes the same captions --------------------------------------------------------


@pytest.mark.parametrize("decode", [GREEDY, LONG_BEAM], ids=["greedy", "beam"])
def test_naive_baseline_gives_the_fast_paths_captions(trained, reference, decode):
    """``capcli benchmark``'s baseline, ``generate`` one image at a time with no cache, does the same search:
    its speedup is fair."""
    model, pixels = trained
    expected = texts(model, reference(decode))
    assert naive_generate(model, pixels, decode) == generate_captions(model, pixels, decode) == expected


def test_benchmark_times_both_decoders_on_the_same_captions(trained):
    model, pixels = trained
    report = Report()
    captions = bench_caption(report, model, pixels, batch=4, beams=5, repeats=1)
    assert captions == generate_captions(model, pixels, DecodeSettings(beams=5))
    figures = report.figures
    assert figures["caption_beam5_agreement"] == 1.0
    fast, naive = figures["caption_beam5_images_per_s"], figures["caption_beam5_naive_images_per_s"]
    assert figures["caption_beam5_speedup"] == pytest.approx(fast / naive)
    assert fast > naive > 0  # the cache and the batch pay: about 5x on 8 images here
    assert 0 < figures["caption_beam5_p50_ms"] <= figures["caption_beam5_p95_ms"]


# --- concept guidance ----------------------------------------------------------------------------------------------


def test_concept_guidance_adds_lambda_log_sigmoid_to_each_concept_token(trained) -> None:
    """By hand: the score of " circle" and " circles" gains λ·log σ(circle's logit), of " red" λ·log σ(red's);
    no other token moves; beams repeat their image's row."""
    from capcli.model import build_model
    from capcli.model.guidance import ConceptGuidance, concept_token_ids
    from capcli.settings import ModelSettings

    _, pixels = trained
    torch.manual_seed(0)
    model = build_model(ModelSettings(), ["a red circle", "two red circles", "a blue square"] * 10,
                        ("circle", "red", "blue square")).eval()
    tokenizer = model.tokenizer
    ids, columns = concept_token_ids(model)
    circle, circles, red = (tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in ("circle", "circles", "red"))
    assert sorted(zip(ids, columns)) == sorted([(circle, 0), (circles, 0), (red, 1)])  # a phrase gets no token
    with torch.no_grad():
        features = model.image_features(pixels[:2])
        logits = model.concept_logits(features)  # (2, 3)
        guide = ConceptGuidance(model, features, weight=2.0, beams=3)
    scores = torch.randn(6, model.decoder.config.vocab_size)
    guided = guide(torch.zeros(6, 1, dtype=torch.long), scores.clone())
    for row in range(6):
        image = row // 3
        want = scores[row].clone()
        want[[circle, circles]] += 2.0 * torch.nn.functional.logsigmoid(logits[image, 0])
        want[red] += 2.0 * torch.nn.functional.logsigmoid(logits[image, 1])
        torch.testing.assert_close(guided[row], want)


def test_concept_guidance_after_a_concept_word_binds_by_place(trained) -> None:
    """By hand, with the head on the patches: after " red", the score of " circle" gains
    λ·log(max_n σ(red_n)·σ(circle_n) / max_n σ(red_n)); after any other token, λ·log σ(circle's logit)."""
    from capcli.model import build_model
    from capcli.model.guidance import ConceptGuidance
    from capcli.settings import ModelSettings

    _, pixels = trained
    torch.manual_seed(0)
    model = build_model(ModelSettings(concept_source="patches"), ["a red circle", "a blue square"] * 10,
                        ("circle", "red")).eval()
    circle, red = (model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in ("circle", "red"))
    with torch.no_grad():
        features = model.image_features(pixels[:1])
        shown = torch.sigmoid(model.concept_head(features[0, 1:]))  # (64, 2)
        guide = ConceptGuidance(model, features, weight=1.5, beams=2)
    scores = torch.zeros(2, model.decoder.config.vocab_size)
    other = model.tokenizer.encode(" a", add_special_tokens=False)[0]
    guided = guide(torch.tensor([[other, red], [red, other]]), scores)
    bound = 1.5 * torch.log((shown[:, 1] * shown[:, 0]).max() / shown[:, 1].max())
    torch.testing.assert_close(guided[0, circle], bound)
    torch.testing.assert_close(guided[1, circle], 1.5 * torch.nn.functional.logsigmoid(shown[:, 0].logit().max()))
    assert guided[0, other] == 0 and guided[1, other] == 0


class _PlacedConcepts(torch.nn.Module):
    """A concept head that sees fixed words at fixed patches of an 8 × 8 grid, whatever the image."""

    def __init__(self, words: int, placed: dict[tuple[int, int], list[int]]):
        super().__init__()
        table = torch.full((64, words), -10.0)
        for (row, col), columns in placed.items():
            table[row * 8 + col, columns] = 10.0
        self.register_buffer("table", table)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table.expand(*x.shape[:-1], -1)


def test_spatial_phrases_bind_the_next_object_by_the_side_of_the_subject(trained) -> None:
    """A red circle at the left of the image, a blue square at its right. After "a red circle is
    left of a", " blue" keeps its score and " square" after it too; after "... right of a", where
    the red circle has nothing on that side but image edge, " blue" loses about λ·log(σ(-10)/σ(10))
    (a red patch is there: " red" keeps its score); "above"/"below" have no side with the square.
    Before the phrase, " right" and " above" lose as much, " left" nothing."""
    from capcli.model import build_model
    from capcli.model.guidance import ConceptGuidance
    from capcli.settings import ModelSettings

    _, pixels = trained
    torch.manual_seed(0)
    captions = ["a red circle is left of a blue square", "a blue square is right of a red circle",
                "a red circle above a blue square", "a blue square below a red circle"] * 10
    words = ("circle", "square", "red", "blue")
    model = build_model(ModelSettings(concept_source="patches"), captions, words).eval()
    model.concept_head = _PlacedConcepts(4, {(3, 1): [0, 2], (3, 6): [1, 3], (3, 0): [2]})
    model.config.concept_slots = []  # the bias terms themselves, added as before slots
    token = {w: model.tokenizer.encode(" " + w, add_special_tokens=False) for w in
             ("a", "red", "circle", "square", "blue", "is", "left of", "right of", "above")}
    assert all(len(t) == 1 for w, t in token.items() if " " not in w)

    def row(*ws: str) -> list[int]:
        return [i for w in ws for i in token[w]]

    with torch.no_grad():
        features = model.image_features(pixels[:1])
        guide = ConceptGuidance(model, features, weight=1.0, beams=4)
    rows = [row("a", "red", "circle", "is", "left of", "a"), row("a", "red", "circle", "is", "right of", "a"),
            row("a", "red", "circle", "is", "left of", "a", "blue"), row("a", "red", "circle", "above", "a")]
    width = max(map(len, rows))
    pad = token["a"][0]
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in rows])
    guided = guide(ids, torch.zeros(4, model.decoder.config.vocab_size))
    blue, red, square = token["blue"][0], token["red"][0], token["square"][0]
    unseen = float(torch.log(torch.sigmoid(torch.tensor(-10.0)) / torch.sigmoid(torch.tensor(10.0))))
    assert abs(guided[0, blue]) < 1e-3  # on the side named: as unguided by place
    assert guided[1, blue] == pytest.approx(unseen, abs=1e-2)  # nothing blue on the left of the circle
    assert abs(guided[1, red]) < 1e-3  # a red patch at its left
    assert abs(guided[2, square]) < 1e-3  # "blue" then "square", bound within the side
    assert guided[3, blue] < -5 and guided[3, square] < -5  # nothing below the circle
    only_objects = ids[[0, 1, 3, 0]]  # no row after a concept word: the bias is the guide's own until changed
    first = guide(only_objects, torch.zeros(4, model.decoder.config.vocab_size))
    assert torch.equal(first, guide(only_objects, torch.zeros(4, model.decoder.config.vocab_size)))

    # Where the direction is chosen: after "a red circle is", a side with nothing on it but red
    # (the subject's own word) costs its phrase's first word; "left" (the square is there) nothing.
    left, right, above = (token[w][0] for w in ("left of", "right of", "above"))
    ids = torch.tensor([row("a", "red", "circle", "is")] * 4)
    before = torch.zeros(4, model.decoder.config.vocab_size)
    chosen = guide(ids, before.clone())
    assert abs(chosen[0, left]) < 1e-3
    assert chosen[0, right] == pytest.approx(unseen, abs=1e-2) and chosen[0, above] == pytest.approx(unseen, abs=1e-2)


def test_the_object_of_a_spatial_phrase_is_found_after_a_verb_a_which_and_an_article() -> None:
    """Token ids by hand: 1 "a", 2 "red", 3 "circle", 4 ",", 5 "which", 6 "is", 7 "on", 8 "the",
    10 "left", 11 "of"; red and circle are concept slots 0 and 1."""
    from capcli.model.guidance import _spatial_object

    phrases = [((10, 11), (1.0, 0.0))]
    slot_of = {2: 0, 3: 1}

    def found(*ids: int):
        return _spatial_object(list(ids), [slot_of.get(i, -1) for i in ids], phrases)

    assert found(1, 2, 3, 6, 10, 11) == ([1, 0], (1.0, 0.0), [])  # "a red circle is left of"
    assert found(1, 2, 3, 6, 10, 11, 1) == ([1, 0], (1.0, 0.0), [])  # ... "a"
    assert found(1, 2, 3, 10, 11, 1, 2) == ([1, 0], (1.0, 0.0), [0])  # ... "a red"
    assert found(1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 1) == ([1, 0], (1.0, 0.0), [])  # ", which is on the left of a"
    assert found(1, 2, 3, 10, 11, 1, 2, 3, 4) is None  # the object is named: the phrase is behind
    assert found(1, 2, 3, 10, 11, 1, 1) is None  # two words between the phrase and the object
    assert found(1, 10, 11, 1) is None  # no subject to be left of
    assert found(1, 2, 3, 6) is None


def test_concept_guidance_keeps_out_a_word_the_head_does_not_see(trained) -> None:
    """Trained briefly, the model says "circle" for some image; with the head sure there is no circle
    in any image, guided search never says it, and with λ = 0 the captions are the unguided ones."""
    model, pixels = trained
    words = [w for caption in generate_captions(model, pixels, BEAM) for w in caption.split()]
    shape = max({"circle", "square", "triangle", "star", "diamond", "cross"}, key=words.count)
    assert words.count(shape) > 0
    guided = _with_concept_head(model, [shape], bias=-30.0)
    assert generate_captions(guided, pixels, DecodeSettings(beams=5, concept_guidance=0.0)) == \
        generate_captions(model, pixels, BEAM)
    captions = generate_captions(guided, pixels, BEAM)
    assert not any(w in (shape, shape + "s", shape + "es") for c in captions for w in c.split())


def _with_concept_head(model: Captioner, words: list[str], bias: float) -> Captioner:
    """A copy of ``model`` with a concept head for ``words`` whose every logit is ``bias``."""
    import copy

    guided = copy.deepcopy(model)
    guided.config.concept_words = list(words)
    guided.config.concept_slots = []  # none read from captions: additive guidance
    width = guided.config.vision["arch"]["output_dim"]
    guided.concept_head = torch.nn.Linear(width, len(words))
    with torch.no_grad():
        guided.concept_head.weight.zero_()
        guided.concept_head.bias.fill_(bias)
    return guided.eval()


# --- slot guidance ---------------------------------------------------------------------------------------------------


def _slot_case():
    """Six concept tokens: "A" and "As" (two forms of word 0) and "B" (word 1) share slot 0, "C" and
    "D" (words 2, 3) slot 1, "X" has no slot. Decoder probabilities and head biases by hand."""
    import math

    p = {"A": 0.3, "As": 0.1, "B": 0.2, "C": 0.05, "D": 0.15, "X": 0.2}
    b = {"A": math.log(0.5), "As": math.log(0.5), "B": 0.0, "C": -1.0, "D": 0.0, "X": -2.0}
    layout = ([0, 0, 1, 2, 3, -1], [0, 0, 1, 1])
    scores = torch.tensor([[math.log(v) for v in p.values()]], dtype=torch.float64)
    return p, b, layout, scores, torch.tensor([list(b.values())], dtype=torch.float64)


def test_slot_fill_shares_each_slots_probability_by_the_head_by_hand() -> None:
    """prior 0.5. Slot 0 keeps p = 0.3 + 0.1 + 0.2 = 0.6; word A (p 0.4, head 0.5) against B (p 0.2, head 1):
    q_A ∝ √0.4·0.5 = 0.31623, q_B ∝ √0.2 = 0.44721, so A 0.6·0.41421·(3/4) = 0.18640, its plural
    0.6·0.41421·(1/4) = 0.062132, B 0.6·0.58579 = 0.35147. Slot 1 keeps 0.2: q_C ∝ √0.05·e⁻¹ = 0.082262,
    q_D ∝ √0.15 = 0.38730, so C 0.035038, D 0.16496. X, in no slot, gets its bias added: 0.2·e⁻²."""
    import math

    from capcli.model.guidance import SlotFill

    _, _, layout, scores, bias = _slot_case()
    filled = SlotFill(*layout, prior=0.5, device=torch.device("cpu"))(scores, bias).exp()[0]
    want = [0.18640, 0.062132, 0.35147, 0.035038, 0.16496, 0.2 * math.exp(-2.0)]
    torch.testing.assert_close(filled, torch.tensor(want, dtype=torch.float64), rtol=2e-4, atol=0)
    assert float(filled[:3].sum()) == pytest.approx(0.6) and float(filled[3:5].sum()) == pytest.approx(0.2)


def test_slot_fill_with_prior_0_lets_the_head_choose_and_1_renormalises_the_additive_bias() -> None:
    """prior 0: slot 0's 0.6 goes 1/3 to A (head 0.5) and 2/3 to B (head 1), A's forms 3:1. prior 1:
    each word's share is p_w·h_w over the slot's Σ p·h: A 0.4·0.5 = 0.2 against B 0.2·1 = 0.2."""
    from capcli.model.guidance import SlotFill

    _, _, layout, scores, bias = _slot_case()
    head = SlotFill(*layout, prior=0.0, device=torch.device("cpu"))(scores, bias).exp()[0]
    torch.testing.assert_close(head[:3], torch.tensor([0.15, 0.05, 0.4], dtype=torch.float64))
    full = SlotFill(*layout, prior=1.0, device=torch.device("cpu"))(scores, bias).exp()[0]
    torch.testing.assert_close(full[:3], torch.tensor([0.225, 0.075, 0.3], dtype=torch.float64))


def test_slot_fill_keeps_barred_tokens_barred_and_makes_no_nan() -> None:
    """A form barred by the search (-inf: no-repeat n-grams) stays barred and its word's other form
    takes the word's share; a slot barred whole stays barred, at every prior."""
    from capcli.model.guidance import SlotFill

    _, _, layout, scores, bias = _slot_case()
    scores[0, 1] = float("-inf")  # "As"
    scores[0, 3:5] = float("-inf")  # "C" and "D": all of slot 1
    for prior in (0.0, 0.2, 1.0):
        filled = SlotFill(*layout, prior=prior, device=torch.device("cpu"))(scores, bias)
        assert not filled.isnan().any()
        assert torch.isneginf(filled[0, [1, 3, 4]]).all()
        assert float(filled[0, :3].exp().sum()) == pytest.approx(0.5)  # slot 0 without "As": 0.3 + 0.2


def test_numpy_slot_fill_of_the_onnx_search_equals_torchs() -> None:
    """serving.fill_slots (numpy, for the exported greedy search) against SlotFill, barred tokens included."""
    import numpy as np

    from capcli.model.guidance import SlotFill
    from capcli.serving import fill_slots

    _, _, layout, _, _ = _slot_case()
    torch.manual_seed(0)
    scores, bias = torch.randn(4, 6) * 3, -torch.rand(4, 6) * 5
    bias[:, 1] = bias[:, 0]  # forms of one word share its bias
    scores[1, 1], scores[2, 3:5] = float("-inf"), float("-inf")
    for prior in (0.0, 0.2, 1.0):
        want = SlotFill(*layout, prior=prior, device=torch.device("cpu"))(scores, bias).numpy()
        got = fill_slots(scores.numpy(), bias.numpy(), dict(zip(("token_words", "word_slots"), layout)), prior)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_slot_layout_shares_only_slots_of_several_words() -> None:
    """Concepts circle 0, square 0, red 1, small 2, "red circle" -1; tokens circle, circles, square, red,
    small. circle and square share slot 0; red and small are alone in theirs: additive, as is a checkpoint
    written before slots; slots for more or fewer words than the checkpoint's are a damaged checkpoint."""
    from capcli.model.guidance import slot_layout

    assert slot_layout([0, 0, 1, 2, -1], [0, 0, 1, 2, 3], 5) == ([0, 0, 1, -1, -1], [0, 0])
    assert slot_layout([0, 1, 2, -1], [0, 1, 2], 4) is None
    assert slot_layout([], [0, 1], 2) is None
    for damaged in ([0, 0], [0, 0, 1, 1]):
        with pytest.raises(ValueError, match="concept slots for 3 concept words"):
            slot_layout(damaged, [0, 1, 2], 3)


def test_concept_guidance_fills_the_slot_the_decoder_opens_with_the_word_bound_there(trained) -> None:
    """A red circle at the left, a blue square at the right; the decoder all but sure of " square" after " red".
    With the slots read from the captions (circle, square: 0; red, blue: 1), the shape slot keeps the
    decoder's probability and the head gives it to " circle", bound to red; the additive bias of a
    checkpoint written before slots takes it from " square" and leaves it to other tokens."""
    from capcli.model import build_model
    from capcli.model.guidance import ConceptGuidance, concept_token_ids
    from capcli.settings import ModelSettings

    _, pixels = trained
    torch.manual_seed(0)
    captions = ["a red circle and a blue square", "a blue square and a red circle", "two red circles"] * 10
    model = build_model(ModelSettings(concept_source="patches"), captions, ("circle", "square", "red", "blue")).eval()
    assert model.config.concept_slots == [0, 0, 1, 1]
    model.concept_head = _PlacedConcepts(4, {(3, 1): [0, 2], (3, 6): [1, 3]})
    tok = {w: model.tokenizer.encode(" " + w, add_special_tokens=False)[0] for w in ("a", "red", "circle", "square")}
    ids = torch.tensor([[tok["a"], tok["red"]]])
    scores = torch.full((1, model.decoder.config.vocab_size), -8.0)
    scores[0, tok["square"]] = 0.0  # the decoder's prior after "red": only red squares seen
    scores = scores.log_softmax(dim=-1)
    ids_, columns = concept_token_ids(model)
    circle = [i for i, c in zip(ids_, columns) if c == 0]  # " circle", " circles": equal odds here
    shapes = [i for i, c in zip(ids_, columns) if c in (0, 1)]
    with torch.no_grad():
        features = model.image_features(pixels[:1])
        slotted = ConceptGuidance(model, features, weight=1.0, beams=1)(ids, scores.clone()).softmax(dim=-1)
        model.config.concept_slots = []
        additive = ConceptGuidance(model, features, weight=1.0, beams=1)(ids, scores.clone()).softmax(dim=-1)
    slot = float(scores[0, shapes].exp().sum())  # the decoder's probability of a shape next: 0.85
    assert float(slotted[0, circle].sum()) == pytest.approx(slot, rel=1e-2)
    assert float(additive[0, circle].sum()) < 1e-2 and float(additive[0, tok["square"]]) < 1e-2  # to other tokens
