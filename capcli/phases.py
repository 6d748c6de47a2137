"""The training phases: each wires settings, data, model and objective into ``engine.fit``.

Nothing here loops over data; a phase only decides *what* is trained (DESIGN §2).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets
import torch

from capcli import distributed
from capcli.caches import frozen_features, pair_logps
from capcli.checkpoint import resolve_checkpoint
from capcli.data.batches import (
    CaptionCollator,
    CaptionDataset,
    PreferenceCollator,
    PreferenceDataset,
    StreamingCaptions,
    caption_dataset,
)
from capcli.data.concepts import caption_words
from capcli.data.preferences import load_preferences
from capcli.data.sources import concept_words, load_splits
from capcli.engine import FitResult, Objective, TrainData, fit
from capcli.errors import ConfigError
from capcli.heldout import heldout_metrics
from capcli.model import Captioner, build_model
from capcli.objectives import AlignObjective, PretrainObjective, score_pairs
from capcli.precision import autocast_context, resolve_device, resolve_precision
from capcli.settings import EngineSettings, Settings, to_yaml


def prepare_run_dir(engine: EngineSettings, overwrite: bool = False) -> Path:
    """Refuse to train over an existing run unless told to resume or overwrite: nothing is lost silently."""
    run_dir = Path(engine.output)
    if engine.resume:
        resolve_checkpoint(run_dir, "last")  # fail now, before any data is loaded, if there is nothing to resume
    elif (run_dir / "checkpoints").exists() and not overwrite:
        raise ConfigError(f"{run_dir} already holds a run; pass --resume to continue it, "
                          f"--overwrite to start it again, or --output DIR for a new one")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class Phase:
    """Everything ``engine.fit`` needs for one phase, before any training."""

    model: Captioner
    objective: Objective
    data: TrainData


@dataclass
class AlignPhase(Phase):
    """Align's phase, plus what it needs around training: where it started, and how to measure."""

    start: Path
    measure: Callable[[Captioner], dict[str, float]]  # the held-out numbers of a model (heldout.py)
    pairs: str  # the one-line summary of the preference pairs


TOKENIZER_ROWS = 20_000  # a streamed source: the tiny preset's tokenizer learns from this many first rows


def _write_config(run_dir: Path, settings: Settings) -> None:
    """The run's resolved settings, ``config.yaml`` (rank 0 writes it)."""
    if distributed.current().main:
        (run_dir / "config.yaml").write_text(to_yaml(settings), encoding="utf-8")


def prepare_pretrain(settings: Settings, overwrite: bool = False) -> Phase:
    """Phase 1's model, objective and data; writes the run's ``config.yaml``."""
    phase = settings.pretrain
    run_dir = prepare_run_dir(phase.engine, overwrite)
    distributed.setup(resolve_device(settings.runtime.device))  # under torchrun: join now, so that...
    with distributed.main_first():  # ...rank 0 alone materialises the data, and the others read it
        splits = load_splits(settings.data)
    torch.manual_seed(settings.runtime.seed)
    if phase.engine.resume:
        # Architecture and tokenizer only: the engine's resume loads the weights with the rest of the state.
        model = Captioner.from_pretrained(resolve_checkpoint(run_dir, "last"), weights=False)
    else:
        train = splits["train"]
        if isinstance(train, datasets.IterableDataset):  # a stream: the tokenizer learns from its head's captions
            train = train.select_columns(["captions"]).take(TOKENIZER_ROWS)
        model = build_model(settings.model, (c for row in train for c in row["captions"]),
                            concept_words_for(settings, (row["captions"] for row in train)))
    _write_config(run_dir, settings)
    words = tuple(model.config.concept_words) if phase.concept_weight else ()
    if phase.concept_weight and not words and distributed.current().main:
        print(f"warning: pretrain.concept_weight is {phase.concept_weight:g} but the model has no concept words "
              f"(data source '{settings.data.source}' names none, or the resumed run had none): no concept loss; "
              "set model.concept_words to train one, or pretrain.concept_weight 0", file=sys.stderr)

    def dataset(name: str) -> CaptionDataset | StreamingCaptions | None:
        if name not in splits:
            return None
        if isinstance(splits[name], datasets.IterableDataset):
            return StreamingCaptions(splits[name], settings.data.train_size, model.image_size,
                                     settings.data.max_pixels, settings.runtime.seed)
        return caption_dataset(splits[name], model.image_size, settings.data)

    data = TrainData(
        train=dataset("train"), val=dataset("val"),
        collate=CaptionCollator(model.tokenizer, settings.data.max_caption_tokens, words),
        num_workers=settings.data.num_workers, max_bad_fraction=settings.data.max_bad_fraction,
    )
    objective = PretrainObjective(phase.contrastive_weight, phase.caption_weight, settings.runtime.local_loss,
                                  phase.concept_weight, phase.token_dropout)
    return Phase(model, objective, data)


def concept_words_for(settings: Settings, captions: Iterable[Sequence[str]] = ()) -> tuple[str, ...]:
    """A new model's concept words: none without the concept loss, else the settings', else the source's
    own, else the most common content words of ``captions``, the training images' captions."""
    if not settings.pretrain.concept_weight:
        return ()
    if settings.model.concept_words is not None:
        return tuple(word.lower() for word in settings.model.concept_words)
    return concept_words(settings.data.source) or caption_words(captions)


