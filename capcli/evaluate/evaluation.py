"""``capcli evaluate``: a checkpoint's captions on one split, and every metric with a 95% interval.

The pipeline (DESIGN §6): load the split → decode every image (batched search, KV cache) →
caption metrics against the references (pycocoevalcap) → CLIP score and RefCLIPScore by a
judge → preference accuracy on held-out pairs generated from the split → win rate against
a baseline's captions (or shuffled captions) → grounding against the scene graphs where
the data has them. Each number gets a percentile bootstrap interval over images.
"""

from __future__ import annotations

import importlib.metadata
import json
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import datasets
import numpy as np
import torch

from capcli import __version__, faults
from capcli.data.batches import (
    PreferenceCollator,
    PreferenceDataset,
    load_image_field,
)
from capcli.data.carve import CARVE_KEYS, carve_changes, train_overlap
from capcli.data.images import ImageLoadError, resize_center_crop
from capcli.data.preferences import generate_pairs
from capcli.data.sources import load_splits
from capcli.errors import ConfigError, DataError
from capcli.evaluate.judge import load_judge
from capcli.metrics import (
    bootstrap_interval,
    caption_intervals,
    caption_metrics,
    clip_score,
    grounding_intervals,
    grounding_metrics,
    pairwise_outcomes,
    preference_accuracy,
    ref_clip_score,
)
from capcli.model import Captioner
from capcli.model.generation import generate_captions
from capcli.objectives import score_pairs
from capcli.phases.caches import pair_logps
from capcli.settings import DataSettings, EvaluateSettings, Settings
from capcli.train.checkpoint import resolve_checkpoint
from capcli.train.runtime import Runtime


def evaluate(settings: Settings, checkpoint: Path, trained_on: DataSettings | None = None,
             log: Callable[[str], None] = print) -> dict[str, Any]:
    """Evaluate ``checkpoint`` on ``settings.evaluate.split``; returns the results document.

    What is evaluated and how is ``settings.evaluate``. ``trained_on`` is the data settings
    recorded with the checkpoint's run: its training split is checked against the evaluated
    images. None: not recorded, and the given settings' own training split is checked.
    """
    options = settings.evaluate
    baseline = resolve_checkpoint(options.baseline) if options.baseline is not None else None  # fails early
    runtime = Runtime.from_settings(settings.runtime)
    model = Captioner.from_pretrained(checkpoint, runtime.device).eval()
    judge = load_judge(options.judge, model, checkpoint, runtime.device, settings.data.max_pixels,
                       settings.data.max_caption_tokens)
    rows, pixels, skipped, overlap = _load_split(settings, trained_on, model.image_size)
    log(f"evaluate: captioning {len(rows)} {options.split} images with beams={options.decode.beams}")
    with runtime.autocast():
        predictions = _decode(model, pixels, options)
    references = [list(captions) for captions in rows["captions"]]

    results = _Results(options.resamples, settings.runtime.seed)
    scores = _caption_scores(results, predictions, references)
    image_emb, clip = _clip_scores(results, judge, rows, predictions, references, runtime, options.batch_size)
    win = _win_rate(results, judge, image_emb, clip, predictions, pixels, baseline, runtime, options)
    _preference(results, model, rows, settings, runtime)
    grounding = None
    if "scene" in rows.column_names:
        grounding = grounding_metrics(predictions, list(rows["scene"]))
        for name, interval in grounding_intervals(grounding, results.resamples, seed=results.seed).items():
            results.put(f"grounding_{name}", grounding.corpus[name], interval)

    if options.save_captions is not None:
        _save_captions(options.save_captions, rows, predictions, references, {f"clip_score{judge.suffix}": clip},
                       scores, grounding)
    if options.report is not None:
        page = _gallery(options, checkpoint, pixels, predictions, references, scores, clip, grounding,
                        win if baseline is not None else None, results.metrics)
        log(f"gallery written to {page}")

    return {
        "checkpoint": str(checkpoint),
        "split": options.split,
        "n": len(rows),
        "skipped_images": skipped,
        "data": settings.data.source,
        "data_settings": {key: getattr(settings.data, key) for key in CARVE_KEYS},
        "carve": _carve_note(settings.data, trained_on),
        "train_overlap": overlap,
        "tokenizer": scores.tokenizer,
        "judge": judge.name,
        "baseline": win.name,
        "decoding": options.decode.model_dump(),
        "bootstrap": {"resamples": options.resamples, "confidence": 0.95, "seed": results.seed},
        "metrics": results.metrics,
        "skipped_metrics": scores.skipped,
        "notes": scores.notes,
        "versions": _versions(),
    }


