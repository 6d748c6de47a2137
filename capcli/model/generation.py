"""Decoding captions from images: batched greedy or beam search with the decoder's KV cache.

transformers' ``generate`` does the search; the image enters as the prefix embeddings
(``inputs_embeds``), so for a decoder-only model the returned ids are the new tokens only.
``generate_scored_captions`` also scores each caption under the model (``logprob``) and
as beam search ranks it (``score``); see :class:`ScoredCaption`.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from transformers import LogitsProcessorList

from capcli.losses import sequence_logps
from capcli.model import Captioner
from capcli.model.guidance import ConceptGuidance
from capcli.model.kvcache import SHARES_PREFIX, cache_argument, prefix_cache
from capcli.settings import DecodeSettings  # the search controls, one settings group
from capcli.train.runtime import evaluating


@dataclass(frozen=True)
class ScoredCaption:
    """A caption with its scores under the model that wrote it.

    The scored tokens are the caption's tokens followed by the end-of-text token, or, when
    the search stopped at ``max_length`` first, the ``max_length`` caption tokens alone.
    """

    text: str
    """The caption, without special tokens."""
    logprob: float
    """Σ log p(token | image, earlier tokens) over the scored tokens, in nats, under the model's
    own next-token distribution (before any search constraint such as no-repeat n-grams or
    concept guidance)."""
    score: float
    """``logprob / tokens ** length_penalty``: the length-normalised score that unguided beam search
    ranks finished captions by (transformers' ``sequences_scores``); the same formula for greedy."""
    tokens: int
    """How many tokens were scored (end-of-text included when the caption ended)."""


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' warnings for a block, then restore its level.

    Once a caption of a batch has ended, ``generate`` feeds it pad tokens and GPT-2 warns
    that "input_ids may be padded" on stderr; the tokens after end-of-text are discarded,
    so the warning is noise in a command whose stderr is for the user. So is the Python
    warning that ``no_repeat_ngram_size`` with ``inputs_embeds`` applies only to the new
    tokens: the prompt is the image prefix, which has no words to repeat.
    """
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(max(level, logging.ERROR))
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Passing `no_repeat_ngram_size` with `inputs_embeds`")
            yield
    finally:
        logger.setLevel(level)


def _search(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings,
            **search: object) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the search: (vision features, (B, new tokens) ids padded with pad after end-of-text)."""
    model.eval()
    features = model.image_features(pixels.to(model.pixel_mean.device))
    return features, _generate(model, features, decode, decode.beams, **search)


def _generate(model: Captioner, features: torch.Tensor, decode: DecodeSettings, copies: int,
              **search: object) -> torch.Tensor:
    """``generate`` from image features: (B·copies, new tokens) ids, padded with pad after end-of-text.

    ``copies`` is how many rows ``generate`` makes of each image (beams, or samples drawn);
    ``search`` overrides the search arguments (sampling, returned sequences).
    """
    prefix = model.prefix(features)  # (B, K, D)
    tokenizer = model.tokenizer
    guide = LogitsProcessorList()
    if decode.concept_guidance and model.concept_head is not None:
        guide.append(ConceptGuidance(model, features, decode.concept_guidance, copies, decode.spatial_guidance,
                                     decode.concept_prior))
    arguments = dict(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=prefix.device),
        max_new_tokens=decode.max_length,
        min_new_tokens=decode.min_length,
        num_beams=decode.beams,
        length_penalty=decode.length_penalty,
        no_repeat_ngram_size=decode.no_repeat_ngram,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        logits_processor=guide,
    )
    if copies > 1 and search.get("use_cache", True) and SHARES_PREFIX and prefix.shape[1] > 1:
        arguments[cache_argument(model.decoder)] = prefix_cache(model.decoder, prefix, copies)
    with quiet_transformers():
        return model.decoder.generate(**{**arguments, **search})


