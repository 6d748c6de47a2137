"""curves.png: a valid PNG of the expected size, from one run or several, and `capcli report`."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from typer.testing import CliRunner

from capcli.cli import app
from capcli.evaluate.report import DPI, HEIGHT, WIDTH, write_curves

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
    """Each run logs steps 1..20: pretrain is drawn at 1..20 and align after it, at 21..40, on
    every panel; the shared panels' x-axes span both runs."""
    from capcli.evaluate.report import draw_curves
    from capcli.train.runlog import read_metrics

    runs = [fake_run(tmp_path / "pretrain", align=False), fake_run(tmp_path / "align", align=True)]
    path = write_curves(runs, tmp_path / "out" / "both.png")
    assert png_size(path) == (1200, 900)
    figure = draw_curves([(run, read_metrics(run / "metrics.jsonl")) for run in runs])
    by_title = {ax.get_title(): ax for ax in figure.axes}
    steps = {"pretrain": list(range(1, 21)), "align": list(range(21, 41))}
    for name, expected in steps.items():
        train = [line for line in by_title[f"{name}: loss"].get_lines() if line.get_label() == "train"]
        assert [list(line.get_xdata()) for line in train] == [expected], name
    lr = by_title["learning rate"]
    assert {line.get_label(): list(line.get_xdata()) for line in lr.get_lines() if line.get_label() in steps} == steps
    assert sorted(line.get_xdata()[0] for line in lr.get_lines() if line.get_label() not in steps) == [0, 20]
    for title in ("learning rate", "align: α(t) and reward accuracy"):
        low, high = by_title[title].get_xlim()
        assert low <= 1 and high >= 40, (title, low, high)


def readme_job_run(root: Path, align: bool) -> Path:
    """A run shaped like the README job's: pretrain's weighted concept loss starts near 200 and ends
    near 1, while its caption and contrastive losses fall from 6 and 4 to a few tenths; align's
    losses move by less than a factor of two."""
    import math

    root.mkdir(parents=True)
    lines = []
    for step in range(1, 101):
        if align:
            parts = {"caption_loss": 0.4 - 0.1 * step / 100, "contrastive_loss": 0.08 + 0.05 * math.exp(-step / 30),
                     "preference_loss": 0.3 * math.exp(-step / 40) + 0.05}
            extra = {"alpha": 0.7 - 0.4 * step / 100, "reward_accuracy": 0.6 + 0.35 * step / 100}
        else:
            parts = {"concept_loss": 200 * math.exp(-step / 15) + 1, "caption_loss": 6 * math.exp(-step / 20) + 0.3,
                     "contrastive_loss": 4 * math.exp(-step / 25) + 0.1}
            extra = {}
        lines.append({"split": "train", "step": step, "epoch": step // 25, "lr": 1e-3 * min(1, step / 10),
                      "loss": sum(parts.values()), **parts, **extra})
    for step, shift in ((0, 0.3), (25, 0.2), (50, 0.1), (75, 0.15), (100, 0.12)):
        parts = {key: value * (1 + shift) for key, value in lines[max(step - 1, 0)].items()
                 if key == "loss" or key.endswith("_loss")}
        lines.append({"split": "val", "step": step, "epoch": step // 25, "val_loss": parts["loss"],
                      **{f"val_{key}": value for key, value in parts.items() if key != "loss"},
                      **({"val_loss_unweighted": 1 - step / 200 if step != 75 else 0.3} if align else {})})
    (root / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    return root


def span(ax, line) -> float:
    """The share of its axis's height that a plotted series covers (log axes included)."""
    import numpy as np

    ax.get_ylim()  # applies any pending autoscaling to the view limits the transform reads
    points = (ax.transScale + ax.transLimits).transform(np.column_stack(line.get_data()).astype(float))
    return float(points[:, 1].max() - points[:, 1].min())


def varying_series(figure):
    """(axes title, line label, span) of every plotted series whose values change by more than 20%."""
    out = []
    for ax in figure.axes:
        for line in ax.get_lines():
            y = [float(v) for v in line.get_ydata()]
            if len(y) > 1 and min(y) > 0 and max(y) > 1.2 * min(y):
                out.append((ax.get_title(), line.get_label(), span(ax, line)))
    return out


def test_each_loss_series_spans_a_visible_part_of_its_axis(tmp_path: Path) -> None:
    """The concept loss (about 200 at the start) no longer flattens the caption and contrastive losses."""
    from capcli.evaluate.report import draw_curves
    from capcli.train.runlog import read_metrics

    runs = [readme_job_run(tmp_path / "pretrain", align=False), readme_job_run(tmp_path / "align", align=True)]
    figure = draw_curves([(run, read_metrics(run / "metrics.jsonl")) for run in runs])
    series = varying_series(figure)
    titles = {title for title, _, _ in series}
    assert {"pretrain: loss", "concept loss", "caption loss", "contrastive loss", "align: loss",
            "preference loss"} <= titles
    assert all(share <= 1 + 1e-9 for _, _, share in series)
    flat = [(title, label, round(share, 3)) for title, label, share in series if share < 0.25]
    assert not flat, f"series squashed into a line: {flat}"


def test_the_visibility_check_fails_on_one_shared_axis(tmp_path: Path) -> None:
    """The check can fail: the concept and caption losses on one linear axis, as curves.png drew them."""
    from matplotlib.figure import Figure

    ax = Figure().add_subplot()
    ax.plot(range(100), [200 * 0.95 ** s + 1 for s in range(100)], label="concept_loss")
    ax.plot(range(100), [6 * 0.97 ** s + 0.3 for s in range(100)], label="caption_loss")
    shares = {label: share for _, label, share in varying_series(ax.figure)}
    assert shares["concept_loss"] > 0.8 and shares["caption_loss"] < 0.05


def test_the_best_checkpoint_is_marked_where_the_engine_kept_it(tmp_path: Path) -> None:
    """align ranks by val loss_unweighted (lowest at step 75 here), pretrain by val loss."""
    from capcli.evaluate.report import best_step, draw_curves
    from capcli.train.runlog import read_metrics

    runs = [readme_job_run(tmp_path / "pretrain", align=False), readme_job_run(tmp_path / "align", align=True)]
    records = [read_metrics(run / "metrics.jsonl") for run in runs]
    assert best_step(records[1])[:2] == (75, 0.3) and best_step(records[1])[2] == "val_loss_unweighted"
    pretrain_best = best_step(records[0])
    assert pretrain_best[2] == "val_loss" and pretrain_best[1] == min(
        r["val_loss"] for r in records[0] if r["split"] == "val")
    figure = draw_curves(list(zip(runs, records, strict=True)))
    stars = [line for ax in figure.axes for line in ax.get_lines() if line.get_label().startswith("best checkpoint")]
    assert [line.get_label() for line in stars] == [f"best checkpoint (step {pretrain_best[0]})",
                                                    "best checkpoint (step 75)"]
    assert list(stars[1].get_xdata()) == [100 + 75]  # align drawn after pretrain's 100 steps
    assert best_step([{"split": "train", "step": 1, "loss": 1.0}]) is None


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
    from capcli.train.runlog import read_metrics

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

    from capcli.phases import pretrain
    from capcli.settings import override
    from capcli.train.engine import TrainingInterrupted
    from capcli.train.runlog import read_metrics

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
