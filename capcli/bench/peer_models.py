"""The peers: the tools a user would pick instead of capcli, built at capcli's sizes.

Each peer is sized from the capcli model measured (:func:`ved_for`, :func:`coca_for`): the
same image size, widths, depths, heads and vocabulary; weights are random, as capcli's are
unless ``--checkpoint`` is given. The peers are optional (the ``peers`` extra);
:func:`missing_peers` says which cannot be built here.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from capcli.model import Captioner

PEERS = ("ved", "coca")
PEER_NAMES = {"ved": "transformers VisionEncoderDecoderModel (ViT + GPT-2 with cross-attention)",
              "coca": "open_clip CoCa"}
PEER_PACKAGES = {"ved": ("transformers",), "coca": ("open_clip", "transformers")}


def missing_peers() -> dict[str, str]:
    """The peers that cannot be built here, each with the reason (an import that failed)."""
    missing = {}
    for peer, check in (("ved", _import_ved), ("coca", _import_coca)):
        try:
            check()
        except ImportError as err:
            missing[peer] = f"{type(err).__name__}: {err}"
    return missing


def peer_versions() -> dict[str, str]:
    """The installed version of each package a peer uses."""
    versions = {}
    for name in ("transformers", "open_clip"):
        try:
            versions[name] = importlib.import_module(name).__version__
        except ImportError:
            versions[name] = "not installed"
    return versions


def _import_ved() -> Any:
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        VisionEncoderDecoderModel,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    return GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel, VisionEncoderDecoderModel


def _import_coca() -> Any:
    import open_clip
    from open_clip.coca_model import CoCa

    return open_clip, CoCa


# --- the peers, at capcli's sizes ----------------------------------------------------------------------------------


@dataclass
class Peer:
    """A peer model and what it reads images with."""

    name: str
    model: torch.nn.Module
    preprocess: Callable[[list], torch.Tensor]
    """PIL images → (B, 3, S, S) float pixels, as the peer's users prepare them."""
    decode: Callable[[torch.Tensor], list[str]]
    """(B, T) generated ids → captions."""
    special: dict[str, int] = field(default_factory=dict)
    """Token ids ``generate`` must be told (CoCa's start and end of text in a vocabulary not open_clip's)."""

    @property
    def parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def ved_for(model: Captioner) -> Peer:
    """A ``VisionEncoderDecoderModel`` sized as ``model``: a ViT encoder of its tower's image size,
    patch, width, depth, heads and MLP ratio (a patch embedding where the tiny tower has a
    convolutional stem), and a GPT-2 decoder of its decoder's config with cross-attention added,
    on its vocabulary. The image processor resizes and normalises with the tower's mean and std."""
    GPT2Config, GPT2LMHeadModel, ViTConfig, ViTImageProcessor, ViTModel, VisionEncoderDecoderModel = _import_ved()
    arch = model.config.vision["arch"]
    encoder = ViTConfig(image_size=arch["image_size"], patch_size=arch["patch_size"], hidden_size=arch["width"],
                        num_hidden_layers=arch["layers"], num_attention_heads=arch["heads"],
                        intermediate_size=int(arch["width"] * arch["mlp_ratio"]), hidden_dropout_prob=0.0,
                        attention_probs_dropout_prob=0.0, attn_implementation="sdpa")
    # GPT-2's own activation (capcli's decoder runs the fused twin, one of capcli's own levers)
    decoder = GPT2Config.from_dict({**model.decoder.config.to_dict(), "add_cross_attention": True,
                                    "is_decoder": True, "activation_function": "gelu_new"}, attn_implementation="sdpa")
    tokenizer = model.tokenizer
    ved = VisionEncoderDecoderModel(encoder=ViTModel(encoder, add_pooling_layer=False),
                                    decoder=GPT2LMHeadModel(decoder))
    ved.config.decoder_start_token_id = tokenizer.bos_token_id
    ved.config.pad_token_id = tokenizer.pad_token_id
    ved.config.eos_token_id = tokenizer.eos_token_id
    ved.generation_config.decoder_start_token_id = tokenizer.bos_token_id
    ved.generation_config.pad_token_id = tokenizer.pad_token_id
    ved.generation_config.eos_token_id = tokenizer.eos_token_id
    size = arch["image_size"]
    processor = ViTImageProcessor(size={"height": size, "width": size}, image_mean=list(model.config.vision["mean"]),
                                  image_std=list(model.config.vision["std"]))
    return Peer("ved", ved, lambda images: processor(images=images, return_tensors="pt")["pixel_values"],
                lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True))


