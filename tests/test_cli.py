"""Tests of the ``capcli`` command line: help, version, exit codes, output streams and short real runs.

Typer's ``CliRunner`` keeps the two streams apart (``result.stdout`` / ``result.stderr``), so each
test checks that results go to stdout and messages and progress to stderr (DESIGN §8). The runs
use the session's synthetic data cache and tiny sizes, so the whole file takes well under a minute.
"""

from __future__ import annotations

import functools
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from capcli import __version__
from capcli.cli import app
from capcli.settings import PRESETS, DecodeSettings, field_doc, load_settings
from capcli.train.runlog import read_metrics

runner = CliRunner()

CHECKPOINT_FILES = ("model.safetensors", "model.json", "tokenizer.json", "state.pt")
SUMMARY_KEYS = {"phase", "run_dir", "best_checkpoint", "steps", "train", "val", "val_start"}
PRETRAIN_OPTIONS = {
    "--data", "--model", "--vision-weights", "--decoder", "--output", "--epochs", "--max-steps", "--batch-size",
    "--lr", "--train-size", "--val-size", "--test-size", "--resume", "--config", "--device", "--precision",
    "--seed", "--quiet", "--json",
}


def short_run(output: Path, max_steps: int = 3) -> list[str]:
    """A pretrain command line that trains a few steps on 32 images."""
    return ["pretrain", "--output", str(output), "--max-steps", str(max_steps), "--train-size", "32",
            "--val-size", "8", "--test-size", "8", "--batch-size", "8"]


def checkpoint_mtimes(run_dir: Path) -> dict[str, int]:
    return {str(p.relative_to(run_dir)): p.stat().st_mtime_ns for p in sorted(run_dir.rglob("*")) if p.is_file()}


def assert_usage_error(result, *expected: str) -> None:
    """Exit 2, one ``error:`` line on stderr naming what is wrong, nothing on stdout, no traceback."""
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit)  # not an uncaught exception that the runner swallowed
    assert result.stdout == ""
    assert result.stderr.startswith("error: ")
    assert result.stderr.strip().count("\n") == 0
    assert "Traceback" not in result.output
    for part in expected:
        assert part in result.stderr


@pytest.fixture(scope="module")
def run_env(data_cache: Path) -> dict[str, str]:
    return {
        "CAPCLI_DATA__CACHE_DIR": str(data_cache),
        "CAPCLI_PRETRAIN__ENGINE__GRAD_ACCUM": "1",
        "CAPCLI_RUNTIME__DEVICE": "cpu",
    }


@pytest.fixture(scope="module")
def json_run(tmp_path_factory, run_env):
    """One 3-step ``--quiet --json`` run, shared by the tests that only read what it wrote."""
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    result = runner.invoke(app, [*short_run(run_dir), "--quiet", "--json"], env=run_env)
    assert result.exit_code == 0, result.output
    return run_dir, result


@pytest.fixture
def copied_run(json_run, tmp_path) -> Path:
    """A private copy of the shared run, for tests that continue or replace it."""
    return Path(shutil.copytree(json_run[0], tmp_path / "run"))


# --- help and version -------------------------------------------------------------------------------------------


def test_help_lists_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for command in ("pretrain", "align", "evaluate", "caption", "benchmark"):
        assert re.search(rf"\b{command}\b", result.stdout), command


def test_no_arguments_shows_help():
    result = runner.invoke(app, [])
    assert "pretrain" in result.output
    assert "Usage" in result.output


def test_version_prints_the_package_version():
    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.stdout.strip() == f"capcli {__version__}"


def test_pretrain_help_lists_every_documented_option():
    result = runner.invoke(app, ["pretrain", "--help"])
    assert result.exit_code == 0
    shown = set(re.findall(r"--[a-z][a-z-]*", result.stdout))
    assert PRETRAIN_OPTIONS <= shown, PRETRAIN_OPTIONS - shown


