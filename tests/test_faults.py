"""Faults a batch job meets, each injected and survived (issue: faults survived by test).

- damaged checkpoints: one line naming the file, exit 1 (2 for a wrong path), no traceback, a
  pickle never executed; ``--resume`` falls back to the previous complete checkpoint;
- one run per output: a lock naming the first run's PID, stale locks taken over;
- full disks and read-only folders (injected ENOSPC/EACCES): one line, exit 1, the previous
  checkpoint intact and resumable;
- non-finite steps: the step and the loss part named, or up to ``max_bad_steps`` skipped;
- bad user input: a metadata row escaping its folder, a binary ``--config``.
"""

from __future__ import annotations

import builtins
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import make_settings
from PIL import Image
from typer.testing import CliRunner

from capcli import faults
from capcli.cli import app
from capcli.data.sources import check_metadata, load_splits
from capcli.errors import CapcliError, CheckpointError, ConfigError, RunLocked
from capcli.model import Captioner
from capcli.phases import prepare_pretrain
from capcli.train import runlock
from capcli.train.checkpoint import (
    check_checkpoint,
    load_state,
    resume_checkpoint,
    save_checkpoint,
)
from capcli.train.engine import fit
from capcli.train.runlog import read_metrics

runner = CliRunner()


def one_error_line(result, code: int, *expected: str) -> None:
    """The documented exit code, one ``error:`` line on stderr naming what is wrong, no traceback."""
    assert result.exit_code == code, result.output
    assert isinstance(result.exception, SystemExit), result.exception
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, result.stderr
    for part in expected:
        assert part in errors[0], errors[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory, data_cache) -> Path:
    """A 2-step pretrain run (best and last written), shared; tests damage copies of it."""
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    settings = make_settings(run_dir, data_cache, **{"pretrain.engine.max_steps": 2})
    phase = prepare_pretrain(settings)
    p = settings.pretrain
    fit(phase.model, phase.objective, phase.data, p.engine, p.optimizer, phase.runtime)
    runlock.release(run_dir)
    return run_dir


@pytest.fixture
def run_copy(trained, tmp_path) -> Path:
    return Path(shutil.copytree(trained, tmp_path / "run"))


@pytest.fixture
def env(data_cache) -> dict[str, str]:
    return {"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_RUNTIME__DEVICE": "cpu",
            "CAPCLI_PRETRAIN__ENGINE__GRAD_ACCUM": "1"}


SIZES = ["--train-size", "64", "--val-size", "16", "--test-size", "16", "--batch-size", "8"]


# --- damaged checkpoints ------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _edit_config(directory: Path, change) -> None:
    config = json.loads((directory / "model.json").read_text())
    change(config)
    (directory / "model.json").write_text(json.dumps(config))


MODEL_DAMAGE = {
    "truncated-weights": (lambda d: _truncate(d / "model.safetensors"), "model.safetensors is truncated"),
    "garbage-weights": (lambda d: (d / "model.safetensors").write_bytes(os.urandom(4096)), "model.safetensors"),
    "missing-key": (lambda d: _edit_config(d, lambda c: c.pop("decoder")), "model.json lacks decoder"),
    "unknown-preset": (lambda d: _edit_config(d, lambda c: c.update(preset="huge")), "unknown preset 'huge'"),
    "garbage-config": (lambda d: (d / "model.json").write_bytes(b"\x00\xff{"), "model.json is not valid JSON"),
    "missing-tokenizer": (lambda d: (d / "tokenizer.json").unlink(), "tokenizer files are missing"),
}


