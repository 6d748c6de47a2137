"""curves.png: a valid PNG of the expected size, from one run or several, and `capcli report`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from typer.testing import CliRunner

from capcli.cli import app
from capcli.report import DPI, HEIGHT, WIDTH, write_curves

runner = CliRunner()


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def fake_run(root: Path, align: bool) -> Path:
    """A metrics.jsonl as the engine writes it: train lines every step, val lines at epoch ends."""
    root.mkdir(parents=True)
    lines = []
    for step in range(1, 21):
        line = {"split": "train", "step": step, "epoch": step // 10, "lr": 1e-3 * step / 20,
                "loss": 5 / step, "caption_loss": 3 / step, "contrastive_loss": 2 / step}
        if align:
            line |= {"preference_loss": 0.5, "alpha": 0.7 - 0.4 * step / 20, "reward_accuracy": 0.5 + step / 50}
        lines.append(line)
    for step in (0, 10, 20):
        lines.append({"split": "val", "step": step, "epoch": step // 10, "val_loss": 6 / (step + 1),
                      "val_caption_loss": 3 / (step + 1), "val_contrastive_loss": 3 / (step + 1)})
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def test_one_run_gets_its_curves_png_of_the_expected_size(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "pretrain", align=False)
    path = write_curves([run])
    assert path == run / "curves.png"
    assert png_size(path) == (int(WIDTH * DPI), int(HEIGHT * DPI))


def test_two_phases_are_drawn_end_to_end_into_one_picture(tmp_path: Path) -> None:
    runs = [fake_run(tmp_path / "pretrain", align=False), fake_run(tmp_path / "align", align=True)]
    path = write_curves(runs, tmp_path / "out" / "both.png")
    assert png_size(path) == (1200, 900)


def test_report_command_writes_the_png_and_refuses_a_folder_without_metrics(tmp_path: Path) -> None:
    run = fake_run(tmp_path / "run", align=True)
    result = runner.invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(run / "curves.png") and (run / "curves.png").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    result = runner.invoke(app, ["report", str(empty)])
    assert result.exit_code == 2 and "no metrics.jsonl" in result.stderr


def test_tensorboard_gets_the_numbers_metrics_jsonl_gets(settings_factory) -> None:
    """One seam, two sinks: every train and val number of metrics.jsonl is a TensorBoard scalar."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capcli.phases import pretrain
    from capcli.runlog import read_metrics

    settings = settings_factory(**{"runtime.log": "tensorboard", "pretrain.engine.max_steps": 3})
    run = settings.pretrain.engine.output
    pretrain(settings)
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = read_metrics(run / "metrics.jsonl")
    train = [r for r in records if r["split"] == "train"]
    assert [e.step for e in events.Scalars("train/loss")] == [r["step"] for r in train]
    assert all(abs(e.value - r["loss"]) < 1e-5 for e, r in zip(events.Scalars("train/loss"), train, strict=True))
    val = [r for r in records if r["split"] == "val"]
    assert len(events.Scalars("val/loss")) == len(val) and "val/contrastive_loss" in events.Tags()["scalars"]


def test_a_resumed_run_keeps_tensorboard_and_metrics_jsonl_in_step(settings_factory) -> None:
    """Stopped after step 5 (checkpoint at step 4, end of epoch 1) and resumed: TensorBoard drops what
    the resume repeats, as metrics.jsonl does, and the two hold the same steps."""
    import os
    import signal

    import pytest
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from capcli.engine import TrainingInterrupted
    from capcli.phases import pretrain
    from capcli.runlog import read_metrics
    from capcli.settings import override

    settings = settings_factory(**{"runtime.log": "tensorboard", "data.train_size": 32})

    def stop_at_5(step, losses):
        if step == 5:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        pretrain(settings, on_step=stop_at_5)
    pretrain(override(settings, {"pretrain.engine.resume": True}))
    run = settings.pretrain.engine.output
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    logged = [r["step"] for r in read_metrics(run / "metrics.jsonl") if r["split"] == "train"]
    assert logged == list(range(1, 9))
    assert [e.step for e in events.Scalars("train/loss")] == logged
