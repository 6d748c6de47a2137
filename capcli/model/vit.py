"""The vision tower's transformer: open_clip's ``VisionTransformer``, the configuration capcli builds.

capcli's towers are CLIP ViTs as open_clip defines them (class token, learnable positions,
pre-norm, pooled class token projected by ``proj``), and a checkpoint's ``vision.*`` weights
carry open_clip's names. The module is written out here rather than imported because importing
``open_clip`` imports ``torchvision``, which imports ``torch._dynamo`` and ``sympy``: 2.6 s of
every ``capcli caption`` process on a 2-core CPU, a third of the wall time of captioning one
image (docs/performance.md), for a class of a hundred lines. open_clip is still what builds a
pretrained tower (``towers.vision_spec_open_clip``) and the CLIP judge; its state dict loads
here unchanged, and tests hold the two to the same outputs and, seeded alike, the same
initial weights.

Only what open_clip's ViT-B/32 and the tiny preset use is here: no attentional pooler, patch
dropout, layer scale or custom blocks.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint


class LayerNorm(nn.LayerNorm):
    """Layer norm whose output has its input's dtype (open_clip's ``LayerNorm``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


class QuickGELU(nn.Module):
    """x·σ(1.702x): the GELU approximation OpenAI's CLIP weights were trained with."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ResidualAttentionBlock(nn.Module):
    """Pre-norm self-attention and MLP, each added to the residual stream."""

    def __init__(self, width: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        # Created in open_clip's order, so that one seed gives both the same initial weights.
        self.ln_1 = LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.ln_2 = LayerNorm(width)
        hidden = int(width * mlp_ratio)
        self.mlp = nn.Sequential(OrderedDict([
            ("c_fc", nn.Linear(width, hidden)), ("gelu", act_layer()), ("c_proj", nn.Linear(hidden, width)),
        ]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln_1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln_2(x))


class Transformer(nn.Module):
    def __init__(self, width: int, layers: int, heads: int, mlp_ratio: float, act_layer: type[nn.Module]):
        super().__init__()
        self.width, self.layers, self.grad_checkpointing = width, layers, False
        self.resblocks = nn.ModuleList(
            ResidualAttentionBlock(width, heads, mlp_ratio, act_layer) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.resblocks:
            x = checkpoint(block, x, use_reentrant=False) if self.grad_checkpointing else block(x)
        return x


class VisionTransformer(nn.Module):
    """(B, 3, H, W) → the class token, normed and projected: (B, output_dim); with ``output_tokens``
    set, that and the normed patch tokens (B, N, width), unprojected."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int, mlp_ratio: float,
                 output_dim: int = 512, act_layer: type[nn.Module] = nn.GELU, output_tokens: bool = False):
        super().__init__()
        self.output_tokens, self.output_dim = output_tokens, output_dim
        self.image_size, self.patch_size = (image_size, image_size), (patch_size, patch_size)
        self.grid_size = (image_size // patch_size, image_size // patch_size)
        self.conv1 = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size, bias=False)
        scale = width ** -0.5
        self.class_embedding = nn.Parameter(scale * torch.randn(width))
        self.positional_embedding = nn.Parameter(scale * torch.randn(self.grid_size[0] * self.grid_size[1] + 1, width))
        self.ln_pre = LayerNorm(width)
        self.transformer = Transformer(width, layers, heads, mlp_ratio, act_layer)
        self.ln_post = LayerNorm(width)
        self.proj = nn.Parameter(scale * torch.randn(width, output_dim))

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.transformer.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x).flatten(2).transpose(1, 2)  # (B, N, width)
        cls = self.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        x = self.ln_post(self.transformer(self.ln_pre(x)))
        pooled, tokens = x[:, 0] @ self.proj, x[:, 1:]
        return (pooled, tokens) if self.output_tokens else pooled