class _Payload:
    """Unpickling this creates a file: the proof that a pickle was executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


STATE_DAMAGE = {
    "garbage-state": (lambda d, m: (d / "state.pt").write_bytes(os.urandom(2048)), "state.pt"),
    "truncated-state": (lambda d, m: _truncate(d / "state.pt"), "state.pt"),
    "raw-pickle-state": (lambda d, m: (d / "state.pt").write_bytes(pickle.dumps(_Payload(m))), "state.pt"),
    "torch-pickle-state": (lambda d, m: torch.save({"step": 1, "x": _Payload(m)}, d / "state.pt"), "state.pt"),
}


@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_damaged_model_files_are_named_by_the_integrity_check(run_copy, damage):
    best = run_copy / "checkpoints" / "best"
    check_checkpoint(best)  # whole: passes
    harm, expected = MODEL_DAMAGE[damage]
    harm(best)
    with pytest.raises(CheckpointError, match="damaged checkpoint") as err:
        check_checkpoint(best)
    assert expected in str(err.value)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("damage", list(STATE_DAMAGE))
def test_a_damaged_or_pickled_state_is_refused_and_never_executed(run_copy, tmp_path, damage):
    last, marker = run_copy / "checkpoints" / "last", tmp_path / "executed"
    STATE_DAMAGE[damage][0](last, marker)
    with pytest.raises(CheckpointError, match="state.pt"):
        load_state(last)
    if damage != "torch-pickle-state":  # a well-formed torch archive passes the CRC check, and load_state refuses it
        with pytest.raises(CheckpointError, match="state.pt"):
            check_checkpoint(last, state=True)
    assert not marker.exists(), "the pickle was executed"


def _command(name: str, checkpoint: Path, run_dir: Path, image: Path) -> list[str]:
    return {
        "caption": ["caption", str(image), "--checkpoint", str(checkpoint), "--beams", "1"],
        "evaluate": ["evaluate", "--checkpoint", str(checkpoint), "--limit", "2", "--beams", "1",
                     "--output", str(run_dir.parent / "results.json"), *SIZES],
        "align": ["align", "--checkpoint", str(checkpoint), "--output", str(run_dir.parent / "align"),
                  "--max-steps", "1", *SIZES],
        "resume": ["pretrain", "--resume", "--output", str(run_dir), "--max-steps", "2", *SIZES],
    }[name]


@pytest.mark.parametrize("command", ["caption", "evaluate", "align", "resume"])
@pytest.mark.parametrize("damage", list(MODEL_DAMAGE))
def test_each_command_names_the_damaged_file_on_one_line(run_copy, tmp_path, env, command, damage):
    folder = run_copy / "checkpoints"
    image = tmp_path / "a.png"
    Image.new("RGB", (8, 8)).save(image)
    for name in ("best", "last"):  # resume falls back from last to best: damage both
        MODEL_DAMAGE[damage][0](folder / name)
    result = runner.invoke(app, [*_command(command, folder / "best", run_copy, image), "--quiet"], env=env)
    one_error_line(result, 1, "damaged checkpoint", MODEL_DAMAGE[damage][1])
    assert result.stdout == ""


def test_a_wrong_checkpoint_path_exits_2(tmp_path, env):
    for command in ("evaluate", "align"):
        result = runner.invoke(app, [*_command(command, tmp_path / "nothing", tmp_path / "run", tmp_path), "--quiet"],
                               env=env)
        one_error_line(result, 2, "no checkpoint at", "nothing")


@pytest.mark.parametrize("damage", ["truncated-weights", "missing-tokenizer", "raw-pickle-state", "garbage-state"])
def test_resume_falls_back_from_a_damaged_last_and_says_so(run_copy, tmp_path, damage, capsys):
    last = run_copy / "checkpoints" / "last"
    marker = tmp_path / "executed"
    if damage in MODEL_DAMAGE:
        MODEL_DAMAGE[damage][0](last)
    else:
        STATE_DAMAGE[damage][0](last, marker)
    chosen = resume_checkpoint(run_copy)
    assert chosen == run_copy / "checkpoints" / "best"
    warning = capsys.readouterr().err
    assert "warning: damaged checkpoint" in warning and str(last) in warning and "resuming from" in warning
    assert load_state(chosen)["step"] == 2
    assert not marker.exists()


def test_resume_prefers_the_backup_a_killed_rename_left(run_copy):
    folder = run_copy / "checkpoints"
    (folder / "last").rename(folder / ".old-last")
    assert resume_checkpoint(run_copy) == folder / ".old-last"


# --- one run per output --------------------------------------------------------------------------------------------

_HOLD = "import sys, time; from capcli.train import runlock; runlock.acquire(sys.argv[1]); print('held', flush=True); time.sleep(60)"


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_run_into_a_locked_output_exits_2_naming_the_first_pid(tmp_path, env):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    try:
        result = runner.invoke(app, ["pretrain", "--output", str(run_dir), "--max-steps", "1", *SIZES, "--quiet"],
                               env=env)
        one_error_line(result, 2, f"PID {holder.pid}", str(run_dir), "--output")
        resumed = runner.invoke(app, ["pretrain", "--output", str(run_dir), "--resume", *SIZES, "--quiet"], env=env)
        one_error_line(resumed, 2, f"PID {holder.pid}")
    finally:
        holder.kill()
        holder.wait()
    assert not (run_dir / "checkpoints").exists()


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    holder = _holder(run_dir)
    os.kill(holder.pid, signal.SIGKILL)  # kill -9: no chance to clean up
    holder.wait()
    assert str(holder.pid) in (run_dir / ".lock").read_text()
    runlock.acquire(run_dir)
    try:
        assert f"taking over the stale lock of PID {holder.pid}" in capsys.readouterr().err
        assert json.loads((run_dir / ".lock").read_text())["pid"] == os.getpid()
        runlock.acquire(run_dir)  # the same process again: a no-op
    finally:
        runlock.release(run_dir)
    assert not (run_dir / ".lock").exists()


def test_the_lock_is_exclusive_between_processes(tmp_path):
    run_dir = tmp_path / "run"
    runlock.acquire(run_dir)
    try:
        other = subprocess.run([sys.executable, "-c", _HOLD, str(run_dir)], capture_output=True, text=True, timeout=60,
                               check=False)
        assert other.returncode == 1 and "RunLocked" in other.stderr and f"PID {os.getpid()}" in other.stderr
    finally:
        runlock.release(run_dir)
    with pytest.raises(RunLocked):  # and back: a live holder in another process refuses this one
        holder = _holder(run_dir)
        try:
            runlock.acquire(run_dir)
        finally:
            holder.kill()
            holder.wait()


@pytest.mark.slow
def test_two_real_runs_into_one_output(tmp_path, env):
    """The issue's report: a second ``capcli pretrain`` 0.5 s after the first, into the same ``--output``."""
    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "capcli", "pretrain", "--output", str(run_dir), "--max-steps", "4", *SIZES,
            "--quiet", "--json"]
    full_env = {**os.environ, **env, "CAPCLI_PRETRAIN__ENGINE__LOG_EVERY": "1"}
    first = subprocess.Popen(args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(0.5)
    second = subprocess.Popen(args, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = {proc: proc.communicate(timeout=300) for proc in (first, second)}
    # Whichever reached the lock first trains (on a busy machine the second may get there first).
    (winner,) = [proc for proc in done if proc.returncode == 0]
    (loser,) = [proc for proc in done if proc is not winner]
    assert loser.returncode == 2, done[loser][1]
    assert f"PID {winner.pid}" in done[loser][1] and "Traceback" not in done[loser][1]
    assert done[loser][0] == ""
    steps = [r["step"] for r in read_metrics(run_dir / "metrics.jsonl") if r["split"] == "train"]
    assert steps == [1, 2, 3, 4]
    assert not (run_dir / ".lock").exists()


# --- full disks and read-only folders ---------------------------------------------------------------------------


@pytest.fixture
def fault(monkeypatch):
    """``fault("POINT@N=ACTION")``: inject through the environment, as the subprocess tests do."""

    def inject(spec: str) -> None:
        faults.reset()
        monkeypatch.setenv(faults.ENV, spec)

    yield inject
    faults.reset()


STAGES = ["checkpoint.start", "checkpoint.weights", "checkpoint.state", "checkpoint.between"]


@pytest.mark.parametrize("action", ["enospc", "eacces"])
@pytest.mark.parametrize("stage", STAGES)
def test_a_failed_checkpoint_write_names_it_and_keeps_the_previous(run_copy, fault, stage, action):
    last = run_copy / "checkpoints" / "last"
    model = Captioner.from_pretrained(last)
    before = {p.name: p.read_bytes() for p in last.iterdir()}
    fault(f"{stage}={action}")
    reason = "No space left on device" if action == "enospc" else "Permission denied"
    with pytest.raises(CheckpointError, match=f"cannot write the checkpoint {last}: {reason}; the previous"):
        save_checkpoint(last, model, {"step": 99})
    found = resume_checkpoint(run_copy)
    assert found == last  # put back under its own name, even after the first rename
    assert {p.name: p.read_bytes() for p in found.iterdir()} == before
    assert not list(last.parent.glob(".tmp-*")), "temporary folder left behind"


def test_torchs_opaque_full_disk_error_is_said_in_words(run_copy, monkeypatch):
    """``torch.save`` on a full disk raises RuntimeError("... inline_container.cc ..."), not OSError."""
    last = run_copy / "checkpoints" / "last"
    model = Captioner.from_pretrained(last)

    def full(*args, **kwargs):
        raise RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 1024 vs 896")

    monkeypatch.setattr("capcli.train.checkpoint.torch.save", full)
    monkeypatch.setattr("capcli.train.checkpoint.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(10, 10, 0))
    with pytest.raises(CheckpointError, match="No space left on device"):
        save_checkpoint(last, model, {"step": 99})
    assert load_state(last)["step"] == 2


def test_temporary_folders_of_a_killed_write_are_removed_by_the_next(run_copy):
    folder = run_copy / "checkpoints"
    (folder / ".tmp-last-abc123").mkdir()  # what a kill -9 inside a write leaves
    save_checkpoint(folder / "last", Captioner.from_pretrained(folder / "last"), {"step": 3})
    assert not list(folder.glob(".tmp-*"))
    assert load_state(folder / "last")["step"] == 3


def test_a_full_disk_mid_training_exits_1_and_the_run_resumes(tmp_path, env, fault):
    """The second checkpoint write of the run (``last`` after ``best``) meets a full disk."""
    run_dir = tmp_path / "run"
    fault("checkpoint.weights@2=enospc")
    result = runner.invoke(app, ["pretrain", "--output", str(run_dir), "--max-steps", "3", *SIZES, "--quiet"],
                           env=env)
    one_error_line(result, 1, "cannot write the checkpoint", "No space left on device", "unchanged")
    fault("")
    resumed = runner.invoke(app, ["pretrain", "--output", str(run_dir), "--max-steps", "3", "--resume", *SIZES,
                                  "--quiet", "--json"], env=env)
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["steps"] == 3


@pytest.mark.parametrize("action", ["enospc", "eacces"])
def test_results_json_on_a_full_disk_names_the_file_and_leaves_no_half_file(tmp_path, fault, action):
    from capcli.results import write_json

    target = tmp_path / "results" / "evaluation_metrics.json"
    fault(f"results.write={action}")
    with pytest.raises(OSError) as err:
        write_json({"a": 1}, target)
    assert err.value.filename == str(target)
    assert list(target.parent.iterdir()) == []


def test_the_cli_turns_storage_errors_into_one_line(tmp_path):
    """Any write the commands make (results/, --save-captions, metrics.jsonl) that fails with ENOSPC or EACCES."""
    import errno

    import typer

    from capcli.cli import exit_codes

    for code, words in ((errno.ENOSPC, "cannot write out.jsonl: No space left on device"),
                        (errno.EACCES, "cannot access out.jsonl: Permission denied")):
        with pytest.raises(typer.Exit) as exit_info, exit_codes():
            raise OSError(code, os.strerror(code), "out.jsonl")
        assert exit_info.value.exit_code == 1
    with pytest.raises(FileNotFoundError), exit_codes():  # not a storage error: a bug to see whole
        raise FileNotFoundError(2, "No such file or directory", "x")
    assert words


def test_a_pixel_cache_that_cannot_be_made_is_a_note_not_a_failure(tmp_path, fault, capsys, data_cache):
    settings = make_settings(tmp_path / "run", data_cache, **{"data.cache_dir": tmp_path / "cache"})
    shutil.copytree(data_cache, tmp_path / "cache", dirs_exist_ok=True, ignore=shutil.ignore_patterns("pixels"))
    from capcli.data.batches import caption_dataset

    splits = load_splits(settings.data)
    fault("pixel_cache.create=enospc")
    dataset = caption_dataset(splits["train"], 32, settings.data)
    assert "cannot make the pixel cache" in capsys.readouterr().err
    assert dataset[(0, 0)] is not None  # decoded without the cache


# --- non-finite steps ----------------------------------------------------------------------------------------------


class _InfGrad(torch.autograd.Function):
    """The identity forward; an infinite gradient backward: a loss that is fine while its gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


def _poisoned(phase, at_steps: set[int], how: str):
    inner, calls = phase.objective, {"n": 0}

    def objective(model, batch, progress):
        calls["n"] += model.training
        out = inner(model, batch, progress)
        if model.training and calls["n"] in at_steps:
            if how == "nan":
                out["caption_loss"] = out["caption_loss"] * float("nan")
            else:
                out["contrastive_loss"] = _InfGrad.apply(out["contrastive_loss"])
        return out

    objective.monitor = inner.monitor  # an objective names the value that picks the best checkpoint
    return objective


def _fit(settings, phase):
    p = settings.pretrain
    return fit(phase.model, phase.objective, phase.data, p.engine, p.optimizer, phase.runtime)


def _mtimes(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize(("how", "named"), [("nan", "non-finite caption_loss at step 11"),
                                            ("inf-grad", "non-finite gradient at step 11 (first in ")])
def test_a_non_finite_step_stops_naming_the_step_and_part(settings_factory, how, named):
    settings = settings_factory(**{"pretrain.engine.epochs": 3})
    phase = prepare_pretrain(settings)
    phase.objective = _poisoned(phase, {11}, how)
    checkpoints = settings.pretrain.engine.output / "checkpoints"
    with pytest.raises(CapcliError, match=named.replace("(", r"\(")) as err:
        _fit(settings, phase)
    assert "max_bad_steps" in str(err.value)
    assert load_state(checkpoints / "last")["step"] == 8  # the last good one, not overwritten
    weights = Captioner.from_pretrained(checkpoints / "last").state_dict()
    assert all(torch.isfinite(v).all() for v in weights.values() if v.is_floating_point())


def test_max_bad_steps_skips_that_many_updates_then_stops(settings_factory, capsys):
    settings = settings_factory(**{"pretrain.engine.epochs": 1, "pretrain.engine.max_bad_steps": 2})
    phase = prepare_pretrain(settings)
    start = {k: v.clone() for k, v in phase.model.state_dict().items()}
    phase.objective = _poisoned(phase, {1, 2}, "nan")  # the first two steps: no update at all
    after_two = {}

    def record(step, losses):
        if step == 2:
            after_two.update({k: v.clone() for k, v in phase.model.state_dict().items()})

    p = settings.pretrain
    result = fit(phase.model, phase.objective, phase.data, p.engine, p.optimizer, phase.runtime, on_step=record)
    assert result.steps == 8
    assert all(torch.equal(after_two[k], start[k]) for k in start), "a skipped step changed the weights"
    assert capsys.readouterr().err.count("its update was skipped") == 2
    assert load_state(settings.pretrain.engine.output / "checkpoints" / "last")["bad_steps"] == 2

    again = settings_factory("again", **{"pretrain.engine.epochs": 1, "pretrain.engine.max_bad_steps": 2})
    phase = prepare_pretrain(again)
    phase.objective = _poisoned(phase, {1, 2, 5}, "nan")
    with pytest.raises(CapcliError, match="non-finite caption_loss at step 5 after 2 skipped bad step"):
        _fit(again, phase)


# --- bad user input -------------------------------------------------------------------------------------------------


def _folder(tmp_path: Path, lines: list[str], name: str = "metadata.jsonl") -> Path:
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i in range(3):
        Image.new("RGB", (8, 8), (i * 80, 0, 0)).save(folder / f"{i}.png")
    (folder / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


GOOD = [json.dumps({"file_name": f"{i}.png", "text": f"a red square {i}"}) for i in range(3)]


@pytest.mark.parametrize(("bad", "expected"), [
    (json.dumps({"file_name": "../../etc/passwd", "text": "x"}), "points outside"),
    (json.dumps({"file_name": "/etc/passwd", "text": "x"}), "is an absolute path"),
    (json.dumps({"file_name": "sub/../../0.png", "text": "x"}), "points outside"),
    ('{"file_name": "1.png", "text": ', "not valid JSON"),
    ('["1.png", "x"]', "must be a JSON object"),
    (json.dumps({"text": "no file"}), "no file_name"),
], ids=["dotdot", "absolute", "nested-dotdot", "invalid-json", "not-object", "no-file-name"])
def test_imagefolder_metadata_rows_are_checked_and_named(tmp_path, bad, expected, env):
    folder = _folder(tmp_path, [*GOOD[:2], bad, GOOD[2]])
    with pytest.raises(ConfigError, match=f"metadata.jsonl line 3: .*{expected}"):
        check_metadata(folder)
    result = runner.invoke(app, ["pretrain", "--data", f"imagefolder:{folder}", "--output", str(tmp_path / "run"),
                                 "--max-steps", "1", "--quiet"], env=env)
    one_error_line(result, 2, "metadata.jsonl line 3", expected)


def test_imagefolder_csv_rows_escaping_the_folder_are_refused(tmp_path):
    folder = _folder(tmp_path, ["file_name,text", "0.png,a", "../secret.png,b"], name="metadata.csv")
    with pytest.raises(ConfigError, match="metadata.csv line 3: file_name '../secret.png' points outside"):
        check_metadata(folder)


def test_imagefolder_with_good_metadata_passes(tmp_path):
    check_metadata(_folder(tmp_path, GOOD))


@pytest.mark.parametrize("content", [bytes(range(256)) * 4, b"\x89PNG\r\n\x1a\n" + os.urandom(200), b"\xff\xfe\x00"],
                         ids=["all-bytes", "png", "bom"])
def test_a_binary_config_file_exits_2(tmp_path, env, content):
    config = tmp_path / "weights.bin"
    config.write_bytes(content)
    result = runner.invoke(app, ["pretrain", "--config", str(config), "--output", str(tmp_path / "run")], env=env)
    one_error_line(result, 2, str(config), "not a YAML text file")
    assert not (tmp_path / "run").exists()


def test_bf16_on_a_cpu_without_bf16_instructions_warns_once(monkeypatch, capsys):
    from capcli.train import precision

    monkeypatch.setattr(precision, "_warned", False)
    monkeypatch.setattr(precision.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: True, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    assert precision.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert capsys.readouterr().err == ""  # AVX512-BF16: fast, no warning
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    for _ in range(3):
        assert precision.resolve_precision("bf16", torch.device("cpu")) == torch.bfloat16
    assert precision.resolve_precision("fp32", torch.device("cpu")) == torch.float32
    err = capsys.readouterr().err
    assert err.count("warning: --precision bf16 on a CPU without AVX512-BF16 or AMX") == 1


def test_without_file_locks_the_pid_in_the_lock_file_decides(tmp_path, monkeypatch):
    """A network file system without locks (flock fails with ENOLCK): a live PID refuses, a dead one is stale."""
    import errno
    import socket

    def no_locks(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(runlock.fcntl, "flock", no_locks)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"pid": sleeper.pid, "host": socket.gethostname()}
        (run_dir / ".lock").write_text(json.dumps(record))
        with pytest.raises(RunLocked, match=f"PID {sleeper.pid}"):
            runlock.acquire(run_dir)
    finally:
        sleeper.kill()
        sleeper.wait()
    runlock.acquire(run_dir)  # its PID is gone now: stale
    runlock.release(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("target", ["save-captions", "results"])
def test_evaluate_on_a_full_disk_names_the_file_it_could_not_write(trained, tmp_path, env, fault, target):
    captions, results = tmp_path / "captions.jsonl", tmp_path / "results" / "metrics.json"
    fault("results.write@1=enospc")  # the first file evaluate writes: --save-captions, else the results JSON
    args = ["evaluate", "--checkpoint", str(trained / "checkpoints" / "best"), "--limit", "2", "--beams", "1",
            "--judge", "self", "--output", str(results), "--quiet"]
    if target == "save-captions":
        args += ["--save-captions", str(captions)]
    result = runner.invoke(app, args, env=env)
    named = captions if target == "save-captions" else results
    one_error_line(result, 1, f"cannot write {named}: No space left on device")
    assert not results.exists()
