"""Loss functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from capcli.losses import IGNORE_INDEX, caption_loss, contrastive_loss


def test_infonce_on_identical_orthonormal_pairs():
    """img = txt = I₂, τ = 0.07: each row's logits are (1/τ, 0), so every CE term is log(1 + e^{-1/τ})."""
    emb = torch.eye(2, dtype=torch.float64)  # float64: the value is far below float32's resolution at 1/τ
    expected = math.log1p(math.exp(-1 / 0.07))  # ≈ 6.3e-7
    assert_close(contrastive_loss(emb, emb, 1 / 0.07), torch.tensor(expected, dtype=torch.float64), rtol=1e-6, atol=0)


def test_infonce_hand_example_with_unit_scale():
    """img = I₂, txt = [e₀, e₀], scale 1: logits = [[1, 1], [0, 0]].

    image→text: both rows are ties, CE = log 2 each.
    text→image: logitsᵀ = [[1, 0], [1, 0]]; row 0 (target 0) gives log(1 + e⁻¹),
    row 1 (target 1) gives log(e + 1). Loss = (log 2 + (log(1+e⁻¹) + log(1+e)) / 2) / 2 ≈ 0.753204.
    """
    img = torch.eye(2)
    txt = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    t2i = (math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2
    expected = (math.log(2) + t2i) / 2
    assert_close(contrastive_loss(img, txt, 1.0), torch.tensor(expected))
    assert expected == pytest.approx(0.753204, abs=1e-6)


def test_infonce_is_symmetric_in_its_two_inputs():
    g = torch.Generator().manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=-1)
    assert_close(contrastive_loss(img, txt, 10.0), contrastive_loss(txt, img, 10.0))


def test_infonce_of_indistinguishable_embeddings_is_log_batch_size():
    """All similarities equal: each CE is over B equal logits, log B."""
    emb = torch.nn.functional.normalize(torch.ones(4, 3), dim=-1)
    assert_close(contrastive_loss(emb, emb, 1 / 0.07), torch.tensor(math.log(4)))


def test_infonce_gradient_pulls_matching_pairs_together():
    img = torch.nn.functional.normalize(torch.tensor([[1.0, 0.2], [0.1, 1.0]]), dim=-1).requires_grad_()
    txt = torch.nn.functional.normalize(torch.tensor([[0.9, 0.4], [0.3, 1.0]]), dim=-1)
    contrastive_loss(img, txt, 1 / 0.07).backward()
    # Moving image 0 along -grad must raise its similarity to text 0.
    assert float(-(img.grad[0] @ txt[0])) > 0


def test_caption_loss_hand_example_per_caption_mean():
    """V = 2. Caption 1: tokens with logits (0, 0)→target 0 and (ln 3, 0)→target 0, i.e. NLL log 2 and log(4/3).
    Caption 2: one token (0, 0)→target 1 (log 2), then padding with wild logits that must not count.
    Per-caption means: (log 2 + log 4/3) / 2 and log 2; the loss is their mean.
    """
    logits = torch.tensor([
        [[0.0, 0.0], [math.log(3), 0.0]],
        [[0.0, 0.0], [50.0, -50.0]],
    ])
    targets = torch.tensor([[0, 0], [1, IGNORE_INDEX]])
    expected = ((math.log(2) + math.log(4 / 3)) / 2 + math.log(2)) / 2
    assert_close(caption_loss(logits, targets), torch.tensor(expected))


def test_caption_loss_ignores_padding_whatever_its_logits():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 5, 7, generator=g)
    targets = torch.tensor([[1, 2, 3, IGNORE_INDEX, IGNORE_INDEX], [4, 5, 6, 0, 1]])
    before = caption_loss(logits, targets)
    logits[0, 3:] = torch.randn(2, 7, generator=g) * 100
    assert_close(caption_loss(logits, targets), before)


def test_caption_loss_of_uniform_logits_is_log_vocab():
    targets = torch.tensor([[3, 1, IGNORE_INDEX], [0, 2, 2]])
    assert_close(caption_loss(torch.zeros(2, 3, 11), targets), torch.tensor(math.log(11)))


def test_caption_loss_refuses_a_caption_without_targets():
    with pytest.raises(ValueError, match="no target tokens"):
        caption_loss(torch.zeros(1, 2, 3), torch.full((1, 2), IGNORE_INDEX))
