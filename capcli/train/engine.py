"""The training engine: the only training loop in capcli.

Nothing here knows about captions or images. A phase hands ``fit`` a model, an
*objective* (batch → named losses) and its data; the engine owns everything else:
device and precision, accumulation, clipping, AdamW and the cosine schedule,
validation and early stopping, checkpoints and resume, Ctrl-C, progress and the
metrics log.

The life cycle is explicit (``_Training``): setup (the runtime's device, optimizer, resume) → epochs of
optimizer steps, each made of ``grad_accum`` micro-batches → validation and checkpoints
after each epoch → the result.
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from capcli.errors import (
    CapcliError,
    CheckpointError,
    ConfigError,
    DataError,
    TrainingInterrupted,
)
from capcli.settings import EngineSettings, OptimizerSettings
from capcli.train import distributed
from capcli.train.checkpoint import (
    Described,
    first_line,
    load_state,
    resume_checkpoint,
    save_checkpoint,
)
from capcli.train.contracts import Batch, FitResult, Objective, TrainData
from capcli.train.interrupt import StopOnInterrupt
from capcli.train.optim import build_optimizer, build_scheduler
from capcli.train.progress import ProgressDisplay
from capcli.train.runlog import NoLog, RunLog
from capcli.train.runner import objective_runner
from capcli.train.runtime import Runtime
from capcli.train.sampler import (
    EpochLayout,
    in_order,
    micro_batches_per_epoch,
    planned_steps,
)
from capcli.train.state import TrainingState, restore_rng, rng_state, seed_rng
from capcli.train.validation import total_loss, validate


def fit(
    model: nn.Module,
    objective: Objective,
    data: TrainData,
    engine: EngineSettings,
    optimizer: OptimizerSettings,
    runtime: Runtime,
    *,
    title: str = "train",
    on_step: Callable[[int, dict[str, float]], None] | None = None,
    describe: Callable[[Path, dict[str, Any]], None] | None = None,
) -> FitResult:
    """Train ``model`` on ``objective`` and write the run directory ``engine.output``.

    Args:
        model: implements ``save_pretrained(directory)`` and ``load_weights(directory)``.
            Parameters without ``requires_grad`` are left alone (frozen towers).
        objective: see ``Objective``.
        data: train and validation datasets and their collate.
        engine, optimizer: the settings groups this function reads.
        runtime: the command's device, precision and process group (under torchrun, one built with
            ``Runtime.from_settings(..., join=True)``), and the runtime settings.
        title: the name shown on the progress display.
        on_step: called after every optimizer step with the step number and its losses.
        describe: called with each checkpoint's folder, before it is swapped in, and its training
            state: writes the files that describe it (the phase's settings, the model card).

    Raises:
        TrainingInterrupted: after Ctrl-C, once a resumable checkpoint is written.
        CapcliError: on a non-finite loss or gradient, or too many unreadable samples.
    """
    return _Training(model, objective, data, engine, optimizer, runtime, title, on_step, describe).run()


class _Training:
    """One call of ``fit``: the live objects and the counters that a checkpoint saves."""

    def __init__(self, model, objective, data, engine, optimizer, runtime: Runtime, title, on_step, describe=None):
        self.model, self.objective, self.data = model, objective, data
        self.engine, self.runtime, self.title, self.on_step = engine, runtime, title, on_step
        self.describe = describe
        self.run_dir = Path(engine.output)
        self.world, self.device = runtime.world, runtime.device
        self.scaler = runtime.grad_scaler()
        settings = runtime.settings
        model.to(self.device).train()
        if settings.gradient_checkpointing:
            _require(model, "set_gradient_checkpointing", "runtime.gradient_checkpointing")(True)
        if settings.compile:
            _require(model, "compile_blocks", "runtime.compile")()
        self.runner = objective_runner(model, self.world.distributed, self.device)
        self.optimizer = build_optimizer(model, optimizer, self.device)

        self.total_steps = planned_steps(len(data.train), engine.batch_size, engine.grad_accum, engine.epochs,
                                         engine.max_steps, self.world.size)
        if micro_batches_per_epoch(len(data.train), engine.batch_size, engine.grad_accum, self.world.size) == 0:
            raise DataError(f"{len(data.train)} training samples cannot fill one optimizer step of "
                            f"batch_size {engine.batch_size} × grad_accum {engine.grad_accum}"
                            + (f" × {self.world.size} processes" if self.world.distributed else ""))
        self.scheduler = build_scheduler(self.optimizer, optimizer, self.total_steps)

        self.state = TrainingState()
        if engine.resume:
            self._restore()
        else:
            seed_rng(settings.seed, self.world.rank)
        self.layout = EpochLayout(engine.batch_size, engine.grad_accum, settings.seed, self.world.rank,
                                  self.world.size, data.collate, data.num_workers, self.device.type == "cuda")
        self.epoch_batches = 0  # micro-batches of the current epoch, set by _train_epoch
        # Rank 0 alone writes the log, the checkpoints and the progress; the others train quietly.
        self.log = (RunLog(self.run_dir, resume_step=self.state.step if engine.resume else None,
                           tensorboard=settings.log == "tensorboard")
                    if self.world.main else NoLog())
        self.val_loader = None
        if data.val is not None and len(data.val) > 0:
            try:
                shard = in_order(len(data.val), engine.batch_size, self.world.rank, self.world.size)
            except ValueError as err:
                raise DataError(f"validation split: {err}; use a larger split or fewer processes") from None
            self.val_loader = DataLoader(data.val, batch_sampler=shard,
                                         collate_fn=data.collate, num_workers=data.num_workers,
                                         pin_memory=self.device.type == "cuda")
        self.result = FitResult(run_dir=self.run_dir)
        self.stop = StopOnInterrupt()

    # ------------------------------------------------------------------ the loop

    def run(self) -> FitResult:
        started = time.monotonic()
        state, engine = self.state, self.engine
        quiet = self.runtime.settings.quiet or not self.world.main
        with self.stop, ProgressDisplay(self.title, self.total_steps, quiet=quiet, start=state.step) as self.display:
            if self.val_loader is not None and state.step == 0 and not state.first_val:
                state.first_val = self._validate()
                self.display.print(f"{self.title} before training: val loss {state.first_val['loss']:.4f}")
            while (state.epoch < engine.epochs and state.step < self.total_steps
                   and not self.result.stopped_early):
                self._train_epoch()
                self._end_of_epoch()
        best = self.run_dir / "checkpoints" / "best"
        if self.val_loader is None:  # nothing to choose by: the last weights are the best we know
            self._save("best")
        distributed.barrier()  # rank 0 has written its checkpoints before any rank reads them
        r = self.result
        r.steps, r.epochs, r.samples, r.skipped = state.step, state.epoch, state.samples, state.skipped
        r.seconds, r.first_val, r.best_val_loss = time.monotonic() - started, state.first_val, state.best_val_loss
        r.best_checkpoint = best if best.exists() else None
        return r

    def _train_epoch(self) -> None:
        state, engine = self.state, self.engine
        train, world = self.data.train, self.world
        loader = train.epoch_loader(state.epoch, state.batch_in_epoch, self.layout)
        self.epoch_batches = loader.num_batches
        batches = iter(loader.batches)
        window: dict[str, float] = {}
        window_steps, window_samples, window_start = 0, 0, time.monotonic()
        # A Ctrl-C is acted on after a step, once every rank agrees (_stop_agreed).
        while state.step < self.total_steps and state.batch_in_epoch < self.epoch_batches:
            micro = _take(batches, engine.grad_accum)
            readable = [b for b in micro if len(b) > 0]
            # One process drops a micro-batch whose images were all unreadable. Under DDP every
            # rank must make the same collective calls, so a step in which any rank lost a whole
            # micro-batch is skipped by all of them; and when any rank's data runs out (a stream
            # shorter than train_size), the epoch ends for all.
            short = len(micro) < engine.grad_accum
            lost = not readable if not world.distributed else len(readable) < len(micro)
            lost_ranks, skipped, short_ranks = distributed.all_sum(
                [float(lost), sum(b.skipped for b in micro), float(short)], self.device)
            state.skipped += int(skipped)
            if short_ranks:  # only a stream shorter than train_size runs out before the plan
                if world.main:
                    print(f"warning: the training stream ran out after {state.batch_in_epoch} of "
                          f"{self.epoch_batches} micro-batches; set --train-size to its length", file=sys.stderr)
                state.batch_in_epoch = self.epoch_batches
                break
            state.batch_in_epoch += len(micro)
            _check_unreadable(state, self.data.max_bad_fraction, at_least=100)
            if lost_ranks:
                continue
            losses, n = self._optimizer_step(readable)
            state.step += 1
            state.samples += n
            for key, value in losses.items():
                window[key] = window.get(key, 0.0) + value
            window_steps, window_samples = window_steps + 1, window_samples + n
            lr = self.scheduler.get_last_lr()[0]
            rate = window_samples / max(1e-9, time.monotonic() - window_start)
            self.display.update(state.step, {"loss": losses["loss"], "lr": lr, "samples/s": rate})
            if state.step % engine.log_every == 0 or state.step == self.total_steps:
                self.result.train = {k: v / window_steps for k, v in window.items()}
                self.log.write({"split": "train", "step": state.step, "epoch": state.epoch, "lr": lr,
                                "samples_per_s": round(rate, 2), **self.result.train})
                window, window_steps, window_samples, window_start = {}, 0, 0, time.monotonic()
            if self.on_step is not None:
                self.on_step(state.step, losses)
            if self._stop_agreed():
                self._interrupted()
        _check_unreadable(state, self.data.max_bad_fraction, at_least=1)

    def _optimizer_step(self, micro: list[Batch]) -> tuple[dict[str, float], int]:
        """Accumulate gradients over the micro-batches of one step and apply them.

        Each micro-batch's loss is weighted by its share of the step's samples, so a step of
        ``k`` micro-batches of ``b`` gives the gradient of one batch of ``k·b`` for any loss
        that is a per-sample mean. Under DDP, gradients are all-reduced (averaged) once, in
        the last micro-batch's backward (``no_sync`` before it), and the logged values are
        averaged over the ranks.

        Returns:
            The step's losses and metrics, and its number of samples over all ranks.
        """
        total = sum(len(b) for b in micro)
        progress = self.state.step / self.total_steps
        sums: dict[str, float] = {}
        for i, batch in enumerate(micro):
            batch = batch.to(self.device)
            weight = len(batch) / total
            last = i == len(micro) - 1
            sync = nullcontext() if last or not self.world.distributed else self.runner.no_sync()
            with sync:
                with self.runtime.autocast():
                    losses = self.runner(self.objective, batch, progress)
                    loss = total_loss(losses)
                self.scaler.scale(loss * weight).backward()
            for key, value in {"loss": loss, **losses}.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight  # note: CPU-GPU sync point
        *values, total = distributed.all_sum([*sums.values(), total], self.device)
        sums = {key: value / self.world.size for key, value in zip(sums, values, strict=True)}
        self.scaler.unscale_(self.optimizer)
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        clip = self.engine.clip_grad or math.inf  # with inf this only measures the norm
        sums["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(params, clip))
        # fp16's scaler expects overflowing gradients now and then and skips those steps itself.
        bad = [k for k, v in sums.items() if not math.isfinite(v)
               and (k == "loss" or k.endswith("_loss") or (k == "grad_norm" and not self.scaler.is_enabled()))]
        if bad:
            self._bad_step(bad, sums)  # stops the run, or drops this update
            return sums, int(total)
        self.scaler.step(self.optimizer)  # with fp16, skips the step when gradients overflowed
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        return sums, int(total)

    def _bad_step(self, bad: list[str], sums: dict[str, float]) -> None:
        """A step whose loss or gradient is not finite: stop before the update (the weights, and every
        checkpoint on disk, stay good), or with ``max_bad_steps`` drop its update and go on."""
        step = self.state.step + 1
        parts = [k for k in bad if k.endswith("_loss")] or [k for k in bad if k != "loss"] or bad
        what = (f"non-finite {', '.join(parts)} at step {step}" if parts != ["grad_norm"]
                else f"non-finite gradient at step {step} (first in {_first_nonfinite_grad(self.model)}; "
                     f"the losses were finite)")
        self.optimizer.zero_grad(set_to_none=True)
        self.state.bad_steps += 1
        if self.state.bad_steps > self.engine.max_bad_steps:
            shown = {k: round(v, 4) for k, v in sums.items()}
            allowed = (f"after {self.engine.max_bad_steps} skipped bad step(s) " if self.engine.max_bad_steps else "")
            raise CapcliError(f"{what} {allowed}(losses: {shown}); the last good checkpoint is in "
                              f"{self.run_dir / 'checkpoints'}; try a lower --lr or --precision fp32, or set "
                              f"engine.max_bad_steps to skip such steps")
        if self.world.main:
            print(f"warning: {what}: its update was skipped ({self.state.bad_steps} of at most "
                  f"{self.engine.max_bad_steps})", file=sys.stderr)
        self.scaler.update()
        with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": meant so here
            warnings.simplefilter("ignore", UserWarning)
            self.scheduler.step()  # the step counts, as one fp16 skips does: the schedule keeps its length

    def _end_of_epoch(self) -> None:
        state, best = self.state, None
        if state.batch_in_epoch >= self.epoch_batches:
            state.epoch += 1
            state.batch_in_epoch = 0
        if self.val_loader is not None:
            self.result.val = self._validate()
            monitor = self.objective.monitor
            loss = self.result.val[monitor]
            self.display.print(f"{self.title} epoch {state.epoch} step {state.step}: val {monitor} {loss:.4f}")
            if loss < state.best_val_loss:
                state.best_val_loss, state.bad_validations = loss, 0
                best = self._save("best")
            else:
                state.bad_validations += 1
                if self.engine.patience and state.bad_validations >= self.engine.patience:
                    self.result.stopped_early = True
                    self.display.print(f"early stop: no val improvement in {self.engine.patience} validations")
        self._save("last", same_as=best)
        if self._stop_agreed():
            self._interrupted(saved=True)

    def _validate(self) -> dict[str, float]:
        metrics = validate(self.model, self.objective, self.val_loader, self.runtime,
                           self.state.step / self.total_steps)
        # Prefixed so that a line read alone says what it measured (val_reward_accuracy, not reward_accuracy).
        self.log.write({"split": "val", "step": self.state.step, "epoch": self.state.epoch,
                        **{f"val_{k}": v for k, v in metrics.items()}})
        return metrics

    def _interrupted(self, saved: bool = False) -> None:
        if not self.engine.save_checkpoints:
            raise TrainingInterrupted(f"interrupted at step {self.state.step} (engine.save_checkpoints is off: "
                                      f"nothing was saved)")
        if not saved:
            self._save("last")
        self.display.print(f"interrupted: resumable checkpoint written to {self.run_dir / 'checkpoints' / 'last'}")
        raise TrainingInterrupted(f"interrupted at step {self.state.step}; "
                                  f"continue with --resume --output {self.run_dir}")

    # ------------------------------------------------------------------ checkpoints

    def _save(self, name: str, same_as: Path | None = None) -> Path | None:
        """Write a checkpoint (rank 0), with every rank's RNG state so that each resumes its own stream.

        ``same_as``: a checkpoint written just before with nothing run since, whose large files
        this one links instead of writing them again (``save_checkpoint``).

        Called on every rank: gathering the RNG states is a collective. The model, optimizer
        and counters are the same on every rank, and the model is the bare one, not DDP's
        wrapper, so the checkpoint loads anywhere.
        """
        if not self.engine.save_checkpoints:
            return None
        rng = distributed.all_objects(rng_state())
        if not self.world.main:
            return None
        state = {**self.state.as_dict(), "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict(), "rng": rng if self.world.distributed else rng[0],
                 "world_size": self.world.size}
        described = Described(self.model, self.describe, state)
        return save_checkpoint(self.run_dir / "checkpoints" / name, described, state, same_as)

    def _stop_agreed(self) -> bool:
        """Ctrl-C on any rank stops every rank after the same step (torchrun forwards the signal)."""
        return distributed.all_sum([float(self.stop.requested)], self.device)[0] > 0

    def _restore(self) -> None:
        """Load ``last/`` into the live objects and take over its counters."""
        directory = resume_checkpoint(self.run_dir)
        try:
            self.model.load_weights(directory)
        except ValueError as err:
            raise ConfigError(f"--resume: {err}; start a new --output or match the model settings") from None
        except Exception as err:  # noqa: BLE001 - safetensors' own errors: damaged data past a sound header
            raise CheckpointError(f"--resume: cannot read {directory / 'model.safetensors'} ({first_line(err)})") from None
        saved = load_state(directory)
        # The position in the epoch counts each rank's micro-batches, and the schedule's length
        # the global steps: both mean something else with another number of processes.
        saved_world = saved.pop("world_size", 1)
        if saved_world != self.world.size:
            raise ConfigError(f"--resume: {directory} was written by {saved_world} process(es) and this run has "
                              f"{self.world.size}; resume with --nproc-per-node × --nnodes = {saved_world}, or "
                              f"start a new run from its weights")
        self.optimizer.load_state_dict(saved.pop("optimizer"))
        self.scheduler.load_state_dict(saved.pop("scheduler"))
        self.scaler.load_state_dict(saved.pop("scaler"))
        restore_rng(saved.pop("rng"), self.world.rank, self.world.size)
        self.state = TrainingState.from_dict(saved)


def _check_unreadable(state: TrainingState, max_fraction: float, at_least: int) -> None:
    """Fail once more than ``max_fraction`` of the samples read so far were unreadable."""
    total = state.samples + state.skipped
    if state.skipped and total >= at_least and state.skipped > max_fraction * total:
        raise DataError(f"{state.skipped} of {total} training samples could not be read, more than "
                        f"max_bad_fraction {max_fraction}; the warnings above name the files")


def _first_nonfinite_grad(model: nn.Module) -> str:
    """The name of the first parameter whose gradient holds a NaN or an Inf."""
    for name, param in model.named_parameters():
        if param.grad is not None and not torch.isfinite(param.grad).all():
            return name
    return "no parameter"


def _require(model: nn.Module, method: str, setting: str) -> Callable:
    """The model's hook for a runtime option; a model without it cannot honour the setting."""
    if not hasattr(model, method):
        raise ConfigError(f"{setting}: {type(model).__name__} has no {method}()")
    return getattr(model, method)


def _take(batches: Iterator[Batch], n: int) -> list[Batch]:
    out = []
    for batch in batches:
        out.append(batch)
        if len(out) == n:
            break
    return out
