"""Phase 1, ``capcli pretrain``: contrastive and captioning loss on image-caption pairs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence

import datasets
import torch

from capcli.data.batches import (
    CaptionCollator,
    CaptionDataset,
    StreamingCaptions,
    training_dataset,
)
from capcli.data.concepts import caption_words
from capcli.data.sources import concept_words, load_splits
from capcli.model import Captioner, build_model
from capcli.objectives import PretrainObjective
from capcli.phases.phase import Phase, draw_curves, prepare_run_dir, write_config
from capcli.settings import Settings
from capcli.train import distributed, runlock
from capcli.train.card import describer
from capcli.train.checkpoint import resume_checkpoint
from capcli.train.engine import FitResult, TrainData, fit
from capcli.train.runtime import Runtime

TOKENIZER_ROWS = 20_000  # a streamed source: the tiny preset's tokenizer learns from this many first rows


def prepare_pretrain(settings: Settings, overwrite: bool = False, runtime: Runtime | None = None) -> Phase:
    """Phase 1's model, objective and data, and the command's runtime (resolved here unless given);
    writes the run's ``config.yaml``."""
    phase = settings.pretrain
    run_dir = prepare_run_dir(phase.engine, overwrite)
    runtime = runtime or Runtime.from_settings(settings.runtime, join=True)  # under torchrun: join now, so that...
    with distributed.main_first():  # ...rank 0 alone materialises the data, and the others read it
        splits = load_splits(settings.data)
    torch.manual_seed(settings.runtime.seed)
    if phase.engine.resume:
        # Architecture and tokenizer only: the engine's resume loads the weights with the rest of the state.
        model = Captioner.from_pretrained(resume_checkpoint(run_dir), weights=False)
    else:
        train = splits["train"]
        if isinstance(train, datasets.IterableDataset):  # a stream: the tokenizer learns from its head's captions
            train = train.select_columns(["captions"]).take(TOKENIZER_ROWS)
        model = build_model(settings.model, (c for row in train for c in row["captions"]),
                            concept_words_for(settings, (row["captions"] for row in train)))
    write_config(run_dir, settings)
    words = tuple(model.config.concept_words) if phase.concept_weight else ()
    if phase.concept_weight and not words and distributed.current().main:
        print(f"warning: pretrain.concept_weight is {phase.concept_weight:g} but the model has no concept words "
              f"(data source '{settings.data.source}' names none, or the resumed run had none): no concept loss; "
              "set model.concept_words to train one, or pretrain.concept_weight 0", file=sys.stderr)

    def dataset(name: str) -> CaptionDataset | StreamingCaptions | None:
        if name not in splits:
            return None
        return training_dataset(splits[name], model.image_size, settings.data, settings.runtime.seed)

    data = TrainData(
        train=dataset("train"), val=dataset("val"),
        collate=CaptionCollator(model.tokenizer, settings.data.max_caption_tokens, words),
        num_workers=settings.data.num_workers, max_bad_fraction=settings.data.max_bad_fraction,
    )
    objective = PretrainObjective(phase.contrastive_weight, phase.caption_weight, settings.runtime.local_loss,
                                  phase.concept_weight, phase.token_dropout)
    return Phase(model, objective, data, runtime)


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
    result = fit(run.model, run.objective, run.data, phase.engine, phase.optimizer, run.runtime,
                 title="pretrain", on_step=on_step, describe=describer(settings, "pretrain", phase.engine.output))
    draw_curves(result.run_dir)
    runlock.release(result.run_dir)
    return result
