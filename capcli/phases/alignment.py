"""Phase 2, ``capcli align``: preference pairs (generated, given or on-policy), the frozen-tower and
reference caches, rounds, and the held-out numbers before and after."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import datasets

from capcli.data.batches import (
    PreferenceCollator,
    PreferenceDataset,
    caption_dataset,
    other_images,
)
from capcli.data.preferences import load_preferences
from capcli.data.sources import load_splits
from capcli.errors import ConfigError, DataError, TrainingInterrupted
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings
from capcli.objectives import AlignObjective, score_pairs
from capcli.phases.caches import (
    caption_features,
    frozen_features,
    image_identity,
    pair_logps,
    trained_pair_rows,
)
from capcli.phases.heldout import heldout_metrics
from capcli.phases.phase import Phase, draw_curves, prepare_run_dir, write_config
from capcli.phases.policy import draw_pairs
from capcli.phases.rewards import JUDGES, load_judge
from capcli.settings import EngineSettings, Settings
from capcli.train import distributed, runlock
from capcli.train.card import describer
from capcli.train.checkpoint import (
    has_checkpoint,
    resolve_checkpoint,
    resume_checkpoint,
)
from capcli.train.engine import FitResult, TrainData, fit
from capcli.train.runlog import RunLog
from capcli.train.runtime import Runtime

DEFAULT_START = Path("runs/pretrain")


@dataclass
class AlignPhase(Phase):
    """Align's phase, plus what it needs around training: where it started, and how to measure."""

    start: Path
    measure: Callable[[Captioner], dict[str, float]]  # the held-out numbers of a model (heldout.py)
    pairs: str  # the one-line summary of the preference pairs


@dataclass(frozen=True)
class AlignRound:
    """One round of align: where it trains, from which weights, against which reference."""

    number: int  # 1-based
    rounds: int
    engine: EngineSettings  # its ``output`` is this round's run directory
    policy: Path  # the checkpoint that trains, and draws the round's on-policy pairs
    reference: Path  # the checkpoint whose log-probs are the DPO reference


def prepare_align(settings: Settings, overwrite: bool = False, round_: AlignRound | None = None,
                  runtime: Runtime | None = None) -> AlignPhase:
    """Phase 2's model (the starting checkpoint), objective, pairs and caches, and the command's runtime
    (resolved here unless given); writes ``config.yaml``.

    The starting checkpoint is also the reference model: its log-probs of every pair are
    computed here, once, and so are the frozen tower's features. On ``--resume`` the
    caches are rebuilt from the same starting checkpoint, then the engine loads the
    run's last weights over it. ``round_`` (from ``align``) names another policy and
    reference for a later round of on-policy pairs.
    """
    phase = settings.align
    if settings.data.streaming:
        raise ConfigError("align reads its preference pairs whole: data.streaming applies to pretrain only")
    start = resolve_checkpoint(phase.checkpoint or DEFAULT_START, "best")
    round_ = round_ or AlignRound(1, 1, phase.engine, start, start)
    run_dir = prepare_run_dir(round_.engine, overwrite)
    runtime = runtime or Runtime.from_settings(settings.runtime, join=True)
    device = runtime.device
    model = Captioner.from_pretrained(round_.policy, device)
    if phase.freeze_vision:
        model.freeze_vision()
    batch = phase.engine.batch_size
    policy = policy_spec(phase.preferences)
    with distributed.main_first():
        caption_splits = load_splits(settings.data)
        if policy is None:
            pairs, report = load_preferences(phase.preferences, settings.data, caption_splits, phase.pairs_per_image)
            summary = report.summary()
        else:
            pairs, summary = _policy_pairs(settings, policy, caption_splits, model, run_dir, round_, runtime)
    if runtime.world.main:
        print(summary, file=sys.stderr)
    write_config(run_dir, settings)

    objective = AlignObjective(phase.beta, phase.margin, phase.alpha_init, phase.alpha_final,
                               phase.length_normalize, phase.lm_weight, settings.runtime.local_loss,
                               phase.image_weight, phase.anchor_weight)
    collate = PreferenceCollator(model.tokenizer, settings.data.max_caption_tokens)
    score = partial(score_pairs, length_normalize=phase.length_normalize)
    reference = model if round_.reference == round_.policy else Captioner.from_pretrained(round_.reference, device)

    def dataset(name: str) -> PreferenceDataset | None:
        if name not in pairs or len(pairs[name]) == 0:
            return None
        split, features, index = pairs[name], None, None
        has_images = "image" in split.column_names and any(v is not None for v in split["image"])
        if phase.freeze_vision and has_images:
            split, features, index = frozen_features(model, split, settings.data.max_pixels, runtime, batch)
        other = other_images([image_identity(v) for v in split["image"]], settings.data.seed) \
            if phase.image_weight and has_images else None
        data = PreferenceDataset(split, model.image_size, settings.data.max_pixels, features, index, other=other)
        if phase.reference == "checkpoint":
            # Training pairs: only those the planned steps visit (a short run visits a fraction).
            rows = trained_pair_rows(data, round_.engine, runtime) if name == "train" else None
            data.reference = pair_logps(reference, data, collate, score, runtime, batch, rows)
        return data

    val_captions = caption_splits.get("val")
    data = TrainData(train=dataset("train"), val=dataset("val"), collate=collate,
                     num_workers=settings.data.num_workers, max_bad_fraction=settings.data.max_bad_fraction)
    captions = None if val_captions is None else caption_dataset(val_captions, model.image_size, settings.data)
    measure = partial(heldout_metrics, objective=objective, pairs=data.val, captions=captions, runtime=runtime,
                      batch_size=batch, max_tokens=settings.data.max_caption_tokens)
    return AlignPhase(model, objective, data, runtime, start=start, measure=measure, pairs=summary)


