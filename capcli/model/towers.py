"""The two towers: a CLIP vision transformer as open_clip defines it (``vit``) and a transformers GPT-2 decoder.

Each tower is described by a plain dict (written into ``model.json``) and built from it
with random weights; pretrained weights, when asked for, are loaded on top by name or
local path. A checkpoint therefore rebuilds with no network: its dicts say what to build,
``model.safetensors`` fills it.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.activations import ACT2FN

from capcli.errors import ConfigError
from capcli.model.vit import QuickGELU, VisionTransformer

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # open_clip's OPENAI_DATASET_MEAN
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)  # open_clip's OPENAI_DATASET_STD

TINY_VISION: dict[str, Any] = {
    "image_size": 64, "patch_size": 8, "width": 128, "layers": 3, "heads": 4, "mlp_ratio": 4.0, "output_dim": 512,
}
TINY_DECODER: dict[str, Any] = {"n_positions": 64, "n_embd": 128, "n_layer": 3, "n_head": 4}
TINY_VOCAB = 512

OFFLINE_HELP = (
    "go online once so the weights are cached, set HF_HOME to a cache that holds them, "
    "or pass a local path"
)


def vision_spec_tiny() -> dict[str, Any]:
    """The tiny preset's vision tower: a small ViT with a convolutional stem and CLIP's normalisation,
    trained from scratch."""
    return {"arch": dict(TINY_VISION), "stem": "conv", "quick_gelu": False, "mean": CLIP_MEAN, "std": CLIP_STD,
            "weights": "scratch"}


def vision_spec_open_clip(model_name: str, weights: str | None,
                          quick_gelu: bool | None = None) -> tuple[dict[str, Any], dict[str, torch.Tensor] | None]:
    """Describe an open_clip model's vision tower and fetch its pretrained weights.

    Args:
        model_name: an open_clip model name, e.g. ``ViT-B-32``.
        weights: an open_clip pretrained tag (``openai``), a local file, or None/"none" for random.

    Returns:
        The spec dict and the tower's state dict (None for random weights).
    """
    import open_clip

    random_init = weights in (None, "none")
    tag = {} if random_init or Path(weights).exists() else open_clip.get_pretrained_cfg(model_name, weights)
    try:
        clip = open_clip.create_model(
            model_name, pretrained=None if random_init else weights, require_pretrained=not random_init,
            # OpenAI's weights were trained with QuickGELU; a tag says so, a local file cannot.
            force_quick_gelu=bool(tag.get("quick_gelu")) if quick_gelu is None else quick_gelu,
        )
    except Exception as err:  # open_clip raises RuntimeError/OSError/hub errors alike for missing weights
        raise ConfigError(
            f"cannot load vision weights '{weights}' for {model_name} ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            f"{OFFLINE_HELP} with --vision-weights FILE"
        ) from None
    visual = clip.visual
    block = visual.transformer.resblocks[0]
    cfg = visual.preprocess_cfg if hasattr(visual, "preprocess_cfg") else {}
    size = visual.image_size[0] if isinstance(visual.image_size, tuple) else visual.image_size
    arch = {
        "image_size": size,
        "patch_size": visual.patch_size[0] if isinstance(visual.patch_size, tuple) else visual.patch_size,
        "width": visual.conv1.out_channels,
        "layers": len(visual.transformer.resblocks),
        "heads": block.attn.num_heads,
        "mlp_ratio": block.mlp.c_fc.out_features / visual.conv1.out_channels,
        "output_dim": visual.output_dim,
    }
    spec = {
        "arch": arch,
        "quick_gelu": isinstance(block.mlp.gelu, open_clip.transformer.QuickGELU),  # OpenAI's weights need it
        "mean": tuple(cfg.get("mean", CLIP_MEAN)),
        "std": tuple(cfg.get("std", CLIP_STD)),
        "weights": f"open_clip:{model_name}:{weights or 'none'}",
    }
    return spec, None if random_init else visual.state_dict()


def patch_tokens(spec: dict[str, Any]) -> int:
    """N, the number of patch tokens the described tower makes of an image (its grid side squared)."""
    arch = spec["arch"]
    return (arch["image_size"] // arch["patch_size"]) ** 2


def build_vision(spec: dict[str, Any]) -> VisionTransformer:
    """A randomly initialised vision tower of the described shape; (B, 3, H, W) → (B, output_dim), or with
    ``output_tokens`` set (the Captioner sets it for a token prefix) that and the (B, N, width) patch tokens."""
    act = QuickGELU if spec["quick_gelu"] else torch.nn.GELU
    tower = VisionTransformer(**spec["arch"], act_layer=act)
    if spec.get("stem") == "conv":  # absent from checkpoints written before the stem existed: a patch embedding
        tower.conv1 = conv_stem(spec["arch"]["patch_size"], spec["arch"]["width"])
    return tower


def conv_stem(patch_size: int, width: int) -> torch.nn.Sequential:
    """Stride-2 3×3 convolutions that replace the ViT's patch embedding, with the same output grid.

    Xiao et al. 2021 ("Early convolutions help transformers see better") found that such a stem
    makes a ViT train faster and more stably. Here it decides what the tiny tower can learn:
    trained from scratch on 64 px scenes, with an 8×8 patch embedding a linear probe of its
    features told the six shapes apart 25% of the time (chance 17%), with this stem 41%.
    """
    steps = patch_size.bit_length() - 1
    if steps < 1 or 2 ** steps != patch_size:
        raise ValueError(f"a convolutional stem needs a patch size that is a power of 2, not {patch_size}")
    channels = [3] + [min(32 * 2 ** i, width) for i in range(steps - 1)] + [width]
    layers: list[torch.nn.Module] = []
    for i, (cin, cout) in enumerate(zip(channels, channels[1:])):
        layers.append(torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1))
        if i < steps - 1:  # the last convolution is the embedding itself, as the patch embedding was
            layers += [torch.nn.GroupNorm(8, cout), torch.nn.GELU()]
    return torch.nn.Sequential(*layers)


def decoder_spec_tiny(vocab_size: int, bos_id: int, eos_id: int, pad_id: int, prefix_length: int = 4) -> dict[str, Any]:
    """The tiny preset's GPT-2: small and without dropout, so training is deterministic.

    Its positions hold the prefix and a caption of 48 tokens and end-of-text (the default
    ``data.max_caption_tokens``), in steps of 64: 64 for the short pooled prefixes, 128 for
    a prefix of the token grid.
    """
    positions = max(TINY_DECODER["n_positions"], 64 * math.ceil((prefix_length + 49) / 64))
    config = GPT2Config(
        vocab_size=vocab_size, **{**TINY_DECODER, "n_positions": positions}, bos_token_id=bos_id, eos_token_id=eos_id,
        pad_token_id=pad_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return {"config": config.to_dict(), "weights": "scratch"}


def load_pretrained_decoder(source: str) -> GPT2LMHeadModel:
    """A GPT-2 family model by hub name or local ``save_pretrained`` directory."""
    try:
        model = GPT2LMHeadModel.from_pretrained(source, attn_implementation="sdpa")
    except Exception as err:  # transformers raises OSError/hub errors for a missing model
        where = "directory" if Path(source).exists() else "model"
        raise ConfigError(
            f"cannot load decoder {where} '{source}' ({type(err).__name__}: {str(err).splitlines()[0][:160]}); "
            f"{OFFLINE_HELP} with --decoder DIR"
        ) from None
    return _fast_gelu(model)


def build_decoder(spec: dict[str, Any]) -> GPT2LMHeadModel:
    """A randomly initialised GPT-2 of the described configuration."""
    return _fast_gelu(GPT2LMHeadModel(GPT2Config.from_dict(spec["config"], attn_implementation="sdpa")))


def _fast_gelu(model: GPT2LMHeadModel) -> GPT2LMHeadModel:
    """GPT-2's ``gelu_new`` computed by PyTorch's fused tanh-GELU: the same function, one kernel.

    transformers writes ``gelu_new`` out as five element-wise operations; ``gelu_pytorch_tanh``
    is its documented fast twin (equal to float rounding). On the tiny preset the swap saves
    about a tenth of a CPU training step (docs/performance.md).
    """
    if model.config.activation_function == "gelu_new":
        model.config.activation_function = "gelu_pytorch_tanh"
        for block in model.transformer.h:
            block.mlp.act = ACT2FN["gelu_pytorch_tanh"]
    return model
