"""Speed: what capcli's fast paths buy over the naive ones, both timed in the same run.

- **Decoding:** ``generate_captions`` (a batch at a time, transformers' ``generate`` with
  the KV cache) against :func:`naive_generate`, which decodes one image at a time and
  re-runs the whole decoder over [prefix; tokens so far] at every step. Both do the same
  search (tests/test_decoding.py checks their captions against each other and against a
  reference), so the ratio is what batching and the cache buy.
- **Align steps:** optimizer steps of the real engine (``engine.fit``) on the pairs as
  ``prepare_align`` builds them, with the frozen tower's features and the reference
  log-probs precomputed, against the same steps computing both live (:class:`LiveReference`).

Each number is the median of ``repeats`` runs after a warm-up, the two sides interleaved so
that a busy machine slows both alike. ``python -m capcli.speed --checkpoint DIR [--json]``
prints them; ``capcli benchmark`` will report them too.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import torch

from capcli.caches import frozen_features, pair_logps
from capcli.checkpoint import resolve_checkpoint
from capcli.data.batches import CaptionDataset, PreferenceBatch, PreferenceDataset
from capcli.data.preferences import PAIRS_PER_IMAGE
from capcli.data.sources import load_splits
from capcli.engine import Objective, TrainData, fit
from capcli.errors import CapcliError, ConfigError
from capcli.generation import DecodeSettings, generate_captions
from capcli.model import Captioner
from capcli.objectives import score_pairs
from capcli.phases import prepare_align
from capcli.precision import autocast_context, resolve_device, resolve_precision
from capcli.settings import Settings, load_settings, override

# --- decoding ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def naive_generate(model: Captioner, pixels: torch.Tensor, decode: DecodeSettings) -> list[str]:
    """Caption images one at a time with no KV cache: the baseline of :func:`decode_speed`.

    Each step runs the decoder over the whole [prefix; tokens so far] of every live beam.
    The search is ``generate``'s as capcli calls it (greedy, or beam search with its length
    penalty, minimum length and default stopping rule), so the captions are
    ``generate_captions``'s.

    Args:
        model: a Captioner (its device is used).
        pixels: (B, 3, H, W) uint8 images at the model's resolution.
        decode: search settings; ``no_repeat_ngram`` is not supported.

    Returns:
        One caption per image, without special tokens.
    """
    if decode.no_repeat_ngram:
        raise ValueError("naive_generate does not block repeated n-grams")
    model.eval()
    captions = []
    for image in pixels:
        prefix = model.prefix(model.image_features(image[None].to(model.pixel_mean.device)))  # (1, K, D)
        search = _greedy if decode.beams == 1 else _beam_search
        captions.append(model.tokenizer.decode(search(model, prefix, decode), skip_special_tokens=True).strip())
    return captions


def _next_log_probs(model: Captioner, prefix: torch.Tensor, ids: torch.Tensor, decode: DecodeSettings) -> torch.Tensor:
    """(R, V) float32 log-probs of the token after each row of ids (R, t), end-of-text barred before min_length."""
    embeds = torch.cat([prefix.expand(len(ids), -1, -1), model.decoder.transformer.wte(ids)], dim=1)  # (R, K+t, D)
    logits = model.decoder(inputs_embeds=embeds, use_cache=False).logits[:, -1].float()  # no cache: all K+t again
    log_probs = torch.log_softmax(logits, dim=-1)
    if ids.shape[1] < decode.min_length:
        log_probs[:, model.tokenizer.eos_token_id] = -math.inf  # after the softmax, as generate's processor
    return log_probs


def _greedy(model: Captioner, prefix: torch.Tensor, decode: DecodeSettings) -> list[int]:
    ids = torch.empty(1, 0, dtype=torch.long, device=prefix.device)  # (1, t)
    for _ in range(decode.max_length):
        token = _next_log_probs(model, prefix, ids, decode).argmax(dim=-1, keepdim=True)  # (1, 1)
        if token.item() == model.tokenizer.eos_token_id:
            break
        ids = torch.cat([ids, token], dim=1)
    return ids[0].tolist()


def _beam_search(model: Captioner, prefix: torch.Tensor, decode: DecodeSettings) -> list[int]:
    """transformers' beam search (``_beam_search``, ``early_stopping=False``) over one image's live beams.

    Each step keeps the 2·beams best continuations; those among the first ``beams`` that end
    (end-of-text, or ``max_length``) join the finished ones, scored sum / length ** penalty;
    the best ``beams`` that did not end run on. The search stops once ``beams`` are finished
    and the best live sum / current length ** penalty cannot beat the worst finished score.
    """
    eos, beams, penalty = model.tokenizer.eos_token_id, decode.beams, decode.length_penalty
    ids = torch.empty(1, 0, dtype=torch.long, device=prefix.device)  # (R, t) live beams
    sums = torch.zeros(1, device=prefix.device)  # (R,) their summed log-probs
    done: list[torch.Tensor] = []  # finished token rows, best first
    scores = torch.empty(0, device=prefix.device)  # their scores, descending
    for length in range(1, decode.max_length + 1):
        log_probs = _next_log_probs(model, prefix, ids, decode)  # (R, V)
        top, index = (sums[:, None] + log_probs).flatten().topk(2 * beams)
        vocab = log_probs.shape[1]
        grown = torch.cat([ids[index // vocab], (index % vocab)[:, None]], dim=1)  # (2·beams, length)
        ended = (grown[:, -1] == eos) | (length == decode.max_length)
        new = ended[:beams]
        pool = done + list(grown[:beams][new])
        order = torch.cat([scores, top[:beams][new] / length**penalty]).sort(descending=True)
        scores, done = order.values[:beams], [pool[i] for i in order.indices[:beams].tolist()]
        live = (~ended).nonzero()[:beams, 0]
        ids, sums = grown[live], top[live]
        if len(live) == 0 or (len(done) == beams and sums[0] / length**penalty <= scores[-1]):
            break
    best = done[0].tolist()
    return best[:-1] if best[-1] == eos else best


def decode_speed(model: Captioner, pixels: torch.Tensor, beams: int = 5, repeats: int = 3) -> dict[str, float]:
    """Images/s of batched decoding with the KV cache against :func:`naive_generate`.

    Args:
        model: a Captioner on its device.
        pixels: (B, 3, H, W) uint8 images; the fast path decodes them as one batch.
        beams: beam width of both searches (1: greedy).
        repeats: timed runs of each side after one warm-up run; the median counts.

    Returns:
        ``caption_beam{N}_images_per_s`` (fast), ``caption_beam{N}_naive_images_per_s``,
        ``caption_beam{N}_speedup`` (their ratio) and ``caption_beam{N}_agreement``, the
        share of images whose two captions are equal (1.0: the same work was timed).
    """
    decode = DecodeSettings(beams=beams)
    fast, naive = partial(generate_captions, model, pixels, decode), partial(naive_generate, model, pixels, decode)
    agreement = statistics.fmean(a == b for a, b in zip(fast(), naive(), strict=True))  # also the warm-up
    fast_s, naive_s = _medians([partial(_seconds, fast), partial(_seconds, naive)], repeats)
    key = f"caption_beam{beams}"
    return {f"{key}_images_per_s": len(pixels) / fast_s, f"{key}_naive_images_per_s": len(pixels) / naive_s,
            f"{key}_speedup": naive_s / fast_s, f"{key}_agreement": agreement}


def _medians(runs: list[Callable[[], float]], repeats: int) -> list[float]:
    """Each run's median result (seconds) over ``repeats`` calls, the runs taking turns."""
    results: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, out in zip(runs, results):
            out.append(run())
    return [statistics.median(out) for out in results]


