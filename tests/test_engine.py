"""The engine, tested by behaviour on the tiny model on CPU.

Parameters change (and frozen ones do not), one batch can be overfitted, accumulation
equals a larger batch, a resumed run repeats the uninterrupted one, a checkpoint write
killed at any stage leaves one that resumes, and NaN and Ctrl-C (a second one at once) stop cleanly.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import SameCaptionEveryEpoch
from torch.testing import assert_close

from capcli.errors import CapcliError, TrainingInterrupted
from capcli.model import Captioner
from capcli.model.generation import DecodeSettings, generate_captions
from capcli.phases import prepare_pretrain, pretrain
from capcli.settings import RuntimeSettings, override
from capcli.train import engine
from capcli.train.checkpoint import (
    load_state,
    resolve_checkpoint,
    resume_checkpoint,
    save_checkpoint,
)
from capcli.train.engine import fit
from capcli.train.optim import cosine_with_warmup
from capcli.train.precision import resolve_precision
from capcli.train.runlog import read_metrics
from capcli.train.runtime import Runtime
from capcli.train.state import TrainingState


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
        "pretrain.engine.save_checkpoints": False,  # 80 one-step epochs: saving each would be most of the time
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
    # AdamW divides each update by the gradient's own scale, so the weights below would agree even
    # if the micro-batches' gradients were summed instead of weighted; the logged norm (before
    # clipping) would not.
    assert_close([r["grad_norm"] for r in small_log], [r["grad_norm"] for r in big_log], rtol=1e-5, atol=1e-6)
    for key in big_state:
        assert_close(small_state[key], big_state[key], rtol=1e-4, atol=2e-5, msg=key)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data_cache):
    """The default quick run (2 epochs of 8 steps), never stopped: what every resumed run must repeat."""
    from conftest import make_settings

    whole = make_settings(tmp_path_factory.mktemp("uninterrupted") / "whole", data_cache)
    pretrain(whole)
    return whole


@pytest.mark.parametrize(("stop_at", "sig"), [(8, signal.SIGINT), (5, signal.SIGINT), (5, signal.SIGTERM)],
                         ids=["after-epoch-1", "mid-epoch", "sigterm-mid-epoch"])
def test_resumed_run_repeats_the_uninterrupted_losses(settings_factory, uninterrupted, stop_at, sig):
    """64 samples / batch 8 = 8 steps an epoch; stop after epoch 1 or in the middle of it, then resume.
    SIGTERM (a scheduler's preemption, torchrun stopping its workers) stops as Ctrl-C does."""
    whole = uninterrupted
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


class _Killed(BaseException):
    """A kill -9 inside a checkpoint write: nothing of the write runs after it, no clean-up either."""


@pytest.fixture(scope="module")
def two_saves(tmp_path_factory, data_cache):
    """A 3-step run stopped by Ctrl-C after step 2, its ``last`` the previous save; and the same
    run never stopped, whose step-3 ``last`` is the save a kill interrupts and what a resume must reach."""
    from conftest import make_settings

    root = tmp_path_factory.mktemp("atomic")
    whole, parted = (make_settings(root / name, data_cache, **{"pretrain.engine.max_steps": 3})
                     for name in ("whole", "parted"))
    pretrain(whole)
    with pytest.raises(TrainingInterrupted):
        pretrain(parted, on_step=interrupt_at(2))
    return parted, parted.pretrain.engine.output, whole.pretrain.engine.output / "checkpoints" / "last"


def _resumed(settings, run_dir):
    """The settings of ``capcli pretrain --resume --output RUN_DIR``."""
    return override(settings, {"pretrain.engine.output": run_dir, "pretrain.engine.resume": True})


def _weights(directory) -> bytes:
    return (directory / "model.safetensors").read_bytes()


@pytest.mark.parametrize("stage", ["checkpoint.start", "checkpoint.weights", "checkpoint.state",
                                   "checkpoint.between", "checkpoint.after"])
def test_a_checkpoint_write_killed_at_any_stage_leaves_one_that_resumes(two_saves, tmp_path, monkeypatch, stage):
    """Killed before the renames or between them, the previous save is what ``--resume`` and
    ``--checkpoint`` find, weights and step; killed after them, the new one. Either way the resumed
    run ends with the weights of the run that was never killed."""
    settings, previous, new = two_saves
    run_dir = Path(shutil.copytree(previous, tmp_path / "run"))
    last = run_dir / "checkpoints" / "last"

    def point(name, path=None):
        if name == stage:
            raise _Killed(name)

    monkeypatch.setattr("capcli.train.checkpoint.faults.point", point)
    monkeypatch.setattr("capcli.train.checkpoint._undo", lambda *args: None)  # a killed process puts nothing back
    with pytest.raises(_Killed):
        save_checkpoint(last, Captioner.from_pretrained(new), load_state(new))
    monkeypatch.undo()

    expected = new if stage == "checkpoint.after" else previous / "checkpoints" / "last"
    for found in (resume_checkpoint(run_dir), resolve_checkpoint(run_dir, "last")):
        assert _weights(found) == _weights(expected), found
        assert load_state(found)["step"] == load_state(expected)["step"]
    pretrain(_resumed(settings, run_dir))  # what `capcli pretrain --resume` runs
    assert _weights(last) == _weights(new)
    assert load_state(last)["step"] == 3
    assert not list(last.parent.glob(".tmp-*")), "the killed write's temporary folder was left behind"
    if stage != "checkpoint.after":  # the resumed run wrote last again, and that write removed the backup
        assert not (last.parent / ".old-last").exists()


def test_best_and_last_of_one_step_share_their_large_files_and_stay_independent(two_saves, tmp_path):
    """Validation improved at the run's last step, so ``best`` and ``last`` hold the same state: the
    weights and the training state are written once and hard-linked. A later write of either leaves
    the other as it was, and each keeps a card of its own."""
    _, _, whole_last = two_saves
    whole_best = whole_last.parent / "best"
    assert load_state(whole_best)["step"] == load_state(whole_last)["step"] == 3
    for name in ("model.safetensors", "state.pt"):
        assert os.path.samefile(whole_best / name, whole_last / name), name
    assert not os.path.samefile(whole_best / "README.md", whole_last / "README.md")

    model, state = Captioner.from_pretrained(whole_last), load_state(whole_last)
    best = save_checkpoint(tmp_path / "best", model, state)
    last = save_checkpoint(tmp_path / "last", model, state, same_as=best)
    assert os.path.samefile(best / "model.safetensors", last / "model.safetensors")
    kept = _weights(best)
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    save_checkpoint(last, model, {**state, "step": 4})
    assert _weights(best) == kept and load_state(best)["step"] == 3
    assert _weights(last) != kept and load_state(last)["step"] == 4
    Captioner.from_pretrained(best)  # still loads


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
    # One step an epoch: what is tested is the count of validations, not training.
    settings = settings_factory(**{"pretrain.engine.epochs": 6, "pretrain.engine.patience": 2,
                                   "data.train_size": 8, "pretrain.engine.save_checkpoints": False})
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


def test_a_second_ctrl_c_stops_at_once(settings_factory):
    """The first Ctrl-C asks for a checkpoint after the step; a second one, before it comes, stops
    there and then: nothing after the second signal runs, no checkpoint is written, and the
    handlers the run replaced are back."""
    settings = settings_factory(**{"pretrain.engine.max_steps": 3})
    reached = []

    def twice(step: int, losses: dict) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("first")
        os.kill(os.getpid(), signal.SIGINT)
        reached.append("second")

    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        pretrain(settings, on_step=twice)
    assert reached == ["first"]
    assert not (settings.pretrain.engine.output / "checkpoints" / "last").exists()
    assert [r["step"] for r in train_log(settings.pretrain.engine.output)] == [1]
    assert signal.getsignal(signal.SIGINT) is handler
