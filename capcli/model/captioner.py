"""The Captioner: vision tower, projection heads, prefix mapper and GPT-2 decoder (DESIGN §3).

Shapes: B batch, T caption tokens, K prefix length, D decoder width, E shared embedding size,
S image feature tokens: 1 (the pooled vector) or 1 + N (the pooled vector, then the tower's N
patch tokens, for a prefix mapper that reads where things are).

- image → vision tower → features (B, S, Dv); features[:, 0] → image head → (B, E), L2-normalised
- caption → decoder alone → hidden state at its last real token → text head → (B, E)
- features → prefix mapper → (B, K, D) → decoder, caption tokens after it → next-token logits
- features[:, 0], or each patch token → concept head → (B, C) logits of the concept words the image shows
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedTokenizerBase

from capcli.losses import IGNORE_INDEX
from capcli.model.kvcache import TRANSFORMERS_5, cache_argument, output_cache
from capcli.model.tokenizer import load_tokenizer
from capcli.model.towers import build_decoder, build_vision, patch_tokens

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "model.json"


@dataclass
class CaptionerConfig:
    """Everything needed to rebuild a Captioner without a network: written as ``model.json``."""

    preset: str
    embed_dim: int
    prefix_length: int
    prefix_mapper: str
    temperature: float
    learn_temperature: bool
    vision: dict[str, Any]
    decoder: dict[str, Any]
    concept_words: list[str] = field(default_factory=list)  # absent from checkpoints written before the head
    concept_source: str = "pooled"  # absent from checkpoints written before patch concepts
    concept_tags: bool = False  # absent from checkpoints written before concept tags
    concept_slots: list[int] = field(default_factory=list)  # data.concepts.concept_slots; absent before slot guidance


# Prefix mappers that read the patch tokens; the others read the pooled vector alone.
TOKEN_MAPPERS = ("tokens", "resampler")


class MLPMapper(nn.Module):
    """ClipCap's MLP mapper on the pooled vector: (B, S, Dv) → (B, K, D)."""

    def __init__(self, in_dim: int, width: int, length: int):
        super().__init__()
        self.length, self.width = length, width
        hidden = (width * length) // 2
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.Tanh(), nn.Linear(hidden, width * length))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features[:, 0]).view(-1, self.length, self.width)