def _seconds(run: Callable[[], object]) -> float:
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


# --- align steps ---------------------------------------------------------------------------------------------------


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
        return getattr(self.objective, "monitor", "loss")

    def __call__(self, model: Captioner, batch: PreferenceBatch, progress: float) -> dict[str, torch.Tensor]:
        with torch.no_grad():
            chosen, rejected = score_pairs(self.reference, batch, self.length_normalize)
        return self.objective(model, replace(batch, reference=torch.stack([chosen, rejected], dim=1)), progress)


def align_step_speed(settings: Settings, steps: int = 5, repeats: int = 3) -> dict[str, float]:
    """Samples/s of align's optimizer steps with its caches against the same steps computing them live.

    Both sides run ``engine.fit`` for ``steps`` steps from ``settings.align.checkpoint`` on
    the same training pairs, without validation, and are timed from the end of step 1
    (a warm-up) to the end of the last step, inside one epoch: the engine's setup and its
    checkpoint at the end are left out.

    - cached: the pairs as ``prepare_align`` builds them: the frozen tower's features and
      the reference log-probs computed once, before training.
    - live: the same pairs read from their image files, the policy's frozen tower run on
      them every step, and a frozen copy of the starting checkpoint kept in memory to
      score them every step (:class:`LiveReference`).

    Returns:
        ``align_samples_per_s`` (cached), ``align_live_samples_per_s``, ``align_cache_speedup``
        (their ratio) and ``cache_build_s``, the one-time cost of both caches over the
        training pairs, which the cached rate leaves out.

    Raises:
        ConfigError: when the settings cache nothing (``align.freeze_vision`` off or
            ``align.reference`` none), or their pairs cannot fill ``steps`` steps in one epoch.
    """
    if not settings.align.freeze_vision or settings.align.reference != "checkpoint":
        raise ConfigError("align_step_speed needs align.freeze_vision and align.reference = checkpoint: "
                          "otherwise align caches nothing")
    if steps < 2:
        raise ConfigError("align_step_speed needs at least 2 steps: the first one warms up")
    with tempfile.TemporaryDirectory(prefix="capcli-speed-") as tmp:
        settings = override(settings, {"align.engine.output": Path(tmp) / "prepare", "align.engine.max_steps": steps,
                                       "align.engine.resume": False, "runtime.quiet": True})
        phase = prepare_align(settings, overwrite=True)
        engine, model, cached = settings.align.engine, phase.model, phase.data.train
        per_step = engine.batch_size * engine.grad_accum
        if len(cached) < steps * per_step:
            raise ConfigError(f"{len(cached)} training pairs cannot fill {steps} steps of {per_step} in one epoch")
        device = next(model.parameters()).device
        reference = Captioner.from_pretrained(phase.start, device).eval().requires_grad_(False)
        live = PreferenceDataset(cached.pairs, model.image_size, settings.data.max_pixels)
        runs = [
            partial(_seconds, partial(_build_caches, model, cached.pairs, phase.data.collate, settings)),
            partial(_step_seconds, model, phase.objective, replace(phase.data, val=None), settings, Path(tmp) / "c"),
            partial(_step_seconds, model, LiveReference(phase.objective, reference, settings.align.length_normalize),
                    replace(phase.data, train=live, val=None), settings, Path(tmp) / "l"),
        ]
        build_s, cached_s, live_s = _medians(runs, repeats)
    return {"align_samples_per_s": per_step / cached_s, "align_live_samples_per_s": per_step / live_s,
            "align_cache_speedup": live_s / cached_s, "cache_build_s": build_s}


