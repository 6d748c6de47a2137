"""From records to tensors: the caption dataset the engine indexes, and its collate.

Images travel as uint8 and are normalised on the device by the model, which keeps the
host-to-device copy four times smaller than float32.
"""

from __future__ import annotations

import itertools
import os
import random
import sys
from dataclasses import dataclass, replace

import torch
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerBase

from capcli.data.concepts import concept_targets
from capcli.data.images import ImageLoadError, load_image, resize_center_crop
from capcli.data.pixel_cache import PixelCache, pixel_cache_for
from capcli.settings import DataSettings
from capcli.train.sampler import (
    EpochLayout,
    EpochLoader,
    IndexedDataset,
    micro_batches_per_epoch,
)


@dataclass
class CaptionExample:
    pixels: torch.Tensor  # (3, H, W) uint8
    caption: str
    scene: dict | None = None  # the image's scene graph, where the source has one (synthetic)


@dataclass
class CaptionBatch:
    """A batch of image-caption pairs. ``caption_ids`` end with end-of-text, padded with the pad token."""

    pixels: torch.Tensor  # (B, 3, H, W) uint8
    caption_ids: torch.Tensor  # (B, T) long
    caption_mask: torch.Tensor  # (B, T) long, 1 on real tokens (end-of-text included)
    captions: list[str]
    skipped: int = 0  # samples dropped because their image could not be read
    concepts: torch.Tensor | None = None  # (B, C) float: which concept words each image shows

    def __len__(self) -> int:
        return len(self.captions)

    def to(self, device: torch.device) -> CaptionBatch:
        move = dict(device=device, non_blocking=True)
        concepts = None if self.concepts is None else self.concepts.to(**move)
        return replace(self, pixels=self.pixels.to(**move), caption_ids=self.caption_ids.to(**move),
                       caption_mask=self.caption_mask.to(**move), concepts=concepts)


class CaptionDataset(IndexedDataset):
    """Image-caption pairs from a split with ``image`` (undecoded) and ``captions`` columns.

    Indexed by the engine's ``SampleKey(index, epoch)``: an image with several reference
    captions gives one of them per epoch, chosen from (seed, epoch, index) so that a
    resumed run sees exactly what the uninterrupted one saw.
    """

    def __init__(self, split, image_size: int, max_pixels: int, seed: int = 0, cache: PixelCache | None = None):
        self.split, self.image_size, self.max_pixels, self.seed = split, image_size, max_pixels, seed
        self.cache = cache  # decoded, resized pixels kept across epochs and runs (pixel_cache.py)
        # With the cache, a step reads only the captions (and scene graph): encoded image bytes stay on disk.
        self.has_scene = "scene" in split.column_names
        columns = ["captions", "scene"] if self.has_scene else ["captions"]
        self.captions = split.select_columns(columns) if cache is not None else split

    def __len__(self) -> int:
        return len(self.split)

    def __getitem__(self, key: tuple[int, int]) -> CaptionExample | None:
        index, epoch = key
        pixels = None if self.cache is None else self.cache.get(index)
        if pixels is None:
            pixels = decode_or_warn(self.split[index]["image"], self.image_size, self.max_pixels)
            if pixels is None:
                return None
            if self.cache is not None:
                self.cache.put(index, pixels)
        row = self.captions[index]
        captions = row["captions"]
        choice = random.Random((self.seed * 1_000_003 + epoch) * 1_000_003 + index).randrange(len(captions))
        return CaptionExample(pixels, captions[choice], row["scene"] if self.has_scene else None)


def decode_or_warn(image, image_size: int, max_pixels: int) -> torch.Tensor | None:
    """An image field as the model's (3, S, S) uint8 input, or None, with a warning naming it, when unreadable."""
    try:
        return resize_center_crop(load_image_field(image, max_pixels), image_size)
    except ImageLoadError as err:
        print(f"warning: skipping unreadable image: {err}", file=sys.stderr)
        return None


