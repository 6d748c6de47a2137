"""Loss functions: pure tensor in, tensor out.

They know nothing of the model, the settings or the device, so each can be checked
against numbers worked out by hand (tests/test_losses.py).
"""

from __future__ import annotations

import math

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


def clamp_logit_scale(logit_scale: torch.Tensor) -> torch.Tensor:
    """Clamp a learnable 1/τ at 100, as in the CLIP paper, so the logits cannot blow up."""
    return logit_scale.clamp(max=100.0)


def initial_logit_scale(temperature: float) -> float:
    """The log of 1/τ, the parametrisation CLIP learns (``logit_scale.exp()`` is 1/τ)."""
    return math.log(1.0 / temperature)
