"""CLIPScore and RefCLIPScore on embeddings (Hessel et al. 2021, https://arxiv.org/abs/2104.08718).

Pure tensor functions: the caller embeds images and captions with the judge model (a
pretrained open_clip ViT-B/32, or the model's own towers for ``clip_score_self``) and
names the judge in the results. The paper embeds captions with the prompt "A photo
depicts" in front; that belongs to the embedding step, not here.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

CLIP_SCORE_W = 2.5
"""The paper's rescaling: image-text cosines of CLIP ViT-B/32 rarely exceed 0.4, so ×2.5 spreads them over [0, 1]."""


def _unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised along the last axis, in at least float32 (half-precision cosines are coarse)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=-1)


def clip_score(image_emb: torch.Tensor, text_emb: torch.Tensor, w: float = CLIP_SCORE_W) -> torch.Tensor:
    """CLIP-S(c, v) = w · max(cos(c, v), 0) for each image-caption pair.

    Args:
        image_emb: (B, D) image embeddings v; normalised here.
        text_emb: (B, D) caption embeddings c, row i describing image i; normalised here.
        w: the rescaling constant, 2.5 in the paper.

    Returns:
        (B,) scores in [0, w].
    """
    cos = (_unit(image_emb) * _unit(text_emb)).sum(dim=-1)  # (B,)
    return w * cos.clamp(min=0)


def ref_clip_score(
    image_emb: torch.Tensor,
    cand_emb: torch.Tensor,
    ref_embs: Sequence[torch.Tensor],
    w: float = CLIP_SCORE_W,
) -> torch.Tensor:
    """RefCLIP-S(c, R, v) = H-Mean(CLIP-S(c, v), max(max_{r ∈ R} cos(c, r), 0)) per image.

    Hessel et al. 2021, §3: the harmonic mean of the reference-free CLIP-S (which carries the
    factor w) and the best cosine between the candidate and a reference caption (which does
    not). When either part is 0 the harmonic mean is 0. The authors' code leaves the text
    term unclipped; the two agree unless every reference has a negative cosine.

    Args:
        image_emb: (B, D) image embeddings.
        cand_emb: (B, D) candidate caption embeddings.
        ref_embs: B tensors of shape (R_i, D), the reference caption embeddings of image i
            (R_i >= 1; a (B, R, D) tensor works too).
        w: CLIP-S's rescaling constant.

    Returns:
        (B,) scores.
    """
    if len(ref_embs) != cand_emb.shape[0]:
        raise ValueError(f"ref_clip_score: {cand_emb.shape[0]} candidates but {len(ref_embs)} reference sets")
    counts = torch.tensor([len(r) for r in ref_embs], device=cand_emb.device)
    if bool((counts == 0).any()):
        raise ValueError("ref_clip_score: every image needs at least one reference embedding")
    refs = _unit(torch.cat(list(ref_embs)))  # (ΣR_i, D)
    cand = _unit(cand_emb)
    owner = torch.repeat_interleave(torch.arange(len(ref_embs), device=cand.device), counts)  # image of each ref
    cos = (refs * cand[owner]).sum(dim=-1)  # (ΣR_i,)
    best = cos.new_full((cand.shape[0],), -1.0).scatter_reduce(0, owner, cos, reduce="amax")  # max_r cos(c, r)
    text_term = best.clamp(min=0)
    image_term = clip_score(image_emb, cand_emb, w)
    total = image_term + text_term
    return torch.where(total > 0, 2 * image_term * text_term / total.clamp(min=torch.finfo(total.dtype).tiny), 0.0)
