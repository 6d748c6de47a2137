"""Objectives: what each phase asks the engine to minimise, as named losses.

An objective turns a batch into a dict. Keys ending in ``_loss`` are already weighted and
the engine sums them; other keys are metrics it only logs. This is the whole contract
between a phase and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.data.batches import CaptionBatch
from capcli.losses import caption_loss, contrastive_loss
from capcli.model import Captioner


@dataclass
class PretrainObjective:
    """Phase 1: ``w_con·L_con + w_lm·L_lm`` on image-caption pairs (DESIGN §4)."""

    contrastive_weight: float = 1.0
    caption_weight: float = 1.0

    def __call__(self, model: Captioner, batch: CaptionBatch, progress: float) -> dict[str, torch.Tensor]:
        features = model.image_features(batch.pixels)  # (B, Dv)
        out: dict[str, torch.Tensor] = {}
        if self.caption_weight:
            logits = model.caption_logits(features, batch.caption_ids, batch.caption_mask)  # (B, T, V)
            targets = model.caption_targets(batch.caption_ids, batch.caption_mask)
            out["caption_loss"] = self.caption_weight * caption_loss(logits, targets)
        if self.contrastive_weight:
            image = model.embed_image(features)  # (B, E)
            text = model.embed_text(batch.caption_ids, batch.caption_mask)  # (B, E)
            out["contrastive_loss"] = self.contrastive_weight * contrastive_loss(image, text, model.logit_scale())
            with torch.no_grad():  # in-batch image→text retrieval accuracy, a readable sign of alignment
                hits = (image @ text.t()).argmax(dim=1) == torch.arange(len(image), device=image.device)
                out["retrieval_acc"] = hits.float().mean()
        return out
