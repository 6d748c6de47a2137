"""Concept words: which of a short list of words (the objects a source names) each caption uses.

These are the targets of the concept head (``losses.concept_loss``): weak labels read from the
captions themselves, as in Fang et al. 2015 ("From captions to visual concepts and back").
A concept is a word or a phrase of words ("cross", "red cross"). It counts where the caption
has it as whole words, its last word in the singular or a plural ("crosses", "red crosses").
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

_WORD = re.compile(r"[a-z]+")


def concept_targets(captions: Sequence[str], concepts: Sequence[str]) -> torch.Tensor:
    """(B, C) float tensor: 1 where caption b names concept c, else 0."""
    phrases = [tuple(_WORD.findall(concept.lower())) for concept in concepts]
    longest = max((len(p) for p in phrases), default=0)
    singular = {}
    for phrase in phrases:
        for form in (phrase[-1] + "s", phrase[-1] + "es"):
            singular.setdefault(form, phrase[-1])
    targets = torch.zeros(len(captions), len(phrases))
    for b, caption in enumerate(captions):
        words = [singular.get(w, w) for w in _WORD.findall(caption.lower())]
        said = {tuple(words[i:i + n]) for n in range(1, longest + 1) for i in range(len(words) - n + 1)}
        for c, phrase in enumerate(phrases):
            if phrase in said:
                targets[b, c] = 1.0
    return targets