# --- the metrics ----------------------------------------------------------------------------------------------------


class _Results:
    """The metrics of the results document, each with its 95% percentile bootstrap interval over images."""

    def __init__(self, resamples: int, seed: int) -> None:
        self.resamples, self.seed = resamples, seed
        self.metrics: dict[str, dict[str, float | None]] = {}

    def put(self, name: str, value: float, interval: tuple[float, float]) -> None:
        self.metrics[name] = {"value": _clean(value), "low": _clean(interval[0]), "high": _clean(interval[1])}

    def mean(self, name: str, per_image: np.ndarray) -> None:
        """The mean of per-image values, and its interval."""
        self.put(name, float(per_image.mean()), bootstrap_interval(per_image, self.resamples, seed=self.seed))


def _caption_scores(results: _Results, predictions: list[str], references: list[list[str]]):
    """BLEU, METEOR, ROUGE-L, CIDEr-D... against the references (pycocoevalcap), and the lengths."""
    scores = caption_metrics(dict(enumerate(predictions)), dict(enumerate(references)))
    for name, interval in caption_intervals(scores, results.resamples, seed=results.seed).items():
        results.put(name, scores.corpus[name], interval)
    # Length in words beside the grounding rates: an emptier caption must not pass for a better one.
    results.mean("caption_length", np.asarray([len(p.split()) for p in predictions], dtype=float))
    results.mean("reference_length", np.asarray([np.mean([len(r.split()) for r in refs]) for refs in references],
                                                dtype=float))
    return scores


def _clip_scores(results: _Results, judge, rows, predictions: list[str], references: list[list[str]],
                 runtime: Runtime, batch_size: int) -> tuple[torch.Tensor, np.ndarray]:
    """CLIP score and RefCLIPScore by the judge; returns the image embeddings and the per-image CLIP scores."""
    with runtime.autocast():  # the judge's towers; the scores themselves in full precision
        image_emb = _batched(judge.embed_images, list(rows["image"]), batch_size)
        cand_emb = _batched(judge.embed_texts, predictions, batch_size)
        ref_emb = _batched(judge.embed_texts, [r for refs in references for r in refs], batch_size)
    clip = clip_score(image_emb, cand_emb).cpu().numpy()
    results.mean(f"clip_score{judge.suffix}", clip)
    ref_sets = torch.split(ref_emb, [len(r) for r in references])
    results.mean(f"ref_clip_score{judge.suffix}", ref_clip_score(image_emb, cand_emb, ref_sets).cpu().numpy())
    return image_emb, clip


@dataclass
class _Baseline:
    name: str
    captions: list[str]
    clip: np.ndarray


def _win_rate(results: _Results, judge, image_emb: torch.Tensor, clip: np.ndarray, predictions: list[str],
              pixels: torch.Tensor, baseline: Path | None, runtime: Runtime, options: EvaluateSettings) -> _Baseline:
    """The judge's CLIP score of our caption against the baseline's, per image: a checkpoint's captions,
    or our own shuffled (each image gets another image's caption)."""
    if baseline is not None:
        baseline_model = Captioner.from_pretrained(baseline, runtime.device).eval()
        with runtime.autocast():
            captions = _decode(baseline_model, pixels, options)
        del baseline_model
        name = f"checkpoint:{baseline}"
    else:
        captions = _shuffled(predictions, results.seed)
        name = "shuffled captions (each image gets another image's generated caption)"
    with runtime.autocast():
        baseline_emb = _batched(judge.embed_texts, captions, options.batch_size)
    baseline_clip = clip_score(image_emb, baseline_emb).cpu().numpy()
    results.mean("win_rate", pairwise_outcomes(clip, baseline_clip, tie=0.5))
    return _Baseline(name, captions, baseline_clip)


