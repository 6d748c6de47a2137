"""``capcli export``: a checkpoint as ONNX graphs, to caption with onnxruntime and no PyTorch.

The export folder holds:

- ``vision.onnx``: (B, 3, S, S) uint8 pixels → the decoder prefix (B, K, D), and the concept
  head's guidance terms (unweighted: ``concept_alone`` (B, C) and ``concept_follows`` (B, C, C),
  as ``guidance.ConceptGuidance`` computes them before multiplying by λ);
- ``decoder.onnx``: one step of GPT-2 with its key/value cache: ``prefix`` (B, P, D) and
  ``input_ids`` (B, T), one of them empty, and the past keys and values of every layer
  (B, H, past, hd) → ``logits`` (B, P+T, V) and the present keys and values. Batch, sequence
  and past lengths are dynamic axes;
- the tokenizer files, and ``decoding.json``: the greedy search settings and the ids it needs.

``serving.OnnxCaptioner`` is the greedy search over those graphs with numpy alone, the same
search as ``capcli caption --beams 1`` (concept guidance included); tests check that the
captions are equal. The spatial binding after a relation phrase (``decode.spatial_guidance``)
is not exported: a caption that states a relation may name its second object differently
(``decoding.json`` says ``"spatial_guidance": false``). onnx and onnxruntime are the ``onnx`` extra.
"""

from __future__ import annotations

import copy
import json
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DynamicCache

from capcli.model import Captioner
from capcli.model.guidance import concept_token_ids, slot_layout
from capcli.serving import DECODING_FILE, require_onnx
from capcli.settings import DecodeSettings

OPSET = 17


def export_onnx(checkpoint: Path, output: Path, max_length: int = 32, min_length: int = 1,
                concept_guidance: float = 1.0,
                concept_prior: float = DecodeSettings.model_fields["concept_prior"].default) -> dict[str, Any]:
    """Write the ONNX graphs, tokenizer and decoding settings of ``checkpoint`` into ``output``.

    Returns:
        The decoding settings written to ``decoding.json``.
    """
    require_onnx()
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    model = Captioner.from_pretrained(checkpoint, "cpu").eval()
    config = model.decoder.config
    layers, heads, width = config.n_layer, config.n_head, config.n_embd
    ids, columns = concept_token_ids(model)
    guided = model.concept_head is not None and bool(ids)
    layout = slot_layout(model.config.concept_slots, columns, len(model.config.concept_words)) if guided else None
    size = model.image_size

    vision = VisionGraph(model, columns if guided else [])
    pixels = torch.randint(0, 256, (2, 3, size, size), dtype=torch.uint8)
    vision_outputs = ["prefix", "concept_alone", "concept_follows"]
    _export(vision, (pixels,), output / "vision.onnx", ["pixels"], vision_outputs,
            {"pixels": {0: "batch"}, **{name: {0: "batch"} for name in vision_outputs}})

    step = DecoderStep(model.decoder)
    past_names = [f"past_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    present_names = [f"present_{kind}_{i}" for i in range(layers) for kind in ("key", "value")]
    past = [torch.randn(2, heads, 3, width // heads) for _ in range(2 * layers)]
    example = (torch.randn(2, 0, width), torch.randint(0, config.vocab_size, (2, 1)), *past)
    axes = {"prefix": {0: "batch", 1: "prefix"}, "input_ids": {0: "batch", 1: "tokens"},
            "logits": {0: "batch", 1: "sequence"},
            **{name: {0: "batch", 2: "past"} for name in past_names},
            **{name: {0: "batch", 2: "total"} for name in present_names}}
    _export(step, example, output / "decoder.onnx", ["prefix", "input_ids", *past_names],
            ["logits", *present_names], axes)

    model.tokenizer.save_pretrained(str(output))
    tokenizer = model.tokenizer
    settings = {
        "image_size": size, "layers": layers, "heads": heads, "head_dim": width // heads,
        "max_length": max_length, "min_length": min_length,
        "concept_guidance": concept_guidance if guided else 0.0, "spatial_guidance": False,
        "concept_token_ids": ids if guided else [], "concept_patches": model.config.concept_source == "patches",
        # Slot guidance (guidance.SlotFill): each token's word (-1: additive), each word's slot; null: additive.
        "concept_slots": dict(zip(("token_words", "word_slots"), layout, strict=True)) if layout else None,
        "concept_prior": concept_prior,
        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
        "vocab_size": config.vocab_size, "checkpoint": str(checkpoint), "opset": OPSET,
    }
    (output / DECODING_FILE).write_text(json.dumps(settings, indent=2), encoding="utf-8")
    return settings


def _export(module, args, path: Path, inputs: list[str], outputs: list[str], axes: dict) -> None:
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # nn.MultiheadAttention's fused kernel has no ONNX form
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # the tracer's notes on Python values it records as constants
            torch.onnx.export(module, args, str(path), input_names=inputs, output_names=outputs,
                              dynamic_axes=axes, opset_version=OPSET, dynamo=False, do_constant_folding=True)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


class VisionGraph(nn.Module):
    """pixels → prefix, and the concept head's unweighted guidance terms (guidance.ConceptGuidance)."""

    def __init__(self, model: Captioner, columns: list[int]):
        super().__init__()
        self.model = model
        self.register_buffer("columns", torch.tensor(columns, dtype=torch.long), persistent=False)

    def forward(self, pixels: torch.Tensor):
        model = self.model
        features = model.image_features(pixels)
        prefix = model.prefix(features).float()  # (B, K, D)
        batch, count = pixels.shape[0], len(self.columns)
        if count == 0:
            empty = prefix.new_zeros(batch, 0)
            return prefix, empty, empty.new_zeros(batch, 0, 0)
        alone = F.logsigmoid(model.concept_logits(features).float()[:, self.columns])  # (B, C)
        if model.config.concept_source != "patches":
            return prefix, alone, alone.new_zeros(batch, count, count)
        shown = torch.sigmoid(model.concept_head(features[:, 1:]).float())  # (B, N, words)
        both = (shown.unsqueeze(-1) * shown.unsqueeze(-2)).amax(dim=1)  # (B, words, words)
        together = both / shown.amax(dim=1).unsqueeze(-1).clamp_min(1e-12)
        follows = together[:, self.columns][:, :, self.columns].clamp_min(1e-6).log()  # (B, C, C)
        return prefix, alone, follows


class DecoderStep(nn.Module):
    """One cached step of GPT-2: (prefix embeddings, token ids, past) → (logits, present)."""

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = copy.deepcopy(decoder)
        self.decoder.config._attn_implementation = "eager"  # an explicit mask: no shape-dependent SDPA path
        self.layers = decoder.config.n_layer

    def forward(self, prefix: torch.Tensor, input_ids: torch.Tensor, *past: torch.Tensor):
        embeds = torch.cat([prefix, self.decoder.transformer.wte(input_ids)], dim=1)  # (B, P+T, D)
        cache = DynamicCache()
        for layer in range(self.layers):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        mask = torch.ones(embeds.shape[0], past[0].shape[2] + embeds.shape[1], dtype=torch.long)
        out = self.decoder(inputs_embeds=embeds, past_key_values=cache, attention_mask=mask, use_cache=True)
        flat = []
        for layer in range(self.layers):
            flat += list(_layer_kv(out.past_key_values, layer))
        return (out.logits.float(), *flat)


def _layer_kv(cache, layer: int):
    if hasattr(cache, "layers"):  # transformers >= 4.56
        return cache.layers[layer].keys, cache.layers[layer].values
    return cache.key_cache[layer], cache.value_cache[layer]