PAIRS_DIR = "pairs"  # a round's drawn pairs, kept so that --resume trains on the same ones
ROUNDS_DIR = "rounds"  # rounds before the last: runs/align/rounds/1, ...; the last round is the run itself
ROUND_FILE = "round.json"  # what a finished round drew and how long it took; marks it done
DRAW_FILE = "draw.json"  # what a round's draw found, written with its pairs


def _policy_pairs(settings: Settings, policy: tuple[str, str], caption_splits, model: Captioner, run_dir: Path,
                  round_: AlignRound, runtime: Runtime) -> tuple[dict[str, datasets.Dataset], str]:
    """On-policy training pairs (drawn now, or read back on --resume), and generated held-out ones."""
    phase, data = settings.align, settings.data
    if "train" not in caption_splits:
        raise ConfigError("policy preferences draw from the caption source's train split, and it has none")
    generated, report = load_preferences("generated", data, caption_splits, max(1, phase.policy.corruption_pairs))
    saved = run_dir / PAIRS_DIR
    # A resumed round trains on the pairs it drew; under torchrun the other ranks read rank 0's draw.
    if (round_.engine.resume or not distributed.current().main) and (saved / "dataset_info.json").exists():
        drawn = datasets.load_from_disk(str(saved))
        summary = f"on-policy pairs of round {round_.number}: {len(drawn)}, read back from {saved}"
    else:
        train = caption_splits["train"]
        judge = load_judge(policy[0] or ("grounding" if "scene" in train.column_names else "cider"), policy[1],
                           train, runtime.device, data.max_pixels, phase.policy.relation_credit)
        decode = DecodeSettings(max_length=data.max_caption_tokens)  # guided, as evaluate decodes
        drawn, drawn_report = draw_pairs(
            model, train, partial(caption_features, model, train, data.max_pixels, runtime), judge,
            decode, phase.policy, seed=data.seed + round_.number, batch_size=phase.engine.batch_size)
        if distributed.current().main:
            drawn.save_to_disk(str(saved))
            record = {"round": round_.number, **drawn_report.record()}
            (run_dir / DRAW_FILE).write_text(json.dumps(record), encoding="utf-8")
        summary = f"round {round_.number} of {round_.rounds}: {drawn_report.summary()}"
    train = drawn
    if phase.policy.corruption_pairs:
        train = datasets.concatenate_datasets([drawn, generated["train"]])
    if len(train) == 0:
        raise DataError("policy preferences: no pair was drawn (every image's captions scored alike); "
                        "lower align.policy.min_gap or draw more candidates (align.policy.beams, samples)")
    summary += f"; held out: {report.summary()}"
    return {**generated, "train": train}, summary


