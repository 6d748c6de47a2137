"""The benchmark's captioning sections: batched KV-cache ``generate`` against :func:`naive_generate`,
and greedy captions through onnxruntime against PyTorch's ``generate``.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch

from capcli.bench.measure import (
    Report,
    interleaved,
    peak_memory,
    percentile,
    seconds_of,
    synchronize,
)
from capcli.data.batches import caption_dataset
from capcli.errors import ConfigError
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings, generate_captions
from capcli.settings import Settings
from capcli.train.runtime import Runtime


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
            synchronize(device)
            times.append(time.perf_counter() - start)
        return times

    naive = partial(seconds_of, partial(naive_generate, model, batches[0], decode))
    fast_runs, naive_runs = interleaved([fast, naive], repeats)
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
    report.add(f"{key}_p50_ms", [1000 * percentile(latencies, 0.50)])
    report.add(f"{key}_p95_ms", [1000 * percentile(latencies, 0.95)])
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
                synchronize(device)
        return time.perf_counter() - start_time

    onnx_times, torch_times = interleaved([partial(run, "onnx"), partial(run, "torch")], b.repeats)
    onnx_rate = [len(pixels) / t for t in onnx_times]
    torch_rate = [len(pixels) / t for t in torch_times]
    report.add("caption_onnx_images_per_s", onnx_rate)
    report.add("caption_onnx_torch_images_per_s", torch_rate)
    report.add("caption_onnx_speedup", [o / t for o, t in zip(onnx_rate, torch_rate, strict=True)])
    report.add("caption_onnx_agreement", [statistics.fmean(a == b for a, b in zip(captions["onnx"], captions["torch"],
                                                                                  strict=True))])
    report.context["onnx"] = f"onnxruntime on the CPU, {torch.get_num_threads()} threads; PyTorch on {device}"


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