class TransformerMapper(nn.Module):
    """ClipCap's transformer mapper on the pooled vector: it becomes K tokens that attend to K learned constants."""

    def __init__(self, in_dim: int, width: int, length: int, layers: int = 2):
        super().__init__()
        self.length, self.width = length, width
        self.project = nn.Linear(in_dim, width * length)
        self.constants = nn.Parameter(torch.randn(length, width) * 0.02)
        heads = max(1, width // 64)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self.project(features[:, 0]).view(-1, self.length, self.width)  # (B, K, D)
        x = torch.cat([x, self.constants.expand(x.shape[0], -1, -1)], dim=1)  # (B, 2K, D)
        return self.transformer(x)[:, self.length:]  # the constants' outputs are the prefix


class TokenMapper(nn.Module):
    """LLaVA-1.5's projector: every feature token through one two-layer MLP, (B, S, Dv) → (B, S, D).

    The prefix is as long as the tower's token grid (plus the pooled vector), and each prefix
    position keeps the place in the image its patch came from (Liu et al. 2023, "Improved
    baselines with visual instruction tuning").
    """

    def __init__(self, in_dim: int, width: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


class ResamplerLayer(nn.Module):
    """One pre-norm layer of the resampler: the queries attend to the image tokens and to
    themselves (Flamingo appends the latents to the keys), then an MLP."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.norm_tokens, self.norm_queries, self.norm_mlp = (nn.LayerNorm(width) for _ in range(3))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, queries: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        q = self.norm_queries(queries)  # (B, K, D)
        kv = torch.cat([self.norm_tokens(tokens), q], dim=1)  # (B, S+K, D)
        queries = queries + self.attn(q, kv, kv, need_weights=False)[0]
        return queries + self.mlp(self.norm_mlp(queries))


class Resampler(nn.Module):
    """K learned queries read the image tokens by cross-attention: (B, S, Dv) → (B, K, D).

    Flamingo's Perceiver Resampler (Alayrac et al. 2022), the image half of BLIP-2's Q-Former
    (Li et al. 2023): a fixed, short prefix whatever the size of the token grid.
    """

    def __init__(self, in_dim: int, width: int, length: int, layers: int = 2):
        super().__init__()
        self.length, self.width = length, width
        self.project = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(length, width) * 0.02)
        self.layers = nn.ModuleList(ResamplerLayer(width, max(1, width // 32)) for _ in range(layers))
        self.norm = nn.LayerNorm(width)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        tokens = self.project(features)  # (B, S, D)
        x = self.queries.expand(features.shape[0], -1, -1)  # (B, K, D)
        for layer in self.layers:
            x = layer(x, tokens)
        return self.norm(x)


def build_mapper(kind: str, in_dim: int, width: int, length: int) -> nn.Module:
    """The prefix mapper named by ``CaptionerConfig.prefix_mapper``."""
    if kind == "mlp":
        return MLPMapper(in_dim, width, length)
    if kind == "transformer":
        return TransformerMapper(in_dim, width, length)
    if kind == "tokens":
        return TokenMapper(in_dim, width)
    if kind == "resampler":
        return Resampler(in_dim, width, length)
    raise ValueError(f"unknown prefix mapper '{kind}' (allowed: mlp, transformer, tokens, resampler)")


class Captioner(nn.Module):
    """Image captioner with a shared image-text embedding space."""

    def __init__(self, config: CaptionerConfig, tokenizer: PreTrainedTokenizerBase):
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        self.vision = build_vision(config.vision)
        self.decoder = build_decoder(config.decoder)
        vision_dim = config.vision["arch"]["output_dim"]
        width = self.decoder.config.n_embd
        self.prefix_mapper = build_mapper(config.prefix_mapper, vision_dim, width, config.prefix_length)
        # A mapper that reads where things are gets the patch tokens as well as the pooled vector.
        self.vision.output_tokens = self.reads_tokens
        self.image_head = nn.Linear(vision_dim, config.embed_dim, bias=False)
        self.text_head = nn.Linear(width, config.embed_dim, bias=False)
        # Predicts which concept words the image shows, from the pooled vector or each patch: a direct,
        # per-image signal that teaches the vision tower to tell objects apart (losses.concept_loss).
        words = len(config.concept_words)
        self.concept_head = nn.Linear(vision_dim, words) if words else None
        if config.concept_tags:
            if not (words and config.prefix_mapper == "tokens" and config.concept_source == "patches"):
                raise ValueError("concept_tags needs concept words, prefix_mapper 'tokens' and concept_source 'patches'")
            ids = [tokenizer.encode(" " + word, add_special_tokens=False) for word in config.concept_words]
            owner = torch.tensor([c for c, w in enumerate(ids) for _ in w])
            # (C, T): row c averages the tokens of word c (a matmul, which ONNX exports, not a scatter).
            mix = torch.zeros(len(ids), len(owner))
            mix[owner, torch.arange(len(owner))] = 1.0 / torch.tensor([len(w) for w in ids])[owner].float()
            self.register_buffer("_tag_ids", torch.tensor([t for w in ids for t in w]), persistent=False)
            self.register_buffer("_tag_mix", mix, persistent=False)
        # Stored as log(1/τ), as CLIP does; a fixed τ is simply not trained.
        self.log_logit_scale = nn.Parameter(
            torch.tensor(math.log(1.0 / config.temperature)), requires_grad=config.learn_temperature
        )
        self.vision_frozen = False
        self.register_buffer("pixel_mean", torch.tensor(config.vision["mean"]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(config.vision["std"]).view(1, 3, 1, 1), persistent=False)

    @property
    def image_size(self) -> int:
        return self.config.vision["arch"]["image_size"]

    @property
    def reads_tokens(self) -> bool:
        """Whether the image features hold the patch tokens after the pooled vector: the prefix
        mapper or the concept head reads them."""
        return self.config.prefix_mapper in TOKEN_MAPPERS or self.config.concept_source == "patches"

    @property
    def feature_tokens(self) -> int:
        """S: how many vectors ``image_features`` gives per image."""
        return 1 + patch_tokens(self.config.vision) if self.reads_tokens else 1

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def logit_scale(self) -> torch.Tensor:
        """1/τ, clamped at 100 as in the CLIP paper so a learnable τ cannot run away."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) uint8 → (B, S, Dv): the pooled vector, then the patch tokens where the mapper reads them.

        The patch tokens go through the tower's own output projection, as the pooled vector
        does (as MaskCLIP reads dense CLIP features), so all S share one width. Normalising
        the pixels here keeps transfers uint8.
        """
        x = pixels.to(self.pixel_mean.dtype) / 255.0
        out = self.vision((x - self.pixel_mean) / self.pixel_std)
        if not self.reads_tokens:
            return out[:, None]  # (B, 1, Dv)
        pooled, tokens = out  # (B, Dv), (B, N, width)
        if self.vision.proj is not None:
            tokens = tokens @ self.vision.proj  # (B, N, Dv)
        return torch.cat([pooled[:, None], tokens], dim=1)  # (B, 1+N, Dv)

    def embed_image(self, features: torch.Tensor) -> torch.Tensor:
        """(B, S, Dv) → (B, E), from the pooled vector, L2-normalised."""
        return F.normalize(self.image_head(features[:, 0]), dim=-1)

    def concept_logits(self, features: torch.Tensor) -> torch.Tensor:
        """(B, S, Dv) → (B, C): one logit per concept word, that the image shows it.

        From the pooled vector, or (``concept_source`` "patches") from the most confident patch
        token: multiple-instance learning, as Fang et al. 2015 read words from image regions.
        A word is in the image when some patch shows it, so each patch must tell its own
        object's shape, colour and size, and the prefix reads them where they are.
        """
        if self.concept_head is None:
            raise ValueError("this model has no concept head (its config names no concept words)")
        if self.config.concept_source == "patches":
            return self.concept_head(features[:, 1:]).amax(dim=1)  # (B, N, C) → (B, C)
        return self.concept_head(features[:, 0])

    def embed_text(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """(B, T) caption tokens ending in end-of-text → (B, E), L2-normalised.

        The caption is read by the decoder alone, after a begin-of-text token; its hidden
        state at the last real token (the end-of-text) is the caption's summary, as CLIP
        takes the EOT token.
        """
        bos = torch.full_like(caption_ids[:, :1], self.tokenizer.bos_token_id)
        ids = torch.cat([bos, caption_ids], dim=1)  # (B, 1+T)
        mask = torch.cat([torch.ones_like(caption_mask[:, :1]), caption_mask], dim=1)
        hidden = self.decoder.transformer(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state  # (B, 1+T, D)
        last = mask.sum(dim=1) - 1  # index of the end-of-text token (right padding)
        summary = hidden[torch.arange(ids.shape[0], device=ids.device), last]  # (B, D)
        return F.normalize(self.text_head(summary), dim=-1)

    def prefix(self, features: torch.Tensor) -> torch.Tensor:
        """(B, S, Dv) → (B, K, D) embeddings in the decoder's input space.

        With ``concept_tags`` (the ``tokens`` mapper with the concept head on the patches),
        each patch's prefix vector also gets the decoder's own embeddings of the concept words
        that patch shows, weighted by the head's confidence: Σ_c σ(a_nc)·E[word_c]. The
        decoder can then copy a word from where it is seen, as object tags let OSCAR and VinVL
        name what their caption data never paired; the confidences are detached, so the head
        stays a detector trained by the concept loss alone.
        """
        prefix = self.prefix_mapper(features)
        if not self.config.concept_tags:
            return prefix
        shown = torch.sigmoid(self.concept_head(features[:, 1:])).detach()  # (B, N, C)
        tags = shown.to(prefix.dtype) @ self.concept_embeddings().to(prefix.dtype)  # (B, N, D)
        return torch.cat([prefix[:, :1], prefix[:, 1:] + tags], dim=1)

    def concept_embeddings(self) -> torch.Tensor:
        """(C, D): each concept word's embedding in the decoder's input space (the mean of its tokens')."""
        wte = self.decoder.transformer.wte(self._tag_ids)  # (T, D)
        return self._tag_mix.to(wte.dtype) @ wte

    def caption_logits(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                       image_of: torch.Tensor | None = None) -> torch.Tensor:
        """Next-token logits for each caption token given the image: (B, T, V), aligned with ``caption_ids``.

        The prefix plays the role of a begin-of-text token: its last position predicts the
        first caption token. Logits are computed for caption positions only.

        ``image_of`` (B,) says which of the P images in ``features`` (P, S, Dv) each caption
        reads, for captions that share images (align's chosen and rejected): the shared path below.
        """
        if image_of is not None:
            if self.shares_prefix():
                return self._shared_prefix_logits(features, caption_ids, caption_mask, image_of)
            features = features[image_of]
        prefix = self.prefix(features)  # (B, K, D)
        k = prefix.shape[1]
        tokens = self.decoder.transformer.wte(caption_ids)  # (B, T, D)
        mask = torch.cat([torch.ones_like(caption_mask[:, :1]).expand(-1, k), caption_mask], dim=1)
        hidden = self.decoder.transformer(
            inputs_embeds=torch.cat([prefix.to(tokens.dtype), tokens], dim=1), attention_mask=mask,
            use_cache=False,  # one whole pass: a cache is never read, and under --compile it recompiled every block
        ).last_hidden_state  # (B, K+T, D)
        return self.decoder.lm_head(hidden[:, k - 1 : -1])  # position K-1+t predicts token t

    def shares_prefix(self) -> bool:
        """Whether ``caption_logits`` runs each image's prefix once for all its captions: with
        transformers ≥ 5 (whose GPT-2 returns a ``Cache`` object; 4.x may return tuples), and not
        under gradient checkpointing (transformers' blocks then keep no cache) nor with compiled
        blocks (a cache object in a compiled block's guards recompiles it per layer)."""
        transformer = self.decoder.transformer
        checkpointing = getattr(transformer, "gradient_checkpointing", False) and self.training
        return (TRANSFORMERS_5 and not checkpointing
                and all(block._compiled_call_impl is None for block in transformer.h))

    def _shared_prefix_logits(self, features: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor,
                              image_of: torch.Tensor) -> torch.Tensor:
        """``caption_logits`` for captions that share images: each image's prefix goes through the
        decoder once, and its keys and values are handed to every caption of that image.

        Causal attention makes the prefix positions independent of the caption after them, so
        this is the same function as running [prefix; caption] for each caption (equal up to
        float rounding; tests/test_align.py), at P·K + B·T tokens instead of B·(K + T). With
        align's pairs (P = B/2, K = 65 patch tokens, T ≈ 15 words) that is 40% fewer.
        """
        tokens = self.decoder.transformer.wte(caption_ids)  # (B, T, D)
        prefix = self.prefix(features).to(tokens.dtype)  # (P, K, D), in the embeddings' dtype as caption_logits has it
        k = prefix.shape[1]
        first = self.decoder.transformer(inputs_embeds=prefix, use_cache=True)
        cache = output_cache(first)
        cache.reorder_cache(image_of)  # each caption's row: its image's keys and values (index_select keeps grads)
        mask = torch.cat([torch.ones_like(caption_mask[:, :1]).expand(-1, k), caption_mask], dim=1)
        rest = self.decoder.transformer(inputs_embeds=tokens, attention_mask=mask,
                                        **{cache_argument(self.decoder): cache}).last_hidden_state  # (B, T, D)
        last = first.last_hidden_state[image_of, -1:]  # (B, 1, D): the prefix's last position predicts token 0
        return self.decoder.lm_head(torch.cat([last, rest[:, :-1]], dim=1))

    def text_logits(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """Next-token logits for captions with no image (text-only preference pairs): (B, T, V).

        A begin-of-text token stands where the prefix would be, as in ``embed_text``.
        """
        bos = torch.full_like(caption_ids[:, :1], self.tokenizer.bos_token_id)
        ids = torch.cat([bos, caption_ids], dim=1)
        mask = torch.cat([torch.ones_like(caption_mask[:, :1]), caption_mask], dim=1)
        return self.decoder(input_ids=ids, attention_mask=mask, use_cache=False).logits[:, :-1]  # t predicts token t

    def freeze_vision(self) -> None:
        """Freeze the vision tower: no gradients, and eval mode that ``train()`` will not undo."""
        self.vision.requires_grad_(False)
        self.vision.eval()
        self.vision_frozen = True

    def train(self, mode: bool = True) -> Captioner:
        super().train(mode)
        if getattr(self, "vision_frozen", False):
            self.vision.eval()  # a frozen tower stays in eval mode (no dropout, fixed norms)
        return self

    def compile_blocks(self) -> None:
        """``torch.compile`` each transformer block in place ("regional compilation").

        The blocks of a tower share one compiled graph, so compiling takes seconds per
        distinct block rather than minutes for the whole model, and the parameter names,
        hence checkpoints, do not change.
        """
        for block in [*self.vision.transformer.resblocks, *self.decoder.transformer.h]:
            if block._compiled_call_impl is None:  # once: a second call would only wrap it again
                block.compile()

    def set_gradient_checkpointing(self, enabled: bool) -> None:
        """Recompute each transformer block's activations in the backward pass (training only)."""
        self.vision.set_grad_checkpointing(enabled)
        decoder, reentrant = self.decoder, {"use_reentrant": False}  # non-reentrant: works when inputs need no grad
        if hasattr(decoder, "activation_checkpointing_enable"):  # transformers 5 renamed gradient_* to activation_*
            enable = partial(decoder.activation_checkpointing_enable, activation_checkpointing_kwargs=reentrant)
            disable = decoder.activation_checkpointing_disable
        else:
            enable = partial(decoder.gradient_checkpointing_enable, gradient_checkpointing_kwargs=reentrant)
            disable = decoder.gradient_checkpointing_disable
        if enabled:
            enable()
        else:
            disable()

    def caption_targets(self, caption_ids: torch.Tensor, caption_mask: torch.Tensor) -> torch.Tensor:
        """The LM targets for ``caption_logits``: the caption tokens, ignored on padding."""
        return caption_ids.masked_fill(caption_mask == 0, IGNORE_INDEX)

    def save_pretrained(self, directory: Path) -> None:
        """Write ``model.safetensors``, ``model.json`` and the tokenizer files into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        # GPT-2 ties lm_head to the token embedding; safetensors refuses shared storage, and the tie is restored on load.
        state.pop("decoder.lm_head.weight", None)
        save_file(state, str(directory / WEIGHTS_FILE), metadata={"format": "pt"})
        (directory / CONFIG_FILE).write_text(json.dumps(self.config.__dict__, indent=2), encoding="utf-8")
        self.tokenizer.save_pretrained(str(directory))

    def load_weights(self, directory: Path) -> None:
        """Load ``model.safetensors`` from a checkpoint into this model.

        Names and shapes are checked before anything is copied, so a mismatch leaves this
        model untouched and says what differs.
        """
        state = load_file(str(Path(directory) / WEIGHTS_FILE), device=str(self.pixel_mean.device))
        own = {k: v.shape for k, v in self.state_dict().items() if k != "decoder.lm_head.weight"}  # tied to wte
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        reshaped = sorted(k for k in set(own) & set(state) if own[k] != state[k].shape)
        if missing or unexpected or reshaped:
            raise ValueError(f"{directory} holds a different model (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}, shapes differ {reshaped[:3]})")
        self.load_state_dict(state, strict=False)
        self.decoder.tie_weights()

    @classmethod
    def from_pretrained(cls, directory: Path, device: str | torch.device = "cpu", weights: bool = True) -> Captioner:
        """Rebuild a Captioner from a checkpoint directory, with no network.

        ``weights=False`` builds the architecture and tokenizer only, for a caller that loads
        the weights itself (the engine's resume).
        """
        directory = Path(directory)
        config = CaptionerConfig(**json.loads((directory / CONFIG_FILE).read_text(encoding="utf-8")))
        model = cls(config, load_tokenizer(directory))
        if weights:
            model.load_weights(directory)
        return model.to(device)
