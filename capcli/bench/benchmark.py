"""``capcli benchmark``: training and captioning speed, memory and MFU, each against a baseline
measured in the same run.

Nothing here trains or decodes by itself: training figures time ``engine.fit``, captions
time ``generation.generate_captions``, metrics time ``metrics.caption_metrics``. Each figure
is taken ``repeats`` times after one warm-up, the fast side and its baseline taking turns so
that a busy machine slows both alike; the report gives the median and the min–max.

| figure | fast side | baseline |
|---|---|---|
| ``data_samples_per_s`` | the pixel cache, warm | decoding and resizing every image |
| ``pretrain_samples_per_s`` | the engine as configured: fused AdamW, pixel cache, ``--compile`` if asked | the same engine as a plain eager step: no fused optimizer, no cache, no compile |
| ``align_samples_per_s`` | align's frozen-feature and reference caches | the tower and a reference model run every step (:class:`LiveReference`) |
| ``caption_beam{1,5}_images_per_s`` | batched ``generate`` with the KV cache | :func:`naive_generate`: the same ``generate``, one image at a time, ``use_cache=False`` |
| ``caption_onnx_images_per_s`` | greedy captions through onnxruntime on the CPU (``capcli export``) | PyTorch's batched ``generate``, same weights and images: ``caption_onnx_torch_images_per_s`` |
| ``policy_pairs_per_s`` | on-policy pairs drawn and judged (align's ``draw_pairs``) | the judge alone on as many captions: ``policy_judge_share`` |
| ``peer_*`` (only when named: ``--sections peers``) | capcli's caption path and pretrain step | transformers' VisionEncoderDecoder and open_clip's CoCa at the same sizes (:mod:`capcli.bench.peers`) |
| ``startup_caption_s`` (only when named: ``--sections startup``) | ``capcli caption`` of one image in a new process | ``python -c "import torch"`` (:mod:`capcli.bench.startup`) |

``mfu`` is pretrain's model FLOPs per second (``capcli.bench.flops``, counted from each step's
real batch shapes) over the peak of a large matmul in the same precision, timed in the same
repeat. Weights are random unless ``checkpoint`` is given: speed does not depend on their
values, except that a random decoder rarely ends a caption early, so every caption runs to
``max_length``.
"""

from __future__ import annotations

import copy
import gc
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from capcli.bench.flops import align_step_flops, pretrain_step_flops
from capcli.data.batches import (
    CaptionBatch,
    CaptionCollator,
    PreferenceBatch,
    PreferenceDataset,
    caption_dataset,
)
from capcli.data.preferences import PAIRS_PER_IMAGE
from capcli.data.sources import load_splits
from capcli.errors import ConfigError
from capcli.metrics.captions import caption_metrics
from capcli.model import Captioner, build_model
from capcli.model.generation import DecodeSettings, generate_captions
from capcli.objectives import PretrainObjective, score_pairs
from capcli.phases import concept_words_for, prepare_align
from capcli.phases.caches import caption_features, frozen_features, pair_logps
from capcli.phases.policy import draw_pairs
from capcli.phases.rewards import GroundingJudge
from capcli.settings import Settings, override
from capcli.train.checkpoint import resolve_checkpoint
from capcli.train.engine import Objective, TrainData, fit
from capcli.train.runtime import Runtime
from capcli.train.sampler import in_order

# --- measuring -----------------------------------------------------------------------------------------------------


@dataclass
class Report:
    """Medians by figure, with the min and max of the repeats behind each."""

    figures: dict[str, float] = field(default_factory=dict)
    ranges: dict[str, tuple[float, float]] = field(default_factory=dict)
    context: dict[str, Any] = field(default_factory=dict)

    def add(self, key: str, values: list[float]) -> None:
        self.figures[key] = statistics.median(values)
        self.ranges[key] = (min(values), max(values))

    def as_dict(self) -> dict[str, Any]:
        """Figures at the top level (``mfu``, ``caption_beam5_speedup``...), then ``range`` and ``context``."""
        return {**self.figures, "range": {k: list(v) for k, v in self.ranges.items()}, "context": self.context}


