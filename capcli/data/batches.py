"""From records to tensors: the caption dataset the engine indexes, and its collate.

Images travel as uint8 and are normalised on the device by the model, which keeps the
host-to-device copy four times smaller than float32.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, replace

import torch
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from capcli.data.images import ImageLoadError, load_image, resize_center_crop


@dataclass
class CaptionExample:
    pixels: torch.Tensor  # (3, H, W) uint8
    caption: str


@dataclass
class CaptionBatch:
    """A batch of image-caption pairs. ``caption_ids`` end with end-of-text, padded with the pad token."""

    pixels: torch.Tensor  # (B, 3, H, W) uint8
    caption_ids: torch.Tensor  # (B, T) long
    caption_mask: torch.Tensor  # (B, T) long, 1 on real tokens (end-of-text included)
    captions: list[str]
    skipped: int = 0  # samples dropped because their image could not be read

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> CaptionBatch:
        move = dict(device=device, non_blocking=True)
        return replace(self, pixels=self.pixels.to(**move), caption_ids=self.caption_ids.to(**move),
                       caption_mask=self.caption_mask.to(**move))


class CaptionDataset(Dataset):
    """Image-caption pairs from a split with ``image`` (undecoded) and ``captions`` columns.

    Indexed by the engine's ``SampleKey(index, epoch)``: an image with several reference
    captions gives one of them per epoch, chosen from (seed, epoch, index) so that a
    resumed run sees exactly what the uninterrupted one saw.
    """

    def __init__(self, split, image_size: int, max_pixels: int, seed: int = 0):
        self.split, self.image_size, self.max_pixels, self.seed = split, image_size, max_pixels, seed

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> CaptionExample | None:
        index, epoch = key
        row = self.split[index]
        try:
            pixels = resize_center_crop(load_image_field(row["image"], self.max_pixels), self.image_size)
        except ImageLoadError as err:
            print(f"warning: skipping unreadable image: {err}", file=sys.stderr)
            return None
        captions = row["captions"]
        choice = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + index).randrange(len(captions))
        return CaptionExample(pixels, captions[choice])


def load_image_field(value: dict | object, max_pixels: int):
    """Decode a ``datasets`` Image value stored undecoded: ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image(value["bytes"], max_pixels=max_pixels, name=value.get("path") or "<bytes>")
        return load_image(value["path"], max_pixels=max_pixels)
    return load_image(value, max_pixels=max_pixels)


@dataclass
class CaptionCollator:
    """Tokenises captions (cut at ``max_tokens``, then end-of-text) and stacks images."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int

    def __call__(self, examples: list[CaptionExample | None]) -> CaptionBatch:
        kept = [e for e in examples if e is not None]
        # split_special_tokens: a caption that contains the text "<|pad|>" is text, not padding.
        ids = self.tokenizer([e.caption for e in kept], add_special_tokens=False, truncation=True,
                             max_length=self.max_tokens, split_special_tokens=True)["input_ids"] if kept else []
        ids = [seq + [self.tokenizer.eos_token_id] for seq in ids]
        width = max((len(seq) for seq in ids), default=1)
        caption_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
        caption_mask = torch.zeros((len(ids), width), dtype=torch.long)
        for row, seq in enumerate(ids):
            caption_ids[row, : len(seq)] = torch.tensor(seq)
            caption_mask[row, : len(seq)] = 1
        pixels = torch.stack([e.pixels for e in kept]) if kept else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        return CaptionBatch(pixels, caption_ids, caption_mask, [e.caption for e in kept],
                            skipped=len(examples) - len(kept))
