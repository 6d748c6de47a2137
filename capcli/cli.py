"""The ``capcli`` command line: thin commands that read settings, call the library, render, exit.

Exit codes (DESIGN §8): 0 success, 1 runtime failure, 2 usage or settings error, 130 interrupted.
Heavy imports (torch, transformers, open_clip) happen inside the commands so that
``--help`` and ``--version`` answer at once. The options, with their help read from the
settings, are in ``options``.
"""

from __future__ import annotations

import errno
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli import __version__
from capcli.errors import CapcliError
from capcli.options import (
    AlignMaxSteps,
    BatchSize,
    CaptionBatch,
    CaptionBeams,
    CaptionCheckpoint,
    CaptionColumn,
    CaptionGuidance,
    CaptionLengthPenalty,
    CaptionMaxLength,
    CaptionMinLength,
    CaptionNoRepeat,
    CaptionPrior,
    CaptionWorkers,
    Compile,
    Config,
    Data,
    Decoder,
    Device,
    Epochs,
    EvalBeams,
    EvalGuidance,
    EvalLengthPenalty,
    EvalMaxLength,
    EvalMinLength,
    EvalNoRepeat,
    EvalPrior,
    ExportGuidance,
    ExportMaxLength,
    ExportMinLength,
    ExportPrior,
    Format,
    GradCheckpoint,
    ImageColumn,
    Images,
    Json,
    LocalLoss,
    Log,
    Lr,
    MaxSteps,
    Model,
    Overwrite,
    Precision,
    Quiet,
    Resume,
    RunDataSource,
    RunTestSize,
    RunTrainSize,
    RunValSize,
    Seed,
    SourceSplit,
    Streaming,
    TestSize,
    TrainSize,
    ValSize,
    VisionWeights,
    column_keys,
    decode_keys,
    help_for,
    runtime_keys,
    speed_keys,
)

app = typer.Typer(
    name="capcli",
    help="Train, align, evaluate and serve an image captioner (CLIP vision encoder + GPT-2 decoder).",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,  # stack locals hold tensors
    rich_markup_mode="rich",
)


@contextmanager
def exit_codes() -> Iterator[None]:
    """Turn capcli's errors into one line on stderr and the documented exit code."""
    try:
        yield
    except CapcliError as err:
        prefix = "interrupted" if err.exit_code == 130 else "error"
        print(f"{prefix}: {err}", file=sys.stderr)
        raise typer.Exit(err.exit_code) from None
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise typer.Exit(130) from None
    except OSError as err:
        if err.errno not in STORAGE_ERRORS:
            raise  # anything else is a bug to see whole
        verb = "access" if err.errno in (errno.EACCES, errno.EPERM) else "write"
        where = f" {err.filename}" if err.filename else ""
        print(f"error: cannot {verb}{where}: {err.strerror}", file=sys.stderr)
        raise typer.Exit(1) from None


# A full disk, a quota, a read-only or forbidden folder: the user's to fix, one line, exit 1.
STORAGE_ERRORS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EFBIG})


