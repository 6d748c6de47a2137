"""Objectives: what each phase asks the engine to minimise, as named losses.

An objective turns a batch into a dict. Keys ending in ``_loss`` are already weighted and
the engine sums them; other keys are metrics it only logs. This is the whole contract
between a phase and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from capcli.data.batches import CaptionBatch, PreferenceBatch
from capcli.losses import (
    alpha_schedule,
    caption_loss,
    concept_loss,
    contrastive_loss,
    local_contrastive_loss,
    preference_loss,
    sequence_logps,
)
from capcli.metrics.preference import preference_accuracy
from capcli.model import Captioner
from capcli.train import distributed


def contrastive(model: Captioner, image: torch.Tensor, text: torch.Tensor, local_loss: bool = False,
                accuracy: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """InfoNCE over the global batch, and the image→text retrieval accuracy of this rank's rows.

    Under data parallelism the embeddings of every rank are gathered with their gradients, so
    the negatives are the whole global batch, as one process with the whole batch would have.
    ``local_loss`` keeps this rank's rows against all columns (less memory); the full loss
    (default) is the same on every rank and exactly the single-process loss. ``accuracy``
    False skips the retrieval accuracy (returned as None).
    """
    (image_all, offset), (text_all, _) = distributed.gather_with_grad(image), distributed.gather_with_grad(text)
    scale = model.logit_scale()
    if local_loss:
        loss = local_contrastive_loss(image, text, image_all, text_all, offset, scale)
        rows, targets = image, torch.arange(len(image), device=image.device) + offset
    else:
        loss = contrastive_loss(image_all, text_all, scale)
        rows, targets = image_all, torch.arange(len(image_all), device=image.device)
    if not accuracy:
        return loss, None
    with torch.no_grad():  # in-batch image→text retrieval accuracy, a readable sign of alignment
        hits = (rows @ text_all.t()).argmax(dim=1) == targets
    return loss, hits.float().mean()


@dataclass
class PretrainObjective:
    """Phase 1: ``w_con·L_con + w_lm·L_lm`` on image-caption pairs (DESIGN §4), plus ``w_c·L_concept``
    where the model has a concept head and the batch its targets."""

    contrastive_weight: float = 1.0
    caption_weight: float = 1.0
    local_loss: bool = False  # under DDP: see ``contrastive``
    concept_weight: float = 0.0
    token_dropout: float = 0.0
    monitor: str = "loss"  # the validation value that picks the best checkpoint (contracts.Objective)

    def __call__(self, model: Captioner, batch: CaptionBatch, progress: float) -> dict[str, torch.Tensor]:
        features = model.image_features(batch.pixels)  # (B, S, Dv)
        out: dict[str, torch.Tensor] = {}
        if self.caption_weight:
            inputs = batch.caption_ids
            if self.token_dropout and model.training:
                # Word dropout (Bowman et al. 2016): the decoder reads some earlier words as the pad token,
                # their targets unchanged, so it must take more from the image and less from the words.
                drop = torch.rand(inputs.shape, device=inputs.device) < self.token_dropout
                inputs = inputs.masked_fill(drop & (batch.caption_mask == 1), model.pad_id)
            logits = model.caption_logits(features, inputs, batch.caption_mask)  # (B, T, V)
            targets = model.caption_targets(batch.caption_ids, batch.caption_mask)
            out["caption_loss"] = self.caption_weight * caption_loss(logits, targets)
        if self.concept_weight and batch.concepts is not None:
            out["concept_loss"] = self.concept_weight * concept_loss(model.concept_logits(features), batch.concepts)
        if self.contrastive_weight:
            image = model.embed_image(features)  # (B, E)
            text = model.embed_text(batch.caption_ids, batch.caption_mask)  # (B, E)
            loss, out["retrieval_acc"] = contrastive(model, image, text, self.local_loss)
            out["contrastive_loss"] = self.contrastive_weight * loss
        return out


def score_pairs(model: Captioner, batch: PreferenceBatch,
                length_normalize: bool = False) -> tuple[torch.Tensor, ...]:
    """Sequence log-probs of each pair's chosen and rejected caption: two (B,) tensors, and a
    third, the chosen caption given the pair's other image, when the batch brings one.

    The captions go through the decoder in one forward pass: they are padded to one width,
    stacked, and conditioned on their image features.
    """
    logits, targets = _pair_logits(model, batch, _features(model, batch), _other_features(model, batch))
    logps = sequence_logps(logits, targets, length_normalize)  # (2B,) or (3B,)
    return logps.split(len(batch))


def _pair_logits(model: Captioner, batch: PreferenceBatch, features: torch.Tensor | None,
                 other: torch.Tensor | None = None):
    """Logits of [chosen; rejected] given the pair's image, then of chosen given ``other`` if set."""
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    ids = [_pad(batch.chosen_ids, width, model.pad_id), _pad(batch.rejected_ids, width, model.pad_id)]
    mask = [_pad(batch.chosen_mask, width, 0), _pad(batch.rejected_mask, width, 0)]
    if features is None:  # text-only pairs: the decoder alone
        logits = model.text_logits(torch.cat(ids), torch.cat(mask))
        return logits, model.caption_targets(torch.cat(ids), torch.cat(mask))
    # Chosen and rejected read the same image: its prefix goes through the decoder once (``image_of``).
    b = len(features)
    image_of = torch.arange(b, device=features.device).repeat(2)
    if other is not None:
        ids, mask = ids + ids[:1], mask + mask[:1]
        features, image_of = torch.cat([features, other]), torch.cat([image_of, image_of[:b] + b])
    ids, mask = torch.cat(ids), torch.cat(mask)
    logits = model.caption_logits(features, ids, mask, image_of)  # (2B or 3B, T, V)
    return logits, model.caption_targets(ids, mask)


