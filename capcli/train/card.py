"""Model cards: the ``README.md`` of every checkpoint, in the Hugging Face model-card format.

The card is YAML front matter (license, base models, datasets, metrics, ``model-index``, and a
``capcli`` block with the architecture, settings, data and training counters), then prose
rendered from that front matter alone. A training phase writes it into each checkpoint
(:func:`write_card`, called by the engine on the checkpoint's temporary folder, so it is
swapped in with the weights); ``capcli evaluate`` adds its results (:func:`add_evaluation`).
Reading a card back is :func:`read_card`.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from capcli import __version__
from capcli.data.carve import RECORD_FILE
from capcli.settings import Settings, to_yaml
from capcli.train.runlog import METRICS_FILE, read_metrics

CARD_FILE = "README.md"
CONFIG_FILE = "model.json"
LICENSE = "mit"  # the project's licence; the pretrained parts it can start from (CLIP, GPT-2) are MIT too
# open_clip's ViT-B-32 tags → their weights on the Hugging Face hub, for `base_model`.
VISION_HUB_IDS = {"openai": "timm/vit_base_patch32_clip_224.openai",
                  "laion2b_s34b_b79k": "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"}
# Headline metrics, in the order a reader looks for them; others stay in the capcli block.
HEADLINE = ("cider_d", "bleu_4", "meteor", "rouge_l", "clip_score", "clip_score_self", "grounding_chair_s",
            "preference_accuracy", "win_rate")


def describer(settings: Settings, phase: str, run_dir: Path,
              start: Path | None = None) -> Callable[[Path, dict[str, Any]], None]:
    """What a phase hands ``engine.fit`` as ``describe``: each checkpoint gets the run's resolved
    settings (``config.yaml``, whose ``data`` group evaluate and align follow) and its model card."""

    def describe(directory: Path, state: dict[str, Any]) -> None:
        (directory / RECORD_FILE).write_text(to_yaml(settings), encoding="utf-8")
        write_card(directory, card_metadata(settings, phase, directory, state, training_seconds(run_dir), start))

    return describe


def training_seconds(run_dir: Path) -> float | None:
    """Wall-clock seconds from the run's first logged line to its last (None before the first)."""
    path = Path(run_dir) / METRICS_FILE
    times = [r["time"] for r in read_metrics(path) if "time" in r] if path.is_file() else []
    return times[-1] - times[0] if len(times) > 1 else None


def card_metadata(settings: Settings, phase: str, checkpoint: Path, state: dict[str, Any],
                  training_seconds: float | None, start: Path | None = None) -> dict[str, Any]:
    """The front matter of a freshly trained checkpoint (before any evaluation)."""
    model = json.loads((Path(checkpoint) / CONFIG_FILE).read_text(encoding="utf-8"))
    engine = getattr(settings, phase).engine
    optimizer = getattr(settings, phase).optimizer
    data = settings.data
    meta: dict[str, Any] = {
        "license": LICENSE,
        "library_name": "capcli",
        "pipeline_tag": "image-to-text",
        "tags": ["image-captioning", "clip", "gpt2", "capcli", phase],
    }
    base = _base_models(settings, model)
    if base:
        meta["base_model"] = base
    if data.source.startswith("hf:"):
        meta["datasets"] = [data.source[3:].partition(":")[0]]
    meta["capcli"] = {
        "version": __version__,
        "phase": phase,
        "architecture": {key: model.get(key) for key in ("preset", "embed_dim", "prefix_mapper", "prefix_length",
                                                         "concept_source", "concept_tags")}
                        | {"concept_words": len(model.get("concept_words") or [])},
        "settings": {"epochs": engine.epochs, "max_steps": engine.max_steps, "batch_size": engine.batch_size,
                     "grad_accum": engine.grad_accum, "lr": optimizer.lr, "seed": settings.runtime.seed},
        "data": data.model_dump(mode="json", include={"source", "seed", "train_size", "val_size", "test_size",
                                                      "train_split", "image_column", "caption_column"}),
        "training": {"step": int(state.get("step", 0)), "epoch": int(state.get("epoch", 0)),
                     "samples": int(state.get("samples", 0)),
                     "best_val_loss": _number(state.get("best_val_loss")),
                     "seconds": None if training_seconds is None else round(training_seconds, 1)},
        "evaluations": [],
    }
    if start is not None:
        meta["capcli"]["start_checkpoint"] = str(start)
    return meta


def write_card(directory: Path, meta: dict[str, Any]) -> Path:
    """Write ``README.md`` (front matter and prose) into ``directory``, atomically."""
    path = Path(directory) / CARD_FILE
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".card-", suffix=".md")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(render(meta))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_card(directory: Path) -> dict[str, Any] | None:
    """The front matter of a checkpoint's card, or None when it has none."""
    path = Path(directory) / CARD_FILE
    if not path.is_file():
        return None
    text = path.read_text(encoding="utf-8")
    if not text.startswith("---\n"):
        return None
    front, _, _ = text[4:].partition("\n---\n")
    meta = yaml.safe_load(front)
    return meta if isinstance(meta, dict) else None


