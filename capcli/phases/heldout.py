"""Held-out numbers that say whether alignment helped or hurt: align's before/after table.

- preference and reward accuracy on held-out pairs (did the model learn the preferences?);
- val caption loss (does it still describe images well?);
- image→text retrieval R@1 over the whole val split (did the shared space survive? a drop
  is the "alignment tax").
"""

from __future__ import annotations

import torch
from torch.utils.data import DataLoader

from capcli.data.batches import (
    CaptionCollator,
    CaptionDataset,
    PreferenceCollator,
    PreferenceDataset,
)
from capcli.model import Captioner
from capcli.objectives import AlignObjective, PretrainObjective
from capcli.train.engine import validate
from capcli.train.runtime import Runtime
from capcli.train.sampler import SampleKey, in_order


def heldout_metrics(
    model: Captioner, objective: AlignObjective, pairs: PreferenceDataset | None,
    captions: CaptionDataset | None, runtime: Runtime, batch_size: int, max_tokens: int,
) -> dict[str, float]:
    """Held-out reward and preference accuracy, val caption loss and R@1, with the model as it is."""
    out: dict[str, float] = {}
    if pairs is not None and len(pairs):
        loader = DataLoader(pairs, batch_sampler=in_order(len(pairs), batch_size),
                            collate_fn=PreferenceCollator(model.tokenizer, max_tokens))
        measured = validate(model, objective, loader, runtime, progress=1.0)
        out["reward_accuracy"] = measured["reward_accuracy"]
        out["preference_accuracy"] = measured["preference_accuracy"]
    if captions is not None and len(captions):
        collate = CaptionCollator(model.tokenizer, max_tokens)
        loader = DataLoader(captions, batch_sampler=in_order(len(captions), batch_size), collate_fn=collate)
        measured = validate(model, PretrainObjective(contrastive_weight=0.0), loader, runtime, progress=1.0)
        out["val_caption_loss"] = measured["caption_loss"]
        out["retrieval_r1"] = retrieval_r1(model, captions, collate, runtime, batch_size)
    return out


def retrieval_r1(model: Captioner, captions: CaptionDataset, collate: CaptionCollator, runtime: Runtime,
                 batch_size: int) -> float:
    """Image→text recall@1 over the whole split: each image against every image's caption.

    Each image contributes the caption ``CaptionDataset`` picks for epoch 0, so the number
    is the same every time it is measured.
    """
    images, texts = [], []
    for keys in in_order(len(captions), batch_size):
        batch = collate([captions[SampleKey(k.index, 0)] for k in keys])
        if len(batch) == 0:
            continue
        batch = batch.to(runtime.device)
        with runtime.inference(model):
            images.append(model.embed_image(model.image_features(batch.pixels)).float())
            texts.append(model.embed_text(batch.caption_ids, batch.caption_mask).float())
    if not images:
        return float("nan")
    similarity = torch.cat(images) @ torch.cat(texts).t()  # (N, N)
    hits = similarity.argmax(dim=1) == torch.arange(len(similarity), device=similarity.device)
    return float(hits.float().mean())
