"""Align's caches: work that does not change during training is done once, before it.

- **Frozen features:** with the vision tower frozen, an image's features are the same at
  every step, so each distinct image goes through the tower once (DESIGN §4).
- **Reference log-probs:** the reference model is the starting checkpoint, frozen, so
  each pair's reference log-probs are computed once; the reference model need not stay
  in memory during training.

Both run before the engine starts and hand the datasets plain tensors.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Callable
from typing import Any

import datasets
import torch

from capcli import faults
from capcli.data.batches import PreferenceCollator, PreferenceDataset, load_image_field
from capcli.data.images import ImageLoadError, resize_center_crop
from capcli.model import Captioner
from capcli.settings import EngineSettings
from capcli.train.runtime import Runtime
from capcli.train.sampler import SampleKey, planned_rows, planned_steps


def image_identity(value: Any) -> str:
    """A key that is equal for the same image: its path, else a hash of its bytes."""
    if isinstance(value, dict):
        if value.get("path") and not value.get("bytes"):
            return f"path:{value['path']}"
        if value.get("bytes"):
            return "sha1:" + hashlib.sha1(value["bytes"]).hexdigest()
    return f"value:{value}"


def frozen_features(
    model: Captioner, pairs: datasets.Dataset, max_pixels: int, runtime: Runtime, batch_size: int = 64,
) -> tuple[datasets.Dataset, torch.Tensor, list[int]]:
    """Run the frozen tower once per distinct image of ``pairs``.

    Returns:
        The pairs whose image could be read (a pair whose image cannot is dropped, with
        a warning, as a training step would drop it), the (N_images, S, Dv) features on the
        CPU in the run's autocast precision (float32 by default on the CPU, bf16 or fp16 under
        autocast: a token prefix holds S = 1 + N vectors an image), and for each kept pair the
        row of its image in the features.
    """
    images = pairs["image"]
    keys = [image_identity(v) for v in images]
    first: dict[str, int] = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    unique = list(first.values())  # the pair rows whose image stands for all pairs of that image
    rows, bad = [], set()
    for start in range(0, len(unique), batch_size):
        chunk = unique[start : start + batch_size]
        features, good = _tower(model, [images[i] for i in chunk], max_pixels, runtime,
                                "skipping pairs of unreadable image")
        bad |= {keys[i] for n, i in enumerate(chunk) if n not in set(good)}
        if good:
            rows.append(features.cpu())
            faults.point("caches.features")
    width = model.config.vision["arch"]["output_dim"]
    features = torch.cat(rows) if rows else torch.empty(0, model.feature_tokens, width)
    slot = {key: n for n, key in enumerate(k for k in (keys[i] for i in unique) if k not in bad)}
    keep = [i for i, key in enumerate(keys) if key not in bad]
    if len(keep) < len(keys):
        pairs = pairs.select(keep)
    return pairs, features, [slot[keys[i]] for i in keep]


def trained_pair_rows(data: PreferenceDataset, engine: EngineSettings, runtime: Runtime) -> list[int] | None:
    """The training pairs whose reference log-probs align needs: those the run's planned steps
    visit (``planned_rows``), or None (every pair) when a pair can still fail to load.

    A micro-batch whose images are all unreadable is skipped without counting a step, so the
    engine would then read past the plan; with cached features (unreadable images dropped
    before training) or text-only pairs, no pair can fail.
    """
    if data.features is None and not data.text_only:
        return None
    world = runtime.world.size
    steps = planned_steps(len(data), engine.batch_size, engine.grad_accum, engine.epochs, engine.max_steps, world)
    return planned_rows(len(data), engine.batch_size, engine.grad_accum, runtime.settings.seed, steps, world)


def pair_logps(
    model: Captioner, dataset: PreferenceDataset, collate: PreferenceCollator, score: Callable,
    runtime: Runtime, batch_size: int = 64, rows: list[int] | None = None,
) -> torch.Tensor:
    """(N, 2) log-probs of every pair's chosen and rejected caption under ``model``; (N, 3) when
    the pairs bring another image each, the third being the chosen caption given it.

    Align calls it once with the starting checkpoint: the cached reference log-probs, of the
    pairs its steps will visit (``rows``, from ``planned_rows``; every pair when None).
    ``score(model, batch) -> (chosen_logps, rejected_logps[, other_logps])`` is the objective's own scoring,
    so the reference and the policy are measured identically.
    """
    # NaN stays where a pair's image is unreadable, and in the rows not asked for (the dataset refuses those).
    out = torch.full((len(dataset), 2 if dataset.other is None else 3), float("nan"))
    rows = list(range(len(dataset))) if rows is None else rows
    for start in range(0, len(rows), batch_size):
        examples = [(i, dataset[SampleKey(i, 0)]) for i in rows[start : start + batch_size]]
        kept = [(i, e) for i, e in examples if e is not None]
        if not kept:
            continue
        batch = collate([e for _, e in kept]).to(runtime.device)
        with runtime.inference(model):
            columns = score(model, batch)
        out[[i for i, _ in kept]] = torch.stack(columns, dim=1).float().cpu()
    return out


def caption_features(model: Captioner, split: datasets.Dataset, max_pixels: int, runtime: Runtime,
                     rows: list[int]) -> tuple[torch.Tensor, list[int]]:
    """The vision features of some rows of a caption split, for drawing on-policy pairs.

    Returns:
        (B, S, Dv) features on the runtime's device of the rows whose image could be read, and those rows;
        an unreadable image is skipped with a warning.
    """
    features, good = _tower(model, split.select(rows)["image"], max_pixels, runtime,
                            "drawing no captions for an unreadable image")
    return features, [rows[n] for n in good]


def _tower(model: Captioner, values: list[Any], max_pixels: int, runtime: Runtime,
           skipping: str) -> tuple[torch.Tensor, list[int]]:
    """Decode image values and run the tower on those that can be read, in eval mode: the (B, S, Dv)
    features on the runtime's device and the positions in ``values`` they belong to (a warning for each other)."""
    pixels, good = [], []
    for n, value in enumerate(values):
        try:
            pixels.append(resize_center_crop(load_image_field(value, max_pixels), model.image_size))
            good.append(n)
        except ImageLoadError as err:
            print(f"warning: {skipping}: {err}", file=sys.stderr)
    if not pixels:
        return torch.empty(0, model.feature_tokens, model.config.vision["arch"]["output_dim"],
                           device=runtime.device), good
    with runtime.inference(model):
        features = model.image_features(torch.stack(pixels).to(runtime.device))
    return features, good
