"""The training phases: each wires settings, data, model and objective into ``engine.fit``.

Nothing here loops over data; a phase only decides *what* is trained (DESIGN §2).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from capcli.checkpoint import resolve_checkpoint
from capcli.data.batches import CaptionCollator, CaptionDataset
from capcli.data.sources import load_splits
from capcli.engine import FitResult, Objective, TrainData, fit
from capcli.errors import ConfigError
from capcli.model import Captioner, build_model
from capcli.objectives import PretrainObjective
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


def prepare_pretrain(settings: Settings, overwrite: bool = False) -> Phase:
    """Phase 1's model, objective and data; writes the run's ``config.yaml``."""
    phase = settings.pretrain
    run_dir = prepare_run_dir(phase.engine, overwrite)
    splits = load_splits(settings.data)
    torch.manual_seed(settings.runtime.seed)
    if phase.engine.resume:
        # Architecture and tokenizer only: the engine's resume loads the weights with the rest of the state.
        model = Captioner.from_pretrained(resolve_checkpoint(run_dir, "last"), weights=False)
    else:
        model = build_model(settings.model, (c for caps in splits["train"]["captions"] for c in caps))
    (run_dir / "config.yaml").write_text(to_yaml(settings), encoding="utf-8")

    def dataset(name: str) -> CaptionDataset | None:
        if name not in splits:
            return None
        return CaptionDataset(splits[name], model.image_size, settings.data.max_pixels, settings.data.seed)

    data = TrainData(
        train=dataset("train"), val=dataset("val"),
        collate=CaptionCollator(model.tokenizer, settings.data.max_caption_tokens),
        num_workers=settings.data.num_workers, max_bad_fraction=settings.data.max_bad_fraction,
    )
    return Phase(model, PretrainObjective(phase.contrastive_weight, phase.caption_weight), data)


def pretrain(settings: Settings, overwrite: bool = False,
             on_step: Callable[[int, dict[str, float]], None] | None = None) -> FitResult:
    """Phase 1: contrastive + captioning loss on image-caption pairs."""
    run = prepare_pretrain(settings, overwrite)
    phase = settings.pretrain
    return fit(run.model, run.objective, run.data, phase.engine, phase.optimizer, settings.runtime,
               title="pretrain", on_step=on_step)