def _preference(results: _Results, model: Captioner, rows, settings: Settings, runtime: Runtime) -> None:
    """Preference accuracy: the model's log-probs rank the true caption over its corruption, in all and by kind."""
    pairs = generate_pairs(rows, results.seed, f"evaluate-{settings.evaluate.split}")
    if not len(pairs):
        return
    ranked, kinds = _preference_outcomes(model, pairs, settings, runtime, settings.evaluate.batch_size)
    results.mean("preference_accuracy", ranked)
    # By kind: relation pairs ask whether the model knows where things are, which its captions may never say.
    for kind in sorted(set(kinds)):
        results.mean(f"preference_accuracy_{kind}", ranked[kinds == kind])


def _gallery(options: EvaluateSettings, checkpoint: Path, pixels: torch.Tensor, predictions: list[str],
             references: list[list[str]], scores, clip: np.ndarray, grounding, baseline: _Baseline | None,
             metrics: dict[str, dict[str, float | None]]) -> Path:
    """The self-contained HTML page of every image with its caption, references, scores and errors."""
    from capcli.evaluate.gallery import GalleryRow, write_gallery

    gallery = [GalleryRow(pixels[i], predictions[i], references[i], float(scores.per_image["cider_d"][i]),
                          float(clip[i]), grounding.errors[i] if grounding is not None else [],
                          baseline.captions[i] if baseline is not None else None,
                          float(baseline.clip[i]) if baseline is not None else None)
               for i in range(len(predictions))]
    summary = {name: value["value"] for name, value in metrics.items() if not name.startswith("grounding_")}
    return write_gallery(options.report, gallery,
                         f"capcli evaluate: {checkpoint} on {options.split} (n={len(predictions)})", summary)


# --- the steps ----------------------------------------------------------------------------------------------------


def _load_split(settings: Settings, trained_on: DataSettings | None, image_size: int):
    options = settings.evaluate
    splits = load_splits(settings.data)
    rows = splits.get(options.split)
    if isinstance(rows, datasets.IterableDataset):
        raise ConfigError(f"'{options.split}' is streamed (data.streaming): evaluate reads a whole split; "
                          f"use --split val or test, which a streamed source keeps in memory")
    if rows is None or len(rows) == 0:
        have = [name for name, s in splits.items() if isinstance(s, datasets.IterableDataset) or len(s)]
        raise ConfigError(f"data source '{settings.data.source}' has no '{options.split}' split "
                          f"(it has: {', '.join(have)})")
    if options.limit is not None:
        rows = rows.select(range(min(options.limit, len(rows))))
    overlap = _checked_overlap(settings, trained_on, splits, rows)
    images, keep = [], []
    for i, value in enumerate(rows["image"]):
        try:
            images.append(resize_center_crop(load_image_field(value, settings.data.max_pixels), image_size))
            keep.append(i)
        except ImageLoadError as err:
            print(f"warning: skipping unreadable image: {err}", file=sys.stderr)
    if not images:
        raise DataError(f"no readable image in the '{options.split}' split")
    skipped = len(rows) - len(keep)
    if skipped:
        rows = rows.select(keep)
    return rows, torch.stack(images), skipped, overlap


def _carve_note(data: DataSettings, trained_on: DataSettings | None) -> str:
    """Whose carve the split is: the run's, another (and how), or unknown (nothing recorded)."""
    if trained_on is None:
        return "not recorded with the checkpoint"
    changes = carve_changes(trained_on, data)
    return f"changed: {'; '.join(changes)}" if changes else "the run's"