ALIGN_OPTIONS = {"--checkpoint", "--preferences", "--freeze-vision", "--no-freeze-vision", "--beta", "--margin",
                 "--output", "--epochs", "--max-steps", "--batch-size", "--lr", "--resume", "--config", "--device",
                 "--precision", "--seed", "--quiet", "--json"}
EVALUATE_OPTIONS = {"--checkpoint", "--split", "--beams", "--limit", "--baseline", "--save-captions", "--max-length",
                    "--min-length", "--length-penalty", "--no-repeat-ngram", "--judge", "--config", "--device",
                    "--precision", "--seed", "--quiet", "--json"}


@pytest.mark.parametrize(("command", "documented"), [("align", ALIGN_OPTIONS), ("evaluate", EVALUATE_OPTIONS)])
def test_align_and_evaluate_help_list_every_documented_option(command, documented):
    result = runner.invoke(app, [command, "--help"])
    assert result.exit_code == 0
    shown = set(re.findall(r"--[a-z][a-z-]*", result.stdout))
    assert documented <= shown, documented - shown


def test_pretrain_help_shows_defaults():
    result = runner.invoke(app, ["pretrain", "--help"])
    # --device, --precision, --seed, --data, --model, --output, --epochs, --batch-size, --lr and the three sizes
    assert result.stdout.count("[default:") >= 12, result.stdout


@pytest.mark.parametrize("command, option, key", [
    ("pretrain", "--epochs", "pretrain.engine.epochs"), ("pretrain", "--batch-size", "pretrain.engine.batch_size"),
    ("pretrain", "--lr", "pretrain.optimizer.lr"), ("pretrain", "--train-size", "data.train_size"),
    ("pretrain", "--val-size", "data.val_size"), ("pretrain", "--test-size", "data.test_size"),
    ("align", "--epochs", "align.engine.epochs"), ("align", "--lr", "align.optimizer.lr"),
    ("pretrain", "--max-steps", "pretrain.engine.max_steps"), ("align", "--max-steps", "align.engine.max_steps"),
    ("pretrain", "--vision-weights", "model.vision_weights"), ("pretrain", "--decoder", "model.decoder"),
    ("caption", "--beams", "caption.decode.beams"), ("caption", "--format", "caption.format"),
    ("evaluate", "--beams", "evaluate.decode.beams"), ("evaluate", "--max-length", "evaluate.decode.max_length"),
    ("evaluate", "--batch-size", "evaluate.batch_size"), ("benchmark", "--repeats", "benchmark.repeats"),
])
def test_help_states_the_defaults_the_settings_have(command, option, key):
    """Help is read from the settings: the field's docstring, then "[default: X; tiny: Y]", naming each
    preset whose profile changes the default. Every preset's value must be the one the help states."""
    params = typer.main.get_command(app).commands[command].params
    help_text = next(p.help for p in params if option in p.opts)
    assert field_doc(key) in help_text
    stated = dict(part.split(": ", 1) for part in re.search(r"\[(default: [^\]]+)\]", help_text).group(1).split("; "))
    for preset in PRESETS:
        value = functools.reduce(getattr, key.split("."), load_settings(cli={"model.preset": preset}, environ={}))
        text = stated.get(preset, stated["default"])
        if isinstance(value, (int, float)) or value is None:
            assert (None if text == "none" else float(text)) == value, (preset, text)
        else:
            assert text == str(value), (preset, text)


def test_export_help_states_the_librarys_decode_defaults():
    params = typer.main.get_command(app).commands["export"].params
    for option, field in (("--max-length", "max_length"), ("--min-length", "min_length"),
                          ("--concept-guidance", "concept_guidance"), ("--concept-prior", "concept_prior")):
        help_text = next(p.help for p in params if option in p.opts)
        assert help_text.endswith(f"[default: {getattr(DecodeSettings(), field):g}]"), help_text


