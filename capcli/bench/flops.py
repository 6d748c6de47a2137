"""Model FLOPs of a training step, by formula: the numerator of MFU.

MFU (PaLM, Chowdhery et al. 2022) is the FLOPs a step *needs*, per second, over the
device's peak. Only matrix products count (projections, attention's two products, the
patch embedding or convolutional stem, the LM head, the contrastive similarity); norms,
activations and the optimizer are left out, as is usual. A product of ``m×k`` by ``k×n`` is ``2·m·k·n``
FLOPs forward; its backward is the same again for the gradient of each operand that
needs one: the weights when they train, the input when something before it trains.
That is why a frozen or cached tower costs less than 3× its forward.

``tests/test_flops.py`` checks these sums against ``torch.utils.flop_counter`` run over
real steps, so the formula counts what the code executes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from capcli.model import Captioner


@dataclass
class _Count:
    """Forward and backward FLOPs, added product by product."""

    forward: int = 0
    backward: int = 0

    def product(self, m: int, k: int, n: int, *, grad_a: bool, grad_b: bool, train: bool = True) -> None:
        """An ``(m×k)·(k×n)`` product; ``grad_a``/``grad_b``: whether each operand needs a gradient."""
        flops = 2 * m * k * n
        self.forward += flops
        if train:
            self.backward += flops * (int(grad_a) + int(grad_b))

    @property
    def total(self) -> int:
        return self.forward + self.backward


def _vit(c: _Count, model: Captioner, images: int, train: bool) -> None:
    """open_clip's VisionTransformer on ``images`` images: patch embedding, blocks, pooled projection."""
    arch = model.config.vision["arch"]
    width, patch, layers = arch["width"], arch["patch_size"], arch["layers"]
    patches = (arch["image_size"] // patch) ** 2
    tokens = patches + 1  # the class token
    hidden = int(width * arch["mlp_ratio"])
    if model.config.vision.get("stem") == "conv":
        _conv_stem(c, model, images, train)
    else:  # the pixels need no gradient: the patch embedding's backward is its weight gradient only
        c.product(images * patches, 3 * patch * patch, width, grad_a=False, grad_b=True, train=train)
    for _ in range(layers):
        _block(c, images, tokens, width, hidden, train)
    # The output projection, of the pooled vector and, where the prefix reads them, of the patch tokens.
    c.product(images * model.feature_tokens, width, arch["output_dim"], grad_a=True, grad_b=True, train=train)


def _conv_stem(c: _Count, model: Captioner, images: int, train: bool) -> None:
    """The convolutional stem: each 3×3 convolution is a product of (pixels out × 9·C_in) by (9·C_in × C_out)."""
    side = model.config.vision["arch"]["image_size"]
    for i, conv in enumerate(m for m in model.vision.conv1 if isinstance(m, torch.nn.Conv2d)):
        side = (side + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        kernel = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1]
        c.product(images * side * side, kernel, conv.out_channels, grad_a=i > 0, grad_b=True, train=train)


def _block(c: _Count, sequences: int, tokens: int, width: int, hidden: int, train: bool, input_grad: bool = True,
           keys: int | None = None) -> None:
    """One pre-norm transformer block (both towers): qkv, attention's two products, out, MLP.

    ``keys``: the positions each token attends over, when a cache adds earlier ones (default ``tokens``).
    """
    rows, keys = sequences * tokens, keys or tokens
    c.product(rows, width, 3 * width, grad_a=input_grad, grad_b=True, train=train)
    # Attention over all heads: Q·Kᵀ and P·V, each 2·tokens·keys·width per sequence.
    c.product(sequences * tokens, width, keys, grad_a=True, grad_b=True, train=train)
    c.product(sequences * tokens, keys, width, grad_a=True, grad_b=True, train=train)
    c.product(rows, width, width, grad_a=True, grad_b=True, train=train)
    c.product(rows, width, hidden, grad_a=True, grad_b=True, train=train)
    c.product(rows, hidden, width, grad_a=True, grad_b=True, train=train)


def _gpt2(c: _Count, model: Captioner, sequences: int, tokens: int, lm_positions: int) -> None:
    """GPT-2 over ``sequences × tokens`` inputs; the LM head on ``lm_positions`` of each sequence."""
    config = model.decoder.config
    width = config.n_embd
    hidden = config.n_inner or 4 * width
    for _ in range(config.n_layer):
        _block(c, sequences, tokens, width, hidden, train=True)
    if lm_positions:
        c.product(sequences * lm_positions, width, config.vocab_size, grad_a=True, grad_b=True)


def _gpt2_shared_prefix(c: _Count, model: Captioner, images: int, sequences: int, tokens: int) -> None:
    """GPT-2 over each image's prefix once and its ``sequences`` captions of ``tokens`` after it,
    reading the prefix's keys and values (``Captioner.caption_logits`` with ``image_of``); the LM
    head on every caption position."""
    config, k = model.decoder.config, model.config.prefix_length
    width = config.n_embd
    hidden = config.n_inner or 4 * width
    for _ in range(config.n_layer):
        _block(c, images, k, width, hidden, train=True)
        _block(c, sequences, tokens, width, hidden, train=True, keys=k + tokens)
    c.product(sequences * tokens, width, config.vocab_size, grad_a=True, grad_b=True)


def _prefix(c: _Count, model: Captioner, images: int, features_grad: bool) -> None:
    """The prefix mapper on the features of ``images`` images."""
    dv = model.config.vision["arch"]["output_dim"]
    kind, k, width = model.config.prefix_mapper, model.config.prefix_length, model.decoder.config.n_embd
    s = model.feature_tokens
    if kind == "mlp":
        hidden = (width * k) // 2
        c.product(images, dv, hidden, grad_a=features_grad, grad_b=True)
        c.product(images, hidden, width * k, grad_a=True, grad_b=True)
    elif kind == "tokens":  # the two-layer MLP on every feature token
        c.product(images * s, dv, width, grad_a=features_grad, grad_b=True)
        c.product(images * s, width, width, grad_a=True, grad_b=True)
    elif kind == "resampler":
        c.product(images * s, dv, width, grad_a=features_grad, grad_b=True)  # the tokens into the decoder's width
        keys = s + k  # the queries attend to the tokens and to themselves
        for _ in model.prefix_mapper.layers:
            c.product(images * k, width, width, grad_a=True, grad_b=True)  # query projection
            c.product(images * keys, width, 2 * width, grad_a=True, grad_b=True)  # key and value projections
            c.product(images * k, width, keys, grad_a=True, grad_b=True)  # Q·Kᵀ
            c.product(images * k, keys, width, grad_a=True, grad_b=True)  # P·V
            c.product(images * k, width, width, grad_a=True, grad_b=True)  # output projection
            c.product(images * k, width, 4 * width, grad_a=True, grad_b=True)
            c.product(images * k, 4 * width, width, grad_a=True, grad_b=True)
    else:
        raise ValueError(f"the FLOP formula covers the mlp, tokens and resampler prefix mappers, not '{kind}'")


def _contrastive(c: _Count, model: Captioner, batch: int, text_tokens: int, features_grad: bool) -> None:
    """The image and text heads, the text pass ([BOS; caption] through GPT-2) and the similarity matrix."""
    vision_dim, embed = model.config.vision["arch"]["output_dim"], model.config.embed_dim
    c.product(batch, vision_dim, embed, grad_a=features_grad, grad_b=True)  # image head
    _gpt2(c, model, batch, 1 + text_tokens, lm_positions=0)
    c.product(batch, model.decoder.config.n_embd, embed, grad_a=True, grad_b=True)  # text head
    c.product(batch, embed, batch, grad_a=True, grad_b=True)  # image · textᵀ


def pretrain_step_flops(model: Captioner, batch: int, caption_tokens: int, frozen_vision: bool = False,
                        concepts: bool = False) -> int:
    """FLOPs of one pretrain micro-batch, forward and backward (PretrainObjective with both losses).

    Args:
        model: the Captioner (its sizes are read, nothing is run).
        batch: images in the micro-batch.
        caption_tokens: the padded caption width T (end-of-text included).
        frozen_vision: the vision tower does not train.
        concepts: the concept loss runs too (the concept head on the pooled vector or on every patch).
    """
    c = _Count()
    _vit(c, model, batch, train=not frozen_vision)
    k = model.config.prefix_length
    _prefix(c, model, batch, features_grad=not frozen_vision)
    _gpt2(c, model, batch, k + caption_tokens, lm_positions=caption_tokens)
    _contrastive(c, model, batch, caption_tokens, features_grad=not frozen_vision)
    c.product(batch, model.config.embed_dim, batch, grad_a=False, grad_b=False, train=False)  # retrieval accuracy
    if concepts:
        vision_dim = model.config.vision["arch"]["output_dim"]
        rows = batch * (model.feature_tokens - 1) if model.config.concept_source == "patches" else batch
        c.product(rows, vision_dim, len(model.config.concept_words), grad_a=not frozen_vision, grad_b=True)
    return c.total


def align_step_flops(model: Captioner, pairs: int, pair_tokens: int, chosen_tokens: int,
                     shared_prefix: bool = True) -> int:
    """FLOPs of one align micro-batch on cached frozen features (AlignObjective, image pairs).

    Each pair's image prefix goes through the decoder once, and its chosen and rejected
    captions, padded to ``pair_tokens``, after it as ``2·pairs`` sequences; the contrastive term
    reads the chosen captions alone, ``chosen_tokens`` wide. The vision tower does not run: its
    features are cached. ``shared_prefix=False`` counts the path without that sharing.
    """
    c = _Count()
    if shared_prefix:
        _prefix(c, model, pairs, features_grad=False)
        _gpt2_shared_prefix(c, model, pairs, 2 * pairs, pair_tokens)
    else:  # Captioner.shares_prefix() is False (compiled blocks, gradient checkpointing): a prefix per caption
        _prefix(c, model, 2 * pairs, features_grad=False)
        _gpt2(c, model, 2 * pairs, model.config.prefix_length + pair_tokens, lm_positions=pair_tokens)
    _contrastive(c, model, pairs, chosen_tokens, features_grad=False)
    return c.total
