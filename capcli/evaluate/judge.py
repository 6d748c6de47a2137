"""The judge behind CLIP score and win rate (DESIGN §6).

A pretrained open_clip ViT-B/32 when one is at hand, else the evaluated model's own image
and text embeddings. The judge is always named in the results: a score judged by the model
itself is reported as ``clip_score_self``, because a model that grades its own captions is
not an independent referee.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from capcli.data.batches import CaptionCollator, load_image_field, tokenize_captions
from capcli.data.images import resize_center_crop
from capcli.errors import ConfigError
from capcli.model import Captioner
from capcli.model.towers import OFFLINE_HELP

JUDGE_MODEL = "ViT-B-32"
JUDGE_TAG = "openai"


class SelfJudge:
    """The evaluated Captioner's own shared space."""

    suffix = "_self"

    def __init__(self, model: Captioner, checkpoint: Path, max_pixels: int, max_tokens: int):
        self.model, self.max_pixels = model, max_pixels
        self.max_tokens = max_tokens  # data.max_caption_tokens: the length the model's text embedding trained on
        self.name = f"self:{checkpoint}"

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        pixels = torch.stack([resize_center_crop(load_image_field(v, self.max_pixels), self.model.image_size)
                              for v in images]).to(self.model.pixel_mean.device)
        return self.model.embed_image(self.model.image_features(pixels)).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        ids, mask = tokenize_captions(CaptionCollator(self.model.tokenizer, self.max_tokens), list(texts))
        device = self.model.pixel_mean.device
        return self.model.embed_text(ids.to(device), mask.to(device)).float()


class OpenClipJudge:
    """A CLIP model from open_clip, with its own preprocessing and tokenizer."""

    suffix = ""

    def __init__(self, weights: str, device: torch.device, max_pixels: int, quick_gelu: bool = False):
        import open_clip

        try:
            model, _, preprocess = open_clip.create_model_and_transforms(
                JUDGE_MODEL, pretrained=weights, force_quick_gelu=quick_gelu, require_pretrained=True)
        except Exception as err:  # open_clip raises RuntimeError/OSError/hub errors alike
            raise ConfigError(f"cannot load the judge {JUDGE_MODEL} '{weights}' ({type(err).__name__}: "
                              f"{str(err).splitlines()[0][:160]}); {OFFLINE_HELP} with --judge FILE, "
                              f"or use --judge self") from None
        self.model, self.preprocess = model.to(device).eval(), preprocess
        self.tokenizer = open_clip.get_tokenizer(JUDGE_MODEL)
        self.device, self.max_pixels = device, max_pixels
        self.name = f"open_clip:{JUDGE_MODEL}:{weights}"

    @torch.no_grad()
    def embed_images(self, images: Sequence[Any]) -> torch.Tensor:
        batch = torch.stack([self.preprocess(load_image_field(v, self.max_pixels)) for v in images])
        return self.model.encode_image(batch.to(self.device)).float()

    @torch.no_grad()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(list(texts)).to(self.device)).float()


def cached_judge_weights() -> str | None:
    """The local file of open_clip's ViT-B-32 ``openai`` weights if the Hugging Face cache holds
    it; never touches the network, so ``--judge auto`` cannot start a surprise download."""
    import open_clip
    from huggingface_hub import try_to_load_from_cache

    hub = open_clip.get_pretrained_cfg(JUDGE_MODEL, JUDGE_TAG).get("hf_hub", "").strip("/")
    for filename in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
        path = try_to_load_from_cache(hub, filename) if hub else None
        if isinstance(path, str):
            return path
    return None


def load_judge(spec: str, model: Captioner, checkpoint: Path, device: torch.device, max_pixels: int,
               max_tokens: int):
    """``auto`` (open_clip ViT-B/32 ``openai`` if cached, else self), ``self``, ``open_clip[:TAG]``, or a weights FILE.

    ``max_tokens`` (``data.max_caption_tokens``) is where the self judge cuts a caption; open_clip's
    tokenizer keeps its own context length.
    """
    if spec == "self":
        return SelfJudge(model, checkpoint, max_pixels, max_tokens)
    if spec == "auto":
        path = cached_judge_weights()
        if path is None:
            return SelfJudge(model, checkpoint, max_pixels, max_tokens)
        judge = OpenClipJudge(path, device, max_pixels, quick_gelu=True)  # OpenAI's weights use QuickGELU
        judge.name = f"open_clip:{JUDGE_MODEL}:{JUDGE_TAG}"
        return judge
    if spec.startswith("open_clip"):
        tag = spec.partition(":")[2] or JUDGE_TAG
        import open_clip

        quick = bool(open_clip.get_pretrained_cfg(JUDGE_MODEL, tag).get("quick_gelu"))
        return OpenClipJudge(tag, device, max_pixels, quick_gelu=quick)
    if Path(spec).is_file():
        return OpenClipJudge(spec, device, max_pixels)
    raise ConfigError(f"unknown judge '{spec}' (allowed: auto, self, open_clip[:TAG], or a {JUDGE_MODEL} weights file)")