class StreamingCaptions:
    """A streamed training split (``datasets.IterableDataset``), read afresh each epoch.

    ``len`` is the epoch's length, ``data.train_size`` (a stream does not know its own); the
    engine stops reading after it. For each epoch :meth:`stream` gives the source shuffled
    (shard order, then a buffer of rows) with a seed of (seed, epoch), so a rerun reads the same
    order; under torchrun, this rank's part of it (``split_dataset_by_node``); after a resume,
    without the batches already consumed.
    """

    def __init__(self, split, size: int, image_size: int, max_pixels: int, seed: int = 0, buffer: int = 1000):
        self.split, self.size, self.image_size, self.max_pixels = split, size, image_size, max_pixels
        self.seed, self.buffer = seed, buffer

    def __len__(self) -> int:
        return self.size

    def epoch_loader(self, epoch: int, start: int, layout: EpochLayout) -> EpochLoader:
        """Epoch ``epoch``'s stream from micro-batch ``start`` on, batched in the order it comes."""
        source = self.stream(epoch, start, layout.batch_size, layout.rank, layout.world)
        loader = DataLoader(source, batch_size=layout.batch_size, collate_fn=layout.collate,
                            num_workers=layout.num_workers, pin_memory=layout.pin_memory)
        return EpochLoader(loader, micro_batches_per_epoch(len(self), layout.batch_size, layout.grad_accum,
                                                           layout.world))

    def stream(self, epoch: int, skip_batches: int, batch_size: int, rank: int,
               world: int) -> torch.utils.data.IterableDataset:
        from datasets.distributed import split_dataset_by_node

        split = self.split.shuffle(seed=self.seed, buffer_size=self.buffer)
        if world > 1:
            split = split_dataset_by_node(split, rank=rank, world_size=world)
        split.set_epoch(epoch)  # on the stream that is read: the shuffle's seed becomes (seed, epoch)
        return _Examples(split, self.image_size, self.max_pixels, epoch, skip_batches, batch_size)


