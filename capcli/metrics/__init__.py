"""Evaluation metrics (DESIGN §6): pure functions on captions, scores and embeddings.

No model loading here: ``capcli evaluate`` embeds and decodes, then calls these.
"""

from capcli.metrics.bootstrap import (
    bootstrap_interval,
    resample_counts,
    resample_indices,
)
from capcli.metrics.captions import (
    METRICS,
    CaptionScores,
    caption_intervals,
    caption_metrics,
    corpus_bleu,
    java_available,
    tokenize,
)
from capcli.metrics.clip_score import clip_score, ref_clip_score
from capcli.metrics.grounding import (
    GROUNDING_METRICS,
    GroundingScores,
    caption_errors,
    grounding_intervals,
    grounding_metrics,
    read_caption,
)
from capcli.metrics.preference import pairwise_outcomes, preference_accuracy, win_rate
from capcli.metrics.ptb import simple_ptb_tokenize

__all__ = [
    "GROUNDING_METRICS",
    "METRICS",
    "CaptionScores",
    "GroundingScores",
    "bootstrap_interval",
    "caption_errors",
    "caption_intervals",
    "caption_metrics",
    "clip_score",
    "corpus_bleu",
    "grounding_intervals",
    "grounding_metrics",
    "java_available",
    "pairwise_outcomes",
    "preference_accuracy",
    "read_caption",
    "ref_clip_score",
    "resample_counts",
    "resample_indices",
    "simple_ptb_tokenize",
    "tokenize",
    "win_rate",
]