def _pad(t: torch.Tensor, width: int, value: int) -> torch.Tensor:
    return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)


def _features(model: Captioner, batch: PreferenceBatch) -> torch.Tensor | None:
    if batch.features is not None:
        return batch.features.to(model.pixel_mean.dtype)  # cached by the frozen tower
    if batch.pixels is not None:
        return model.image_features(batch.pixels)
    return None


def _other_features(model: Captioner, batch: PreferenceBatch) -> torch.Tensor | None:
    if batch.other_features is not None:
        return batch.other_features.to(model.pixel_mean.dtype)
    if batch.other_pixels is not None:
        return model.image_features(batch.other_pixels)
    return None


@dataclass
class AlignObjective:
    """Phase 2: ``α(t)·L_con + (1−α(t))·L_pref`` (+ ``lm_weight·L_lm`` on the chosen caption), DESIGN §4.

    The reward of a caption is β·(log π − log π_ref); the reference log-probs come with the
    batch, cached once per pair. Two optional terms of mDPO (Wang et al. 2024, "mDPO:
    Conditional Preference Optimization for Multimodal Large Language Models") share the
    preference's (1 − α): with ``image_weight``, the chosen caption given its own image is
    preferred over the same caption given another image (``image_preference_loss``), so the
    reward cannot be won on the caption's words alone; with ``anchor_weight``, ``−log σ(r_c)``
    keeps the chosen caption's reward above zero (``anchor_loss``), where plain DPO lets both
    rewards fall. ``loss_unweighted`` (L_con + L_pref, without α) is what
    validation ranks checkpoints by: the weighted total moves with α(t), so its values at
    different epochs are not comparable.
    """

    beta: float = 0.1
    margin: float = 0.1
    alpha_init: float = 0.7
    alpha_final: float = 0.3
    length_normalize: bool = False
    lm_weight: float = 0.0
    local_loss: bool = False  # under DDP: see ``contrastive``
    image_weight: float = 0.0
    anchor_weight: float = 0.0
    monitor: str = "loss_unweighted"

    def __call__(self, model: Captioner, batch: PreferenceBatch, progress: float) -> dict[str, torch.Tensor]:
        alpha = alpha_schedule(progress, 1.0, self.alpha_init, self.alpha_final)
        features = _features(model, batch)
        other = _other_features(model, batch) if self.image_weight and features is not None else None
        logits, targets = _pair_logits(model, batch, features, other)
        logps = sequence_logps(logits, targets, self.length_normalize)
        n = len(batch)
        policy_chosen, policy_rejected = logps[:n], logps[n : 2 * n]
        ref_chosen = ref_rejected = None
        if batch.reference is not None:
            ref_chosen, ref_rejected = batch.reference[:, 0], batch.reference[:, 1]
        preference, reward_chosen, reward_rejected = preference_loss(
            policy_chosen, policy_rejected, ref_chosen, ref_rejected, self.beta, self.margin)
        out: dict[str, torch.Tensor] = {"preference_loss": (1 - alpha) * preference}
        unweighted = preference.detach()
        if other is not None:
            if batch.reference is not None and batch.reference.shape[1] < 3:
                raise ValueError("image_weight needs the reference log-prob of each chosen caption given "
                                 "its other image: build the pairs with other images")
            ref_other = None if batch.reference is None else batch.reference[:, 2]
            image_term = preference_loss(policy_chosen, logps[2 * n :], ref_chosen, ref_other, self.beta, 0.0).loss
            out["image_preference_loss"] = (1 - alpha) * self.image_weight * image_term
            unweighted = unweighted + self.image_weight * image_term.detach()
        if self.anchor_weight:
            anchor = -F.logsigmoid(reward_chosen).mean()
            out["anchor_loss"] = (1 - alpha) * self.anchor_weight * anchor
            unweighted = unweighted + self.anchor_weight * anchor.detach()
        if features is not None:  # text-only pairs have no image to contrast with
            image = model.embed_image(features)
            text = model.embed_text(batch.chosen_ids, batch.chosen_mask)
            con, _ = contrastive(model, image, text, self.local_loss, accuracy=False)
            out["contrastive_loss"] = alpha * con
            unweighted = unweighted + con.detach()
        if self.lm_weight:
            out["caption_loss"] = self.lm_weight * caption_loss(logits[:n], targets[:n])
        with torch.no_grad():
            reward_chosen, reward_rejected = reward_chosen.detach(), reward_rejected.detach()
            if other is not None:
                out["logp_chosen_other_image"] = logps[2 * n :].mean()
            out.update(
                loss_unweighted=unweighted,
                reward_accuracy=preference_accuracy(reward_chosen, reward_rejected, tie=0.5),
                # The model's own ranking by log-prob, as `capcli evaluate` measures it: ties are wrong.
                preference_accuracy=preference_accuracy(policy_chosen, policy_rejected, tie=0.0),
                reward_margin=(reward_chosen - reward_rejected).mean(),
                logp_chosen=policy_chosen.mean(),
                logp_rejected=policy_rejected.mean(),
                alpha=torch.tensor(alpha),
            )
        return out

