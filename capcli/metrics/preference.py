"""Pairwise preference metrics (DESIGN §6): preference accuracy on pairs, and win rate.

Both are means of per-item outcomes, which ``preference_accuracy(..., reduction="none")`` and
``pairwise_outcomes`` return so that the caller can bootstrap them
(``bootstrap_interval(pairwise_outcomes(a, b, tie=0.5))``).
"""

from __future__ import annotations

import numpy as np
import torch
from numpy.typing import ArrayLike


def _as_array(x: ArrayLike | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64)
    return np.asarray(x, dtype=np.float64)


def pairwise_outcomes(a: ArrayLike | torch.Tensor, b: ArrayLike | torch.Tensor, tie: float) -> np.ndarray:
    """Per item: 1 where a > b, ``tie`` where a == b, 0 where a < b.

    Args:
        a, b: (N,) scores of the same N items (a tensor, an array or a list).
        tie: what an exact tie is worth.

    Returns:
        (N,) float64 outcomes.
    """
    a, b = _as_array(a), _as_array(b)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"expected two non-empty 1-d score arrays of the same length, got {a.shape} and {b.shape}")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("scores must be finite: a NaN would silently count as a loss")
    return np.where(a > b, 1.0, np.where(a == b, tie, 0.0))


def preference_accuracy(chosen: torch.Tensor, rejected: torch.Tensor, tie: float,
                        reduction: str = "mean") -> torch.Tensor:
    """The share of pairs whose score ranks the chosen caption above the rejected one.

    The one preference accuracy: align logs it per batch (``reward_accuracy`` on the rewards,
    ``preference_accuracy`` on the log-probs) and ``capcli evaluate`` bootstraps it per pair.
    It stays in torch on the scores' device, so a training step pays no CPU-GPU sync for it.

    Args:
        chosen, rejected: (N,) scores of the same N pairs (rewards or log-probabilities).
        tie: what an exact tie is worth. 0 where a score that cannot tell the two captions
            apart has not ranked them (the log-probs); 0.5 for the DPO rewards, which are all
            exactly 0 while the policy is the reference, so that the start reads chance, not 0.
        reduction: "mean" for the share (0-d), "none" for each pair's outcome (N,), as
            ``F.cross_entropy`` names it.

    Returns:
        A float32 tensor: 1 where chosen > rejected, ``tie`` where equal, 0 where below, per pair
        or averaged (the wins' mean plus ``tie`` times the ties' mean).
    """
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"expected two 1-d score tensors of the same length, got {tuple(chosen.shape)} "
                         f"and {tuple(rejected.shape)}")
    wins, ties = (chosen > rejected).float(), (chosen == rejected).float()
    if reduction == "none":
        return wins + tie * ties
    if reduction == "mean":
        return wins.mean() + tie * ties.mean()
    raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")


def win_rate(scores_a: ArrayLike | torch.Tensor, scores_b: ArrayLike | torch.Tensor) -> float:
    """The fraction of images where the judge scores caption a above caption b; ties count half.

    Counting ties as half makes win_rate(a, b) + win_rate(b, a) = 1, and a judge that cannot
    tell the captions apart gives 0.5. Name the baseline b in the results.
    """
    return float(pairwise_outcomes(scores_a, scores_b, tie=0.5).mean())
