"""Pairwise preference metrics (DESIGN §6): reward accuracy on held-out pairs, and win rate.

Both are means of per-item outcomes, which ``pairwise_outcomes`` returns so that the
caller can bootstrap them (``bootstrap_interval(pairwise_outcomes(a, b, tie=0.5))``).
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


def preference_accuracy(chosen_rewards: ArrayLike | torch.Tensor, rejected_rewards: ArrayLike | torch.Tensor) -> float:
    """The fraction of held-out pairs whose reward ranks the chosen caption above the rejected one.

    A tie counts as wrong: a reward that cannot tell the two apart has not ranked them, and
    counting it as half would let a constant reward score 0.5.
    """
    return float(pairwise_outcomes(chosen_rewards, rejected_rewards, tie=0.0).mean())


def win_rate(scores_a: ArrayLike | torch.Tensor, scores_b: ArrayLike | torch.Tensor) -> float:
    """The fraction of images where the judge scores caption a above caption b; ties count half.

    Counting ties as half makes win_rate(a, b) + win_rate(b, a) = 1, and a judge that cannot
    tell the captions apart gives 0.5. Name the baseline b in the results.
    """
    return float(pairwise_outcomes(scores_a, scores_b, tie=0.5).mean())
