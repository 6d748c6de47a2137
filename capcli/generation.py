"""Decoding captions from images: batched greedy or beam search with the decoder's KV cache.

transformers' ``generate`` does the search; the image enters as the prefix embeddings
(``inputs_embeds``), so for a decoder-only model the returned ids are the new tokens only.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.model import Captioner


@dataclass(frozen=True)
class DecodeSettings:
    """Search controls, as ``generate`` takes them."""

    beams: int = 1
    max_length: int = 32
    min_length: int = 1
    length_penalty: float = 1.0
    no_repeat_ngram: int = 0


@torch.no_grad()
def generate_captions(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings = DecodeSettings()) -> list[str]:
    """Caption a batch of images.

    Args:
        model: a Captioner (its device is used).
        pixels: (B, 3, H, W) uint8 images at the model's resolution.
        decode: search settings.

    Returns:
        One caption per image, without special tokens.
    """
    model.eval()
    device = model.pixel_mean.device
    prefix = model.prefix(model.image_features(pixels.to(device)))  # (B, K, D)
    tokenizer = model.tokenizer
    ids = model.decoder.generate(
        inputs_embeds=prefix,
        attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long, device=device),
        max_new_tokens=decode.max_length,
        min_new_tokens=decode.min_length,
        num_beams=decode.beams,
        length_penalty=decode.length_penalty,
        no_repeat_ngram_size=decode.no_repeat_ngram,
        do_sample=False,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
    )  # (B, new tokens), padded with pad after end-of-text
    return [text.strip() for text in tokenizer.batch_decode(ids, skip_special_tokens=True)]
