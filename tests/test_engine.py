"""The engine, tested by behaviour on the tiny model on CPU.

Parameters change (and frozen ones do not), one batch can be overfitted, accumulation
equals a larger batch, a resumed run repeats the uninterrupted one, a checkpoint write
that dies leaves the previous checkpoint, and NaN and Ctrl-C stop cleanly.
"""

from __future__ import annotations

import contextlib
import math
import os
import signal

import pytest
import torch
from conftest import SameCaptionEveryEpoch
from torch.testing import assert_close

from capcli import engine
from capcli.checkpoint import load_state, resolve_checkpoint, save_checkpoint
from capcli.engine import TrainingState, fit
from capcli.errors import CapcliError, CheckpointError, TrainingInterrupted
from capcli.generation import DecodeSettings, generate_captions
from capcli.model import Captioner
from capcli.optim import cosine_with_warmup
from capcli.phases import prepare_pretrain, pretrain
from capcli.precision import resolve_precision
from capcli.runlog import read_metrics
from capcli.runtime import Runtime
from capcli.settings import RuntimeSettings, override


def train_log(run_dir) -> list[dict]:
    return [r for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]


def fit_phase(settings, phase, **kwargs):
    p = settings.pretrain
    return fit(phase.model, phase.objective, phase.data, p.engine, p.optimizer, phase.runtime, **kwargs)


def interrupt_at(step_to_stop: int, sig: int = signal.SIGINT):
    """An on_step callback that presses Ctrl-C (or sends ``sig``) once the given step is done."""

    def on_step(step: int, losses: dict) -> None:
        if step == step_to_stop:
            os.kill(os.getpid(), sig)

    return on_step


def test_parameters_change_and_frozen_ones_do_not(settings_factory):
    settings = settings_factory(**{"pretrain.engine.max_steps": 2})
    phase = prepare_pretrain(settings)
    phase.model.vision.requires_grad_(False)
    before = {k: v.clone() for k, v in phase.model.state_dict().items()}
    fit_phase(settings, phase)
    after = phase.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    for part in ("decoder.", "prefix_mapper.", "image_head.", "text_head."):
        assert any(k.startswith(part) for k in changed), f"nothing under {part} was trained"
    assert not any(k.startswith("vision.") for k in changed), "a frozen tower was updated"
    assert "log_logit_scale" not in changed, "a fixed temperature was trained"


def test_one_batch_can_be_overfitted(settings_factory):
    settings = settings_factory(**{
        "data.train_size": 8, "data.val_size": 1, "pretrain.engine.epochs": 80, "pretrain.engine.patience": None,
        "pretrain.optimizer.lr": 1e-3, "pretrain.optimizer.warmup": 0.1, "pretrain.optimizer.min_lr_ratio": 1.0,
    })
    phase = prepare_pretrain(settings)
    phase.data.train = SameCaptionEveryEpoch(phase.data.train)
    fit_phase(settings, phase)
    log = train_log(settings.pretrain.engine.output)
    first, last = log[0], log[-1]
    assert (first["step"], last["step"]) == (1, 80)
    assert last["caption_loss"] < 0.05 * first["caption_loss"], (first, last)
    assert last["contrastive_loss"] < 0.05 * first["contrastive_loss"], (first, last)
    assert last["retrieval_acc"] == 1.0
    # The memorised captions come back from the images alone, through batched greedy decoding.
    examples = [phase.data.train[(i, 0)] for i in range(8)]
    pixels = torch.stack([e.pixels for e in examples])
    generated = generate_captions(phase.model, pixels, DecodeSettings(beams=1, max_length=40))
    hits = sum(g == e.caption for g, e in zip(generated, examples))
    assert hits >= 6, list(zip(generated, [e.caption for e in examples]))


