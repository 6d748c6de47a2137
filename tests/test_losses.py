"""Loss functions against values worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

from capcli.losses import (
    IGNORE_INDEX,
    alpha_schedule,
    caption_loss,
    concept_loss,
    contrastive_loss,
    preference_loss,
    sequence_logps,
)


def test_concept_loss_by_hand():
    """Logits 0 give log 2 per word. Row 0 names 1 of 3 words: 3·log 2 / 1; row 1 names 2: 3·log 2 / 2.
    The batch mean is (3 + 1.5)·log 2 / 2 = 2.25·log 2 ≈ 1.559581."""
    targets = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0]])
    assert_close(concept_loss(torch.zeros(2, 3), targets), torch.tensor(2.25 * math.log(2)))
    assert 2.25 * math.log(2) == pytest.approx(1.559581, abs=1e-6)


def test_concept_loss_with_confident_logits_and_an_empty_caption():
    """Row 0: a named word at logit 2 costs softplus(−2), an absent one at logit 1 softplus(1):
    0.126928 + 1.313262 = 1.440190. Row 1 names nothing, so its sum is divided by 1, not 0:
    softplus(0) + softplus(3) = 0.693147 + 3.048587. Mean ≈ 2.590962."""
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0]])
    targets = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    row0 = math.log1p(math.exp(-2)) + math.log1p(math.exp(1))
    row1 = math.log(2) + math.log1p(math.exp(3))
    assert_close(concept_loss(logits, targets), torch.tensor((row0 + row1) / 2))
    assert (row0 + row1) / 2 == pytest.approx(2.590962, abs=1e-6)


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


# --- preference loss, α schedule, sequence log-probs ------------------------------------------------------------


def test_preference_loss_at_initialisation_is_ln2():
    """Policy = reference, no margin: every reward difference is 0 and −log σ(0) = ln 2."""
    logps = torch.tensor([-12.5, -3.0, -40.0])
    other = torch.tensor([-11.0, -9.0, -1.0])
    loss, _, _ = preference_loss(logps, other, logps, other, beta=0.1, margin=0.0)
    assert_close(loss, torch.tensor(math.log(2)))


def test_preference_loss_hand_example_with_reference_and_margin():
    """πc−refc = 2, πr−refr = −3: z = 0.1·(2 − (−3)) − 0.1 = 0.4, loss = log(1 + e^−0.4) ≈ 0.513015."""
    loss, _, _ = preference_loss(torch.tensor([-8.0]), torch.tensor([-13.0]), torch.tensor([-10.0]), torch.tensor([-10.0]),
                           beta=0.1, margin=0.1)
    assert_close(loss, torch.tensor(math.log1p(math.exp(-0.4))))
    assert float(loss) == pytest.approx(0.513015, abs=1e-6)


def test_preference_loss_without_reference_uses_plain_logps():
    """reference none: z = β·(πc − πr) − m = 0.5·(−1 − (−3)) − 0 = 1, loss = log(1 + e^−1); mean over two pairs."""
    chosen, rejected = torch.tensor([-1.0, -3.0]), torch.tensor([-3.0, -1.0])
    loss, _, _ = preference_loss(chosen, rejected, beta=0.5, margin=0.0)
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(1.0))) / 2
    assert_close(loss, torch.tensor(expected))


def test_preference_loss_margin_raises_the_loss_and_gradient_prefers_chosen():
    chosen = torch.tensor([-5.0], requires_grad=True)
    rejected = torch.tensor([-5.0], requires_grad=True)
    loss, _, _ = preference_loss(chosen, rejected, beta=0.1, margin=0.1)
    assert float(loss.detach()) > math.log(2)  # −log σ(−0.1) > −log σ(0)
    loss.backward()
    assert float(chosen.grad) < 0 < float(rejected.grad)  # descent raises chosen, lowers rejected


@pytest.mark.parametrize(("step", "expected"), [(0, 0.7), (50, 0.5), (100, 0.3), (25, 0.6), (150, 0.3)])
def test_alpha_schedule_is_linear_from_init_to_final(step, expected):
    assert alpha_schedule(step, 100, init=0.7, final=0.3) == pytest.approx(expected)


def test_sequence_logps_sum_and_length_normalised_by_hand():
    """V = 4, uniform logits: each real token has log-prob −ln 4. Row 0 has 3 tokens, row 1 has 1 then padding."""
    logits = torch.zeros(2, 3, 4)
    logits[1, 1:] = torch.tensor([100.0, -100.0, 5.0, 0.0])  # padding positions: must not count
    targets = torch.tensor([[1, 2, 3], [0, IGNORE_INDEX, IGNORE_INDEX]])
    assert_close(sequence_logps(logits, targets), torch.tensor([-3 * math.log(4), -math.log(4)]))
    assert_close(sequence_logps(logits, targets, length_normalize=True), torch.tensor([-math.log(4)] * 2))