def _version(value: bool) -> None:
    if value:
        print(f"capcli {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Train, align, evaluate and serve an image captioner."""


def _main_process() -> bool:
    """Under torchrun, rank 0 alone prints the result; the other ranks print nothing on stdout."""
    from capcli.train.distributed import launched

    return launched().main


@app.command()
def pretrain(
    config: Config = None, device: Device = None, precision: Precision = None, seed: Seed = None,
    quiet: Quiet = False, json: Json = False, data: Data = None, model: Model = None,
    vision_weights: VisionWeights = None, decoder: Decoder = None,
    output: Annotated[Optional[Path], typer.Option(help=help_for("pretrain.engine.output"), show_default=False)] = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None, lr: Lr = None,
    train_size: TrainSize = None, val_size: ValSize = None, test_size: TestSize = None,
    resume: Resume = False, overwrite: Overwrite = False, compile: Compile = False,
    gradient_checkpointing: GradCheckpoint = False, local_loss: LocalLoss = False,
    image_column: ImageColumn = None, caption_column: CaptionColumn = None, split: SourceSplit = None,
    streaming: Streaming = False, log: Log = None,
) -> None:
    """Phase 1: contrastive (InfoNCE) + captioning loss on image-caption pairs."""
    with exit_codes():
        from capcli.settings import load_settings

        settings = load_settings(config, {
            **runtime_keys(device, precision, seed, quiet), **speed_keys(compile, gradient_checkpointing, local_loss, log),
            **column_keys(image_column, caption_column, split), "data.streaming": streaming or None,
            "data.source": data, "model.preset": model,
            "model.vision_weights": vision_weights, "model.decoder": decoder,
            "pretrain.engine.output": output, "pretrain.engine.epochs": epochs,
            "pretrain.engine.max_steps": max_steps, "pretrain.engine.batch_size": batch_size,
            "pretrain.optimizer.lr": lr, "data.train_size": train_size, "data.val_size": val_size,
            "data.test_size": test_size, "pretrain.engine.resume": resume or None,
        })
        from capcli import (  # torch and friends: only once the settings are known to be good
            phases,
            results,
        )

        result = phases.pretrain(settings, overwrite=overwrite)
        if _main_process():
            results.print_fit(results.fit_summary("pretrain", result), json)


@app.command()
def align(
    config: Config = None, device: Device = None, precision: Precision = None, seed: Seed = None,
    quiet: Quiet = False, json: Json = False, data: RunDataSource = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Starting checkpoint, or a run directory (its best).  \\[default: runs/pretrain]", show_default=False)] = None,
    preferences: Annotated[Optional[str], typer.Option(help="Preference pairs: generated | jsonl:PATH | hf:NAME[:CONFIG] | disk:PATH | ultrafeedback[:NAME] | policy[:grounding|cider|clip[:WEIGHTS]] (the model's own captions, judged)  \\[default: generated from --data]", show_default=False)] = None,
    freeze_vision: Annotated[Optional[bool], typer.Option("--freeze-vision/--no-freeze-vision", help="Keep the vision tower frozen, its features cached.  \\[default: freeze]", show_default=False)] = None,
    beta: Annotated[Optional[float], typer.Option(help=help_for("align.beta"), show_default=False)] = None,
    margin: Annotated[Optional[float], typer.Option(help=help_for("align.margin"), show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help=help_for("align.engine.output"), show_default=False)] = None,
    epochs: Annotated[Optional[int], typer.Option(help=help_for("align.engine.epochs"), show_default=False)] = None,
    max_steps: AlignMaxSteps = None,
    batch_size: Annotated[Optional[int], typer.Option(help=help_for("align.engine.batch_size"), show_default=False)] = None,
    lr: Annotated[Optional[float], typer.Option(help=help_for("align.optimizer.lr"), show_default=False)] = None,
    train_size: RunTrainSize = None, val_size: RunValSize = None, test_size: RunTestSize = None,
    resume: Resume = False, overwrite: Overwrite = False, compile: Compile = False,
    gradient_checkpointing: GradCheckpoint = False, local_loss: LocalLoss = False,
    image_column: ImageColumn = None, caption_column: CaptionColumn = None, split: SourceSplit = None,
    log: Log = None,
) -> None:
    """Phase 2: Bradley-Terry preference alignment (DPO-style, with a margin), vision encoder frozen.

    The caption data (the source of generated pairs, and the val split) are the starting run's, as
    recorded with its checkpoint: the same source and the same carve.
    """
    with exit_codes():
        from capcli.settings import load_settings

        cli = {
            **runtime_keys(device, precision, seed, quiet), **speed_keys(compile, gradient_checkpointing, local_loss, log),
            **column_keys(image_column, caption_column, split), "data.source": data, "align.checkpoint": checkpoint,
            "align.preferences": preferences, "align.freeze_vision": freeze_vision, "align.beta": beta,
            "align.margin": margin, "align.engine.output": output, "align.engine.epochs": epochs,
            "align.engine.max_steps": max_steps, "align.engine.batch_size": batch_size,
            "align.optimizer.lr": lr, "data.train_size": train_size, "data.val_size": val_size,
            "data.test_size": test_size, "align.engine.resume": resume or None,
        }
        settings = load_settings(config, cli)
        from capcli import phases, results
        from capcli.data.carve import follow_run
        from capcli.train.checkpoint import resolve_checkpoint

        start = resolve_checkpoint(settings.align.checkpoint or phases.DEFAULT_START, "best")
        run = follow_run(start, config, cli)
        if (warning := run.warning(start)) is not None and _main_process():
            print(f"warning: {warning}", file=sys.stderr)
        result = phases.align(run.settings, overwrite=overwrite)
        if _main_process():
            results.print_align(results.align_summary(result), json)


@app.command()
def caption(
    images: Images = None, checkpoint: CaptionCheckpoint = None, beams: CaptionBeams = None,
    batch_size: CaptionBatch = None, workers: CaptionWorkers = None, fmt: Format = None,
    max_length: CaptionMaxLength = None,
    min_length: CaptionMinLength = None, length_penalty: CaptionLengthPenalty = None,
    no_repeat_ngram: CaptionNoRepeat = None, concept_guidance: CaptionGuidance = None,
    concept_prior: CaptionPrior = None, config: Config = None,
    device: Device = None, precision: Precision = None, quiet: Quiet = False,
) -> None:
    """Caption image files, folders, globs and stdin lists: one line per image on stdout, in input order, flushed batch by batch.

    jsonl and tsv add two numbers per caption, both ≤ 0 (closer to 0: more likely). [bold]logprob[/bold]: Σ log p(token | image, earlier tokens), in nats, under the model's own distribution, over the caption's tokens and its end-of-text token (over all max-length tokens when it never ended); [bold]tokens[/bold] counts them. [bold]score[/bold]: logprob / tokens^length-penalty, the length-normalised score that beam search ranks captions by.

    A missing, corrupt, non-image or oversized file gets one line on stderr, "error: PATH: reason", and the rest is still captioned. Exit codes: 0 every image captioned, 1 some failed, 2 usage error.
    """
    with exit_codes():
        from capcli.inference.captioning import expand_inputs, write_captions
        from capcli.settings import load_settings

        settings = load_settings(config, {
            "runtime.device": device, "runtime.precision": precision, "runtime.quiet": quiet or None,
            "caption.format": fmt, "caption.batch_size": batch_size, "caption.workers": workers,
            **decode_keys("caption", beams, max_length, min_length, length_penalty, no_repeat_ngram, concept_guidance,
                          concept_prior),
        })
        items = expand_inputs(images or [], sys.stdin)
        # torch and friends: only once the options are known to be good
        from capcli.train.checkpoint import default_checkpoint, resolve_checkpoint

        directory = resolve_checkpoint(checkpoint) if checkpoint else default_checkpoint()
        failed = write_captions(items, directory, settings)
    if failed:
        raise typer.Exit(1)


@app.command()
def evaluate(
    config: Config = None, device: Device = None, precision: Precision = None, seed: Seed = None,
    quiet: Quiet = False, json: Json = False, data: RunDataSource = None,
    checkpoint: CaptionCheckpoint = None,
    split: Annotated[Optional[str], typer.Option(help=help_for("evaluate.split"), show_default=False)] = None,
    beams: EvalBeams = None, max_length: EvalMaxLength = None, min_length: EvalMinLength = None,
    length_penalty: EvalLengthPenalty = None, no_repeat_ngram: EvalNoRepeat = None,
    concept_guidance: EvalGuidance = None, concept_prior: EvalPrior = None,
    limit: Annotated[Optional[int], typer.Option(help=help_for("evaluate.limit"), show_default=False)] = None,
    baseline: Annotated[Optional[Path], typer.Option(help=help_for("evaluate.baseline"), show_default=False)] = None,
    save_captions: Annotated[Optional[Path], typer.Option(help=help_for("evaluate.save_captions"), show_default=False)] = None,
    report: Annotated[Optional[Path], typer.Option(help=help_for("evaluate.report"), show_default=False)] = None,
    output: Annotated[Optional[Path], typer.Option(help=help_for("evaluate.output"), show_default=False)] = None,
    batch_size: Annotated[Optional[int], typer.Option("--batch-size", help=help_for("evaluate.batch_size"), show_default=False)] = None,
    judge: Annotated[Optional[str], typer.Option(help=help_for("evaluate.judge"), show_default=False)] = None,
    train_size: RunTrainSize = None, val_size: RunValSize = None, test_size: RunTestSize = None,
    allow_train_images: Annotated[bool, typer.Option("--allow-train-images", help=help_for("evaluate.allow_train_images"))] = False,
) -> None:
    """Captions of a split, scored: BLEU, METEOR, ROUGE-L, CIDEr-D, CLIP score, win rate, preference
    accuracy and (on synthetic) grounding, each with a bootstrap 95% interval.

    The data are the run's, as recorded with the checkpoint: the same source and the same carve
    of val and test. The evaluated images are checked against the run's training images.
    """
    with exit_codes():
        from capcli.settings import load_settings

        cli = {
            **runtime_keys(device, precision, seed, quiet), "data.source": data, "data.train_size": train_size,
            "data.val_size": val_size, "data.test_size": test_size, "evaluate.split": split,
            **decode_keys("evaluate", beams, max_length, min_length, length_penalty, no_repeat_ngram, concept_guidance,
                          concept_prior),
            "evaluate.limit": limit, "evaluate.baseline": baseline, "evaluate.save_captions": save_captions,
            "evaluate.report": report, "evaluate.output": output, "evaluate.batch_size": batch_size,
            "evaluate.judge": judge, "evaluate.allow_train_images": allow_train_images or None,
        }
        load_settings(config, cli)  # the options are checked before a checkpoint is looked for
        from capcli import results
        from capcli.data.carve import follow_run
        from capcli.evaluate import evaluation
        from capcli.train.checkpoint import default_checkpoint, resolve_checkpoint

        directory = resolve_checkpoint(checkpoint) if checkpoint else default_checkpoint()
        run = follow_run(directory, config, cli)
        settings = run.settings
        if (warning := run.warning(directory)) is not None:
            print(f"warning: {warning}", file=sys.stderr)
        log = (lambda _: None) if settings.runtime.quiet else (lambda line: print(line, file=sys.stderr))
        outcome = evaluation.evaluate(settings, directory, run.recorded, log)
        output = settings.evaluate.output
        results.write_json(outcome, output)
        results.print_evaluation(outcome, json)
        log(f"results written to {output}")
        _add_to_card(directory, outcome, log)


def _add_to_card(checkpoint: Path, outcome: dict, log) -> None:
    """evaluate's results into the checkpoint's model card; a read-only checkpoint only warns."""
    from capcli.train.card import add_evaluation

    try:
        log(f"results added to the model card {add_evaluation(checkpoint, outcome)}")
    except OSError as err:
        print(f"warning: cannot add the results to {checkpoint}'s model card ({err.strerror or err})", file=sys.stderr)


@app.command()
def report(
    runs: Annotated[list[Path], typer.Argument(metavar="RUN_DIR...", help="Run directories (with metrics.jsonl); several are drawn end to end, phases marked.", show_default=False)],
    output: Annotated[Optional[Path], typer.Option(help="Where the PNG goes.  \\[default: RUN_DIR/curves.png for one run, ./curves.png for several]", show_default=False)] = None,
) -> None:
    """Draw a run's training curves into curves.png: losses, loss components, learning rate, α(t) and reward accuracy."""
    with exit_codes():
        from capcli.evaluate.report import write_curves

        print(write_curves(runs, output))


@app.command()
def export(
    checkpoint: Annotated[Path, typer.Argument(metavar="CHECKPOINT", help="Checkpoint, or a run directory (its best).", show_default=False)],
    output: Annotated[Path, typer.Option(help="Folder for the graphs, the tokenizer and decoding.json.", show_default=False)],
    fmt: Annotated[str, typer.Option("--format", help="onnx  \\[default: onnx]", show_default=False)] = "onnx",
    max_length: ExportMaxLength = None, min_length: ExportMinLength = None, concept_guidance: ExportGuidance = None,
    concept_prior: ExportPrior = None,
) -> None:
    """Export a checkpoint for serving without PyTorch: the vision tower with the prefix mapper as one ONNX
    graph, the decoder with its key/value cache as another (dynamic batch and sequence axes), the tokenizer,
    and decoding.json, the greedy search settings (docs/serving.md). Needs the onnx extra:
    pip install "capcli[onnx]"."""
    with exit_codes():
        from capcli.errors import ConfigError
        from capcli.serving import require_onnx
        from capcli.settings import DecodeSettings, validated

        if fmt != "onnx":
            raise ConfigError(f"unknown --format {fmt!r} (allowed: onnx)")
        given = {"max_length": max_length, "min_length": min_length, "concept_guidance": concept_guidance,
                 "concept_prior": concept_prior}
        decode = validated(DecodeSettings, {key: value for key, value in given.items() if value is not None})

        require_onnx()  # before torch is imported: a missing extra answers at once
        from capcli.inference.export import export_onnx
        from capcli.train.checkpoint import resolve_checkpoint

        export_onnx(resolve_checkpoint(checkpoint), output, decode.max_length, decode.min_length,
                    decode.concept_guidance, decode.concept_prior)
        print(output)


@app.command()
def benchmark(
    config: Config = None, device: Device = None, precision: Precision = None, seed: Seed = None,
    quiet: Quiet = False, json: Json = False, model: Model = None,
    batch_size: Annotated[Optional[int], typer.Option(help="Training micro-batch of both phases.  \\[default: the preset's: tiny 32]", show_default=False)] = None,
    repeats: Annotated[Optional[int], typer.Option(help=help_for("benchmark.repeats"), show_default=False)] = None,
    steps: Annotated[Optional[int], typer.Option(help=help_for("benchmark.steps"), show_default=False)] = None,
    checkpoint: Annotated[Optional[Path], typer.Option(help="Time this checkpoint's architecture and weights.  \\[default: random weights of --model]", show_default=False)] = None,
    sections: Annotated[str, typer.Option(help="Comma-separated: data, pretrain, align, caption, onnx, policy, metrics; and, run only when named, peers (capcli beside transformers' VisionEncoderDecoder and open_clip's CoCa), startup (one image in one `capcli caption` process against `import torch`) and caption_files (the caption command on a folder of full-size JPEGs, read ahead by workers or not).  \\[default: all but peers, startup and caption_files]", show_default=False)] = "data,pretrain,align,caption,onnx,policy,metrics",
    out: Annotated[Optional[Path], typer.Option(help="Also write the results JSON to this file.", show_default=False)] = None,
    compile: Compile = False,
) -> None:
    """Measured training, data, captioning and metric speed, peak memory and MFU, each against a baseline
    timed in the same run (docs/performance.md)."""
    with exit_codes():
        from capcli.settings import load_settings

        settings = load_settings(config, {
            **runtime_keys(device, precision, seed, quiet), **speed_keys(compile, False), "model.preset": model,
            "pretrain.engine.batch_size": batch_size, "align.engine.batch_size": batch_size,
            "benchmark.repeats": repeats, "benchmark.steps": steps,
        })
        from capcli import results
        from capcli.bench.benchmark import run_benchmark
        from capcli.train.checkpoint import resolve_checkpoint

        chosen = tuple(part.strip() for part in sections.split(",") if part.strip())
        report = run_benchmark(settings, resolve_checkpoint(checkpoint) if checkpoint else None, chosen,
                               log=(lambda _: None) if settings.runtime.quiet else (lambda line: print(line, file=sys.stderr)))
        document = report.as_dict()
        if out is not None:
            results.write_json(document, out)
        results.print_benchmark(document, json)


def main() -> None:
    app()
