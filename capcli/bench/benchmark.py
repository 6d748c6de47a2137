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
| ``align_samples_per_s`` | align's frozen-feature and reference caches | the tower and a reference model run every step (:class:`~capcli.bench.training.LiveReference`) |
| ``caption_beam{1,5}_images_per_s`` | batched ``generate`` with the KV cache | :func:`~capcli.bench.decoding.naive_generate`: the same ``generate``, one image at a time, ``use_cache=False`` |
| ``caption_onnx_images_per_s`` | greedy captions through onnxruntime on the CPU (``capcli export``) | PyTorch's batched ``generate``, same weights and images: ``caption_onnx_torch_images_per_s`` |
| ``policy_pairs_per_s`` | on-policy pairs drawn and judged (align's ``draw_pairs``) | the judge alone on as many captions: ``policy_judge_share`` |
| ``peer_*`` (only when named: ``--sections peers``) | capcli's caption path and pretrain step | transformers' VisionEncoderDecoder and open_clip's CoCa at the same sizes (:mod:`capcli.bench.peers`) |
| ``startup_caption_s`` (only when named: ``--sections startup``) | ``capcli caption`` of one image in a new process | ``python -c "import torch"`` (:mod:`capcli.bench.startup`) |
| ``caption_files_images_per_s`` (only when named: ``--sections caption_files``) | the caption command on a folder of full-size JPEGs, DataLoader workers reading ahead | the same with the images read between batches (:mod:`capcli.bench.files`) |

``mfu`` is pretrain's model FLOPs per second (``capcli.bench.flops``, counted from each step's
real batch shapes) over the peak of a large matmul in the same precision, timed in the same
repeat. ``mfu_at_model_shapes`` divides the same rate by ``model_shapes_peak_flops``, the rate
the step's own matrix products (recorded from one step, forward and backward) reach when each
is timed alone at its shapes: where small matrices cannot reach a CPU's large-matmul peak
(AVX-512), it still says how much of a step lies outside its products. Weights are random
unless ``checkpoint`` is given: speed does not depend on their values, except that a random
decoder rarely ends a caption early, so every caption runs to ``max_length``.

This module runs the sections and holds the data, metrics and on-policy ones; the others are
:mod:`capcli.bench.training` (pretrain, align), :mod:`capcli.bench.decoding` (caption, onnx),
:mod:`capcli.bench.peers` and :mod:`capcli.bench.startup`, all measured with
:mod:`capcli.bench.measure`.
"""

from __future__ import annotations

import math
import platform
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader

from capcli.bench.decoding import bench_caption, bench_onnx
from capcli.bench.files import bench_caption_files
from capcli.bench.measure import (
    Report,
    interleaved,
    matmul_peak,
    seconds_of,
    synchronize,
)
from capcli.bench.peers import bench_peers, image_files
from capcli.bench.startup import bench_startup
from capcli.bench.training import bench_align, bench_pretrain
from capcli.data.batches import CaptionCollator, caption_dataset
from capcli.data.preferences import PAIRS_PER_IMAGE
from capcli.data.sources import load_splits
from capcli.errors import ConfigError
from capcli.metrics.captions import caption_metrics
from capcli.model import Captioner, build_model
from capcli.model.generation import DecodeSettings
from capcli.phases import concept_words_for
from capcli.phases.caches import caption_features
from capcli.phases.policy import draw_pairs
from capcli.phases.rewards import GroundingJudge
from capcli.settings import Settings, override
from capcli.train.checkpoint import resolve_checkpoint
from capcli.train.runtime import Runtime
from capcli.train.sampler import in_order

# --- data ----------------------------------------------------------------------------------------------------------


def bench_data(report: Report, settings: Settings, model: Captioner, repeats: int) -> None:
    """Samples/s of the training DataLoader (read, decode, resize, collate) with the warm pixel cache and without."""
    split = load_splits(settings.data)["train"]
    collate = CaptionCollator(model.tokenizer, settings.data.max_caption_tokens)

    def read(dataset) -> float:
        loader = DataLoader(dataset, batch_sampler=in_order(len(dataset), settings.pretrain.engine.batch_size),
                            collate_fn=collate, num_workers=settings.data.num_workers)
        return seconds_of(lambda: [None for _ in loader])

    cached = caption_dataset(split, model.image_size, settings.data)
    if cached.cache is None:
        raise ConfigError("data.pixel_cache is off, or the split is over data.pixel_cache_max_gb: nothing to compare")
    plain = caption_dataset(split, model.image_size, settings.data.model_copy(update={"pixel_cache": False}))
    fast, slow = interleaved([partial(read, cached), partial(read, plain)], repeats)  # the warm-up fills the cache
    report.add("data_samples_per_s", [len(split) / t for t in fast])
    report.add("data_uncached_samples_per_s", [len(split) / t for t in slow])
    report.add("data_cache_speedup", [t_slow / t_fast for t_fast, t_slow in zip(fast, slow, strict=True)])


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
    (times,) = interleaved([partial(seconds_of, lambda: scores.append(caption_metrics(predictions, refs)))], repeats)
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
        synchronize(device)
        drawn.append(found)
        return time.perf_counter() - start

    texts = [[caps[0]] * (draw.beams + draw.samples) for caps in split["captions"]]  # as many captions as drawn
    rows = list(range(len(split)))

    def judged() -> float:
        return seconds_of(lambda: (judge.score(rows, texts), judge.references(rows)))

    draws, judges = interleaved([run, judged], repeats)
    found = drawn[-1]
    report.add("policy_pairs_per_s", [found.pairs / t for t in draws])
    report.add("policy_captions_per_s", [found.captions / t for t in draws])
    report.add("policy_judge_share", [j / d for j, d in zip(judges, draws, strict=True)])
    report.context["policy_images"] = found.images
    report.context["policy_candidates"] = draw.beams + draw.samples


# --- the whole benchmark -------------------------------------------------------------------------------------------

SECTIONS = ("data", "pretrain", "align", "caption", "onnx", "policy", "metrics")
# Run only when named: capcli beside the tools users would pick instead (capcli.bench.peers); one image
# in one `capcli caption` process against `import torch` (capcli.bench.startup); the caption command on
# a folder of full-size JPEGs, read ahead by workers or not (capcli.bench.files).
OPT_IN_SECTIONS = ("peers", "startup", "caption_files")


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
            bench_peers(report, settings, runtime, model, test, work, b.repeats, peak, log)
        if "caption_files" in sections:
            log(f"benchmark: the caption command on {b.caption_files} JPEGs ({b.repeats} repeats after a warm-up)")
            bench_caption_files(report, settings, start, test, b.caption_files, b.repeats, work)
        if "startup" in sections:
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