def policy_spec(spec: str | None) -> tuple[str, str] | None:
    """``policy[:JUDGE[:ARG]]`` → (judge, arg), "" where not given; None for any other source."""
    kind, _, rest = (spec or "").partition(":")
    if kind != "policy":
        return None
    judge, _, arg = rest.partition(":")
    if judge and judge not in JUDGES:
        raise ConfigError(f"unknown judge in '{spec}' (allowed: policy, policy:{', policy:'.join(JUDGES)})")
    return judge, arg


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
    """Phase 2: preference alignment from the pretrain checkpoint, with the before/after numbers.

    With on-policy pairs (``--preferences policy``) and ``align.policy.rounds`` R > 1, align
    runs R rounds, each drawing its pairs from the policy the last one left and training on
    them (iterative DPO); rounds before the last train into ``RUN/rounds/N``, the last one into
    the run directory itself, so its checkpoints are the run's. ``--resume`` skips the rounds
    that finished and resumes the one that was stopped, on the pairs it had drawn.
    """
    phase = settings.align
    run_dir = Path(phase.engine.output)
    start = resolve_checkpoint(phase.checkpoint or DEFAULT_START, "best")
    rounds = phase.policy.rounds if policy_spec(phase.preferences) else 1
    if rounds > 1 and distributed.launched().main:
        runlock.acquire(run_dir)
        if phase.engine.resume and not any((run_dir / d).exists() for d in (ROUNDS_DIR, "checkpoints")):
            resume_checkpoint(run_dir)  # nothing to resume: the usual error
        if not phase.engine.resume and (run_dir / ROUNDS_DIR).exists():
            if not overwrite:
                prepare_run_dir(phase.engine, overwrite)  # refuses, as for a run's checkpoints
            shutil.rmtree(run_dir / ROUNDS_DIR)
    policy, reference, records = start, start, []
    before: dict[str, float] | None = None
    runtime: Runtime | None = None  # resolved by the first round's prepare_align, where pretrain resolves it
    for number in range(1, rounds + 1):
        output = run_dir if number == rounds else run_dir / ROUNDS_DIR / str(number)
        done = output / ROUND_FILE
        if phase.engine.resume and number < rounds and done.exists():
            records.append(json.loads(done.read_text(encoding="utf-8")))
            policy = resolve_checkpoint(output, "best")
            reference = policy if phase.policy.reference == "previous" else start
            continue
        resume = phase.engine.resume and has_checkpoint(output)  # also one a kill left as .old-last
        engine = phase.engine.model_copy(update={"output": output, "resume": resume})
        run = prepare_align(settings, overwrite, AlignRound(number, rounds, engine, policy, reference), runtime)
        runtime = run.runtime
        if before is None:
            before = run.measure(run.model if policy == start else Captioner.from_pretrained(start, runtime.device))
        try:
            result = fit(run.model, run.objective, run.data, engine, phase.optimizer, runtime,
                         title="align" if rounds == 1 else f"align round {number}/{rounds}", on_step=on_step,
                         describe=describer(settings, "align", output, run.start))
        except TrainingInterrupted as err:
            if rounds == 1:
                raise
            raise TrainingInterrupted(f"round {number} of {rounds} interrupted ({err}); "
                                      f"continue with --resume --output {run_dir}") from None
        draw_curves(result.run_dir)
        if output != run_dir:
            runlock.release(output)
        draw = output / DRAW_FILE
        record = {**(json.loads(draw.read_text(encoding="utf-8")) if draw.exists() else {"round": number}),
                  "steps": result.steps, "train_seconds": round(result.seconds, 2),
                  "best_val_loss": result.best_val_loss}
        if distributed.current().main:
            done.write_text(json.dumps(record), encoding="utf-8")
        records.append(record)
        policy = result.best_checkpoint or resolve_checkpoint(output, "last")
        reference = policy if phase.policy.reference == "previous" else start
    if rounds > 1 and distributed.current().main:
        log = RunLog(run_dir, resume_step=result.steps)  # keeps the last round's lines, appends the rounds'
        for record in records:
            log.write({"split": "round", **record})
    runlock.release(run_dir)
    model = Captioner.from_pretrained(policy, runtime.device)
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