def test_python_m_capcli_prints_the_version(tmp_path):
    done = subprocess.run([sys.executable, "-m", "capcli", "--version"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"capcli {__version__}"


# --- usage and settings errors: exit 2, one line on stderr ------------------------------------------------------


def test_bad_config_file_exits_2_naming_the_key(tmp_path, run_env):
    config = tmp_path / "bad.yaml"
    config.write_text("pretrain:\n  engine:\n    epoch: 3\n", encoding="utf-8")
    result = runner.invoke(app, [*short_run(tmp_path / "run"), "--config", str(config)], env=run_env)
    assert_usage_error(result, "'pretrain.engine.epoch'", "did you mean 'epochs'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--device", "tpu"], ["'runtime.device'", "'auto', 'cpu', 'cuda' or 'mps'", "'tpu'"]),
        (["--batch-size", "0"], ["'pretrain.engine.batch_size'", "greater than or equal to 1"]),
        (["--precision", "fp8"], ["'runtime.precision'", "'fp32'"]),
        (["--config", "missing.yaml"], ["config file not found", "missing.yaml"]),
    ],
    ids=["device", "batch-size", "precision", "missing-config"],
)
def test_bad_option_exits_2_naming_the_key(tmp_path, run_env, options, expected):
    result = runner.invoke(app, [*short_run(tmp_path / "run"), *options], env=run_env)
    assert_usage_error(result, *expected)
    assert not (tmp_path / "run").exists()


def test_unknown_env_group_exits_2(tmp_path, run_env):
    result = runner.invoke(app, short_run(tmp_path / "run"), env={**run_env, "CAPCLI_BOGUS": "1"})
    assert_usage_error(result, "CAPCLI_BOGUS", "align, benchmark, caption, data, evaluate, model, pretrain, runtime")


# --- a short real run -------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_json_is_one_document_with_the_summary(json_run):
    run_dir, result = json_run
    summary = json.loads(result.stdout)  # the whole of stdout is one document
    assert isinstance(summary, dict)
    assert SUMMARY_KEYS <= set(summary)
    assert summary["phase"] == "pretrain"
    assert summary["steps"] == 3
    assert summary["run_dir"] == str(run_dir)
    assert summary["best_checkpoint"] == str(run_dir / "checkpoints" / "best")
    assert {"loss", "caption_loss", "contrastive_loss"} <= set(summary["train"])
    assert {"loss", "caption_loss", "contrastive_loss"} <= set(summary["val"])
    assert {"loss", "caption_loss", "contrastive_loss"} <= set(summary["val_start"])
    assert (run_dir / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn at the end of the phase


@pytest.mark.slow
def test_quiet_run_prints_no_progress(json_run):
    _, result = json_run
    assert not re.search(r"\bstep\b", result.stderr), result.stderr


@pytest.mark.slow
def test_pretrain_writes_the_run_directory(json_run):
    run_dir, _ = json_run
    assert (run_dir / "config.yaml").is_file()
    assert (run_dir / "metrics.jsonl").is_file()
    for which in ("best", "last"):
        for name in CHECKPOINT_FILES:
            assert (run_dir / "checkpoints" / which / name).is_file(), f"{which}/{name}"


@pytest.mark.slow
def test_run_config_yaml_loads_back_as_the_resolved_settings(json_run, run_env):
    run_dir, _ = json_run
    resolved = load_settings(cli={
        "pretrain.engine.output": run_dir, "pretrain.engine.max_steps": 3, "pretrain.engine.batch_size": 8,
        "data.train_size": 32, "data.val_size": 8, "data.test_size": 8, "runtime.quiet": True,
    }, environ=run_env)
    assert load_settings(config=run_dir / "config.yaml", environ={}) == resolved


@pytest.mark.slow
def test_run_config_yaml_is_accepted_by_config_option(json_run):
    run_dir, _ = json_run
    # With no other options, config.yaml alone points back at its own run, which is refused as occupied.
    result = runner.invoke(app, ["pretrain", "--config", str(run_dir / "config.yaml")])
    assert_usage_error(result, str(run_dir), "already holds a run")


@pytest.mark.slow
def test_metrics_jsonl_has_train_and_val_lines_with_steps(json_run):
    run_dir, _ = json_run
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    records = [json.loads(line) for line in lines]
    assert records
    for record in records:
        assert record["split"] in ("train", "val")
        assert isinstance(record["step"], int)
    assert {(r["split"], r["step"]) for r in records} >= {("val", 0), ("train", 3), ("val", 3)}


@pytest.mark.slow
def test_second_run_into_the_same_output_is_refused(json_run, run_env):
    run_dir, _ = json_run
    before = checkpoint_mtimes(run_dir)
    result = runner.invoke(app, [*short_run(run_dir), "--quiet", "--json"], env=run_env)
    assert_usage_error(result, str(run_dir), "--resume", "--overwrite")
    assert checkpoint_mtimes(run_dir) == before


@pytest.mark.slow
def test_resume_continues_the_run(json_run, copied_run, run_env):
    result = runner.invoke(app, [*short_run(copied_run, max_steps=4), "--resume", "--quiet", "--json"], env=run_env)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 4
    assert summary["val_start"] == json.loads(json_run[1].stdout)["val_start"]  # not measured again
    records = read_metrics(copied_run / "metrics.jsonl")
    assert [r["step"] for r in records if r["split"] == "val"].count(0) == 1
    assert ("train", 4) in {(r["split"], r["step"]) for r in records}


@pytest.mark.slow
def test_overwrite_starts_the_run_again(copied_run, run_env):
    result = runner.invoke(app, [*short_run(copied_run, max_steps=2), "--overwrite", "--quiet", "--json"],
                           env=run_env)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["steps"] == 2
    assert max(r["step"] for r in read_metrics(copied_run / "metrics.jsonl")) == 2  # step 3 of the old run is gone


def test_resume_of_an_empty_directory_exits_2(tmp_path, run_env):
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, [*short_run(empty), "--resume", "--quiet"], env=run_env)
    assert_usage_error(result, "no checkpoint", str(empty))


