"""Loss functions: pure tensor in, tensor out.

They know nothing of the model, the settings or the device, so each can be checked
against numbers worked out by hand (tests/test_losses.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
"""Target value that marks a position with no loss (prefix and padding), as in PyTorch and transformers."""


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of matching image-text pairs.

    CLIP, Radford et al. 2021 (https://arxiv.org/abs/2103.00020): row i of each input is a
    positive pair, every other row in the batch is a negative. The loss is the mean of the
    image→text and text→image cross-entropies.

    Args:
        image_emb: (B, D) L2-normalised image embeddings.
        text_emb: (B, D) L2-normalised text embeddings.
        logit_scale: 1/τ, a float or a 0-d tensor (learnable temperature).

    Returns:
        A 0-d tensor.
    """
    logits = logit_scale * image_emb @ text_emb.t()  # (B, B): similarity of image i to text j
    targets = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.t(), targets)) / 2


def local_contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, image_all: torch.Tensor,
                           text_all: torch.Tensor, offset: int, logit_scale: torch.Tensor | float) -> torch.Tensor:
    """Symmetric InfoNCE of one rank's rows against every rank's columns (open_clip's ``local_loss``).

    Row i of ``image_emb``/``text_emb`` is row ``offset + i`` of the gathered ``image_all``/
    ``text_all``. The logits are (B, world·B) instead of (world·B, world·B): the same negatives
    for this rank's pairs, in a world-times smaller matrix. With one rank it equals
    :func:`contrastive_loss`.
    """
    targets = torch.arange(image_emb.shape[0], device=image_emb.device) + offset
    per_image = logit_scale * image_emb @ text_all.t()  # (B, world·B)
    per_text = logit_scale * text_emb @ image_all.t()
    return (F.cross_entropy(per_image, targets) + F.cross_entropy(per_text, targets)) / 2


def caption_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Token cross-entropy of a captioning language model, averaged per caption, then over the batch.

    Each caption counts once whatever its length. That keeps the loss a plain per-sample
    mean, so a batch split into accumulated micro-batches gives the same gradient as the
    whole batch (a per-token mean over the batch would weight micro-batches by their token
    counts).

    Args:
        logits: (B, T, V) next-token logits, already aligned with ``targets`` (position t predicts targets[:, t]).
        targets: (B, T) token ids, ``IGNORE_INDEX`` where there is no caption token (prefix, padding).

    Returns:
        A 0-d tensor.
    """
    token_nll = F.cross_entropy(
        logits.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="none"
    ).view_as(targets)  # (B, T), 0 where ignored
    counts = (targets != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):  # note: CPU-GPU sync point, but an empty caption is a data bug worth stopping on
        raise ValueError("caption_loss: a caption has no target tokens")
    return (token_nll.sum(dim=1) / counts).mean()


def concept_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label binary cross-entropy of which concept words each image shows.

    The targets are read from the image's caption and, where it has one, its scene graph
    (``data.concepts``). Per sample, the cross-entropy is summed over the words and divided by
    the number of words present (at least 1): each present word weighs the same however long
    the list is, where a plain mean would let the many absent words drown the few present ones.
    The result is then a per-sample mean, so accumulated micro-batches equal the whole batch.

    Args:
        logits: (B, C) one logit per concept word.
        targets: (B, C) 1 where the word is present, else 0.

    Returns:
        A 0-d tensor.
    """
    bce = F.binary_cross_entropy_with_logits(logits.float(), targets.float(), reduction="none")  # (B, C)
    return (bce.sum(dim=1) / targets.float().sum(dim=1).clamp(min=1.0)).mean()


def sequence_logps(logits: torch.Tensor, targets: torch.Tensor, length_normalize: bool = False) -> torch.Tensor:
    """Log-probability of each target sequence under its logits: the reward's raw material.

    Args:
        logits: (B, T, V) next-token logits aligned with ``targets``.
        targets: (B, T) token ids, ``IGNORE_INDEX`` on positions that are not part of the sequence.
        length_normalize: divide by the number of tokens (mean log-prob per token), so a
            long caption is not penalised for its length alone.

    Returns:
        (B,) summed (or mean) log-probabilities, in float32.
    """
    mask = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), dim=-1)
    token = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # (B, T); ignored ids read row 0
    total = (token * mask).sum(dim=1)
    return total / mask.sum(dim=1).clamp(min=1) if length_normalize else total


class PreferenceLoss(NamedTuple):
    """What :func:`preference_loss` returns: the loss and the rewards it was computed from."""

    loss: torch.Tensor
    """0-d: the mean over pairs."""
    chosen_rewards: torch.Tensor
    """(B,) β·(πc − refc), or β·πc without a reference; with gradients (an anchor term may use them)."""
    rejected_rewards: torch.Tensor
    """(B,) β·(πr − refr), or β·πr without a reference."""


def preference_loss(
    policy_chosen_logps: torch.Tensor,
    policy_rejected_logps: torch.Tensor,
    ref_chosen_logps: torch.Tensor | None = None,
    ref_rejected_logps: torch.Tensor | None = None,
    beta: float = 0.1,
    margin: float = 0.1,
) -> PreferenceLoss:
    """Bradley-Terry preference loss with a margin: ``−log σ(β·((πc−refc) − (πr−refr)) − margin)``.

    With reference log-probs this is DPO (Rafailov et al. 2023,
    https://arxiv.org/abs/2305.18290) plus a margin, as in the Llama 2 reward model;
    without them (``reference: none``) the rewards are the plain log-probabilities. At
    initialisation the policy is the reference, so with no margin the loss is ln 2. As
    torchtune's DPO loss does, it returns the rewards beside the loss, so that no caller
    computes them again.

    Args:
        policy_chosen_logps, policy_rejected_logps: (B,) sequence log-probs under the trained model.
        ref_chosen_logps, ref_rejected_logps: (B,) the same under the frozen reference, or None.
        beta: scale of the implicit reward.
        margin: how far the chosen reward must exceed the rejected before the loss flattens.

    Returns:
        A :class:`PreferenceLoss`: the mean loss over pairs, and each pair's two rewards.
    """
    chosen, rejected = policy_chosen_logps, policy_rejected_logps
    if ref_chosen_logps is not None and ref_rejected_logps is not None:
        chosen, rejected = chosen - ref_chosen_logps, rejected - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen - rejected) - margin).mean()
    return PreferenceLoss(loss, beta * chosen, beta * rejected)


def alpha_schedule(step: float, total: float, init: float = 0.7, final: float = 0.3) -> float:
    """α(t) = init + (final − init)·t/T, linear over the phase's optimizer steps, held at ``final`` after T."""
    if total <= 0:
        return final
    return init + (final - init) * min(max(step / total, 0.0), 1.0)
