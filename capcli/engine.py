"""The training engine: the only training loop in capcli.

Nothing here knows about captions or images. A phase hands ``fit`` a model, an
*objective* (batch → named losses) and its data; the engine owns everything else:
device and precision, accumulation, clipping, AdamW and the cosine schedule,
validation and early stopping, checkpoints and resume, Ctrl-C, progress and the
metrics log.

The life cycle is explicit: setup (device, optimizer, resume) → train (epochs of
optimizer steps, each made of ``grad_accum`` micro-batches) → validate and checkpoint
each epoch → cleanup (final checkpoint, display closed).

Data order is a pure function of (seed, epoch): the sampler hands datasets
``SampleKey(index, epoch)`` so that any per-sample randomness (which of an image's
captions to use) is too. That is what makes a resumed run repeat the uninterrupted one.
"""

from __future__ import annotations

import math
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, Sampler

from capcli.checkpoint import load_state, resolve_checkpoint, save_checkpoint
from capcli.errors import CapcliError, ConfigError, DataError, TrainingInterrupted
from capcli.progress import ProgressDisplay
from capcli.runlog import RunLog
from capcli.settings import EngineSettings, OptimizerSettings, RuntimeSettings


class SampleKey(NamedTuple):
    """What the sampler hands a dataset: the row, and the epoch for per-sample randomness."""

    index: int
    epoch: int


class Batch(Protocol):
    """What a collate function must return: a sized batch that moves to a device."""

    skipped: int  # samples dropped while loading (corrupt images), counted against max_bad_fraction

    def __len__(self) -> int: ...
    def to(self, device: torch.device) -> Batch: ...


class Objective(Protocol):
    """Turns a batch into named losses. Keys ending in ``_loss`` are summed into the loss to
    minimise; other 0-d tensors are logged as metrics. ``progress`` runs from 0 to 1 over
    the phase's optimizer steps (for schedules such as align's α(t))."""

    def __call__(self, model: nn.Module, batch: Any, progress: float) -> dict[str, torch.Tensor]: ...


@dataclass
class TrainData:
    """The datasets of a phase and how to batch them."""

    train: Dataset
    val: Dataset | None
    collate: Callable[[list[Any]], Batch]
    num_workers: int = 0
    max_bad_fraction: float = 0.01


@dataclass
class FitResult:
    """What a finished (or early-stopped) run reports."""

    run_dir: Path
    steps: int
    epochs: int
    samples: int
    seconds: float
    stopped_early: bool
    train: dict[str, float] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    first_val: dict[str, float] = field(default_factory=dict)
    best_val_loss: float = math.inf
    best_checkpoint: Path | None = None
    skipped: int = 0


# ---------------------------------------------------------------- device and precision


def resolve_device(name: str) -> torch.device:
    """``auto`` takes CUDA, then MPS, then the CPU; an explicit device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was asked for but CUDA is not available (allowed: auto, cpu, cuda, mps)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("device 'mps' was asked for but MPS is not available (allowed: auto, cpu, cuda, mps)")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> torch.dtype:
    """``auto`` is bf16 on CUDA (fp16 where bf16 is missing) and fp32 elsewhere.

    On CPU, fp32 is the only sane automatic choice: bf16 matmuls run about 100× slower
    than fp32 on CPUs without AMX or AVX512-BF16.
    """
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def autocast_context(device: torch.device, dtype: torch.dtype) -> Callable[[], AbstractContextManager]:
    """Built once: ``nullcontext`` for fp32, ``torch.autocast`` otherwise."""
    if dtype == torch.float32:
        return nullcontext
    return lambda: torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------- optimizer and schedule


def build_optimizer(model: nn.Module, settings: OptimizerSettings, device: torch.device) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; matrices decay, biases and norm gains do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter of the model is frozen")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": settings.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups, lr=settings.lr, betas=settings.betas, eps=settings.eps, fused=device.type == "cuda"
    )


def cosine_with_warmup(total_steps: int, warmup: float, min_ratio: float) -> Callable[[int], float]:
    """LR multiplier: linear warmup over ``warmup × total`` steps, then a cosine decay to ``min_ratio``."""
    warmup_steps = int(round(warmup * total_steps))

    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return multiplier


# ---------------------------------------------------------------- data order


class StepBatchSampler(Sampler[list[SampleKey]]):
    """One epoch's micro-batches, in a seeded order, skipping those already consumed.

    Only whole optimizer steps are yielded: the tail that cannot fill ``batch_size × accum``
    is dropped, so every step sees the same number of samples.
    """

    def __init__(self, n: int, batch_size: int, accum: int, seed: int, epoch: int, skip_batches: int = 0):
        self.batch_size, self.epoch = batch_size, epoch
        generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        self.order = torch.randperm(n, generator=generator).tolist()
        self.num_batches = (n // (batch_size * accum)) * accum
        self.skip = skip_batches

    def __len__(self) -> int:
        return self.num_batches - self.skip

    def __iter__(self) -> Iterator[list[SampleKey]]:
        for b in range(self.skip, self.num_batches):
            rows = self.order[b * self.batch_size : (b + 1) * self.batch_size]
            yield [SampleKey(i, self.epoch) for i in rows]


def steps_per_epoch(n: int, settings: EngineSettings) -> int:
    return n // (settings.batch_size * settings.grad_accum)


# ---------------------------------------------------------------- Ctrl-C


class _StopOnInterrupt:
    """The first Ctrl-C asks the loop to stop at the next safe point; a second one stops at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def __enter__(self) -> _StopOnInterrupt:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: leave signals alone
            self._previous = None
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc: object) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


