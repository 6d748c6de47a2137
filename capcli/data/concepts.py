"""Concept words: which of a short list of words (the objects a source names) each caption uses.

These are the targets of the concept head (``losses.concept_loss``): weak labels read from the
captions themselves, as in Fang et al. 2015 ("From captions to visual concepts and back").
A word counts in its singular and its plurals (``cross``: "cross", "crosses"), as a whole word.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_WORD = re.compile(r"[a-z]+")


def concept_targets(captions: Sequence[str], words: Sequence[str]) -> torch.Tensor:
    """(B, C) float tensor: 1 where caption b names word c (singular or plural), else 0."""
    column = {}
    for c, word in enumerate(words):
        for form in (word, word + "s", word + "es"):
            column.setdefault(form, c)
    targets = torch.zeros(len(captions), len(words))
    for b, caption in enumerate(captions):
        for token in _WORD.findall(caption.lower()):
            if token in column:
                targets[b, column[token]] = 1.0
    return targets