def coca_for(model: Captioner) -> Peer:
    """An open_clip ``CoCa`` sized as ``model``.

    - the ``clip-gpt2`` preset: ``coca_ViT-B-32`` as open_clip ships it (its ViT-B/32 tower,
      a 12-layer text tower and a 12-layer multimodal decoder of width 512, 256 attention-pool
      queries, open_clip's vocabulary of 49408);
    - otherwise (tiny): the same architecture scaled to the capcli model: the tower's image
      size, patch, width, depth and heads; text and multimodal towers each of the decoder's
      width, depth and heads (``coca_ViT-B-32``'s two towers each have GPT-2 small's depth);
      as many attention-pool queries as capcli's decoder reads image positions; capcli's
      vocabulary and pad token. Its embedding width is the decoder's (open_clip passes the
      pooled image tokens, of that width, to the multimodal decoder), not capcli's 512.
    """
    open_clip, CoCa = _import_coca()
    arch, vision = model.config.vision["arch"], model.config.vision
    tokenizer = model.tokenizer
    if model.config.preset == "clip-gpt2":
        config = open_clip.get_model_config("coca_ViT-B-32")
        coca = CoCa(**{k: v for k, v in config.items() if k != "custom_text"})  # a flag for create_model
        decode, special = (lambda ids: [open_clip.decode(row) for row in ids.cpu()]), {}
    else:
        gpt = model.decoder.config
        width, heads, layers = gpt.n_embd, gpt.n_head, gpt.n_layer
        context = gpt.n_positions - model.config.prefix_length
        text = {"context_length": context, "vocab_size": gpt.vocab_size, "width": width, "heads": heads,
                "layers": layers, "embed_cls": True, "output_tokens": True, "pad_id": model.pad_id}
        coca = CoCa(
            embed_dim=width,  # open_clip feeds the pooled image tokens, of this width, to the multimodal decoder
            vision_cfg={"image_size": arch["image_size"], "patch_size": arch["patch_size"], "width": arch["width"],
                        "layers": arch["layers"], "head_width": arch["width"] // arch["heads"],
                        "mlp_ratio": arch["mlp_ratio"], "attentional_pool": True, "attn_pooler_heads": arch["heads"],
                        "attn_pooler_queries": model.config.prefix_length, "output_tokens": True},
            text_cfg=text, multimodal_cfg={**text, "attn_pooler_heads": heads},
            pad_id=model.pad_id,
        )
        decode = lambda ids: tokenizer.batch_decode(ids, skip_special_tokens=True)
        # open_clip's tokenizer starts a text with a token of its own; capcli's tiny BPE starts with
        # end-of-text (GPT-2's way), which CoCa's greedy loop would read as a finished caption.
        sot = gpt.vocab_size - 1
        if sot in (tokenizer.eos_token_id, tokenizer.pad_token_id):
            raise ValueError(f"the vocabulary's last id {sot} is a special token: no row left for CoCa's start token")
        special = {"sot_token_id": sot, "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    # open_clip leaves the multimodal decoder's text projection as torch.empty (pretrained weights
    # overwrite it; random memory can hold 1e37 or NaN, and the search then runs on inf), and that
    # decoder's init_parameters is never called (and fails: it reads a missing attribute). Set it
    # as open_clip's text tower sets its own projection.
    projection = coca.text_decoder.text_projection
    torch.nn.init.normal_(projection.data, std=projection.shape[0] ** -0.5)
    transform = open_clip.image_transform(arch["image_size"], is_train=False, mean=tuple(vision["mean"]),
                                          std=tuple(vision["std"]))
    return Peer("coca", coca, lambda images: torch.stack([transform(image) for image in images]), decode, special)


def build_peers(model: Captioner, peers: Sequence[str]) -> dict[str, Peer]:
    """The named peers, sized as ``model``, on its device, in eval mode."""
    device = model.pixel_mean.device
    built = {"ved": ved_for, "coca": coca_for}
    return {name: _on(built[name](model), device) for name in peers}


def _on(peer: Peer, device: torch.device) -> Peer:
    peer.model.to(device).eval()
    return peer
