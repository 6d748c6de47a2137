"""The benchmark's training sections: pretrain steps against the plain eager step, align steps with
their caches against the same steps computing features and reference log-probs live, and MFU.

Both time ``engine.fit`` itself (:func:`timed_fit`), counting each step's model FLOPs from its real
batch shapes (``capcli.bench.flops``).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from capcli.bench.flops import align_step_flops, pretrain_step_flops
from capcli.bench.measure import (
    MatmulShapes,
    Report,
    alone,
    interleaved,
    matmul_flops,
    seconds_of,
    shapes_peak,
    synchronize,
)
from capcli.data.batches import (
    CaptionBatch,
    CaptionCollator,
    PreferenceBatch,
    PreferenceDataset,
    caption_dataset,
)
from capcli.data.sources import load_splits
from capcli.errors import ConfigError
from capcli.model import Captioner
from capcli.objectives import PretrainObjective, score_pairs
from capcli.phases import prepare_align
from capcli.phases.caches import frozen_features, pair_logps, trained_pair_rows
from capcli.settings import Settings, override
from capcli.train.engine import Objective, TrainData, fit, total_loss
from capcli.train.runtime import Runtime


@dataclass
class Counted:
    """An objective that also records each training micro-batch's model FLOPs and decoder tokens.

    Validation calls (the model in eval mode) are not recorded. The math is the wrapped
    objective's.
    """

    objective: Objective
    flops_of: Callable[[Any], int]
    tokens_of: Callable[[Any], int]
    flops: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)

    @property
    def monitor(self) -> str:
        return self.objective.monitor

    def __call__(self, model: Captioner, batch: Any, progress: float) -> dict[str, torch.Tensor]:
        if model.training:
            self.flops.append(self.flops_of(batch))
            self.tokens.append(self.tokens_of(batch))
        return self.objective(model, batch, progress)


@dataclass
class Steps:
    """Steps 2 to N of one ``engine.fit`` run: the first warms up and is left out."""

    seconds: float
    samples: int
    flops: int
    tokens: int

    def per_s(self, what: str) -> float:
        return getattr(self, what) / self.seconds


def timed_fit(model: Captioner, objective: Counted, data: TrainData, settings: Settings, runtime: Runtime,
              phase: str, output: Path) -> Steps:
    """Run ``engine.fit`` for ``{phase}.engine.max_steps`` steps and time steps 2 to the last.

    The engine's setup and its final checkpoint fall outside the timed window. ``runtime`` is the
    benchmark's, with ``settings.runtime`` (compile, say) as this run's knobs.
    """
    group = getattr(settings, phase)
    stamps: list[tuple[float, int]] = []
    device = runtime.device

    def on_step(step: int, losses: dict[str, float]) -> None:
        synchronize(device)
        stamps.append((time.perf_counter(), len(objective.flops)))

    objective.flops.clear()
    objective.tokens.clear()
    fit(model, objective, data, group.engine.model_copy(update={"output": output}), group.optimizer,
        replace(runtime, settings=settings.runtime), title=f"benchmark {phase}", on_step=on_step)
    (start, first), (end, last) = stamps[0], stamps[-1]
    steps = len(stamps) - 1
    per_step = group.engine.batch_size * group.engine.grad_accum
    return Steps(end - start, steps * per_step, sum(objective.flops[first:last]), sum(objective.tokens[first:last]))


def _caption_tokens(batch: CaptionBatch) -> int:
    return int(batch.caption_mask.sum())


def _pair_tokens(batch: PreferenceBatch) -> int:
    return int(batch.chosen_mask.sum() + batch.rejected_mask.sum())


def pretrain_flops(model: Captioner, batch: CaptionBatch) -> int:
    return pretrain_step_flops(model, len(batch), batch.caption_ids.shape[1], frozen_vision=model.vision_frozen,
                               concepts=batch.concepts is not None)


def _align_flops(model: Captioner, batch: PreferenceBatch) -> int:
    if batch.features is None:
        raise ConfigError("the align FLOP formula covers cached image features only")
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    return align_step_flops(model, len(batch), width, batch.chosen_ids.shape[1], shared_prefix=model.shares_prefix())


def _eager(settings: Settings, phase: str) -> Settings:
    """The plain eager baseline of a phase: no fused optimizer, no pixel cache, no compile."""
    return override(settings, {f"{phase}.optimizer.fused": False, "data.pixel_cache": False,
                               "runtime.compile": False})


def bench_pretrain(report: Report, settings: Settings, runtime: Runtime, model: Captioner, work: Path,
                   repeats: int, peak: Callable[[], float]) -> None:
    """Pretrain steps as configured against the plain eager step, and MFU against the measured peak."""
    split = load_splits(settings.data)["train"]
    p = settings.pretrain
    objective = PretrainObjective(p.contrastive_weight, p.caption_weight, concept_weight=p.concept_weight,
                                  token_dropout=p.token_dropout)
    words = tuple(model.config.concept_words) if p.concept_weight else ()
    runs = []
    for name, s in (("fast", settings), ("eager", _eager(settings, "pretrain"))):
        data = TrainData(train=caption_dataset(split, model.image_size, s.data), val=None,
                         collate=CaptionCollator(model.tokenizer, s.data.max_caption_tokens, words),
                         num_workers=s.data.num_workers)
        counted = Counted(objective, partial(pretrain_flops, model), _caption_tokens)
        runs.append(partial(timed_fit, copy.deepcopy(model), counted, data, s, runtime, "pretrain",
                            work / f"pretrain-{name}"))
    first = data.collate([data.train[(i, 0)] for i in range(min(p.engine.batch_size, len(data.train)))])
    products = step_matmuls(model, objective, first, runtime)
    at_shapes = partial(shapes_peak, products, runtime.device)
    # The rest of the formula's FLOPs is the convolutions and, where SDPA runs a fused kernel (the
    # CPU's), attention's two products.
    report.context["model_shapes_flops_share"] = matmul_flops(products) / pretrain_flops(model, first)
    peaks, shape_peaks, fast, eager = interleaved([peak, at_shapes, *runs], repeats)
    memory = alone(runs[0], runtime.device, dropped=runs)
    report.add("pretrain_samples_per_s", [r.per_s("samples") for r in fast])
    report.add("pretrain_tokens_per_s", [r.per_s("tokens") for r in fast])
    report.add("pretrain_eager_samples_per_s", [r.per_s("samples") for r in eager])
    report.add("pretrain_speedup",
               [e.seconds / e.samples / (f.seconds / f.samples) for f, e in zip(fast, eager, strict=True)])
    report.add("peak_flops", peaks)
    report.add("pretrain_model_flops_per_s", [r.per_s("flops") for r in fast])
    report.add("mfu", [r.per_s("flops") / p for r, p in zip(fast, peaks, strict=True)])
    report.add("model_shapes_peak_flops", shape_peaks)
    report.add("mfu_at_model_shapes", [r.per_s("flops") / p for r, p in zip(fast, shape_peaks, strict=True)])
    report.add("pretrain_peak_memory_mb", [memory["mb"]])


def step_matmuls(model: Captioner, objective: Objective, batch: CaptionBatch, runtime: Runtime):
    """The matrix products of one training step on ``batch``, forward and backward (``MatmulShapes``' counts),
    under the runtime's precision. On a copy of the model, whose gradients are then dropped."""
    model = copy.deepcopy(model).train()
    batch = batch.to(runtime.device)
    with MatmulShapes() as products:
        with runtime.autocast():
            loss = total_loss(objective(model, batch, 0.0))
        loss.backward()
    return products.counts


# --- align ---------------------------------------------------------------------------------------------------------


@dataclass
class LiveReference:
    """Align's objective without its caches: reference log-probs computed every step.

    The frozen reference model (the starting checkpoint, kept in memory) scores the batch's
    pairs with ``score_pairs``, as the cache does, running its own tower on the pixels; the
    wrapped objective then runs on the batch with those log-probs and reads the pixels
    through the policy's frozen tower. The math is a cached step's.
    """

    objective: Objective
    reference: Captioner
    length_normalize: bool = False

    @property
    def monitor(self) -> str:
        return self.objective.monitor

    def __call__(self, model: Captioner, batch: PreferenceBatch, progress: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            chosen, rejected = score_pairs(self.reference, batch, self.length_normalize)
        return self.objective(model, replace(batch, reference=torch.stack([chosen, rejected], dim=1)), progress)


def bench_align(report: Report, settings: Settings, runtime: Runtime, start: Path, work: Path, repeats: int,
                peak: Callable[[], float]) -> None:
    """Align steps with the frozen-feature and reference caches against the same steps computing both live.

    - cached: the pairs as ``prepare_align`` builds them (features and reference log-probs
      computed once, before training; ``cache_build_s`` is that one-time cost).
    - live: the same pairs read from their image files, the policy's frozen tower run on them
      every step, and a frozen copy of the starting checkpoint kept in memory to score them.
    """
    if not settings.align.freeze_vision or settings.align.reference != "checkpoint":
        raise ConfigError("benchmarking align needs align.freeze_vision and align.reference = checkpoint: "
                          "otherwise align caches nothing")
    settings = override(settings, {"align.checkpoint": start, "align.engine.output": work / "align-prepare",
                                   "align.engine.resume": False})
    phase = prepare_align(settings, overwrite=True, runtime=runtime)
    engine, model, cached = settings.align.engine, phase.model, phase.data.train
    per_step = engine.batch_size * engine.grad_accum
    if len(cached) < engine.max_steps * per_step:
        raise ConfigError(f"{len(cached)} training pairs cannot fill {engine.max_steps} steps of {per_step}")
    device = runtime.device
    reference = Captioner.from_pretrained(phase.start, device).eval().requires_grad_(False)
    live_data = PreferenceDataset(cached.pairs, model.image_size, settings.data.max_pixels)
    fast = Counted(phase.objective, partial(_align_flops, model), _pair_tokens)
    live = Counted(LiveReference(phase.objective, reference, settings.align.length_normalize),
                   lambda batch: 0, _pair_tokens)
    runs = [
        partial(seconds_of, partial(_build_align_caches, model, cached.pairs, phase.data.collate, settings, runtime)),
        partial(timed_fit, model, fast, replace(phase.data, val=None), settings, runtime, "align",
                work / "align-cached"),
        partial(timed_fit, model, live, replace(phase.data, train=live_data, val=None), settings, runtime, "align",
                work / "align-live"),
        peak,
    ]
    build, fast_runs, live_runs, peaks = interleaved(runs, repeats)
    del reference, live
    memory = alone(runs[1], device, dropped=runs)
    report.add("align_samples_per_s", [r.per_s("samples") for r in fast_runs])
    report.add("align_tokens_per_s", [r.per_s("tokens") for r in fast_runs])
    report.add("align_live_samples_per_s", [r.per_s("samples") for r in live_runs])
    report.add("align_cache_speedup", [lv.seconds / f.seconds for f, lv in zip(fast_runs, live_runs, strict=True)])
    report.add("align_mfu", [r.per_s("flops") / p for r, p in zip(fast_runs, peaks, strict=True)])
    report.add("align_cache_build_s", build)
    report.add("align_peak_memory_mb", [memory["mb"]])


def _build_align_caches(model: Captioner, pairs, collate, settings: Settings, runtime: Runtime) -> None:
    """Both align caches over ``pairs``, as ``prepare_align`` builds them (the result is dropped)."""
    batch, max_pixels = settings.align.engine.batch_size, settings.data.max_pixels
    pairs, features, index = frozen_features(model, pairs, max_pixels, runtime, batch)
    data = PreferenceDataset(pairs, model.image_size, max_pixels, features, index)
    score = partial(score_pairs, length_normalize=settings.align.length_normalize)
    pair_logps(model, data, collate, score, runtime, batch, trained_pair_rows(data, settings.align.engine, runtime))
