"""The Python API: a checkpoint loaded once, then images captioned, embedded and scored.

::

    import capcli

    captioner = capcli.load("runs/align")               # a checkpoint, or a run directory (its best)
    captioner.caption("photo.jpg")                       # Caption(text=..., logprob=..., score=..., tokens=...)
    captioner.caption(["a.jpg", pil_image, tensor], beams=1)
    captioner.embed_images(["a.jpg"])                    # (N, 512) float32, L2-normalised
    captioner.embed_texts(["a red circle"])              # (N, 512)
    captioner.score("photo.jpg", "a red circle")         # log p(caption | image), in nats

Images are paths (read by capcli's safe loader: format allow-list, pixel cap, EXIF
orientation), PIL images, or tensors: (3, H, W) or (N, 3, H, W), uint8 in 0..255 or floats in
0..1. Every call batches inside, runs without gradients, and uses the runtime the CLI would
(``auto``: CUDA, then MPS, then the CPU; bf16 autocast on CUDA). ``capcli caption`` decodes
through :meth:`ImageCaptioner.caption_pixels`, the same path.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from capcli.data.batches import CaptionCollator, tokenize_captions
from capcli.data.images import DEFAULT_MAX_PIXELS, load_image, resize_center_crop
from capcli.errors import CapcliError
from capcli.model import Captioner
from capcli.model.generation import (
    DecodeSettings,
    ScoredCaption,
    caption_logprobs,
    generate_scored_captions,
)
from capcli.train.checkpoint import default_checkpoint, resolve_checkpoint
from capcli.train.runtime import Runtime

ImageInput = str | os.PathLike | Image.Image | torch.Tensor | np.ndarray
Caption = ScoredCaption  # text, logprob, score, tokens (generation.ScoredCaption)
MAX_CAPTION_TOKENS = 48  # as data.max_caption_tokens: longer captions are cut when embedded or scored


class ImageCaptioner:
    """A loaded checkpoint, ready to caption, embed and score images.

    Named apart from ``capcli.model.Captioner``, the ``nn.Module`` it wraps (``.model``).
    """

    def __init__(self, model: Captioner, runtime: Runtime, *, checkpoint: Path | None = None,
                 batch_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS):
        self.model = model.eval()
        self.runtime = runtime  # its autocast wraps every call
        self.checkpoint = checkpoint
        self.batch_size = batch_size
        self.max_pixels = max_pixels

    @classmethod
    def load(cls, path: str | os.PathLike | None = None, device: str = "auto", precision: str = "auto", *,
             batch_size: int = 16, max_pixels: int = DEFAULT_MAX_PIXELS,
             runtime: Runtime | None = None) -> ImageCaptioner:
        """Load a checkpoint directory, or a run directory (its ``checkpoints/best``).

        Args:
            path: the checkpoint; None takes ``runs/align``'s best, else ``runs/pretrain``'s, as the CLI does.
            device: ``auto`` | ``cpu`` | ``cuda`` | ``mps`` (or ``cuda:1``).
            precision: ``auto`` | ``fp32`` | ``bf16`` | ``fp16``: the autocast of every call.
            batch_size: images decoded or embedded together.
            max_pixels: images larger than this are refused before decoding.
            runtime: a command's runtime, already resolved; it replaces ``device`` and ``precision``.

        Raises:
            ConfigError: no checkpoint there. CapcliError: one is there but cannot be loaded.
        """
        directory = resolve_checkpoint(Path(path)) if path is not None else default_checkpoint()
        runtime = runtime or Runtime.named(device, precision)
        try:
            model = Captioner.from_pretrained(directory, runtime.device)
        except Exception as err:  # a damaged or foreign directory: say which, on one line
            reason = " ".join(str(err).split()) or type(err).__name__
            raise CapcliError(f"cannot load the checkpoint in {directory}: {reason}") from err
        return cls(model, runtime, checkpoint=directory, batch_size=batch_size, max_pixels=max_pixels)

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def image_size(self) -> int:
        """The side, in pixels, that every image is resized and centre-cropped to."""
        return self.model.image_size

    # ------------------------------------------------------------------ images in

    def pixels(self, images: ImageInput | Iterable[ImageInput]) -> torch.Tensor:
        """(N, 3, S, S) uint8: the images as the model reads them (resized, centre-cropped)."""
        return torch.stack([self._pixels(image) for image in _as_list(images)[0]])

    def _pixels(self, image: ImageInput) -> torch.Tensor:
        size = self.image_size
        if isinstance(image, (str, os.PathLike)):
            return resize_center_crop(load_image(image, max_pixels=self.max_pixels), size)
        if isinstance(image, Image.Image):
            return resize_center_crop(image, size)
        if isinstance(image, np.ndarray):  # (H, W, 3) or (H, W), as PIL and OpenCV arrays are
            return resize_center_crop(Image.fromarray(image), size)
        if isinstance(image, torch.Tensor):
            t = image.detach().cpu()
            if t.ndim != 3 or t.shape[0] not in (1, 3):
                raise ValueError(f"an image tensor is (3, H, W) or (1, H, W), got {tuple(t.shape)}")
            if t.is_floating_point():
                t = (t.clamp(0, 1) * 255).round().to(torch.uint8)
            t = t.to(torch.uint8).expand(3, -1, -1)
            if tuple(t.shape[1:]) == (size, size):
                return t.contiguous()
            return resize_center_crop(Image.fromarray(t.permute(1, 2, 0).numpy()), size)
        raise TypeError(f"an image is a path, a PIL image, an array or a tensor, not {type(image).__name__}")

    # ------------------------------------------------------------------ captions

    def caption(self, images: ImageInput | Iterable[ImageInput], beams: int = 5, max_length: int = 32,
                min_length: int = 1, length_penalty: float = 1.0, no_repeat_ngram: int = 0,
                concept_guidance: float = 1.0, spatial_guidance: bool = True,
                concept_prior: float = DecodeSettings.model_fields["concept_prior"].default) -> Caption | list[Caption]:
        """Caption one image (returns one :class:`Caption`) or several (returns a list, in order).

        The settings are ``capcli caption``'s (``beams=1`` is greedy search). Each caption comes
        with ``logprob`` (Σ log p of its tokens and end-of-text, nats), ``tokens`` and ``score``
        (``logprob / tokens ** length_penalty``, what beam search ranks by).
        """
        items, single = _as_list(images)
        decode = DecodeSettings(beams=beams, max_length=max_length, min_length=min_length,
                                length_penalty=length_penalty, no_repeat_ngram=no_repeat_ngram,
                                concept_guidance=concept_guidance, spatial_guidance=spatial_guidance,
                                concept_prior=concept_prior)
        out: list[Caption] = []
        for start in range(0, len(items), self.batch_size):
            pixels = torch.stack([self._pixels(image) for image in items[start : start + self.batch_size]])
            out += self.caption_pixels(pixels, decode)
        return out[0] if single else out

    @torch.no_grad()
    def caption_pixels(self, pixels: torch.Tensor, decode: DecodeSettings) -> list[Caption]:
        """Caption a batch already at the model's size: (B, 3, S, S) uint8 → B captions."""
        with self.runtime.autocast():
            return generate_scored_captions(self.model, pixels, decode)

    # ------------------------------------------------------------------ embeddings and scores

    @torch.no_grad()
    def embed_images(self, images: ImageInput | Iterable[ImageInput]) -> torch.Tensor:
        """(N, E) float32 on the CPU: the images in the shared space, L2-normalised (E = 512)."""
        items, _ = _as_list(images)
        out = []
        for start in range(0, len(items), self.batch_size):
            pixels = torch.stack([self._pixels(image) for image in items[start : start + self.batch_size]])
            with self.runtime.autocast():
                features = self.model.image_features(pixels.to(self.device))
                out.append(self.model.embed_image(features).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def embed_texts(self, texts: str | Sequence[str]) -> torch.Tensor:
        """(N, E) float32 on the CPU: the captions in the shared space, L2-normalised."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        collate = CaptionCollator(self.model.tokenizer, MAX_CAPTION_TOKENS)
        out = []
        for start in range(0, len(texts), self.batch_size):
            ids, mask = tokenize_captions(collate, texts[start : start + self.batch_size])
            with self.runtime.autocast():
                out.append(self.model.embed_text(ids.to(self.device), mask.to(self.device)).float().cpu())
        return torch.cat(out)

    @torch.no_grad()
    def score(self, images: ImageInput | Iterable[ImageInput], captions: str | Sequence[str]) -> float | list[float]:
        """log p(caption | image) under the model, in nats: Σ over the caption's tokens and its end-of-text.

        One image and one caption give a float; lists of equal length give one score per pair.
        The same number ``caption`` reports as ``logprob`` for the caption it wrote.
        """
        items, single = _as_list(images)
        texts = [captions] if isinstance(captions, str) else list(captions)
        if len(items) != len(texts):
            raise ValueError(f"score takes one caption per image: {len(items)} images, {len(texts)} captions")
        collate = CaptionCollator(self.model.tokenizer, MAX_CAPTION_TOKENS)
        out: list[float] = []
        for start in range(0, len(items), self.batch_size):
            pixels = torch.stack([self._pixels(image) for image in items[start : start + self.batch_size]])
            ids, _ = tokenize_captions(collate, texts[start : start + self.batch_size])
            with self.runtime.autocast():
                features = self.model.image_features(pixels.to(self.device))
                logprobs, _ = caption_logprobs(self.model, features, ids.to(self.device))
            out += logprobs.tolist()
        return out[0] if single and isinstance(captions, str) else out


def load(path: str | os.PathLike | None = None, device: str = "auto", precision: str = "auto",
         **options: Any) -> ImageCaptioner:
    """``ImageCaptioner.load``: a checkpoint or run directory, ready to caption, embed and score."""
    return ImageCaptioner.load(path, device, precision, **options)


def _as_list(images: Any) -> tuple[list[Any], bool]:
    """The images as a list, and whether one image (not a list of one) was given."""
    if isinstance(images, (str, os.PathLike, Image.Image, np.ndarray)):
        return [images], True
    if isinstance(images, torch.Tensor):
        return ([images], True) if images.ndim == 3 else (list(images), False)
    return list(images), False
