"""The decoder's KV cache across transformers versions, and the prefix cache that beam search reuses.

transformers 5's GPT-2 returns its cache as a ``Cache`` object, which can be reordered and
repeated across rows; 4.x may return tuples, so capcli shares a prefix's keys and values only
from 5 on. 5.24 renamed ``past_key_values`` to ``cache``, as an argument and as an output field.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
import transformers
from torch import nn

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5

# transformers 5's ``generate`` runs only the positions a cache passed to it does not hold, also
# for ``inputs_embeds``; 4.x reads the embeddings whole.
SHARES_PREFIX = TRANSFORMERS_5


def output_cache(output: Any) -> Any:
    """The KV cache of a transformers model output, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def cache_argument(model: nn.Module) -> str:
    """The keyword that passes a KV cache to ``model``'s forward and ``generate``: ``cache`` from
    transformers 5.24, ``past_key_values`` before."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def prefix_cache(decoder: nn.Module, prefix: torch.Tensor, copies: int) -> Any:
    """The decoder's keys and values of each image's prefix but its last position, computed once
    per image and repeated for its ``copies`` rows (beams or samples).

    ``generate`` repeats ``inputs_embeds`` for each row before its first pass, so without this
    the K prefix positions of an image ran ``copies`` times (5 × 65 positions at beams 5 for the
    tiny preset); with it they run once, and generate runs the last one for each row, which
    gives it the first token's logits. Causal attention makes each position's keys depend only
    on the positions before it, so the search is the same, up to float rounding.
    """
    with torch.no_grad():
        cache = output_cache(decoder.transformer(inputs_embeds=prefix[:, :-1], use_cache=True))
    cache.batch_repeat_interleave(copies)  # the rows of an image together, as generate expands them
    return cache