class _Examples(torch.utils.data.IterableDataset):
    """Rows of a stream as CaptionExamples (None for an unreadable image, as CaptionDataset gives).
    An image with several captions gives the next one each epoch (a stream has no row index
    for CaptionDataset's seeded choice)."""

    def __init__(self, rows, image_size: int, max_pixels: int, epoch: int, skip_batches: int, batch_size: int):
        self.rows, self.image_size, self.max_pixels, self.epoch = rows, image_size, max_pixels, epoch
        self.skip_batches, self.batch_size = skip_batches, batch_size

    def _skip(self) -> int:
        """Rows this reader already consumed. DataLoader workers each read their own part of the
        stream (datasets splits it by worker) and the loader takes their batches in turn, so
        worker w made batches w, w + n, w + 2n... of those consumed."""
        info = torch.utils.data.get_worker_info()
        workers, me = (info.num_workers, info.id) if info is not None else (1, 0)
        return max(0, -(-(self.skip_batches - me) // workers)) * self.batch_size

    def __iter__(self):
        # Resuming: the consumed rows are read again in the same order and passed over undecoded
        # (datasets' own skip() would change the shuffled order it is applied to).
        for row in itertools.islice(self.rows, self._skip(), None):
            pixels = decode_or_warn(row["image"], self.image_size, self.max_pixels)
            yield None if pixels is None else CaptionExample(pixels, row["captions"][self.epoch % len(row["captions"])],
                                                             row.get("scene"))


def caption_dataset(split, image_size: int, data: DataSettings) -> CaptionDataset:
    """A split's CaptionDataset as the data settings ask: with its pixel cache when ``pixel_cache`` is on.

    Across nodes (torchrun with fewer processes per node than in all) the cache is off: its
    memory-mapped file would sit on a network filesystem, where writes from different hosts
    are not coherent.
    """
    # Imported here, not at the top: captioning a file needs no `datasets`.
    from capcli.data.sources import cache_root

    cache, why = None, ""
    if data.pixel_cache and os.environ.get("LOCAL_WORLD_SIZE", "1") == os.environ.get("WORLD_SIZE", "1"):
        cache, why = pixel_cache_for(split, cache_root(data), image_size, data.pixel_cache_max_gb)
    if why:
        print(f"note: {why}; the images are decoded every epoch", file=sys.stderr)
    return CaptionDataset(split, image_size, data.max_pixels, data.seed, cache)


def training_dataset(split, image_size: int, data: DataSettings, seed: int) -> CaptionDataset | StreamingCaptions:
    """A caption split as the engine reads it: a stream read afresh each epoch (its shuffle seeded
    by ``seed``, ``data.train_size`` rows an epoch), else indexed (``caption_dataset``)."""
    import datasets

    if isinstance(split, datasets.IterableDataset):
        return StreamingCaptions(split, data.train_size, image_size, data.max_pixels, seed)
    return caption_dataset(split, image_size, data)


def load_image_field(value: dict | object, max_pixels: int):
    """Decode a ``datasets`` Image value stored undecoded: ``{"bytes": ..., "path": ...}``."""
    if isinstance(value, dict):
        if value.get("bytes"):
            return load_image(value["bytes"], max_pixels=max_pixels, name=value.get("path") or "<bytes>")
        return load_image(value["path"], max_pixels=max_pixels)
    return load_image(value, max_pixels=max_pixels)


@dataclass
class CaptionCollator:
    """Tokenises captions (cut at ``max_tokens``, then end-of-text), stacks images, and marks the
    concept words each caption names or its scene graph makes true (for a model with a concept head)."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int
    concept_words: tuple[str, ...] = ()

    def __call__(self, examples: list[CaptionExample | None]) -> CaptionBatch:
        kept = [e for e in examples if e is not None]
        captions = [e.caption for e in kept]
        caption_ids, caption_mask = tokenize_captions(self, captions)
        pixels = torch.stack([e.pixels for e in kept]) if kept else torch.empty(0, 3, 1, 1, dtype=torch.uint8)
        scenes = [e.scene for e in kept]
        concepts = concept_targets(captions, self.concept_words, scenes) if self.concept_words else None
        return CaptionBatch(pixels, caption_ids, caption_mask, captions, skipped=len(examples) - len(kept),
                            concepts=concepts)


def tokenize_captions(collator: CaptionCollator, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) ids and mask: each caption cut at ``max_tokens``, then end-of-text, then padding."""
    tokenizer = collator.tokenizer
    # split_special_tokens: a caption that contains the text "<|pad|>" is text, not padding.
    ids = tokenizer(captions, add_special_tokens=False, truncation=True, max_length=collator.max_tokens,
                    split_special_tokens=True)["input_ids"] if captions else []
    ids = [seq + [tokenizer.eos_token_id] for seq in ids]
    width = max((len(seq) for seq in ids), default=1)
    caption_ids = torch.full((len(ids), width), tokenizer.pad_token_id, dtype=torch.long)
    caption_mask = torch.zeros((len(ids), width), dtype=torch.long)
    for row, seq in enumerate(ids):
        caption_ids[row, : len(seq)] = torch.tensor(seq)
        caption_mask[row, : len(seq)] = 1
    return caption_ids, caption_mask


# --- preference pairs (align) -------------------------------------------------


@dataclass
class PreferenceExample:
    chosen: str
    rejected: str
    pixels: torch.Tensor | None = None  # (3, H, W) uint8, when the tower runs live
    features: torch.Tensor | None = None  # (S, Dv) cached features of the frozen tower
    reference: torch.Tensor | None = None  # (2,) or (3,) cached reference log-probs (see PreferenceBatch)
    other_pixels: torch.Tensor | None = None  # another image, for the image-conditional term
    other_features: torch.Tensor | None = None


@dataclass
class PreferenceBatch:
    """Chosen and rejected captions of the same images, with what conditions them.

    Exactly one of ``pixels`` and ``features`` is set for image pairs; both are None for
    text-only pairs (UltraFeedback), which the decoder scores with no image.
    """

    chosen_ids: torch.Tensor  # (B, T) long, end-of-text included, pad after
    chosen_mask: torch.Tensor  # (B, T)
    rejected_ids: torch.Tensor  # (B, T') long
    rejected_mask: torch.Tensor  # (B, T')
    pixels: torch.Tensor | None = None  # (B, 3, H, W) uint8
    features: torch.Tensor | None = None  # (B, S, Dv)
    reference: torch.Tensor | None = None  # (B, 2) reference log-probs of chosen, rejected [, chosen | other image]
    skipped: int = 0
    # Another image of the split for each pair (mDPO's image-conditional term: the chosen caption
    # is scored under it too); pixels or cached features, as for the pair's own image.
    other_pixels: torch.Tensor | None = None
    other_features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.chosen_ids)

    def to(self, device: torch.device) -> PreferenceBatch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device, non_blocking=True)

        return PreferenceBatch(move(self.chosen_ids), move(self.chosen_mask), move(self.rejected_ids),
                               move(self.rejected_mask), move(self.pixels), move(self.features),
                               move(self.reference), self.skipped, move(self.other_pixels),
                               move(self.other_features))