def _build_caches(model: Captioner, pairs, collate, settings: Settings) -> None:
    """Both align caches over ``pairs``, as ``prepare_align`` builds them (the result is dropped)."""
    device = next(model.parameters()).device
    autocast = autocast_context(device, resolve_precision(settings.runtime.precision, device))
    batch, max_pixels = settings.align.engine.batch_size, settings.data.max_pixels
    pairs, features, index = frozen_features(model, pairs, max_pixels, device, autocast, batch)
    data = PreferenceDataset(pairs, model.image_size, max_pixels, features, index)
    score = partial(score_pairs, length_normalize=settings.align.length_normalize)
    pair_logps(model, data, collate, score, device, autocast, batch)


def _step_seconds(model: Captioner, objective: Objective, data: TrainData, settings: Settings, output: Path) -> float:
    """Mean seconds of one optimizer step in an ``engine.fit`` run, over steps 2 to the last."""
    stamps: list[float] = []
    a = settings.align
    fit(model, objective, data, a.engine.model_copy(update={"output": output}), a.optimizer, settings.runtime,
        title="speed", on_step=lambda step, losses: stamps.append(time.perf_counter()))
    return (stamps[-1] - stamps[0]) / (len(stamps) - 1)


# --- python -m capcli.speed ----------------------------------------------------------------------------------------


def measure(checkpoint: Path, images: int = 16, beams: int = 5, steps: int = 5, repeats: int = 3,
            device: str = "auto") -> dict[str, float | int | str]:
    """Decoding and align-step speed of a checkpoint on synthetic scenes, with what they ran on.

    Decoding takes ``images`` test scenes in one batch (``capcli caption``'s default batch is
    16); align takes just enough generated pairs to fill ``steps`` steps of the checkpoint's
    align settings (the tiny preset: 32 × 2 pairs a step).
    """
    settings = load_settings(cli={"align.checkpoint": checkpoint, "runtime.device": device})
    per_step = settings.align.engine.batch_size * settings.align.engine.grad_accum
    settings = override(settings, {"data.train_size": math.ceil(1.1 * steps * per_step / PAIRS_PER_IMAGE),
                                   "data.val_size": 8, "data.test_size": images})
    model = Captioner.from_pretrained(resolve_checkpoint(checkpoint, "best"), resolve_device(device)).eval()
    scenes = CaptionDataset(load_splits(settings.data)["test"], model.image_size, settings.data.max_pixels)
    pixels = torch.stack([scenes[(i, 0)].pixels for i in range(min(images, len(scenes)))])
    context = {"device": str(model.pixel_mean.device), "torch_threads": torch.get_num_threads(),
               "images": len(pixels), "align_samples_per_step": per_step, "align_steps": steps, "repeats": repeats}
    return {**context, **decode_speed(model, pixels, beams, repeats), **align_step_speed(settings, steps, repeats)}


def main(argv: list[str] | None = None) -> int:
    """``python -m capcli.speed``: a table (or ``--json``) on stdout; exit 0, or 1/2 with ``error: ...`` on stderr."""
    parser = argparse.ArgumentParser(prog="python -m capcli.speed", description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="a checkpoint or run directory")
    parser.add_argument("--json", action="store_true", help="print one JSON document")
    parser.add_argument("--images", type=int, default=16, help="images decoded in one batch (default 16)")
    parser.add_argument("--beams", type=int, default=5, help="beam width of both decoders (default 5)")
    parser.add_argument("--steps", type=int, default=5, help="align optimizer steps per timed run (default 5)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the median counts")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    args = parser.parse_args(argv)
    try:
        results = measure(args.checkpoint, args.images, args.beams, args.steps, args.repeats, args.device)
    except CapcliError as err:
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"speed: {args.checkpoint} (median of {args.repeats})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    for key, value in results.items():
        table.add_row(key, f"{value:.3g}" if isinstance(value, float) else str(value))
    Console(highlight=False).print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