# ---------------------------------------------------------------- the loop


def _total_loss(losses: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in losses.items() if k.endswith("_loss"))


@torch.no_grad()
def validate(model: nn.Module, objective: Objective, loader: DataLoader, device: torch.device,
             autocast: Callable[[], AbstractContextManager], progress: float) -> dict[str, float]:
    """Sample-weighted means of every value the objective returns, plus ``loss``, their sum."""
    model.eval()
    sums: dict[str, float] = {}
    count = 0
    for batch in loader:
        if len(batch) == 0:
            continue
        batch = batch.to(device)
        with autocast():
            out = objective(model, batch, progress)
        out = {"loss": _total_loss(out), **out}
        for key, value in out.items():
            sums[key] = sums.get(key, 0.0) + float(value) * len(batch)
        count += len(batch)
    model.train()
    return {k: v / count for k, v in sums.items()} if count else {}


def fit(
    model: nn.Module,
    objective: Objective,
    data: TrainData,
    engine: EngineSettings,
    optimizer_settings: OptimizerSettings,
    runtime: RuntimeSettings,
    *,
    title: str = "train",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``objective`` and write the run directory ``engine.output``.

    Args:
        model: must implement ``save_pretrained(directory)`` and ``load_weights(directory)``; parameters without
            ``requires_grad`` are left alone (frozen towers).
        objective: see ``Objective``.
        data: train and validation datasets (keyed by ``SampleKey``) and their collate.
        engine, optimizer_settings, runtime: the settings groups this function reads.
        title: the name shown on the progress bar.
        on_step: called after every optimizer step with the step number and its losses.

    Raises:
        TrainingInterrupted: after Ctrl-C, once a resumable checkpoint is written.
        CapcliError: on a non-finite loss or gradient, or too many unreadable samples.
    """
    run_dir = Path(engine.output)
    device = resolve_device(runtime.device)
    dtype = resolve_precision(runtime.precision, device)
    autocast = autocast_context(device, dtype)
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)  # does nothing unless fp16
    model.to(device).train()
    optimizer = build_optimizer(model, optimizer_settings, device)

    per_epoch = steps_per_epoch(len(data.train), engine)
    if per_epoch == 0:
        raise DataError(
            f"{len(data.train)} training samples cannot fill one optimizer step of "
            f"batch_size {engine.batch_size} × grad_accum {engine.grad_accum}"
        )
    total_steps = per_epoch * engine.epochs
    if engine.max_steps:
        total_steps = min(total_steps, engine.max_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, cosine_with_warmup(total_steps, optimizer_settings.warmup, optimizer_settings.min_lr_ratio)
    )

    state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "samples": 0, "skipped": 0,
             "best_val_loss": math.inf, "bad_validations": 0, "first_val": {}}
    if engine.resume:
        state = _restore(run_dir, model, optimizer, scheduler, scaler, device)
    else:
        random.seed(runtime.seed)
    log = RunLog(run_dir, resume_step=state["step"] if engine.resume else None)

    def checkpoint(name: str) -> Path:
        full = {**state, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict(), "rng": _rng_state(), "total_steps": total_steps}
        return save_checkpoint(run_dir / "checkpoints" / name, model, full)

    val_loader = None
    if data.val is not None and len(data.val) > 0:
        val_loader = DataLoader(
            data.val,
            batch_sampler=_val_batches(len(data.val), engine.batch_size),
            collate_fn=data.collate, num_workers=data.num_workers, pin_memory=device.type == "cuda",
        )

    def run_validation() -> dict[str, float]:
        metrics = validate(model, objective, val_loader, device, autocast, state["step"] / total_steps)
        log.write({"split": "val", "step": state["step"], "epoch": state["epoch"], **metrics})
        return metrics

    started = time.monotonic()
    result = FitResult(run_dir=run_dir, steps=0, epochs=0, samples=0, seconds=0.0, stopped_early=False)
    window: dict[str, float] = {}
    window_steps, window_samples, window_start = 0, 0, time.monotonic()
    best_path = run_dir / "checkpoints" / "best" if state["best_val_loss"] < math.inf else None
    stop = _StopOnInterrupt()

    with stop, ProgressDisplay(title, total_steps, quiet=runtime.quiet, start=state["step"]) as display:
        if val_loader is not None and state["step"] == 0 and not state["first_val"]:
            state["first_val"] = run_validation()
            display.print(f"{title} before training: val loss {state['first_val'].get('loss', math.nan):.4f}")
        val_metrics: dict[str, float] = {}
        while state["epoch"] < engine.epochs and state["step"] < total_steps and not result.stopped_early:
            sampler = StepBatchSampler(len(data.train), engine.batch_size, engine.grad_accum,
                                       runtime.seed, state["epoch"], state["batch_in_epoch"])
            loader = DataLoader(data.train, batch_sampler=sampler, collate_fn=data.collate,
                                num_workers=data.num_workers, pin_memory=device.type == "cuda")
            batches = iter(loader)
            while state["step"] < total_steps and not stop.requested:
                micro = _take(batches, engine.grad_accum)
                if not micro:
                    break
                state["skipped"] += sum(b.skipped for b in micro)
                micro = [b for b in micro if len(b) > 0]
                _check_unreadable(state, data.max_bad_fraction, at_least=100)
                step_losses = _optimizer_step(model, objective, micro, optimizer, scaler, autocast, device,
                                              engine.clip_grad, state["step"] / total_steps)
                if step_losses is None:  # every sample of this step was unreadable
                    continue
                scheduler.step()
                n = sum(len(b) for b in micro)
                state["step"] += 1
                state["batch_in_epoch"] += engine.grad_accum
                state["samples"] += n
                if not math.isfinite(step_losses["grad_norm"]):
                    raise CapcliError(
                        f"non-finite gradient at step {state['step']} (losses: "
                        f"{ {k: round(v, 4) for k, v in step_losses.items()} }); the last good checkpoint is in "
                        f"{run_dir / 'checkpoints'}; try a lower --lr or --precision fp32"
                    )
                for key, value in step_losses.items():
                    window[key] = window.get(key, 0.0) + value
                window_steps, window_samples = window_steps + 1, window_samples + n
                lr = scheduler.get_last_lr()[0]
                rate = window_samples / max(1e-9, time.monotonic() - window_start)
                display.update(state["step"], {"loss": step_losses["loss"], "lr": lr, "samples/s": rate})
                if state["step"] % engine.log_every == 0 or state["step"] == total_steps:
                    means = {k: v / window_steps for k, v in window.items()}
                    log.write({"split": "train", "step": state["step"], "epoch": state["epoch"], "lr": lr,
                               "samples_per_s": round(rate, 2), **means})
                    result.train = means
                    window, window_steps, window_samples, window_start = {}, 0, 0, time.monotonic()
                if on_step is not None:
                    on_step(state["step"], step_losses)
                if stop.requested:
                    checkpoint("last")
                    display.print(f"interrupted: resumable checkpoint written to {run_dir / 'checkpoints' / 'last'}")
                    raise TrainingInterrupted(
                        f"interrupted at step {state['step']}; continue with --resume --output {run_dir}"
                    )
            _check_unreadable(state, data.max_bad_fraction, at_least=1)
            if state["batch_in_epoch"] >= sampler.num_batches:
                state["epoch"] += 1
                state["batch_in_epoch"] = 0
            if val_loader is not None:
                val_metrics = run_validation()
                display.print(f"{title} epoch {state['epoch']} step {state['step']}: val loss {val_metrics['loss']:.4f}")
                if val_metrics["loss"] < state["best_val_loss"]:
                    state["best_val_loss"], state["bad_validations"] = val_metrics["loss"], 0
                    best_path = checkpoint("best")
                else:
                    state["bad_validations"] += 1
                    if engine.patience and state["bad_validations"] >= engine.patience:
                        result.stopped_early = True
                        display.print(f"early stop: no val improvement in {engine.patience} validations")
            checkpoint("last")
            if stop.requested:
                raise TrainingInterrupted(f"interrupted at step {state['step']}; continue with --resume --output {run_dir}")

    if best_path is None:  # no validation data: the last weights are the best we know
        best_path = save_checkpoint(run_dir / "checkpoints" / "best", model, {**state, "rng": _rng_state()})
    result.steps, result.epochs, result.samples = state["step"], state["epoch"], state["samples"]
    result.seconds = time.monotonic() - started
    result.val, result.first_val = val_metrics, state["first_val"]
    result.best_val_loss, result.best_checkpoint, result.skipped = state["best_val_loss"], best_path, state["skipped"]
    return result


def _check_unreadable(state: dict[str, Any], max_fraction: float, at_least: int) -> None:
    """Fail once more than ``max_fraction`` of the samples read so far were unreadable."""
    total = state["samples"] + state["skipped"]
    if state["skipped"] and total >= at_least and state["skipped"] > max_fraction * total:
        raise DataError(
            f"{state['skipped']} of {total} training samples could not be read, more than "
            f"max_bad_fraction {max_fraction}; the warnings above name the files"
        )


def _take(batches: Iterator[Batch], n: int) -> list[Batch]:
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == n:
            break
    return out


def _optimizer_step(model, objective, micro, optimizer, scaler, autocast, device, clip_grad, progress):
    """Accumulate gradients over the micro-batches of one step and apply them.

    Each micro-batch's loss is weighted by its share of the step's samples, so a step of
    ``k`` micro-batches of ``b`` gives the gradient of one batch of ``k·b`` for any loss
    that is a per-sample mean.
    """
    total = sum(len(b) for b in micro)
    if total == 0:
        return None
    sums: dict[str, float] = {}
    for batch in micro:
        batch = batch.to(device)
        weight = len(batch) / total
        with autocast():
            losses = objective(model, batch, progress)
            loss = _total_loss(losses)
        scaler.scale(loss * weight).backward()
        for key, value in {"loss": loss, **losses}.items():
            sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight  # note: CPU-GPU sync point
    scaler.unscale_(optimizer)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else math.inf)
    scaler.step(optimizer)  # skips the step when fp16 gradients overflowed
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    sums["grad_norm"] = float(grad_norm)
    if scaler.is_enabled() and not math.isfinite(sums["grad_norm"]):
        sums["grad_norm"] = 0.0  # fp16 overflow: the scaler skipped the step and lowered its scale
    return sums


def _val_batches(n: int, batch_size: int) -> list[list[SampleKey]]:
    return [[SampleKey(i, 0) for i in range(s, min(n, s + batch_size))] for s in range(0, n, batch_size)]


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _restore(run_dir, model, optimizer, scheduler, scaler, device) -> dict[str, Any]:
    """Load ``last/`` into the live objects and return the loop's counters."""
    try:
        directory = resolve_checkpoint(run_dir, "last")
    except ConfigError:
        raise ConfigError(f"--resume: no checkpoint to resume in {run_dir / 'checkpoints' / 'last'}") from None
    try:
        model.load_weights(directory)
    except ValueError as err:
        raise ConfigError(f"--resume: {err}; start a new --output or match the model settings") from None
    state = load_state(directory)
    optimizer.load_state_dict(state.pop("optimizer"))
    scheduler.load_state_dict(state.pop("scheduler"))
    scaler.load_state_dict(state.pop("scaler"))
    rng = state.pop("rng")
    torch.set_rng_state(rng["torch"])
    random.setstate(_as_tuple(rng["python"]))
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    state.pop("total_steps", None)
    return state


def _as_tuple(value: Any) -> Any:
    """``random.setstate`` wants tuples; a saved state may come back with lists."""
    return tuple(_as_tuple(v) for v in value) if isinstance(value, (list, tuple)) else value
