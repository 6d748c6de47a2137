"""What every phase shares: its run directory, its ``config.yaml``, its curves, and ``Phase``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from capcli.errors import ConfigError
from capcli.model import Captioner
from capcli.settings import EngineSettings, Settings, to_yaml
from capcli.train import distributed, runlock
from capcli.train.checkpoint import resume_checkpoint
from capcli.train.engine import Objective, TrainData
from capcli.train.runtime import Runtime


def prepare_run_dir(engine: EngineSettings, overwrite: bool = False) -> Path:
    """Refuse to train over an existing run unless told to resume or overwrite: nothing is lost silently."""
    run_dir = Path(engine.output)
    if distributed.launched().main:
        runlock.acquire(run_dir)  # one run per run directory: a second one refuses here, naming the first
    if engine.resume:
        resume_checkpoint(run_dir)  # fail now, before any data is loaded, if there is nothing to resume
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
    runtime: Runtime  # the command's, resolved once: every round of align shares it


def write_config(run_dir: Path, settings: Settings) -> None:
    """The run's resolved settings, ``config.yaml`` (rank 0 writes it)."""
    if distributed.current().main:
        (run_dir / "config.yaml").write_text(to_yaml(settings), encoding="utf-8")


def draw_curves(run_dir: Path) -> None:
    """``curves.png`` at the end of a phase (rank 0). A plot that fails is a warning, never a failed run."""
    if not distributed.current().main:
        return
    try:
        from capcli.evaluate.report import write_curves

        write_curves([run_dir])
    except Exception as err:  # noqa: BLE001 - the run itself succeeded; say why there is no picture
        print(f"warning: no curves.png for {run_dir} ({type(err).__name__}: {err})", file=sys.stderr)
