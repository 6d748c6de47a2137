"""The command line's options: one ``Annotated`` type per option, its help and default read from
its setting (the field's docstring, its default and the presets' profiles: ``help_for``), as
docgen reads them for the docs, so the two cannot drift. None means "not given": the settings
layers below the command line decide. The ``*_keys`` functions turn a command's options into
dotted settings keys.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer
from pydantic import BaseModel
from rich.markup import escape

from capcli.settings import (  # pydantic and yaml only: --help stays quick
    DecodeSettings,
    field_doc,
    preset_defaults,
    shown,
)


def runtime_keys(device: str | None, precision: str | None, seed: int | None, quiet: bool) -> dict[str, object]:
    """The runtime options every command shares, as dotted settings keys (None: not given)."""
    return {"runtime.device": device, "runtime.precision": precision, "runtime.seed": seed,
            "runtime.quiet": quiet or None}


def help_for(key: str, root: type[BaseModel] | None = None) -> str:
    """An option's help, read from its setting: the field's docstring, then its default and the value of
    each preset whose profile changes it (``[default: 10; tiny: 16]``). ``root``: a group of its own
    (export's ``DecodeSettings``), whose field default is the default. A setting that is unset by
    default (None) everywhere shows no default: its docstring says what unset means."""
    if root is None:
        doc, values = field_doc(key), preset_defaults(key)
    else:
        doc, values = field_doc(key, root), {"default": getattr(root(), key)}
    if all(value is None for value in values.values()):
        return escape(doc)
    defaults = "; ".join(f"{name}: {shown(value)}" for name, value in values.items())
    return f"{escape(doc)}  \\[{defaults}]"  # an escaped bracket: rich markup would take [default: ...] for a tag



# Options shared by the commands. None means "not given": the settings layers below decide.
Config = Annotated[Optional[Path], typer.Option("--config", help="YAML settings file shaped like configs/default.yaml, or a shipped config by name (ablation).", show_default=False)]
Device = Annotated[Optional[str], typer.Option(help=help_for("runtime.device"), show_default=False)]
Precision = Annotated[Optional[str], typer.Option(help=help_for("runtime.precision"), show_default=False)]
Seed = Annotated[Optional[int], typer.Option(help=help_for("runtime.seed"), show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress output on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
Data = Annotated[Optional[str], typer.Option(help=help_for("data.source"), show_default=False)]
ImageColumn = Annotated[Optional[str], typer.Option(help=help_for("data.image_column"), show_default=False)]
CaptionColumn = Annotated[Optional[str], typer.Option(help=help_for("data.caption_column"), show_default=False)]
SourceSplit = Annotated[Optional[str], typer.Option("--split", help=help_for("data.train_split"), show_default=False)]
Streaming = Annotated[bool, typer.Option("--streaming", help="hf: read the training split as a stream, downloading nothing ahead; an epoch is --train-size samples.")]


def column_keys(image_column: str | None, caption_column: str | None, split: str | None) -> dict[str, object]:
    return {"data.image_column": image_column, "data.caption_column": caption_column, "data.train_split": split}
Model = Annotated[Optional[str], typer.Option(help=help_for("model.preset"), show_default=False)]
VisionWeights = Annotated[Optional[str], typer.Option(help=help_for("model.vision_weights"), show_default=False)]
Decoder = Annotated[Optional[str], typer.Option(help=help_for("model.decoder"), show_default=False)]
Epochs = Annotated[Optional[int], typer.Option(help=help_for("pretrain.engine.epochs"), show_default=False)]
MaxSteps = Annotated[Optional[int], typer.Option(help=help_for("pretrain.engine.max_steps"), show_default=False)]
AlignMaxSteps = Annotated[Optional[int], typer.Option("--max-steps", help=help_for("align.engine.max_steps"), show_default=False)]
BatchSize = Annotated[Optional[int], typer.Option(help=help_for("pretrain.engine.batch_size"), show_default=False)]
Lr = Annotated[Optional[float], typer.Option(help=help_for("pretrain.optimizer.lr"), show_default=False)]
TrainSize = Annotated[Optional[int], typer.Option(help=help_for("data.train_size"), show_default=False)]
ValSize = Annotated[Optional[int], typer.Option(help=help_for("data.val_size"), show_default=False)]
TestSize = Annotated[Optional[int], typer.Option(help=help_for("data.test_size"), show_default=False)]
# evaluate and align on a checkpoint: the data settings default to the run's (carve.py).
RunDataSource = Annotated[Optional[str], typer.Option("--data", help="Data source: synthetic | imagefolder:PATH | hf:NAME[:CONFIG] | disk:PATH | wds:PATTERN; another than the run's is read with a warning.  \\[default: the run's, recorded with the checkpoint]", show_default=False)]
RunTrainSize = Annotated[Optional[int], typer.Option("--train-size", help="At most N training images; a size other than the run's carves other splits, with a warning.  \\[default: the run's]", show_default=False)]
RunValSize = Annotated[Optional[int], typer.Option("--val-size", help="At most N validation images; a size other than the run's carves other splits, with a warning.  \\[default: the run's]", show_default=False)]
RunTestSize = Annotated[Optional[int], typer.Option("--test-size", help="At most N test images; a size other than the run's carves other splits, with a warning.  \\[default: the run's]", show_default=False)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start again in an --output that already holds a run.")]
Compile = Annotated[bool, typer.Option("--compile", help="torch.compile each transformer block: slower start, faster steps (docs/performance.md).")]
GradCheckpoint = Annotated[bool, typer.Option("--gradient-checkpointing", help="Recompute activations in the backward pass: less memory, more compute.")]
LocalLoss = Annotated[bool, typer.Option("--local-loss", help="Under torchrun: each rank's contrastive loss covers its own pairs against all ranks' (less memory). Default: the global batch, exactly as one process.")]


Log = Annotated[Optional[str], typer.Option("--log", help=help_for("runtime.log"), show_default=False)]


def speed_keys(compile: bool, gradient_checkpointing: bool, local_loss: bool = False, log: str | None = None) -> dict[str, object]:
    return {"runtime.compile": compile or None, "runtime.gradient_checkpointing": gradient_checkpointing or None,
            "runtime.local_loss": local_loss or None, "runtime.log": log}


Images = Annotated[Optional[list[str]], typer.Argument(metavar="IMAGES", help="Image files, folders (searched recursively, sorted), globs (quoted ones are expanded too), or - to read paths from stdin, one per line.", show_default=False)]
CaptionCheckpoint = Annotated[Optional[Path], typer.Option("--checkpoint", help="Checkpoint, or a run directory (its best).  \\[default: runs/align's best, else runs/pretrain's]", show_default=False)]
CaptionBatch = Annotated[Optional[int], typer.Option("--batch-size", help=help_for("caption.batch_size"), show_default=False)]
Format = Annotated[Optional[str], typer.Option("--format", help=help_for("caption.format"), show_default=False)]
CaptionWorkers = Annotated[Optional[int], typer.Option("--workers", help=help_for("caption.workers"), show_default=False)]


def search_options(group: str) -> tuple[Any, ...]:
    """``group``'s search options (caption, evaluate), each with its setting's docstring and default."""
    def option(field: str, kind: type) -> Any:
        return Annotated[Optional[kind], typer.Option(help=help_for(f"{group}.decode.{field}"), show_default=False)]

    return (option("beams", int), option("max_length", int), option("min_length", int),
            option("length_penalty", float), option("no_repeat_ngram", int), option("concept_guidance", float),
            option("concept_prior", float))


(CaptionBeams, CaptionMaxLength, CaptionMinLength, CaptionLengthPenalty, CaptionNoRepeat, CaptionGuidance,
 CaptionPrior) = search_options("caption")
EvalBeams, EvalMaxLength, EvalMinLength, EvalLengthPenalty, EvalNoRepeat, EvalGuidance, EvalPrior = (
    search_options("evaluate"))
# export's greedy search: the library's own DecodeSettings defaults
ExportMaxLength = Annotated[Optional[int], typer.Option(help=help_for("max_length", DecodeSettings), show_default=False)]
ExportMinLength = Annotated[Optional[int], typer.Option(help=help_for("min_length", DecodeSettings), show_default=False)]
ExportGuidance = Annotated[Optional[float], typer.Option(help=help_for("concept_guidance", DecodeSettings), show_default=False)]
ExportPrior = Annotated[Optional[float], typer.Option(help=help_for("concept_prior", DecodeSettings), show_default=False)]


def decode_keys(group: str, beams: int | None, max_length: int | None, min_length: int | None,
            length_penalty: float | None, no_repeat_ngram: int | None,
            concept_guidance: float | None, concept_prior: float | None = None) -> dict[str, object]:
    """The search options of caption and evaluate, as dotted settings keys of ``group``.decode (None: not given)."""
    return {f"{group}.decode.beams": beams, f"{group}.decode.max_length": max_length,
            f"{group}.decode.min_length": min_length, f"{group}.decode.length_penalty": length_penalty,
            f"{group}.decode.no_repeat_ngram": no_repeat_ngram, f"{group}.decode.concept_guidance": concept_guidance,
            f"{group}.decode.concept_prior": concept_prior}