def candidate_captions(model: Captioner, features: torch.Tensor, decode: DecodeSettings, beams: int,
                       samples: int, temperature: float = 1.0) -> list[list[str]]:
    """Several captions of each image, as the model writes them: the material of on-policy pairs.

    Args:
        model: a Captioner (in eval mode for this call).
        features: (B, S, Dv) the images' vision features (``model.image_features``, or align's cache).
        decode: length limits and concept guidance, as ``capcli evaluate`` decodes.
        beams: the ``beams`` best finished captions of a beam search of that width (0 for none).
        samples: captions drawn by ancestral sampling at ``temperature`` (0 for none); the draw
            follows torch's global generator, so seed it for a reproducible draw.

    Returns:
        For each image, its ``beams + samples`` captions (beam candidates first), duplicates kept.
    """
    runs = []
    if beams:
        runs.append((beams, dict(num_beams=beams, num_return_sequences=beams)))
    if samples:
        runs.append((samples, dict(num_beams=1, do_sample=True, temperature=temperature, top_k=0,
                                   num_return_sequences=samples)))
    out: list[list[str]] = [[] for _ in range(len(features))]
    for copies, search in runs:
        with evaluating(model):
            ids = _generate(model, features, decode, copies, **search)  # (B·copies, T), an image's rows together
        texts = [t.strip() for t in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        for i, text in enumerate(texts):
            out[i // copies].append(text)
    return out


@torch.no_grad()
def generate_captions(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings = DecodeSettings(),
                      *, use_cache: bool = True) -> list[str]:
    """Caption a batch of images.

    Args:
        model: a Captioner (its device is used).
        pixels: (B, 3, H, W) uint8 images at the model's resolution.
        decode: search settings.
        use_cache: False re-runs the decoder over [prefix; tokens so far] at every step, the same
            search without the KV cache: only the baseline that ``capcli benchmark`` times.

    Returns:
        One caption per image, without special tokens.
    """
    _, ids = _search(model, pixels, decode, use_cache=use_cache)
    return [text.strip() for text in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]


def scored_mask(ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """(B, T) generated ids → (B, T) mask of the scored tokens: up to and including the first end-of-text.

    A row without end-of-text (the search hit ``max_length``) is scored in full; whatever
    follows the end-of-text is padding and is not scored.
    """
    is_eos = (ids == eos_id).long()
    before = torch.cumsum(is_eos, dim=1) - is_eos  # end-of-text tokens strictly before each position
    return (before == 0).long()


@torch.no_grad()
def caption_logprobs(model: Captioner, features: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forced log-probability of generated captions given their images.

    Args:
        model: the Captioner that generated ``ids``.
        features: the images' vision features (``model.image_features``).
        ids: (B, T) generated ids, as ``generate`` returns them.

    Returns:
        (B,) float32 sums of log p(token | image, earlier tokens) over the scored tokens
        (:func:`scored_mask`), and (B,) the number of scored tokens.
    """
    mask = scored_mask(ids, model.tokenizer.eos_token_id)
    logits = model.caption_logits(features, ids, mask)  # (B, T, V)
    return sequence_logps(logits, model.caption_targets(ids, mask)), mask.sum(dim=1)


@torch.no_grad()
def generate_scored_captions(
    model: Captioner, pixels: torch.Tensor, decode: DecodeSettings = DecodeSettings()
) -> list[ScoredCaption]:
    """Caption a batch of images, as :func:`generate_captions` does, and score each caption.

    The search is the same as :func:`generate_captions`'s, so the texts are identical; one
    extra teacher-forced forward pass over the chosen captions gives their log-probabilities.

    Args:
        model: a Captioner (its device is used).
        pixels: (B, 3, H, W) uint8 images at the model's resolution.
        decode: search settings.

    Returns:
        One :class:`ScoredCaption` per image, in order.
    """
    features, ids = _search(model, pixels, decode)
    texts = [text.strip() for text in model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
    logprobs, lengths = caption_logprobs(model, features, ids)
    scores = logprobs / lengths.float() ** decode.length_penalty
    rows = zip(texts, logprobs.tolist(), scores.tolist(), lengths.tolist(), strict=True)
    return [ScoredCaption(text, logprob, score, length) for text, logprob, score, length in rows]
