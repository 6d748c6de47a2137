"""The judges of on-policy preference pairs (``capcli align --preferences policy``): a score per caption.

A judge scores captions the model wrote for training images; ``capcli.phases.policy`` pairs a
high-scoring caption against a low-scoring one. Higher is better for every judge.

- ``grounding``: truth against the image's scene graph (``grounding_reward``): objects
  covered earn, false claims cost, so an empty caption cannot win. Needs a source with
  scene graphs (the embedded ``synthetic``).
- ``cider``: CIDEr-D against the image's own reference captions, the reward of
  self-critical sequence training (Rennie et al. 2017), for any captioned source.
- ``clip``: CLIPScore (Hessel et al. 2021) under an independent CLIP model, the one
  ``capcli evaluate`` names as its judge; the model under training never grades itself.

Each judge also scores the image's reference captions (``references``), so that a reference
can stand as the chosen caption where every sample is worse.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, Protocol

import datasets
import numpy as np
import torch
from pycocoevalcap.cider.cider_scorer import CiderScorer

from capcli.errors import ConfigError
from capcli.metrics.clip_score import clip_score
from capcli.metrics.grounding import grounding_reward
from capcli.metrics.ptb import simple_ptb_tokenize

JUDGES = ("grounding", "cider", "clip")


class Judge(Protocol):
    """Scores captions of the rows of one caption split."""

    name: str

    def score(self, rows: Sequence[int], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        """For each row, the scores of its captions, in order."""
        ...

    def references(self, rows: Sequence[int]) -> list[list[float]]:
        """For each row, the scores of its own reference captions, in order."""
        ...


class GroundingJudge:
    """``grounding_reward`` against each row's scene graph."""

    name = "grounding"

    def __init__(self, split: datasets.Dataset, relation_credit: float = 0.0):
        self.relation_credit = relation_credit
        if "scene" not in split.column_names:
            raise ConfigError("the grounding judge needs scene graphs, and this caption source has none "
                              "(only the embedded synthetic source has them); use policy:cider or policy:clip")
        self.scenes, self.captions = split["scene"], split["captions"]

    def score(self, rows: Sequence[int], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        return [[grounding_reward(c, self.scenes[r], self.relation_credit) for c in caps]
                for r, caps in zip(rows, captions, strict=True)]

    def references(self, rows: Sequence[int]) -> list[list[float]]:
        return self.score(rows, [self.captions[r] for r in rows])


class CiderJudge:
    """CIDEr-D of each caption against its row's references, with document frequencies over the rows scored.

    CIDEr-D weighs n-grams by their rarity among the references of the images scored
    together, so the captions of a batch of images are scored together. A reference is
    scored against the image's other references (leave one out), its idf from its own image's.
    """

    name = "cider"

    def __init__(self, split: datasets.Dataset):
        self.captions = split["captions"]

    def score(self, rows: Sequence[int], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        pairs = [(r, c) for r, caps in zip(rows, captions, strict=True) for c in caps]
        flat = cider_d([(c, self.captions[r]) for r, c in pairs], [r for r, _ in pairs])
        out, at = [], 0
        for caps in captions:
            out.append(flat[at : at + len(caps)].tolist())
            at += len(caps)
        return out

    def references(self, rows: Sequence[int]) -> list[list[float]]:
        out = []
        for r in rows:
            refs = list(self.captions[r])
            out.append(cider_d([(ref, refs[:j] + refs[j + 1:]) for j, ref in enumerate(refs)]).tolist()
                       if len(refs) > 1 else [0.0] * len(refs))
        return out


def cider_d(entries: Sequence[tuple[str, Sequence[str]]], images: Sequence[Hashable] | None = None) -> np.ndarray:
    """(n,) CIDEr-D of each ``(caption, references)``: pycocoevalcap's scorer on Python PTB tokens.

    ``images`` names the image of each entry (default: each its own). CIDEr-D's document
    frequencies and corpus size count each image once, however many of its captions are
    scored, so a caption scores as it would scored alone with one caption per image.
    """
    if not entries:
        return np.zeros(0)
    scorer = _PerImageCider(list(images) if images is not None else list(range(len(entries))))
    for caption, references in entries:
        scorer += (simple_ptb_tokenize(caption), [simple_ptb_tokenize(r) for r in references])
    _, scores = scorer.compute_score()
    return np.asarray(scores, dtype=np.float64)


class _PerImageCider(CiderScorer):
    """pycocoevalcap's CIDEr-D scorer with the idf of the distinct images.

    Its own scorer counts each entry's references as one document and takes log(entries) as
    the corpus size; an image entered once per candidate would change both, and so the
    weight of every n-gram the references lack (idf log(corpus size)).
    """

    def __init__(self, images: list[Hashable]):
        super().__init__(n=4, sigma=6.0)
        self.images = images

    def compute_doc_freq(self) -> None:
        seen = set()
        for image, refs in zip(self.images, self.crefs, strict=True):
            if image not in seen:
                seen.add(image)
                for ngram in {ngram for ref in refs for ngram in ref}:
                    self.document_frequency[ngram] += 1

    @property
    def ref_len(self) -> float | None:  # compute_cider's log(corpus size)
        return float(np.log(len(set(self.images)))) if getattr(self, "images", None) else None

    @ref_len.setter
    def ref_len(self, value: float | None) -> None:
        pass  # compute_cider sets log(len(crefs)): the property above keeps the distinct images'


class ClipJudge:
    """CLIPScore, ``w·max(cos, 0)``, under a judge of ``capcli.evaluate.judge`` (never the model being trained)."""

    name = "clip"

    def __init__(self, split: datasets.Dataset, judge: Any):
        self.images, self.captions, self.judge = split["image"], split["captions"], judge

    @torch.no_grad()
    def score(self, rows: Sequence[int], captions: Sequence[Sequence[str]]) -> list[list[float]]:
        images = self.judge.embed_images([self.images[r] for r in rows])  # (B, E)
        flat = [c for caps in captions for c in caps]
        texts = self.judge.embed_texts(flat) if flat else torch.zeros(0, images.shape[1])
        owner = torch.tensor([i for i, caps in enumerate(captions) for _ in caps], dtype=torch.long)
        scores = clip_score(images[owner].cpu(), texts.cpu()).tolist() if flat else []
        out, at = [], 0
        for caps in captions:
            out.append(scores[at : at + len(caps)])
            at += len(caps)
        return out

    def references(self, rows: Sequence[int]) -> list[list[float]]:
        return self.score(rows, [self.captions[r] for r in rows])


def load_judge(name: str, arg: str, split: datasets.Dataset, device: torch.device, max_pixels: int,
               relation_credit: float = 0.0) -> Judge:
    """The judge ``name`` (one of ``JUDGES``) for the rows of ``split``; ``arg`` is the clip judge's weights,
    ``relation_credit`` what the grounding judge pays for each true relation."""
    if name == "grounding":
        return GroundingJudge(split, relation_credit)
    if name == "cider":
        return CiderJudge(split)
    if name == "clip":
        from capcli.evaluate.judge import (
            JUDGE_MODEL,
            OpenClipJudge,
            cached_judge_weights,
        )

        weights = arg or cached_judge_weights()
        if weights is None:
            raise ConfigError(f"the clip judge needs an independent CLIP model, and open_clip's {JUDGE_MODEL} "
                              f"'openai' weights are not cached; name a weights file with policy:clip:FILE, "
                              f"or use policy:grounding or policy:cider")
        if arg and not Path(arg).is_file():
            raise ConfigError(f"policy:clip:{arg}: no such weights file")
        return ClipJudge(split, OpenClipJudge(weights, device, max_pixels, quick_gelu=not arg))
    raise ConfigError(f"unknown judge '{name}' (allowed: {', '.join(JUDGES)})")