def _checked_overlap(settings: Settings, trained_on: DataSettings | None, splits, rows) -> int | None:
    """How many evaluated images the run trained on; a held-out split holding any is refused unless allowed.

    None where it cannot be known: a streamed training split (a stream is never carved), or
    the run's recorded data that can no longer be read.
    """
    options = settings.evaluate
    train = splits.get("train")
    if trained_on is not None and carve_changes(trained_on, settings.data):
        try:
            train = load_splits(trained_on).get("train")
        except (ConfigError, DataError) as err:
            print(f"warning: cannot read the run's training data to check the split against it ({err})",
                  file=sys.stderr)
            return None
    if train is None or isinstance(train, datasets.IterableDataset):
        return None
    overlap = train_overlap(train["image"], rows["image"])
    if overlap and options.split != "train" and not options.allow_train_images:
        raise ConfigError(f"the {options.split} split holds {overlap} of the {len(rows)} images evaluated that the "
                          f"run trained on ({_carve_note(settings.data, trained_on)}); evaluate on the run's own "
                          f"carve (drop the data options that change it), or pass --allow-train-images to score "
                          f"them anyway")
    return overlap


def _decode(model: Captioner, pixels: torch.Tensor, options: EvaluateSettings) -> list[str]:
    out: list[str] = []
    for start in range(0, len(pixels), options.batch_size):
        out += generate_captions(model, pixels[start : start + options.batch_size], options.decode)
    return out


def _batched(embed: Callable[[list[Any]], torch.Tensor], items: list[Any], batch_size: int) -> torch.Tensor:
    return torch.cat([embed(items[s : s + batch_size]) for s in range(0, len(items), batch_size)])


def _shuffled(captions: list[str], seed: int) -> list[str]:
    """A seeded derangement: every image gets a caption generated for another image."""
    if len(captions) < 2:
        return list(captions)
    order = list(range(len(captions)))
    random.Random(seed).shuffle(order)
    shifted = [0] * len(captions)
    for k, i in enumerate(order):  # each image takes the caption of the next image in a random cycle
        shifted[i] = order[(k + 1) % len(order)]
    return [captions[shifted[i]] for i in range(len(captions))]


def _preference_outcomes(model, pairs, settings, runtime, batch_size) -> tuple[np.ndarray, np.ndarray]:
    """Per pair, 1 where log p(chosen | image) > log p(rejected | image), else 0 (ties are wrong); and its kind."""
    data = PreferenceDataset(pairs, model.image_size, settings.data.max_pixels)
    collate = PreferenceCollator(model.tokenizer, settings.data.max_caption_tokens)
    logps = pair_logps(model, data, collate, score_pairs, runtime, batch_size)
    read = ~logps.isnan().any(dim=1)  # pairs whose image could not be read are left out
    kinds = np.asarray(pairs["corruption"], dtype=object)[read.numpy()]
    return preference_accuracy(logps[read, 0], logps[read, 1], tie=0.0, reduction="none").numpy(), kinds


def _save_captions(path: Path, rows, predictions, references, judged: dict[str, np.ndarray], scores,
                   grounding) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        faults.point("results.write", path)
        with path.open("w", encoding="utf-8") as f:
            for i, caption in enumerate(predictions):
                image = rows[i]["image"]
                record = {"image": image.get("path") if isinstance(image, dict) else str(image), "caption": caption,
                          "references": references[i], **{k: float(v[i]) for k, v in judged.items()},
                          "cider_d": float(scores.per_image["cider_d"][i])}
                if grounding is not None:
                    record["grounding_errors"] = grounding.errors[i]
                f.write(json.dumps(record) + "\n")
    except OSError as err:  # a full disk or a forbidden folder: the CLI's one line names the file
        raise OSError(err.errno, err.strerror, str(path)) from err


def _clean(value: float) -> float | None:
    """JSON has no NaN: a metric with nothing to measure is null."""
    value = float(value)
    return None if np.isnan(value) else value


def _versions() -> dict[str, str]:
    versions = {"capcli": __version__}
    for package in ("torch", "transformers", "open_clip_torch", "pycocoevalcap", "datasets"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions
