"""On-policy preference pairs: captions the model writes, judged, the better against the worse.

``capcli align --preferences policy[:JUDGE]`` trains on pairs drawn from the model being
aligned rather than on corrupted references alone, as RLAIF-V and iterative DPO do: the
rejected caption is a mistake the model really makes, so the preference loss pushes down
what it would otherwise write. For each training image (DESIGN §5):

1. the model writes ``beams`` beam-search candidates and ``samples`` temperature samples
   (batched KV-cache generation, the decoder of ``capcli caption``; ``candidate_captions``);
2. a judge scores them (``capcli.phases.rewards``), and the image's reference captions too;
3. the best caption is chosen (a reference where it beats every sample and
   ``use_references`` is on), and paired against up to ``per_image`` distinct worse
   samples, each at least ``min_gap`` below it, the worst first. Equal scores are never
   paired, whatever ``min_gap``.

The draw is seeded, so the same model and settings draw the same pairs.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import datasets
import torch

from capcli.data.preferences import PAIR_FEATURES
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings, candidate_captions
from capcli.phases.rewards import Judge
from capcli.settings import PolicySettings

POLICY = "policy"  # the ``corruption`` value of an on-policy pair: it was drawn, not made


@dataclass
class Candidate:
    text: str
    score: float
    reference: bool = False


def pair_candidates(samples: Sequence[Candidate], references: Sequence[Candidate], per_image: int,
                    min_gap: float, use_references: bool = True) -> list[tuple[Candidate, Candidate]]:
    """The ``(chosen, rejected)`` pairs of one image, as the module docstring says.

    Args:
        samples: the model's captions with their judge scores (duplicates allowed).
        references: the image's reference captions with their scores.
        per_image: the most pairs to return.
        min_gap: the least ``chosen.score − rejected.score`` of a pair; a pair's gap is
            always positive, even when this is 0.
        use_references: let a reference be chosen where it scores above every sample.
    """
    distinct: dict[str, Candidate] = {}
    for c in samples:
        distinct.setdefault(c.text.strip(), c)
    pool = [c for text, c in distinct.items() if text]
    if not pool:
        return []
    chosen = max(pool, key=lambda c: c.score)  # the first of equal bests: beam candidates come first
    if use_references and references:
        best_reference = max(references, key=lambda c: c.score)
        if best_reference.score > chosen.score:
            chosen = best_reference
    worse = sorted((c for c in pool if c is not chosen and c.text != chosen.text
                    and chosen.score - c.score >= min_gap and chosen.score > c.score),
                   key=lambda c: c.score)
    return [(chosen, rejected) for rejected in worse[:per_image]]


@dataclass
class DrawReport:
    """What one draw did: its counts, the judge's means and its time (logged per round)."""

    images: int = 0
    captions: int = 0
    pairs: int = 0
    reference_chosen: int = 0
    judge_samples: float = 0.0  # mean judge score of every caption drawn
    judge_chosen: float = 0.0
    judge_rejected: float = 0.0
    seconds: float = 0.0
    judge: str = ""
    extra: dict[str, float] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"images": self.images, "captions": self.captions, "pairs": self.pairs,
                "reference_chosen": self.reference_chosen, "judge": self.judge,
                "judge_samples": round(self.judge_samples, 4), "judge_chosen": round(self.judge_chosen, 4),
                "judge_rejected": round(self.judge_rejected, 4), "draw_seconds": round(self.seconds, 2),
                "pairs_per_s": round(self.pairs / self.seconds, 2) if self.seconds else None}

    def summary(self) -> str:
        return (f"on-policy pairs: {self.pairs} from {self.images} images ({self.captions} captions drawn, "
                f"judge {self.judge}: samples {self.judge_samples:.3f}, chosen {self.judge_chosen:.3f}, "
                f"rejected {self.judge_rejected:.3f}; {self.reference_chosen} references chosen) "
                f"in {self.seconds:.0f} s")


@torch.no_grad()
def draw_pairs(model: Captioner, split: datasets.Dataset,
               features: Callable[[list[int]], tuple[torch.Tensor, list[int]]],
               judge: Judge, decode: DecodeSettings, settings: PolicySettings, seed: int, batch_size: int = 64,
               progress: Callable[[int, int], None] | None = None) -> tuple[datasets.Dataset, DrawReport]:
    """Draw, judge and pair captions for the images of a caption split.

    Args:
        model: the policy, as it is now.
        split: a caption split (``image``, ``captions``, and ``scene`` where there are graphs).
        features: rows of ``split`` → the (B, S, Dv) vision features of those whose image could be
            read, on the model's device, and those rows (an unreadable image draws nothing).
        judge: scores captions of rows of ``split``.
        decode: length limits and concept guidance of the candidates.
        settings: ``align.policy``: how many images and candidates, the gap, the pairs per image.
        seed: of the choice of images and of the sampling.
        batch_size: images captioned together.
        progress: called with (images done, images) after each batch.

    Returns:
        The pairs (``PAIR_FEATURES`` columns, ``corruption`` = "policy"), and the report.
    """
    started = time.monotonic()
    rows = list(range(len(split)))
    random.Random(seed).shuffle(rows)
    rows = sorted(rows[: settings.images] if settings.images else rows)
    images, captions = split["image"], split["captions"]
    out: dict[str, list[Any]] = {name: [] for name in PAIR_FEATURES}
    report = DrawReport(judge=judge.name)
    drawn_sum = chosen_sum = rejected_sum = 0.0
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for start in range(0, len(rows), batch_size):
            vision, batch = features(rows[start : start + batch_size])
            if not batch:
                continue
            texts = candidate_captions(model, vision, decode, settings.beams, settings.samples,
                                       settings.temperature)
            scores = judge.score(batch, texts)
            ref_scores = judge.references(batch) if settings.use_references else [[] for _ in batch]
            for row, caps, caps_scores, refs in zip(batch, texts, scores, ref_scores, strict=True):
                samples = [Candidate(t, s) for t, s in zip(caps, caps_scores, strict=True)]
                references = [Candidate(t, s, True) for t, s in zip(captions[row], refs, strict=False)]
                pairs = pair_candidates(samples, references, settings.per_image, settings.min_gap,
                                        settings.use_references)
                report.captions += len(caps)
                drawn_sum += sum(caps_scores)
                for chosen, rejected in pairs:
                    out["image"].append(images[row])
                    out["prompt"].append("")
                    out["chosen"].append(chosen.text)
                    out["rejected"].append(rejected.text)
                    out["corruption"].append(POLICY)
                    chosen_sum, rejected_sum = chosen_sum + chosen.score, rejected_sum + rejected.score
                    report.reference_chosen += int(chosen.reference)
            report.images += len(batch)
            if progress is not None:
                progress(min(start + batch_size, len(rows)), len(rows))
    report.pairs = len(out["chosen"])
    report.judge_samples = drawn_sum / max(1, report.captions)
    report.judge_chosen = chosen_sum / max(1, report.pairs)
    report.judge_rejected = rejected_sum / max(1, report.pairs)
    report.seconds = time.monotonic() - started
    return datasets.Dataset.from_dict(out, features=PAIR_FEATURES), report
