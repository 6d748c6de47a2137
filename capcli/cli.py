"""The ``capcli`` command line: thin commands that read settings, call the library, render, exit.

Exit codes (DESIGN §8): 0 success, 1 runtime failure, 2 usage or settings error, 130 interrupted.
Heavy imports (torch, transformers, open_clip) happen inside the commands so that
``--help`` and ``--version`` answer at once.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Optional

import typer

from capcli import __version__
from capcli.errors import CapcliError

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


# Options shared by the commands. None means "not given": the settings layers below decide.
Config = Annotated[Optional[Path], typer.Option("--config", help="YAML settings file, shaped like configs/default.yaml.", show_default=False)]
Device = Annotated[Optional[str], typer.Option(help="auto | cpu | cuda | mps  \\[default: auto]", show_default=False)]
Precision = Annotated[Optional[str], typer.Option(help="auto | fp32 | bf16 | fp16  \\[default: auto: bf16 on CUDA, fp32 on CPU]", show_default=False)]
Seed = Annotated[Optional[int], typer.Option(help="Seed of initialisation and data order.  \\[default: 0]", show_default=False)]
Quiet = Annotated[bool, typer.Option("--quiet", help="No progress output on stderr.")]
Json = Annotated[bool, typer.Option("--json", help="Print the result as one JSON document on stdout.")]
Data = Annotated[Optional[str], typer.Option(help="Data source: synthetic | imagefolder:PATH  \\[default: synthetic]", show_default=False)]
Model = Annotated[Optional[str], typer.Option(help="Model preset: tiny | clip-gpt2  \\[default: tiny]", show_default=False)]
VisionWeights = Annotated[Optional[str], typer.Option(help="clip-gpt2: open_clip tag, local file, or none  \\[default: openai]", show_default=False)]
Decoder = Annotated[Optional[str], typer.Option(help="clip-gpt2: GPT-2 name or local directory  \\[default: gpt2]", show_default=False)]
Epochs = Annotated[Optional[int], typer.Option(help="Passes over the training data.  \\[default: 10; tiny: 8]", show_default=False)]
MaxSteps = Annotated[Optional[int], typer.Option(help="Stop after N optimizer steps (smoke runs).", show_default=False)]
BatchSize = Annotated[Optional[int], typer.Option(help="Images per micro-batch.  \\[default: 64; tiny: 32]", show_default=False)]
Lr = Annotated[Optional[float], typer.Option(help="Peak learning rate.  \\[default: 1e-4; tiny: 1e-3]", show_default=False)]
TrainSize = Annotated[Optional[int], typer.Option(help="At most N training images.  \\[default: 10000; tiny: 3000]", show_default=False)]
ValSize = Annotated[Optional[int], typer.Option(help="At most N validation images.  \\[default: 1000; tiny: 300]", show_default=False)]
TestSize = Annotated[Optional[int], typer.Option(help="At most N test images.  \\[default: 1000; tiny: 300]", show_default=False)]
Resume = Annotated[bool, typer.Option("--resume", help="Continue the run in --output from its last checkpoint.")]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Start again in an --output that already holds a run.")]


@app.command()
def pretrain(
    config: Config = None, device: Device = None, precision: Precision = None, seed: Seed = None,
    quiet: Quiet = False, json: Json = False, data: Data = None, model: Model = None,
    vision_weights: VisionWeights = None, decoder: Decoder = None,
    output: Annotated[Optional[Path], typer.Option(help="Run directory.  \\[default: runs/pretrain]", show_default=False)] = None,
    epochs: Epochs = None, max_steps: MaxSteps = None, batch_size: BatchSize = None, lr: Lr = None,
    train_size: TrainSize = None, val_size: ValSize = None, test_size: TestSize = None,
    resume: Resume = False, overwrite: Overwrite = False,
) -> None:
    """Phase 1: contrastive (InfoNCE) + captioning loss on image-caption pairs."""
    with exit_codes():
        from capcli.settings import load_settings

        settings = load_settings(config, {
            "runtime.device": device, "runtime.precision": precision, "runtime.seed": seed,
            "runtime.quiet": quiet or None, "data.source": data, "model.preset": model,
            "model.vision_weights": vision_weights, "model.decoder": decoder,
            "pretrain.engine.output": output, "pretrain.engine.epochs": epochs,
            "pretrain.engine.max_steps": max_steps, "pretrain.engine.batch_size": batch_size,
            "pretrain.optimizer.lr": lr, "data.train_size": train_size, "data.val_size": val_size,
            "data.test_size": test_size, "pretrain.engine.resume": resume or None,
        })
        from capcli import phases, results  # torch and friends: only once the settings are known to be good

        result = phases.pretrain(settings, overwrite=overwrite)
        results.print_fit(results.fit_summary("pretrain", result), json)


def _not_yet(command: str, issue: str) -> None:
    print(f"error: `capcli {command}` is not built yet in capcli {__version__} ({issue}); "
          f"see CHANGELOG.md", file=sys.stderr)
    raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def align() -> None:
    """Phase 2: Bradley-Terry preference alignment with the vision encoder frozen. (Not built yet.)"""
    _not_yet("align", "planned: preference alignment")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def evaluate() -> None:
    """CLIP score, BLEU-4, CIDEr, ROUGE-L and preference win rate of a checkpoint. (Not built yet.)"""
    _not_yet("evaluate", "planned: metrics")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def caption() -> None:
    """Caption image files, folders and lists, for shell scripts. (Not built yet.)"""
    _not_yet("caption", "planned: batched decoding")


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def benchmark() -> None:
    """Measured training and captioning speed, memory and MFU. (Not built yet.)"""
    _not_yet("benchmark", "planned: benchmark")


def main() -> None:
    app()