class PreferenceDataset(IndexedDataset):
    """Preference pairs (``image``, ``chosen``, ``rejected``) indexed by ``SampleKey``.

    ``features[feature_index[i]]`` replaces pair ``i``'s image when the vision tower is
    frozen, and ``reference[i]`` holds its reference log-probs: both are computed once
    before training (``capcli.phases.caches``), so a step decodes no image and runs no tower.
    With ``other`` (``other_images``), pair ``i`` also brings the image of pair ``other[i]``,
    another image, for the image-conditional term.
    """

    def __init__(self, pairs, image_size: int, max_pixels: int, features: torch.Tensor | None = None,
                 feature_index: list[int] | None = None, reference: torch.Tensor | None = None,
                 other: list[int] | None = None):
        self.pairs, self.image_size, self.max_pixels = pairs, image_size, max_pixels
        self.features, self.feature_index, self.reference = features, feature_index, reference
        self.text_only = "image" not in pairs.column_names or all(v is None for v in pairs["image"])
        self.other = None if self.text_only else other

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, key: tuple[int, int]) -> PreferenceExample | None:
        example = self._example(key[0])
        if example is not None and example.reference is not None and torch.isnan(example.reference).all():
            # The cache holds the pairs of the run's planned steps alone: another one means the plan
            # and the engine disagree. (A pair whose image is unreadable is NaN too, and None above.)
            raise RuntimeError(f"pair {key[0]} has no cached reference log-probs: the cache holds the pairs that "
                               "the run's planned steps visit (capcli.train.sampler.planned_rows)")
        return example

    def _example(self, index: int) -> PreferenceExample | None:
        row = self.pairs[index]
        example = PreferenceExample(row["chosen"], row["rejected"])
        if self.reference is not None:
            example.reference = self.reference[index]
        if self.text_only:
            return example
        if self.features is not None:
            example.features = self.features[self.feature_index[index]]
            if self.other is not None:
                example.other_features = self.features[self.feature_index[self.other[index]]]
            return example
        try:
            example.pixels = resize_center_crop(load_image_field(row["image"], self.max_pixels), self.image_size)
            if self.other is not None:
                other = self.pairs[self.other[index]]["image"]
                example.other_pixels = resize_center_crop(load_image_field(other, self.max_pixels), self.image_size)
        except ImageLoadError as err:
            print(f"warning: skipping unreadable image: {err}", file=sys.stderr)
            return None
        return example


def other_images(keys: list[str], seed: int) -> list[int] | None:
    """For each pair, a pair of *another* image (``keys`` say which pairs share an image).

    The distinct images go round one seeded random cycle, each pointing at the next, so every
    image is some pair's "other" once; None when there are fewer than two images.
    """
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    images = list(first)
    if len(images) < 2:
        return None
    random.Random(seed).shuffle(images)
    following = {key: first[images[(k + 1) % len(images)]] for k, key in enumerate(images)}
    return [following[key] for key in keys]


@dataclass
class PreferenceCollator:
    """Tokenises both captions of each pair like ``CaptionCollator`` and stacks the rest."""

    tokenizer: PreTrainedTokenizerBase
    max_tokens: int

    def __call__(self, examples: list[PreferenceExample | None]) -> PreferenceBatch:
        kept = [e for e in examples if e is not None]
        captions = CaptionCollator(self.tokenizer, self.max_tokens)
        chosen = tokenize_captions(captions, [e.chosen for e in kept])
        rejected = tokenize_captions(captions, [e.rejected for e in kept])

        def stack(name: str) -> torch.Tensor | None:
            values = [getattr(e, name) for e in kept]
            return torch.stack(values) if values and values[0] is not None else None

        return PreferenceBatch(*chosen, *rejected, pixels=stack("pixels"), features=stack("features"),
                               reference=stack("reference"), skipped=len(examples) - len(kept),
                               other_pixels=stack("other_pixels"), other_features=stack("other_features"))