def _interleaved(runs: list[Callable[[], Any]], repeats: int) -> list[list[Any]]:
    """Each run's results over ``repeats`` turns after one warm-up turn, the runs taking turns."""
    for run in runs:
        run()
    results: list[list[Any]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results, strict=True):
            out.append(run())
    return results


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, float]]:
    """The peak memory inside the block, in MiB, under ``out["mb"]``.

    CUDA: ``torch.cuda.max_memory_allocated`` after a reset. CPU: the process's peak resident
    set (``VmHWM``), reset on entry through ``/proc/self/clear_refs`` where Linux allows it;
    elsewhere the peak since the process started (``ru_maxrss``), which can only be higher.
    """
    out: dict[str, float] = {}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield out
        torch.cuda.synchronize(device)
        out["mb"] = torch.cuda.max_memory_allocated(device) / 2**20
        return
    resettable = _reset_peak_rss()
    yield out
    out["mb"] = _peak_rss_kb(resettable) / 1024


def _reset_peak_rss() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_kb(from_proc: bool) -> float:
    if from_proc:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return float(line.split()[1])
    import resource  # Unix only

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1024 if sys.platform == "darwin" else peak  # bytes on macOS, KiB on Linux


def _alone(run: Callable[[], Any], device: torch.device, dropped: list) -> dict[str, float]:
    """Peak memory of one more ``run`` on its own, after the other runs (baselines holding their
    own models) are dropped: the memory a run of the fast side needs, not the benchmark's."""
    dropped.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    with peak_memory(device) as memory:
        run()
    return memory


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 5) -> float:
    """FLOP/s of a ``size``² matmul in ``dtype`` on ``device``: the median of ``repeats`` timings."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        a @ b
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return 2 * size**3 / statistics.median(times)


# --- training: what each optimizer step did ------------------------------------------------------------------------


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
        _synchronize(device)
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


def _pretrain_flops(model: Captioner, batch: CaptionBatch) -> int:
    return pretrain_step_flops(model, len(batch), batch.caption_ids.shape[1], frozen_vision=model.vision_frozen,
                               concepts=batch.concepts is not None)


def _align_flops(model: Captioner, batch: PreferenceBatch) -> int:
    if batch.features is None:
        raise ConfigError("the align FLOP formula covers cached image features only")
    width = max(batch.chosen_ids.shape[1], batch.rejected_ids.shape[1])
    return align_step_flops(model, len(batch), width, batch.chosen_ids.shape[1])


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
        counted = Counted(objective, partial(_pretrain_flops, model), _caption_tokens)
        runs.append(partial(timed_fit, copy.deepcopy(model), counted, data, s, runtime, "pretrain",
                            work / f"pretrain-{name}"))
    peaks, fast, eager = _interleaved([peak, *runs], repeats)
    memory = _alone(runs[0], runtime.device, dropped=runs)
    report.add("pretrain_samples_per_s", [r.per_s("samples") for r in fast])
    report.add("pretrain_tokens_per_s", [r.per_s("tokens") for r in fast])
    report.add("pretrain_eager_samples_per_s", [r.per_s("samples") for r in eager])
    report.add("pretrain_speedup",
               [e.seconds / e.samples / (f.seconds / f.samples) for f, e in zip(fast, eager, strict=True)])
    report.add("peak_flops", peaks)
    report.add("pretrain_model_flops_per_s", [r.per_s("flops") for r in fast])
    report.add("mfu", [r.per_s("flops") / p for r, p in zip(fast, peaks, strict=True)])
    report.add("pretrain_peak_memory_mb", [memory["mb"]])


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
        partial(_seconds, partial(_build_align_caches, model, cached.pairs, phase.data.collate, settings, runtime)),
        partial(timed_fit, model, fast, replace(phase.data, val=None), settings, runtime, "align",
                work / "align-cached"),
        partial(timed_fit, model, live, replace(phase.data, train=live_data, val=None), settings, runtime, "align",
                work / "align-live"),
        peak,
    ]
    build, fast_runs, live_runs, peaks = _interleaved(runs, repeats)
    del reference, live
    memory = _alone(runs[1], device, dropped=runs)
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
    pair_logps(model, data, collate, score, runtime, batch)


# --- data ----------------------------------------------------------------------------------------------------------


def bench_data(report: Report, settings: Settings, model: Captioner, repeats: int) -> None:
    """Samples/s of the training DataLoader (read, decode, resize, collate) with the warm pixel cache and without."""
    split = load_splits(settings.data)["train"]
    collate = CaptionCollator(model.tokenizer, settings.data.max_caption_tokens)

    def read(dataset) -> float:
        loader = DataLoader(dataset, batch_sampler=in_order(len(dataset), settings.pretrain.engine.batch_size),
                            collate_fn=collate, num_workers=settings.data.num_workers)
        return _seconds(lambda: [None for _ in loader])

    cached = caption_dataset(split, model.image_size, settings.data)
    if cached.cache is None:
        raise ConfigError("data.pixel_cache is off, or the split is over data.pixel_cache_max_gb: nothing to compare")
    plain = caption_dataset(split, model.image_size, settings.data.model_copy(update={"pixel_cache": False}))
    fast, slow = _interleaved([partial(read, cached), partial(read, plain)], repeats)  # the warm-up fills the cache
    report.add("data_samples_per_s", [len(split) / t for t in fast])
    report.add("data_uncached_samples_per_s", [len(split) / t for t in slow])
    report.add("data_cache_speedup", [t_slow / t_fast for t_fast, t_slow in zip(fast, slow, strict=True)])


# --- captions ------------------------------------------------------------------------------------------------------


def bench_caption(report: Report, model: Captioner, pixels: torch.Tensor, batch: int, beams: int,
                  repeats: int) -> list[str]:
    """Batched KV-cache decoding of ``pixels`` against :func:`naive_generate` on the first batch.

    Returns the fast path's captions of every image (from its last repeat).
    """
    # Unguided on both sides, as the figures have always been taken; the two sides do equal work.
    decode = DecodeSettings(beams=beams, concept_guidance=0.0)
    batches = list(pixels.split(batch))
    device = model.pixel_mean.device
    captions: list[str] = []

    def fast() -> list[float]:
        times = []
        captions.clear()
        for chunk in batches:
            start = time.perf_counter()
            captions.extend(generate_captions(model, chunk, decode))
            _synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    naive = partial(_seconds, partial(naive_generate, model, batches[0], decode))
    fast_runs, naive_runs = _interleaved([fast, naive], repeats)
    with peak_memory(device) as memory:  # the fast path alone
        fast()
    naive_captions = naive_generate(model, batches[0], decode)
    agreement = statistics.fmean(a == b for a, b in zip(captions[: len(naive_captions)], naive_captions, strict=True))
    key = f"caption_beam{beams}"
    fast_rate = [len(pixels) / sum(times) for times in fast_runs]
    naive_rate = [len(batches[0]) / t for t in naive_runs]
    latencies = sorted(t for times in fast_runs for t in times)
    report.add(f"{key}_images_per_s", fast_rate)
    report.add(f"{key}_naive_images_per_s", naive_rate)
    report.add(f"{key}_speedup", [f / n for f, n in zip(fast_rate, naive_rate, strict=True)])
    report.add(f"{key}_p50_ms", [1000 * _percentile(latencies, 0.50)])
    report.add(f"{key}_p95_ms", [1000 * _percentile(latencies, 0.95)])
    report.add(f"{key}_agreement", [agreement])
    report.add(f"{key}_peak_memory_mb", [memory["mb"]])
    return list(captions)


def bench_onnx(report: Report, start: Path, work: Path, test, settings: Settings, runtime: Runtime,
               log: Callable[[str], None]) -> None:
    """Greedy captions through onnxruntime on the CPU (``capcli export``, ``serving.OnnxCaptioner``) against
    PyTorch's batched ``generate`` on the runtime's device: the same weights, images, batches and search."""
    from capcli.serving import require_onnx

    try:
        require_onnx()
    except ConfigError as err:
        log(f"benchmark: onnx skipped ({err})")
        report.context["onnx"] = "not installed"
        return
    from capcli.inference.export import export_onnx
    from capcli.serving import OnnxCaptioner

    b = settings.benchmark
    log(f"benchmark: onnxruntime against PyTorch, greedy ({b.repeats} repeats after a warm-up)")
    device = runtime.device
    decode = DecodeSettings(beams=1)
    export_onnx(start, work / "onnx", decode.max_length, decode.min_length, decode.concept_guidance)
    session = OnnxCaptioner(work / "onnx", threads=torch.get_num_threads())
    model = Captioner.from_pretrained(start, device).eval()
    scenes = caption_dataset(test, model.image_size, settings.data)
    pixels = torch.stack([scenes[(i, 0)].pixels for i in range(min(b.images, len(scenes)))])
    batches = list(pixels.split(b.caption_batch))
    captions: dict[str, list[str]] = {"onnx": [], "torch": []}

    def run(side: str) -> float:
        captions[side].clear()
        start_time = time.perf_counter()
        for chunk in batches:
            if side == "onnx":
                captions[side].extend(session.caption_pixels(chunk.numpy()))
            else:
                captions[side].extend(generate_captions(model, chunk, decode))
                _synchronize(device)
        return time.perf_counter() - start_time

    onnx_times, torch_times = _interleaved([partial(run, "onnx"), partial(run, "torch")], b.repeats)
    onnx_rate = [len(pixels) / t for t in onnx_times]
    torch_rate = [len(pixels) / t for t in torch_times]
    report.add("caption_onnx_images_per_s", onnx_rate)
    report.add("caption_onnx_torch_images_per_s", torch_rate)
    report.add("caption_onnx_speedup", [o / t for o, t in zip(onnx_rate, torch_rate, strict=True)])
    report.add("caption_onnx_agreement", [statistics.fmean(a == b for a, b in zip(captions["onnx"], captions["torch"],
                                                                                  strict=True))])
    report.context["onnx"] = f"onnxruntime on the CPU, {torch.get_num_threads()} threads; PyTorch on {device}"


def _percentile(sorted_values: list[float], q: float) -> float:
    """The ``q`` quantile by linear interpolation between the closest ranks (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


# --- the naive decoder: decoding's baseline ------------------------------------------------------------------------


def naive_generate(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings) -> list[str]:
    """Caption images one at a time with no KV cache: the baseline of :func:`bench_caption`.

    The package's own decoder, transformers' ``generate``, with ``use_cache=False``: each step
    runs the decoder over the whole [prefix; tokens so far] of every live beam. The search is
    the fast path's, so the captions are ``generate_captions``'s and the speedup compares equal work.

    Args:
        model: a Captioner (its device is used).
        pixels: (B, 3, H, W) uint8 images at the model's resolution.
        decode: search settings.

    Returns:
        One caption per image, without special tokens.
    """
    return [caption for image in pixels for caption in generate_captions(model, image[None], decode, use_cache=False)]


# --- metrics -------------------------------------------------------------------------------------------------------


def bench_metrics(report: Report, references: list[list[str]], repeats: int) -> None:
    """Seconds of ``caption_metrics`` (PTB tokenizing, BLEU, METEOR, ROUGE-L, CIDEr-D) over a test split.

    Each image's prediction is the first reference of the next image: a wrong caption, so
    the n-gram matching does real work.
    """
    keys = range(len(references))
    predictions = {i: references[(i + 1) % len(references)][0] for i in keys}
    refs = {i: references[i] for i in keys}
    scores: list[Any] = []
    (times,) = _interleaved([partial(_seconds, lambda: scores.append(caption_metrics(predictions, refs)))], repeats)
    report.add("metrics_s", times)
    report.add("metrics_captions_per_s", [len(references) / t for t in times])
    report.context["metrics_captions"] = len(references)
    report.context["metrics_tokenizer"] = scores[-1].tokenizer


# --- on-policy pairs ------------------------------------------------------------------------------------------------


def bench_policy(report: Report, settings: Settings, runtime: Runtime, model: Captioner, split,
                 repeats: int) -> None:
    """On-policy pairs drawn and judged per second (``capcli align --preferences policy``), and the judge's share.

    Draws from ``split``'s images exactly as align does (``draw_pairs``: batched KV-cache beam
    candidates and samples, the grounding judge on the scene graphs, the pair builder), then
    times the judge alone on the same captions, so the report says where the time goes.
    """
    device = runtime.device
    draw = settings.align.policy.model_copy(update={"images": None})  # every image of the split
    decode = DecodeSettings(max_length=settings.data.max_caption_tokens)
    features = partial(caption_features, model, split, settings.data.max_pixels, runtime)
    judge = GroundingJudge(split)
    drawn: list[Any] = []

    def run() -> float:
        start = time.perf_counter()
        pairs, found = draw_pairs(model, split, features, judge, decode, draw,
                                  settings.runtime.seed, settings.benchmark.caption_batch)
        _synchronize(device)
        drawn.append(found)
        return time.perf_counter() - start

    texts = [[caps[0]] * (draw.beams + draw.samples) for caps in split["captions"]]  # as many captions as drawn
    rows = list(range(len(split)))

    def judged() -> float:
        return _seconds(lambda: (judge.score(rows, texts), judge.references(rows)))

    draws, judges = _interleaved([run, judged], repeats)
    found = drawn[-1]
    report.add("policy_pairs_per_s", [found.pairs / t for t in draws])
    report.add("policy_captions_per_s", [found.captions / t for t in draws])
    report.add("policy_judge_share", [j / d for j, d in zip(judges, draws, strict=True)])
    report.context["policy_images"] = found.images
    report.context["policy_candidates"] = draw.beams + draw.samples


# --- the whole benchmark -------------------------------------------------------------------------------------------

SECTIONS = ("data", "pretrain", "align", "caption", "onnx", "policy", "metrics")
# Run only when named: capcli beside the tools users would pick instead (capcli.bench.peers); one image
# in one `capcli caption` process against `import torch` (capcli.bench.startup).
OPT_IN_SECTIONS = ("peers", "startup")


def benchmark_settings(settings: Settings) -> Settings:
    """The settings a benchmark trains with: data sized to fill its steps, nothing validated or stopped early."""
    b = settings.benchmark
    pretrain_step = settings.pretrain.engine.batch_size * settings.pretrain.engine.grad_accum
    align_step = settings.align.engine.batch_size * settings.align.engine.grad_accum
    # Sized for min(pairs_per_image, 2) pairs an image: an image with fewer captions than pairs_per_image
    # gives fewer pairs, and pairs beyond what the steps use only lengthen the timed cache build.
    per_image = min(settings.align.pairs_per_image, PAIRS_PER_IMAGE)
    images = max(pretrain_step * b.steps, math.ceil(align_step * b.steps / per_image))
    return override(settings, {
        "data.train_size": images, "data.val_size": 8, "data.test_size": max(b.images, b.metric_captions),
        "pretrain.engine.max_steps": b.steps, "align.engine.max_steps": b.steps,
        # A full-size checkpoint with its optimizer state is gigabytes; a benchmark keeps no weights.
        "pretrain.engine.save_checkpoints": False, "align.engine.save_checkpoints": False,
        "pretrain.engine.resume": False, "align.engine.resume": False, "runtime.quiet": True,
    })


def run_benchmark(settings: Settings, checkpoint: Path | None = None, sections: tuple[str, ...] = SECTIONS,
                  log: Callable[[str], None] = lambda line: None) -> Report:
    """Measure every section of ``sections``; see the module docstring for what each one times.

    Args:
        settings: the benchmark's settings (``benchmark``, ``runtime``, ``model`` and the
            engines' batch sizes are read); synthetic data is made in a temporary folder.
        checkpoint: time these weights (and this architecture) instead of random ones.
        sections: which of ``SECTIONS`` and ``OPT_IN_SECTIONS`` to measure.
        log: told, one line each, which section starts.
    """
    unknown = set(sections) - set(SECTIONS + OPT_IN_SECTIONS)
    if unknown:
        raise ConfigError(f"unknown benchmark section(s) {', '.join(sorted(unknown))} "
                          f"(allowed: {', '.join(SECTIONS + OPT_IN_SECTIONS)})")
    b = settings.benchmark
    runtime = Runtime.from_settings(settings.runtime, join=True)  # it trains, as pretrain and align do
    device, dtype = runtime.device, runtime.dtype
    report = Report()
    with tempfile.TemporaryDirectory(prefix="capcli-benchmark-") as tmp:
        work = Path(tmp)
        settings = benchmark_settings(override(settings, {"data.cache_dir": work / "data"}))
        splits = load_splits(settings.data)
        torch.manual_seed(settings.runtime.seed)
        if checkpoint is not None:
            model = Captioner.from_pretrained(resolve_checkpoint(checkpoint, "best"), device)
        else:
            captions = splits["train"]["captions"]
            model = build_model(settings.model, (c for caps in captions for c in caps),
                                concept_words_for(settings, captions)).to(device)
        if {"pretrain", "align", "peers"} & set(sections) and model.config.prefix_mapper == "transformer":
            raise ConfigError("benchmark: the MFU formula covers the mlp, tokens and resampler prefix mappers, "
                              "not transformer; --sections data,caption,metrics times the rest")
        start = work / "start"
        model.save_pretrained(start)
        size = b.matmul_size or (8192 if device.type == "cuda" else 2048)
        peak = partial(matmul_peak, device, dtype, size)
        report.context = _context(settings, model, device, dtype, checkpoint, size)
        if "data" in sections:
            log(f"benchmark: data ({b.repeats} repeats after a warm-up)")
            bench_data(report, settings, model, b.repeats)
        if "pretrain" in sections:
            log(f"benchmark: pretrain ({b.repeats} repeats after a warm-up)")
            bench_pretrain(report, settings, runtime, model, work, b.repeats, peak)
        if "align" in sections:
            log(f"benchmark: align ({b.repeats} repeats after a warm-up)")
            bench_align(report, settings, runtime, start, work, b.repeats, peak)
        test = splits["test"]
        if "caption" in sections:
            log(f"benchmark: caption at beams 1 and 5 ({b.repeats} repeats after a warm-up)")
            scenes = caption_dataset(test, model.image_size, settings.data)
            pixels = torch.stack([scenes[(i, 0)].pixels for i in range(min(b.images, len(scenes)))])
            model.eval()
            for beams in (1, 5):
                bench_caption(report, model, pixels, b.caption_batch, beams, b.repeats)
        if "onnx" in sections:
            bench_onnx(report, start, work, test, settings, runtime, log)
        if "policy" in sections:
            log(f"benchmark: on-policy pairs ({b.repeats} repeats after a warm-up)")
            bench_policy(report, settings, runtime, model, test.select(range(min(b.images, len(test)))), b.repeats)
        if "metrics" in sections:
            log(f"benchmark: metrics ({b.repeats} repeats after a warm-up)")
            bench_metrics(report, test["captions"][: b.metric_captions], b.repeats)
        if "peers" in sections:
            from capcli.bench.peers import bench_peers  # imports capcli.bench.benchmark

            bench_peers(report, settings, runtime, model, test, work, b.repeats, peak, log)
        if "startup" in sections:
            from capcli.bench.peers import image_files
            from capcli.bench.startup import bench_startup

            image = image_files(test, 1, work / "startup-image")[0]
            bench_startup(report, start, image, str(device), b.repeats, log)
    return report


def _context(settings: Settings, model: Captioner, device: torch.device, dtype: torch.dtype,
             checkpoint: Path | None, matmul_size: int) -> dict[str, Any]:
    """What the figures were measured on and with."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = _cpu_name() or platform.processor() or platform.machine()
    return {
        "device": str(device), "device_name": name, "precision": str(dtype).removeprefix("torch."),
        "torch": torch.__version__, "torch_threads": torch.get_num_threads(), "preset": model.config.preset,
        "parameters": sum(p.numel() for p in model.parameters()), "weights": str(checkpoint or "random"),
        "pretrain_batch": settings.pretrain.engine.batch_size * settings.pretrain.engine.grad_accum,
        "align_batch": settings.align.engine.batch_size * settings.align.engine.grad_accum,
        "steps": settings.benchmark.steps, "repeats": settings.benchmark.repeats,
        "caption_images": settings.benchmark.images, "caption_batch": settings.benchmark.caption_batch,
        "compile": settings.runtime.compile, "matmul_size": matmul_size,
        "memory": "cuda max_memory_allocated" if device.type == "cuda" else "process peak RSS",
    }


def _cpu_name() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None
