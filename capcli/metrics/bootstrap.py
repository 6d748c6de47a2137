"""Percentile bootstrap intervals over images (DESIGN §6: every metric gets a 95% interval).

Images are the unit that is resampled: each resample draws ``n`` images with replacement
and recomputes the statistic on them. The draws depend only on ``(n, n_resamples, seed)``,
so metrics bootstrapped with the same seed on the same images share their resamples
(paired intervals), and a run is reproducible.

What is recomputed per resample is up to the statistic. For per-image scores it is their
mean; for caption metrics whose corpus value is not a mean of per-image scores, see
``capcli.metrics.captions.caption_intervals`` (BLEU is recomputed from summed n-gram
counts; CIDEr-D keeps the document frequencies of the full set).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from numpy.typing import ArrayLike

Statistic = Callable[[np.ndarray], np.ndarray]
"""Maps resampled indices, (R, n) ints, to the statistic of each resample, (R,)."""


def resample_indices(n: int, n_resamples: int = 1000, seed: int = 0) -> np.ndarray:
    """(n_resamples, n) image indices drawn uniformly with replacement, fixed by ``seed``."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"bootstrap needs n >= 1 and n_resamples >= 1, got n={n}, n_resamples={n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def resample_counts(indices: np.ndarray, n: int) -> np.ndarray:
    """How often each of the ``n`` images was drawn in each resample: (R, n) from (R, n) indices.

    For a statistic built from per-image sums, ``counts @ per_image`` gives each resample's
    sums without materialising an (R, n, ...) array.
    """
    n_resamples = indices.shape[0]
    offsets = np.arange(n_resamples)[:, None] * n  # row r's images become r*n .. r*n + n-1
    return np.bincount((indices + offsets).ravel(), minlength=n_resamples * n).reshape(n_resamples, n)


def bootstrap_interval(
    data: ArrayLike | Statistic,
    n_resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    *,
    n: int | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over images.

    Args:
        data: either per-image values, (n,), whose mean is bootstrapped; or a vectorised
            statistic that takes resampled indices, (R, n), and returns one value per
            resample, (R,), for statistics that are not means (corpus BLEU, for example).
        n_resamples: R, the number of resamples.
        confidence: coverage of the interval; 0.95 gives the 2.5th and 97.5th percentiles.
        seed: fixes the resamples (see ``resample_indices``).
        n: the number of images; required with a statistic function.

    Returns:
        (low, high). Values that are all equal give low == high.
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if callable(data):
        if n is None:
            raise ValueError("bootstrap_interval: pass n, the number of images, with a statistic function")
        stats = np.asarray(data(resample_indices(n, n_resamples, seed)), dtype=np.float64)
        if stats.shape != (n_resamples,):
            raise ValueError(f"the statistic must return shape ({n_resamples},), got {stats.shape}")
    else:
        values = np.asarray(data, dtype=np.float64)
        if values.ndim != 1 or values.size == 0:
            raise ValueError(f"per-image values must be a non-empty 1-d array, got shape {values.shape}")
        if n is not None and n != values.size:
            raise ValueError(f"n={n} but {values.size} values were given")
        shift = values[0]  # means of deviations: a constant input gives exactly that constant
        stats = shift + (values[resample_indices(values.size, n_resamples, seed)] - shift).mean(axis=1)
    if not np.isfinite(stats).all():
        raise ValueError("bootstrap_interval: the statistic is not finite on every resample")
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)