def pretrain(settings: Settings, overwrite: bool = False,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Phase 1: contrastive + captioning loss on image-caption pairs."""
    run = prepare_pretrain(settings, overwrite)
    phase = settings.pretrain
    result = fit(run.model, run.objective, run.data, phase.engine, phase.optimizer, settings.runtime,
                 title="pretrain", on_step=on_step)
    _draw_curves(result.run_dir)
    return result


def _draw_curves(run_dir: Path) -> None:
    """``curves.png`` at the end of a phase (rank 0). A plot that fails is a warning, never a failed run."""
    if not distributed.current().main:
        return
    try:
        from capcli.report import write_curves

        write_curves([run_dir])
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say why there is no picture
        print(f"warning: no curves.png for {run_dir} ({type(err).__name__}: {err})", file=sys.stderr)


DEFAULT_START = Path("runs/pretrain")


def prepare_align(settings: Settings, overwrite: bool = False) -> AlignPhase:
    """Phase 2's model (the starting checkpoint), objective, pairs and caches; writes ``config.yaml``.

    The starting checkpoint is also the reference model: its log-probs of every pair are
    computed here, once, and so are the frozen tower's features. On ``--resume`` the
    caches are rebuilt from the same starting checkpoint, then the engine loads the
    run's last weights over it.
    """
    phase = settings.align
    run_dir = prepare_run_dir(phase.engine, overwrite)
    if settings.data.streaming:
        raise ConfigError("align reads its preference pairs whole: data.streaming applies to pretrain only")
    start = resolve_checkpoint(phase.checkpoint or DEFAULT_START, "best")
    world, device = distributed.setup(resolve_device(settings.runtime.device))
    autocast = autocast_context(device, resolve_precision(settings.runtime.precision, device))
    model = Captioner.from_pretrained(start, device)
    with distributed.main_first():
        caption_splits = load_splits(settings.data)
        pairs, report = load_preferences(phase.preferences, settings.data, caption_splits, phase.pairs_per_image)
    if world.main:
        print(report.summary(), file=sys.stderr)
    _write_config(run_dir, settings)
    if phase.freeze_vision:
        model.freeze_vision()

    objective = AlignObjective(phase.beta, phase.margin, phase.alpha_init, phase.alpha_final,
                               phase.length_normalize, phase.lm_weight, settings.runtime.local_loss)
    collate = PreferenceCollator(model.tokenizer, settings.data.max_caption_tokens)
    score = partial(score_pairs, length_normalize=phase.length_normalize)
    batch = phase.engine.batch_size

    def dataset(name: str) -> PreferenceDataset | None:
        if name not in pairs or len(pairs[name]) == 0:
            return None
        split, features, index = pairs[name], None, None
        has_images = "image" in split.column_names and any(v is not None for v in split["image"])
        if phase.freeze_vision and has_images:
            split, features, index = frozen_features(model, split, settings.data.max_pixels, device, autocast, batch)
        data = PreferenceDataset(split, model.image_size, settings.data.max_pixels, features, index)
        if phase.reference == "checkpoint":
            data.reference = pair_logps(model, data, collate, score, device, autocast, batch)
        return data

    val_captions = caption_splits.get("val")
    data = TrainData(train=dataset("train"), val=dataset("val"), collate=collate,
                     num_workers=settings.data.num_workers, max_bad_fraction=settings.data.max_bad_fraction)
    captions = None if val_captions is None else caption_dataset(val_captions, model.image_size, settings.data)
    measure = partial(heldout_metrics, objective=objective, pairs=data.val, captions=captions, device=device,
                      autocast=autocast, batch_size=batch, max_tokens=settings.data.max_caption_tokens)
    return AlignPhase(model, objective, data, start=start, measure=measure, pairs=report.summary())


@dataclass
class AlignResult:
    """Align's training result, and the held-out numbers before and after it."""

    fit: FitResult
    start: Path
    before: dict[str, float]
    after: dict[str, float]
    pairs: str
    retrieval_drop: float | None = None
    tax_warning: str | None = None


def align(settings: Settings, overwrite: bool = False,
          on_step: Callable[[int, dict[str, float]], None] | None = None) -> AlignResult:
    """Phase 2: preference alignment from the pretrain checkpoint, with the before/after numbers."""
    run = prepare_align(settings, overwrite)
    phase = settings.align
    before = run.measure(run.model)
    result = fit(run.model, run.objective, run.data, phase.engine, phase.optimizer, settings.runtime,
                 title="align", on_step=on_step)
    _draw_curves(result.run_dir)
    best = result.best_checkpoint or resolve_checkpoint(result.run_dir, "last")
    model = Captioner.from_pretrained(best, next(run.model.parameters()).device)
    after = run.measure(model)
    out = AlignResult(result, run.start, before, after, run.pairs)
    if "retrieval_r1" in before and "retrieval_r1" in after:
        out.retrieval_drop = before["retrieval_r1"] - after["retrieval_r1"]
        if out.retrieval_drop > phase.max_retrieval_drop:
            out.tax_warning = (f"alignment tax: val retrieval R@1 fell from {before['retrieval_r1']:.3f} to "
                               f"{after['retrieval_r1']:.3f} (more than align.max_retrieval_drop = "
                               f"{phase.max_retrieval_drop}); consider a higher alpha or a lower --lr")
            if distributed.current().main:
                print(f"warning: {out.tax_warning}", file=sys.stderr)
    return out