def test_accumulation_equals_a_larger_batch(settings_factory):
    """Batch 8 × accumulation 1 and batch 4 × accumulation 2 see the same 8 samples per step.

    The contrastive term is switched off: its negatives are the micro-batch, so it cannot be
    split exactly (see docs/training.md); the caption loss is a per-sample mean and can.
    """
    common = {"data.train_size": 32, "pretrain.contrastive_weight": 0.0, "pretrain.engine.epochs": 1}
    big = settings_factory("big", **common, **{"pretrain.engine.batch_size": 8, "pretrain.engine.grad_accum": 1})
    small = settings_factory("small", **common, **{"pretrain.engine.batch_size": 4, "pretrain.engine.grad_accum": 2})
    runs = []
    for settings in (big, small):
        phase = prepare_pretrain(settings)
        fit_phase(settings, phase)
        runs.append((phase.model.state_dict(), train_log(settings.pretrain.engine.output)))
    (big_state, big_log), (small_state, small_log) = runs
    assert [r["step"] for r in big_log] == [r["step"] for r in small_log] == [1, 2, 3, 4]
    assert_close([r["caption_loss"] for r in small_log], [r["caption_loss"] for r in big_log], rtol=1e-5, atol=1e-6)
    for key in big_state:
        assert_close(small_state[key], big_state[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.mark.parametrize(("stop_at", "sig"), [(8, signal.SIGINT), (5, signal.SIGINT), (5, signal.SIGTERM)],
                         ids=["after-epoch-1", "mid-epoch", "sigterm-mid-epoch"])
def test_resumed_run_repeats_the_uninterrupted_losses(settings_factory, stop_at, sig):
    """64 samples / batch 8 = 8 steps an epoch; stop after epoch 1 or in the middle of it, then resume.
    SIGTERM (a scheduler's preemption, torchrun stopping its workers) stops as Ctrl-C does."""
    whole = settings_factory("whole")
    pretrain(whole)
    parted = settings_factory("parted")
    with pytest.raises(TrainingInterrupted):
        pretrain(parted, on_step=interrupt_at(stop_at, sig))
    assert load_state(parted.pretrain.engine.output / "checkpoints" / "last")["step"] == stop_at
    resumed = override(parted, {"pretrain.engine.resume": True})
    result = pretrain(resumed)
    assert result.steps == 16
    expected = [(r["step"], r["loss"]) for r in train_log(whole.pretrain.engine.output)]
    got = [(r["step"], r["loss"]) for r in train_log(parted.pretrain.engine.output)]
    assert [s for s, _ in got] == [s for s, _ in expected] == list(range(1, 17))
    assert_close([loss for _, loss in got], [loss for _, loss in expected], rtol=1e-6, atol=1e-7)
    a = Captioner.from_pretrained(whole.pretrain.engine.output / "checkpoints" / "last").state_dict()
    b = Captioner.from_pretrained(parted.pretrain.engine.output / "checkpoints" / "last").state_dict()
    for key in a:
        assert_close(b[key], a[key], rtol=1e-6, atol=1e-7, msg=key)


def test_interrupted_checkpoint_write_leaves_the_previous_one(settings_factory, monkeypatch):
    settings = settings_factory(**{"pretrain.engine.max_steps": 2})
    phase = prepare_pretrain(settings)
    fit_phase(settings, phase)
    last = settings.pretrain.engine.output / "checkpoints" / "last"

    def dies(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("capcli.checkpoint.torch.save", dies)  # dies after the weights, before state.pt
    with pytest.raises(CheckpointError, match="disk full"):
        save_checkpoint(last, phase.model, {"step": 99})
    monkeypatch.undo()
    assert load_state(resolve_checkpoint(last))["step"] == 2
    assert not [p for p in last.parent.iterdir() if p.name.startswith(".tmp-")], "temporary files left behind"

    # A kill between the two renames leaves only the backup: it is found and loads.
    last.rename(last.parent / ".old-last")
    found = resolve_checkpoint(settings.pretrain.engine.output, "last")
    assert found.name == ".old-last"
    assert Captioner.from_pretrained(found) is not None
    save_checkpoint(last, phase.model, {"step": 3})  # the next write puts things right
    assert load_state(resolve_checkpoint(settings.pretrain.engine.output, "last"))["step"] == 3
    assert not (last.parent / ".old-last").exists()


def test_nan_loss_stops_with_a_clear_error_and_keeps_the_last_checkpoint(settings_factory):
    settings = settings_factory(**{"pretrain.engine.epochs": 3})
    phase = prepare_pretrain(settings)
    inner, calls = phase.objective, {"n": 0}

    def poisoned(model, batch, progress):
        calls["n"] += model.training  # count training micro-batches only, not validation ones
        out = inner(model, batch, progress)
        if model.training and calls["n"] == 11:  # in epoch 2 (8 steps an epoch)
            out["caption_loss"] = out["caption_loss"] * float("nan")
        return out

    poisoned.monitor = inner.monitor  # an objective names the value that picks the best checkpoint
    phase.objective = poisoned
    with pytest.raises(CapcliError, match="non-finite caption_loss at step 11"):
        fit_phase(settings, phase)
    last = settings.pretrain.engine.output / "checkpoints" / "last"
    assert load_state(last)["step"] == 8
    weights = Captioner.from_pretrained(last).state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_early_stopping_after_patience_validations_without_improvement(settings_factory, monkeypatch):
    settings = settings_factory(**{"pretrain.engine.epochs": 6, "pretrain.engine.patience": 2})
    monkeypatch.setattr(engine, "validate", lambda *args, **kwargs: {"loss": 1.0})
    result = pretrain(settings)
    assert result.stopped_early
    assert result.epochs == 3  # epoch 1 sets the best, epochs 2 and 3 do not improve on it


def test_cosine_schedule_with_warmup_by_hand():
    f = cosine_with_warmup(total_steps=10, warmup=0.2, min_ratio=0.1)
    assert [f(0), f(1)] == pytest.approx([0.5, 1.0])  # 2 warmup steps
    assert f(2) == pytest.approx(1.0)
    assert f(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(10) == pytest.approx(0.1)


def test_automatic_precision_policy(monkeypatch):
    assert resolve_precision("auto", torch.device("cpu")) == torch.float32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_precision("auto", torch.device("cuda")) == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert resolve_precision("auto", torch.device("cuda")) == torch.float16
    assert resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16


def test_the_runtime_is_resolved_once_and_measures_in_eval_mode_without_gradients():
    runtime = Runtime.from_settings(RuntimeSettings(device="cpu", precision="bf16", seed=3))
    assert (runtime.device, runtime.dtype, runtime.world.size, runtime.settings.seed) == (torch.device("cpu"),
                                                                                           torch.bfloat16, 1, 3)
    assert not runtime.grad_scaler().is_enabled()  # loss scaling is fp16's alone
    layer = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5))
    for mode in (True, False):
        layer.train(mode)
        with runtime.inference(layer):
            assert not layer.training and not torch.is_grad_enabled()
            out = layer(torch.ones(2, 4))
        assert layer.training is mode  # given back as it was
        assert out.dtype == torch.bfloat16 and not out.requires_grad
    assert Runtime.named("cpu", "fp32").autocast().__class__ is contextlib.nullcontext


def test_training_state_is_saved_in_the_dict_form_of_older_checkpoints():
    """state.pt keeps the counters as plain keys; a checkpoint written before ``bad_steps`` existed resumes."""
    state = TrainingState(step=5, epoch=1, batch_in_epoch=2, samples=40, best_val_loss=0.5, first_val={"loss": 2.0})
    saved = state.as_dict()
    assert saved["step"] == 5 and saved["first_val"] == {"loss": 2.0} and saved["best_val_loss"] == 0.5
    assert TrainingState.from_dict({**saved, "optimizer": {}}) == state
    older = {k: v for k, v in saved.items() if k != "bad_steps"}
    assert TrainingState.from_dict(older).bad_steps == 0


# --- speed options: each must train the same model as the plain step -----------------------------------------------


def _three_steps(settings_factory, name: str, **overrides) -> tuple[list[float], dict[str, torch.Tensor]]:
    """Losses and final weights of 3 steps of the same data from the same initial weights."""
    settings = settings_factory(name, **{"pretrain.engine.max_steps": 3, "pretrain.engine.epochs": 1, **overrides})
    phase = prepare_pretrain(settings)
    losses: list[float] = []
    fit_phase(settings, phase, on_step=lambda step, out: losses.append(out["loss"]))
    return losses, {k: v.detach().clone() for k, v in phase.model.state_dict().items()}


def _assert_same_training(a, b, rtol: float, atol: float) -> None:
    (losses_a, state_a), (losses_b, state_b) = a, b
    assert len(losses_a) == len(losses_b) == 3
    assert_close(losses_b, losses_a, rtol=rtol, atol=atol)
    assert state_a.keys() == state_b.keys()  # the checkpoint names do not change
    for key in state_a:
        assert_close(state_b[key], state_a[key], rtol=rtol, atol=atol, msg=key)


def test_fused_adamw_trains_like_the_plain_loop(settings_factory):
    plain = _three_steps(settings_factory, "plain", **{"pretrain.optimizer.fused": False})
    fused = _three_steps(settings_factory, "fused", **{"pretrain.optimizer.fused": True})
    _assert_same_training(plain, fused, rtol=1e-5, atol=1e-6)


def test_gradient_checkpointing_trains_like_keeping_activations(settings_factory):
    kept = _three_steps(settings_factory, "kept")
    recomputed = _three_steps(settings_factory, "recomputed", **{"runtime.gradient_checkpointing": True})
    _assert_same_training(kept, recomputed, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(settings_factory):
    """``--compile`` (torch.compile of each block, inductor on CPU): the same losses and weights, and
    checkpoints with the eager names. Inductor fuses element-wise work, so agreement is to float rounding."""
    eager = _three_steps(settings_factory, "eager")
    compiled = _three_steps(settings_factory, "compiled", **{"runtime.compile": True})
    _assert_same_training(eager, compiled, rtol=1e-4, atol=1e-5)


def test_a_run_without_checkpoints_writes_none_and_says_so_on_ctrl_c(settings_factory):
    settings = settings_factory(**{"pretrain.engine.save_checkpoints": False, "pretrain.engine.max_steps": 3})
    result = pretrain(settings)
    assert result.steps == 3 and result.best_checkpoint is None
    assert not (settings.pretrain.engine.output / "checkpoints").exists()
    with pytest.raises(TrainingInterrupted, match="nothing was saved"):
        pretrain(override(settings, {"pretrain.engine.output": settings.pretrain.engine.output.parent / "again"}),
                 on_step=interrupt_at(2))