@pytest.mark.slow
def test_table_on_stdout_and_progress_lines_on_stderr(tmp_path, run_env):
    result = runner.invoke(app, short_run(tmp_path / "run", max_steps=2), env=run_env)
    assert result.exit_code == 0, result.output
    assert "caption_loss" in result.stdout
    assert "val (end)" in result.stdout
    assert "pretrain: 2 steps" in result.stdout
    assert not re.search(r"pretrain step \d+/", result.stdout)  # no progress mixed into the results
    assert re.search(r"^pretrain step 2/2 ", result.stderr, re.MULTILINE), result.stderr
    assert "before training: val loss" in result.stderr
    assert "\x1b" not in result.stderr  # plain lines, not a live bar: the runner is not a terminal


# --- Ctrl-C through the real process ------------------------------------------------------------------------------


@pytest.mark.slow(seconds=28)
def test_ctrl_c_mid_epoch_saves_a_checkpoint_exits_130_and_resumes(tmp_path, run_env):
    """SIGINT to a real ``capcli pretrain`` process once it has logged a step of its first epoch."""
    import os
    import signal
    import time

    run_dir = tmp_path / "run"
    args = [sys.executable, "-m", "capcli", "pretrain", "--output", str(run_dir), "--train-size", "64",
            "--val-size", "8", "--batch-size", "8", "--epochs", "50", "--quiet"]
    env = {**os.environ, **run_env, "CAPCLI_PRETRAIN__ENGINE__LOG_EVERY": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and any(r["split"] == "train" for r in read_metrics(metrics)):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "--resume" in err and "Traceback" not in err
    assert out == ""
    state_step = max(r["step"] for r in read_metrics(metrics) if r["split"] == "train")
    assert state_step < 50 * 8, "the run was not stopped"
    assert (run_dir / "checkpoints" / "last" / "state.pt").is_file()

    resumed = subprocess.run([*args[:-1], "--max-steps", str(state_step + 2), "--resume", "--json", "--quiet"],
                             env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["steps"] == state_step + 2
