"""The carve belongs to the run: evaluate (and align) on a checkpoint read the data settings
recorded with it, a changed carve warns, and a held-out split holding training images is refused.

One tiny run on an image folder (no val/test sub-folders: both are carved out of train) serves
the module; a second run directory is only its files copied, to check the run directory's
``config.yaml`` is found when a checkpoint has none.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from PIL import Image
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.carve import carve_changes, follow_run, record_of, train_overlap
from capcli.data.sources import load_splits
from capcli.settings import DataSettings

runner = CliRunner()
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 30), "blue": (30, 30, 220), "yellow": (230, 220, 20)}
SIZES = {"data.train_size": 64, "data.val_size": 4, "data.test_size": 6}


def write_folder(root: Path, n: int = 40) -> Path:
    """``n`` distinct 24-px PNGs (a coloured square on a noisy background) and their captions."""
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % len(COLOURS)]
        rng = random.Random(i)
        image = Image.new("RGB", (24, 24), tuple(rng.randrange(256) for _ in range(3)))
        image.paste(COLOURS[colour], (4 + i % 8, 4, 14 + i % 8, 14))
        image.save(root / f"{i:03d}.png")
        rows.append({"file_name": f"{i:03d}.png", "caption": f"a {colour} square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def photos_run(tmp_path_factory, data_cache) -> tuple[Path, Path]:
    """A run trained on an image folder for 2 steps: (run directory, image folder)."""
    from conftest import make_settings

    from capcli.phases import pretrain

    root = tmp_path_factory.mktemp("carve")
    folder = write_folder(root / "photos")
    settings = make_settings(root / "runs" / "photos", data_cache, **{
        **SIZES, "data.source": f"imagefolder:{folder}", "pretrain.engine.max_steps": 2,
        "pretrain.engine.epochs": 1, "pretrain.concept_weight": 0.0})
    pretrain(settings)
    return settings.pretrain.engine.output, folder


def evaluate(run: Path, out: Path, *extra: str):
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run), "--beams", "1", "--output", str(out),
                                 "--quiet", "--json", "--device", "cpu", *extra], env={})
    return result


def names(split) -> list[str]:
    return sorted(Path(image["path"]).name for image in split["image"])


def test_an_image_folder_run_evaluates_on_its_own_test_split_by_default(photos_run, tmp_path):
    run, folder = photos_run
    result = evaluate(run, tmp_path / "r.json", "--save-captions", str(tmp_path / "c.jsonl"))
    assert result.exit_code == 0, result.output
    assert "warning" not in result.stderr
    doc = json.loads(result.stdout)
    assert doc["data"] == f"imagefolder:{folder}"  # not synthetic, as it was before runs recorded their data
    assert doc["carve"] == "the run's" and doc["train_overlap"] == 0
    assert doc["data_settings"]["val_size"] == 4 and doc["data_settings"]["test_size"] == 6
    # The very images of the run's test carve, none of its training images.
    splits = load_splits(DataSettings(source=f"imagefolder:{folder}", train_size=64, val_size=4, test_size=6))
    evaluated = sorted(Path(json.loads(line)["image"]).name
                       for line in (tmp_path / "c.jsonl").read_text(encoding="utf-8").splitlines())
    assert evaluated == names(splits["test"]) and len(evaluated) == 3  # a tenth of the 36 left after val
    assert not set(evaluated) & set(names(splits["train"]))


def test_a_changed_carve_warns_and_training_images_are_refused_unless_allowed(photos_run, tmp_path):
    run, folder = photos_run
    result = evaluate(run, tmp_path / "r.json", "--val-size", "2")
    assert result.exit_code == 2, result.output
    assert "data.val_size 4 → 2" in result.stderr and "warning: data settings differ" in result.stderr
    assert "images evaluated that the run trained on" in result.stderr and "--allow-train-images" in result.stderr
    assert result.stdout == ""

    result = evaluate(run, tmp_path / "r.json", "--val-size", "2", "--allow-train-images")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["carve"] == "changed: data.val_size 4 → 2"
    run_train = load_splits(DataSettings(source=f"imagefolder:{folder}", train_size=64, val_size=4, test_size=6))
    other = load_splits(DataSettings(source=f"imagefolder:{folder}", train_size=64, val_size=2, test_size=6))
    expected = len(set(names(other["test"])) & set(names(run_train["train"])))
    assert doc["train_overlap"] == expected > 0


def test_split_train_is_scored_with_its_overlap_said(photos_run, tmp_path):
    run, _ = photos_run
    result = evaluate(run, tmp_path / "r.json", "--split", "train", "--limit", "5")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["train_overlap"] == 5


def test_every_checkpoint_records_the_runs_settings(photos_run):
    run, _ = photos_run
    for name in ("best", "last"):
        checkpoint = run / "checkpoints" / name
        assert record_of(checkpoint) == checkpoint / "config.yaml"
        assert (checkpoint / "config.yaml").read_text() == (run / "config.yaml").read_text()


def test_precedence_run_record_over_defaults_and_the_command_line_over_the_record(photos_run, tmp_path):
    run, folder = photos_run
    checkpoint = run / "checkpoints" / "best"
    followed = follow_run(checkpoint, None, {"data.source": None}, environ={})
    assert followed.settings.data.source == f"imagefolder:{folder}"
    assert followed.settings.data.test_size == 6  # the run's, not the tiny preset's 300
    assert followed.changes == [] and followed.warning(checkpoint) is None
    followed = follow_run(checkpoint, None, {"data.test_size": 9}, environ={"CAPCLI_DATA__VAL_SIZE": "5"})
    assert followed.changes == ["data.val_size 4 → 5", "data.test_size 6 → 9"]


def test_a_checkpoint_without_its_own_record_falls_back_to_its_run_directory(tmp_path):
    checkpoint = tmp_path / "run" / "checkpoints" / "best"
    checkpoint.mkdir(parents=True)
    assert record_of(checkpoint) is None
    (tmp_path / "run" / "config.yaml").write_text("data:\n  source: synthetic\n  test_size: 7\n  gone: 1\n")
    assert record_of(checkpoint) == tmp_path / "run" / "config.yaml"
    followed = follow_run(checkpoint, None, {}, environ={})
    assert followed.recorded.test_size == 7 and followed.settings.data.test_size == 7  # unknown keys dropped


def test_carve_changes_name_each_carve_setting_and_ignore_the_rest():
    run = DataSettings(source="imagefolder:a", seed=0, val_size=10, test_size=10, train_size=100)
    assert carve_changes(run, run.model_copy(update={"num_workers": 4, "train_size": 50})) == []
    changed = run.model_copy(update={"seed": 1, "source": "imagefolder:b"})
    assert carve_changes(run, changed) == ["data.source imagefolder:a → imagefolder:b", "data.seed 0 → 1"]
    # synthetic renders another dataset for any size
    synthetic = DataSettings(source="synthetic", train_size=100)
    assert carve_changes(synthetic, synthetic.model_copy(update={"train_size": 50})) == ["data.train_size 100 → 50"]


def test_overlap_is_by_content_whatever_the_name(tmp_path):
    a, b, c = (tmp_path / name for name in ("a.png", "b.png", "c.png"))
    Image.new("RGB", (4, 4), (1, 2, 3)).save(a)
    Image.new("RGB", (4, 4), (9, 9, 9)).save(b)
    c.write_bytes(a.read_bytes())  # a copy under another name
    train = [{"path": str(a), "bytes": None}, {"path": str(tmp_path / "missing.png"), "bytes": None}]
    assert train_overlap(train, [{"path": str(c), "bytes": None}, {"path": str(b), "bytes": None}]) == 1
    assert train_overlap(train, [{"path": None, "bytes": a.read_bytes()}]) == 1
    assert train_overlap(train, [{"path": str(b), "bytes": None}]) == 0


def test_align_on_a_run_reads_that_runs_caption_data(photos_run, tmp_path, data_cache):
    """align --checkpoint RUN generates its pairs from the run's image folder and carve, and records them."""
    import yaml

    run, folder = photos_run
    out = tmp_path / "align"
    result = runner.invoke(app, ["align", "--checkpoint", str(run), "--output", str(out), "--max-steps", "1",
                                 "--batch-size", "8", "--quiet", "--json", "--device", "cpu"], env={})
    assert result.exit_code == 0, result.output
    assert "warning: data settings differ" not in result.stderr
    recorded = yaml.safe_load((out / "checkpoints" / "best" / "config.yaml").read_text(encoding="utf-8"))["data"]
    assert recorded["source"] == f"imagefolder:{folder}"
    assert (recorded["val_size"], recorded["test_size"], recorded["cache_dir"]) == (4, 6, str(data_cache))
