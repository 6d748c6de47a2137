"""The MFU numerator: capcli.bench.flops' formula against PyTorch's FLOP counter on real steps.

``torch.utils.flop_counter.FlopCounterMode`` counts every matrix product the step executes,
forward and backward. Attention runs on SDPA's math backend here, because the counter has
no formula for the CPU flash kernel; the math backend executes the same two products as
plain batched matmuls, which it counts.
"""

from __future__ import annotations

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from capcli.bench.flops import align_step_flops, pretrain_step_flops
from capcli.data.batches import (
    CaptionBatch,
    CaptionCollator,
    PreferenceBatch,
    PreferenceCollator,
    PreferenceExample,
    tokenize_captions,
)
from capcli.data.concepts import concept_targets
from capcli.model import Captioner, build_model
from capcli.objectives import AlignObjective, PretrainObjective
from capcli.settings import ModelSettings
from capcli.train.engine import total_loss

CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a big cross",
            "one purple circle", "three orange squares below a red triangle", "a blue star"]


@pytest.fixture(scope="module")
def model() -> Captioner:
    torch.manual_seed(0)
    return build_model(ModelSettings(), CAPTIONS * 20).train()


def counted(step) -> int:
    """FLOPs the counter sees in ``step()``: its forward and the backward of what it returns."""
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        total_loss(step()).backward()
    return counter.get_total_flops()


@pytest.mark.parametrize("batch", [3, 8])
def test_pretrain_formula_equals_the_flop_counter(model: Captioner, batch: int) -> None:
    captions = [CAPTIONS[i % len(CAPTIONS)] for i in range(batch)]
    ids, mask = _tokens(model, captions)
    pixels = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8)
    data = CaptionBatch(pixels, ids, mask, captions)
    expected = counted(lambda: PretrainObjective()(model, data, 0.0))
    assert pretrain_step_flops(model, batch, ids.shape[1]) == expected
    model.zero_grad(set_to_none=True)


def test_pretrain_formula_counts_the_concept_head() -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(), CAPTIONS * 20, ("circle", "square", "star", "cross")).train()
    batch, captions = 5, [CAPTIONS[i % len(CAPTIONS)] for i in range(5)]
    ids, mask = _tokens(model, captions)
    pixels = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8)
    data = CaptionBatch(pixels, ids, mask, captions, concepts=concept_targets(captions, model.config.concept_words))
    expected = counted(lambda: PretrainObjective(concept_weight=1.0)(model, data, 0.0))
    assert pretrain_step_flops(model, batch, ids.shape[1], concepts=True) == expected
    assert expected > pretrain_step_flops(model, batch, ids.shape[1])


def test_pretrain_formula_with_a_frozen_tower_counts_no_vision_backward(model: Captioner) -> None:
    batch, captions = 4, CAPTIONS[:4]
    ids, mask = _tokens(model, captions)
    pixels = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8)
    model.vision.requires_grad_(False)
    try:
        expected = counted(lambda: PretrainObjective()(model, CaptionBatch(pixels, ids, mask, captions), 0.0))
    finally:
        model.vision.requires_grad_(True)
        model.zero_grad(set_to_none=True)
    assert pretrain_step_flops(model, batch, ids.shape[1], frozen_vision=True) == expected
    assert expected < pretrain_step_flops(model, batch, ids.shape[1])