def add_evaluation(checkpoint: Path, results: dict[str, Any]) -> Path:
    """Add ``capcli evaluate``'s results to the checkpoint's card (one entry per split, data and
    decoding: evaluating again replaces it). A checkpoint without a card gets one from its
    ``model.json``."""
    checkpoint = Path(checkpoint)
    meta = read_card(checkpoint) or _bare_card(checkpoint)
    entry = {
        "split": results["split"], "n": results["n"], "data": results["data"], "carve": results.get("carve"),
        "train_overlap": results.get("train_overlap"), "judge": results["judge"], "tokenizer": results["tokenizer"],
        "decoding": results["decoding"],
        "metrics": {name: {k: _number(v) for k, v in m.items()} for name, m in results["metrics"].items()},
    }
    block = meta.setdefault("capcli", {})
    key = (entry["split"], entry["data"], json.dumps(entry["decoding"], sort_keys=True))
    kept = [e for e in block.get("evaluations") or []
            if (e.get("split"), e.get("data"), json.dumps(e.get("decoding"), sort_keys=True)) != key]
    block["evaluations"] = [*kept, entry]
    _index(meta)
    return write_card(checkpoint, meta)


def _index(meta: dict[str, Any]) -> None:
    """``metrics`` and ``model-index``, the hub's fields, from the capcli block's evaluations."""
    evaluations = meta.get("capcli", {}).get("evaluations") or []
    names = sorted({name for e in evaluations for name in e["metrics"] if name in HEADLINE}, key=HEADLINE.index)
    if not evaluations:
        return
    meta["metrics"] = names
    meta["model-index"] = [{
        "name": meta.get("capcli", {}).get("name", "capcli-captioner"),
        "results": [{
            "task": {"type": "image-to-text", "name": "Image Captioning"},
            "dataset": {"name": e["data"], "type": e["data"], "split": e["split"]},
            "metrics": [{"type": name, "name": name, "value": e["metrics"][name]["value"]}
                        for name in names if name in e["metrics"] and e["metrics"][name]["value"] is not None],
        } for e in evaluations],
    }]


def _bare_card(checkpoint: Path) -> dict[str, Any]:
    """A card for a checkpoint written before cards: what its ``model.json`` says."""
    model = json.loads((checkpoint / CONFIG_FILE).read_text(encoding="utf-8"))
    return {"license": LICENSE, "library_name": "capcli", "pipeline_tag": "image-to-text",
            "tags": ["image-captioning", "capcli"],
            "capcli": {"version": __version__,
                       "architecture": {key: model.get(key) for key in ("preset", "embed_dim", "prefix_mapper",
                                                                        "prefix_length", "concept_source",
                                                                        "concept_tags")},
                       "evaluations": []}}


def _base_models(settings: Settings, model: dict[str, Any]) -> list[str]:
    if model.get("preset") != "clip-gpt2":
        return []  # tiny: trained from scratch
    base = []
    tag = settings.model.vision_weights or "openai"
    if tag in VISION_HUB_IDS:
        base.append(VISION_HUB_IDS[tag])
    decoder = settings.model.decoder or "gpt2"
    if not Path(decoder).exists():  # a hub name, not a local folder
        base.append(decoder)
    return base


def _number(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def render(meta: dict[str, Any]) -> str:
    """The whole card: front matter, then prose from it."""
    block = meta.get("capcli", {})
    arch, settings, data, training = (block.get(k) or {} for k in ("architecture", "settings", "data", "training"))
    lines = ["---", yaml.safe_dump(meta, sort_keys=False, allow_unicode=True).rstrip(), "---", "",
             f"# capcli captioner ({arch.get('preset', '?')}, {block.get('phase', 'checkpoint')})", "",
             ("An image captioner trained with capcli: a CLIP-style vision tower, a prefix mapper and a GPT-2 "
              "decoder, trained with a contrastive (InfoNCE) and a captioning loss, then optionally aligned with "
              "a preference loss."), "",
             "```python", "import capcli", "", 'captioner = capcli.load("path/to/this/checkpoint")',
             'print(captioner.caption("photo.jpg").text)', "```", "", "## Architecture", ""]
    lines += [f"- {key.replace('_', ' ')}: {value}" for key, value in arch.items()]
    if meta.get("base_model"):
        lines += [f"- base models: {', '.join(meta['base_model'])}"]
    if settings:
        lines += ["", "## Settings", ""] + [f"- {key.replace('_', ' ')}: {value}" for key, value in settings.items()]
    if data:
        lines += ["", "## Data", "", (f"Source `{data.get('source')}`, seed {data.get('seed')}: at most "
                                      f"{data.get('train_size')} training, {data.get('val_size')} validation and "
                                      f"{data.get('test_size')} test images. A source without held-out splits has "
                                      "them carved by the seed and the sizes; `capcli evaluate` on this checkpoint "
                                      "uses the same carve.")]
    if training:
        seconds = training.get("seconds")
        best = training.get("best_val_loss")
        lines += ["", "## Training", "", (f"{training.get('step')} optimizer steps, {training.get('epoch')} epochs, "
                                          f"{training.get('samples')} samples")
                  + (f", {seconds} s" if seconds is not None else "")
                  + (f"; best validation loss {best:.4f}" if isinstance(best, (int, float)) else "") + "."]
    for e in block.get("evaluations") or []:
        lines += ["", f"## Evaluation: {e['data']} {e['split']} (n={e['n']})", "",
                  (f"Judge `{e['judge']}`, tokenizer {e['tokenizer']}, beams {e['decoding'].get('beams')}; "
                   f"carve: {e.get('carve')}; training images in the split: {e.get('train_overlap')}."), "",
                  "| metric | value | 95% interval |", "|---|---|---|"]
        for name, m in e["metrics"].items():
            if m.get("value") is None:
                continue
            lines.append(f"| {name} | {m['value']:.4f} | {_fmt(m.get('low'))} – {_fmt(m.get('high'))} |")
    return "\n".join(lines) + "\n"


def _fmt(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}"
