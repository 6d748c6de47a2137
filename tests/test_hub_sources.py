"""The ``hf:``, ``disk:`` and ``wds:`` data sources, on local stand-ins built here.

``hf:`` goes through ``datasets.load_dataset`` on a local folder of parquet files (what a hub
dataset is once cached); ``disk:`` through ``load_from_disk``; ``wds:`` through datasets'
``webdataset`` builder on tar shards written with ``tarfile``. Each then trains one step.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.sources import expand_braces, load_splits
from capcli.errors import ConfigError
from capcli.settings import DataSettings

runner = CliRunner()
CAPTIONS = ["a red circle", "two blue squares", "a green star above a cross", "one yellow triangle",
            "a big purple circle", "three small crosses"]


def png_bytes(seed: int, size: int = 20) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def image_dataset(n: int, start: int = 0, caption_column: str = "caption") -> datasets.Dataset:
    rows = {"image": [{"bytes": png_bytes(start + i), "path": None} for i in range(n)],
            caption_column: [CAPTIONS[(start + i) % len(CAPTIONS)] for i in range(n)]}
    return datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image())


@pytest.fixture
def hf_folder(tmp_path: Path) -> Path:
    """A local dataset repository: parquet files named by split, images embedded as bytes."""
    root = tmp_path / "hf-data"
    (root / "data").mkdir(parents=True)
    image_dataset(24).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    image_dataset(6, start=100).to_parquet(str(root / "data" / "validation-00000-of-00001.parquet"))
    return root


@pytest.fixture
def disk_folder(tmp_path: Path) -> Path:
    root = tmp_path / "saved"
    datasets.DatasetDict({"train": image_dataset(24, caption_column="text")}).save_to_disk(str(root))
    return root


def write_shards(root: Path, caption_key: str) -> Path:
    """Two tar shards of 12 samples each: ``png`` images with ``txt`` captions, or ``json`` ones
    holding a ``caption`` field (as pixparse/cc3m-wds has)."""
    root.mkdir(parents=True)
    for shard in range(2):
        with tarfile.open(root / f"part-{shard:03d}.tar", "w") as tar:
            for i in range(12):
                key = f"{shard:03d}{i:04d}"
                caption = CAPTIONS[(shard * 12 + i) % len(CAPTIONS)]
                text = json.dumps({"caption": caption, "width": 20}) if caption_key == "json" else caption
                for name, data in ((f"{key}.png", png_bytes(shard * 100 + i)), (f"{key}.{caption_key}", text.encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return root


@pytest.fixture
def wds_shards(tmp_path: Path) -> Path:
    return write_shards(tmp_path / "shards", "txt")


def test_hf_reads_a_local_dataset_repository_with_its_validation_split(hf_folder: Path) -> None:
    splits = load_splits(DataSettings(source=f"hf:{hf_folder}", val_size=100, test_size=3))
    # test is carved from train, at most a tenth of it
    assert len(splits["train"]) == 22 and len(splits["val"]) == 6 and len(splits["test"]) == 2
    row = splits["train"][0]
    assert set(splits["train"].column_names) == {"image", "captions"}
    assert row["image"]["bytes"][:4] == b"\x89PNG" and row["captions"] in ([c] for c in CAPTIONS)


def test_hf_split_option_picks_the_training_split(hf_folder: Path) -> None:
    splits = load_splits(DataSettings(source=f"hf:{hf_folder}", train_split="validation", test_size=0))
    assert len(splits["train"]) + len(splits.get("val", [])) == 6
    with pytest.raises(ConfigError, match="no split 'dev'"):
        load_splits(DataSettings(source=f"hf:{hf_folder}", train_split="dev"))


def test_hf_name_that_is_not_cached_offline_is_a_config_error_naming_the_remedies() -> None:
    with pytest.raises(ConfigError) as err:
        load_splits(DataSettings(source="hf:nobody-here/no-such-captions"))
    message = str(err.value)
    assert "nobody-here/no-such-captions" in message and "HF_HOME" in message and "local path" in message


def test_disk_reads_save_to_disk_and_carves_val_and_test(disk_folder: Path) -> None:
    splits = load_splits(DataSettings(source=f"disk:{disk_folder}", val_size=2, test_size=2))
    assert [len(splits[s]) for s in ("train", "val", "test")] == [20, 2, 2]
    assert splits["train"][0]["captions"][0] in CAPTIONS  # the "text" column, found by default


def test_disk_that_is_not_a_saved_dataset_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a dataset saved with save_to_disk"):
        load_splits(DataSettings(source=f"disk:{tmp_path}"))


@pytest.mark.parametrize("caption_key", ["txt", "json"])
def test_wds_reads_shards_by_brace_pattern_with_txt_or_json_captions(tmp_path: Path, caption_key: str) -> None:
    root = write_shards(tmp_path / "shards", caption_key)
    splits = load_splits(DataSettings(source=f"wds:{root}/part-{{000..001}}.tar", val_size=2, test_size=0))
    assert len(splits["train"]) + len(splits["val"]) == 24  # both shards
    captions = {c for split in splits.values() for caps in split["captions"] for c in caps}
    assert captions == set(CAPTIONS)
    assert splits["train"][0]["image"]["bytes"][:4] == b"\x89PNG"


def test_wds_pattern_that_matches_nothing_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no tar shard matches"):
        load_splits(DataSettings(source=f"wds:{tmp_path}/none-{{0..3}}.tar"))


def test_brace_expansion_keeps_zero_padding_and_nests() -> None:
    assert expand_braces("s/{008..010}.tar") == ["s/008.tar", "s/009.tar", "s/010.tar"]
    assert expand_braces("a{1..2}b{0..1}") == ["a1b0", "a1b1", "a2b0", "a2b1"]
    assert expand_braces("plain.tar") == ["plain.tar"]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["hf", "disk", "wds"])
def test_each_source_trains_a_step(kind: str, hf_folder: Path, disk_folder: Path, wds_shards: Path,
                                   tmp_path: Path, data_cache: Path) -> None:
    spec = {"hf": f"hf:{hf_folder}", "disk": f"disk:{disk_folder}", "wds": f"wds:{wds_shards}/part-{{000..001}}.tar"}
    output = tmp_path / "run"
    result = runner.invoke(app, ["pretrain", "--data", spec[kind], "--max-steps", "2", "--batch-size", "4",
                                 "--val-size", "4", "--test-size", "0", "--output", str(output), "--quiet",
                                 "--json", "--device", "cpu"],
                           env={"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_PRETRAIN__ENGINE__GRAD_ACCUM": "1"})
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["steps"] == 2 and summary["samples"] == 8 and summary["skipped_images"] == 0
    assert (output / "checkpoints" / "best" / "model.safetensors").is_file()


# ---------------------------------------------------------------- streaming (hf: with --streaming)


def test_a_streamed_source_keeps_train_a_stream_and_val_in_memory(hf_folder: Path) -> None:
    splits = load_splits(DataSettings(source=f"hf:{hf_folder}", streaming=True, train_size=20, val_size=4,
                                      test_size=3))
    assert isinstance(splits["train"], datasets.IterableDataset)
    assert len(splits["val"]) == 4  # the head of the validation stream
    assert "test" not in splits  # the source has none, and a stream is never carved
    train = list(splits["train"])  # the whole stream: the engine stops after train_size samples an epoch
    assert len(train) == 24 and train[0]["captions"][0] in CAPTIONS


def test_a_streamed_source_without_a_validation_split_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "train-only"
    (root / "data").mkdir(parents=True)
    image_dataset(8).to_parquet(str(root / "data" / "train-00000-of-00001.parquet"))
    with pytest.raises(ConfigError, match="no validation split to stream"):
        load_splits(DataSettings(source=f"hf:{root}", streaming=True))


def test_a_resumed_stream_skips_each_workers_share_of_the_consumed_batches(monkeypatch) -> None:
    """Workers read their own parts of the stream and the loader takes their batches in turn."""
    from types import SimpleNamespace

    from capcli.data.batches import _Examples

    examples = _Examples(rows=[], image_size=8, max_pixels=10, epoch=0, skip_batches=5, batch_size=4)
    assert examples._skip() == 20  # no workers: all 5 batches of 4
    skipped = []
    for worker in range(2):
        monkeypatch.setattr("torch.utils.data.get_worker_info", lambda w=worker: SimpleNamespace(num_workers=2, id=w))
        skipped.append(examples._skip())
    assert skipped == [12, 8]  # worker 0 made batches 0, 2, 4; worker 1 made 1, 3


def test_streaming_applies_to_hf_sources_only(disk_folder: Path) -> None:
    with pytest.raises(ConfigError, match="streaming applies to hf: sources"):
        load_splits(DataSettings(source=f"disk:{disk_folder}", streaming=True))


@pytest.mark.slow(seconds=30)
def test_a_streamed_run_trains_epochs_and_resumes_to_the_same_losses(hf_folder: Path, tmp_path: Path,
                                                                       data_cache: Path, monkeypatch) -> None:
    """2 epochs of a 16-sample stream in steps of 4; stopped after step 6 (mid-epoch 2), then resumed."""
    # datasets waits 5 s each time a streamed parquet iteration ends, for Arrow's reader threads to
    # finish (apache/arrow#45214): 25 of this test's 30 s. Half a second is ample for files this small.
    monkeypatch.setattr(datasets.config, "SLEEP_TIME_ON_THREADS_SHUTDOWN", 0.5)
    from capcli.phases import pretrain
    from capcli.settings import load_settings, override
    from capcli.train.checkpoint import load_state
    from capcli.train.engine import TrainingInterrupted
    from capcli.train.runlog import read_metrics

    def settings(name: str):
        return load_settings(cli={
            "data.source": f"hf:{hf_folder}", "data.streaming": True, "data.train_size": 16, "data.val_size": 4,
            "data.test_size": 0, "data.cache_dir": data_cache, "pretrain.engine.batch_size": 4,
            "pretrain.engine.grad_accum": 1, "pretrain.engine.epochs": 2, "pretrain.engine.log_every": 1,
            "pretrain.engine.output": tmp_path / name, "runtime.device": "cpu", "runtime.quiet": True}, environ={})

    def losses(name: str) -> list[tuple[int, float]]:
        return [(r["step"], r["loss"]) for r in read_metrics(tmp_path / name / "metrics.jsonl") if r["split"] == "train"]

    whole = pretrain(settings("whole"))
    assert whole.steps == 8 and whole.epochs == 2

    import os
    import signal

    def stop_after_6(step: int, _losses) -> None:
        if step == 6:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        pretrain(settings("parted"), on_step=stop_after_6)
    assert load_state(tmp_path / "parted" / "checkpoints" / "last")["batch_in_epoch"] == 2
    pretrain(override(settings("parted"), {"pretrain.engine.resume": True}))
    assert [s for s, _ in losses("parted")] == list(range(1, 9))
    got, expected = [v for _, v in losses("parted")], [v for _, v in losses("whole")]
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