def test_align_formula_equals_the_flop_counter(model: Captioner) -> None:
    pairs = 5
    collate = PreferenceCollator(model.tokenizer, 48)
    features = torch.randn(pairs, 1, model.config.vision["arch"]["output_dim"])
    batch: PreferenceBatch = collate([
        PreferenceExample(CAPTIONS[i], CAPTIONS[-1 - i] + " and a cross", features=features[i],
                          reference=torch.tensor([-10.0, -12.0])) for i in range(pairs)
    ])
    objective = AlignObjective(lm_weight=0.2)
    expected = counted(lambda: objective(model, batch, 0.5))
    model.zero_grad(set_to_none=True)
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    assert batch.rejected_ids.shape[1] != batch.chosen_ids.shape[1]  # the pair is padded to one width
    assert model.shares_prefix()
    assert align_step_flops(model, pairs, width, batch.chosen_ids.shape[1]) == expected
    # Where the prefix is not shared (compiled blocks, gradient checkpointing: shares_prefix() is
    # False) each caption runs its own, and the formula says so. (Checkpointing's recomputed
    # forward is not model FLOPs, so the path is switched here rather than by checkpointing.)
    model.shares_prefix = lambda: False
    try:
        unshared = counted(lambda: objective(model, batch, 0.5))
        model.zero_grad(set_to_none=True)
    finally:
        del model.shares_prefix
    assert align_step_flops(model, pairs, width, batch.chosen_ids.shape[1], shared_prefix=False) == unshared > expected


@pytest.mark.parametrize(("mapper", "source"), [("tokens", "patches"), ("resampler", "pooled"), ("mlp", "patches")])
def test_the_formula_counts_the_token_prefixes_and_patch_concepts(mapper: str, source: str) -> None:
    """The token prefix (every patch through the MLP, a longer decoder input), the resampler's
    cross-attention, and the concept head on every patch, in pretrain and in align on cached tokens."""
    torch.manual_seed(0)
    model = build_model(ModelSettings(prefix_mapper=mapper, concept_source=source), CAPTIONS * 20,
                        ("circle", "square", "red")).train()
    batch, captions = 3, CAPTIONS[:3]
    ids, mask = _tokens(model, captions)
    pixels = torch.randint(0, 256, (batch, 3, model.image_size, model.image_size), dtype=torch.uint8)
    data = CaptionBatch(pixels, ids, mask, captions, concepts=concept_targets(captions, model.config.concept_words))
    expected = counted(lambda: PretrainObjective(concept_weight=1.0)(model, data, 0.0))
    assert pretrain_step_flops(model, batch, ids.shape[1], concepts=True) == expected
    model.zero_grad(set_to_none=True)
    with torch.no_grad():
        features = model.image_features(pixels)  # (3, 65, 512), as align caches them
    pairs = PreferenceCollator(model.tokenizer, 48)([
        PreferenceExample(CAPTIONS[i], CAPTIONS[-1 - i] + " and a cross", features=features[i],
                          reference=torch.tensor([-10.0, -12.0])) for i in range(batch)])
    expected = counted(lambda: AlignObjective(lm_weight=0.2)(model, pairs, 0.5))
    model.zero_grad(set_to_none=True)
    width = max(pairs.chosen_ids.shape[1], pairs.rejected_ids.shape[1])
    assert align_step_flops(model, batch, width, pairs.chosen_ids.shape[1]) == expected


def _tokens(model: Captioner, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    return tokenize_captions(CaptionCollator(model.tokenizer, 48), captions)


@pytest.mark.slow
def test_the_formula_holds_for_the_full_size_clip_gpt2(tmp_path) -> None:
    """ViT-B/32 and GPT-2 124M with random weights, loaded through the local-directory path."""
    from test_model import _gpt2_tokenizer_without_pad
    from transformers import GPT2Config, GPT2LMHeadModel

    tokenizer = _gpt2_tokenizer_without_pad(CAPTIONS * 20)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(tmp_path))
    tokenizer.save_pretrained(str(tmp_path))
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(tmp_path))).train()
    ids, mask = _tokens(model, CAPTIONS[:2])
    pixels = torch.randint(0, 256, (2, 3, model.image_size, model.image_size), dtype=torch.uint8)
    expected = counted(lambda: PretrainObjective()(model, CaptionBatch(pixels, ids, mask, CAPTIONS[:2]), 0.0))
    assert pretrain_step_flops(model, 2, ids.shape[1]) == expected
