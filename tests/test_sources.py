"""Tests for capcli.data.sources and capcli.data.batches: named sources, user image folders,
split carving, clear errors, tokenised batches, and the corrupt-image policy end to end.

User folders are written into ``tmp_path`` with a few tiny PNGs and a metadata file, in the
Hugging Face "imagefolder" layout; nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from capcli.data import synthetic
from capcli.data.batches import CaptionCollator, CaptionDataset
from capcli.data.sources import load_splits
from capcli.data.synthetic import generate
from capcli.errors import ConfigError, DataError
from capcli.model.tokenizer import train_bpe
from capcli.settings import DataSettings


def _png(path: Path, seed: int, size: int = 24) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


def _caption(index: int) -> str:
    return generate("train", index, seed=0)[1][0]


def _write_folder(root: Path, n: int, fmt: str = "jsonl", rows: list[dict] | None = None,
                  image_key: str = "file_name", caption_key: str = "caption", start: int = 0) -> Path:
    """``n`` PNGs plus ``metadata.jsonl``/``.csv``; ``rows`` overrides the default row per image."""
    root.mkdir(parents=True, exist_ok=True)
    if rows is None:
        rows = [{caption_key: _caption(start + i)} for i in range(n)]
    full = []
    for i, row in enumerate(rows):
        name = f"img{start + i:03d}.png"
        _png(root / name, seed=start + i)
        full.append({image_key: name, **row})
    if fmt == "jsonl":
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in full), encoding="utf-8")
    else:
        with open(root / "metadata.csv", "w", newline="", encoding="utf-8") as out:
            writer = csv.DictWriter(out, fieldnames=list(full[0]))
            writer.writeheader()
            writer.writerows(full)
    return root


def _names(split) -> list[str]:
    return [Path(img["path"]).name for img in split["image"]]


def _folder_settings(root: Path, **kwargs) -> DataSettings:
    return DataSettings(source=f"imagefolder:{root}", **kwargs)


# ---------------------------------------------------------------- synthetic


def test_synthetic_splits_have_the_requested_sizes_and_columns(tmp_path: Path) -> None:
    settings = DataSettings(source="synthetic", cache_dir=tmp_path, train_size=12, val_size=5, test_size=4)
    splits = load_splits(settings)
    assert {name: len(split) for name, split in splits.items()} == {"train": 12, "val": 5, "test": 4, "test_novel": 4}
    for name, split in splits.items():
        assert {"image", "captions", "scene"} <= set(split.column_names), name
        assert split.features["image"].decode is False
        row = split[0]
        assert set(row["image"]) == {"bytes", "path"}
        assert row["image"]["bytes"] is None and Path(row["image"]["path"]).is_file()
        assert Path(row["image"]["path"]).parent.name == name
        assert isinstance(row["captions"], list) and len(row["captions"]) == 5
        assert all(isinstance(c, str) and c for c in row["captions"])
        assert 1 <= len(row["scene"]["objects"]) <= 3
    # The rows are the generator's, in order.
    assert splits["train"][3]["captions"] == generate("train", 3, seed=0)[1]
    with Image.open(splits["train"][0]["image"]["path"]) as img:
        assert img.size == (64, 64)


def test_synthetic_is_materialised_once_and_reused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    settings = DataSettings(source="synthetic", cache_dir=tmp_path, train_size=6, val_size=2, test_size=4,
                            image_size=32)
    first = load_splits(settings)
    folders = [p for p in tmp_path.iterdir() if p.name.startswith("synthetic-")]
    assert len(folders) == 1 and (folders[0] / ".complete").is_file()
    stamps = {p: p.stat().st_mtime_ns for p in folders[0].rglob("*.png")}
    assert len(stamps) == 6 + 2 + 4 + 4

    def no_render(*args, **kwargs):
        raise AssertionError("the materialised folder should have been reused")

    monkeypatch.setattr(synthetic, "render", no_render)
    second = load_splits(settings)
    assert [p for p in tmp_path.iterdir() if p.name.startswith("synthetic-")] == folders
    assert {p: p.stat().st_mtime_ns for p in folders[0].rglob("*.png")} == stamps
    for name in first:
        assert _names(first[name]) == _names(second[name])
        assert first[name]["captions"] == second[name]["captions"]
    with Image.open(first["val"][0]["image"]["path"]) as img:
        assert img.size == (32, 32)


def test_synthetic_loads_when_a_split_has_no_relations(tmp_path: Path) -> None:
    # With seed 0, test_novel rows 0-2 and test row 0 are single-object scenes (no relations).
    settings = DataSettings(source="synthetic", cache_dir=tmp_path, train_size=6, val_size=2, test_size=2)
    splits = load_splits(settings)
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "val": 2, "test": 2, "test_novel": 2}


def test_split_folders_whose_metadata_infers_different_types_still_load(tmp_path: Path) -> None:
    root = tmp_path / "splits"
    _write_folder(root / "train", 4, rows=[{"caption": "a cat", "tags": ["pet"]}] * 4)
    _write_folder(root / "val", 2, rows=[{"caption": "a dog", "tags": []}] * 2, start=10)
    splits = load_splits(_folder_settings(root, test_size=0))
    assert {name: len(split) for name, split in splits.items()} == {"train": 4, "val": 2}


def test_synthetic_takes_no_argument(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="synthetic:foo"):
        load_splits(DataSettings(source="synthetic:foo", cache_dir=tmp_path))


# ---------------------------------------------------------------- imagefolder


def test_imagefolder_jsonl_caption_strings_become_lists_and_eval_splits_are_carved(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 40)
    splits = load_splits(_folder_settings(root, val_size=4, test_size=3))
    assert set(splits) == {"train", "val", "test"}
    sizes = {name: len(split) for name, split in splits.items()}
    assert sizes == {"train": 33, "val": 4, "test": 3}
    names = {name: _names(split) for name, split in splits.items()}
    all_names = [n for split in names.values() for n in split]
    assert sorted(all_names) == [f"img{i:03d}.png" for i in range(40)]  # disjoint and complete
    for split in splits.values():
        assert set(split.column_names) == {"image", "captions"}
        for row in split:
            index = int(Path(row["image"]["path"]).stem[3:])
            assert row["captions"] == [_caption(index)]


def test_imagefolder_carving_is_deterministic_in_the_seed(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 40)
    a = load_splits(_folder_settings(root, val_size=4, test_size=4, seed=0))
    b = load_splits(_folder_settings(root, val_size=4, test_size=4, seed=0))
    c = load_splits(_folder_settings(root, val_size=4, test_size=4, seed=1))
    for name in ("train", "val", "test"):
        assert _names(a[name]) == _names(b[name])
    assert set(_names(a["val"])) != set(_names(c["val"]))


def test_imagefolder_never_carves_more_than_a_tenth(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 25)
    splits = load_splits(_folder_settings(root, val_size=1000, test_size=1000))
    assert {name: len(split) for name, split in splits.items()} == {"train": 21, "val": 2, "test": 2}


def test_imagefolder_metadata_csv_with_text_column(tmp_path: Path) -> None:
    rows = [{"text": f"a photo, number {i}"} for i in range(12)]
    root = _write_folder(tmp_path / "csv", 12, fmt="csv", rows=rows)
    splits = load_splits(_folder_settings(root, val_size=1, test_size=0))
    assert {name: len(split) for name, split in splits.items()} == {"train": 11, "val": 1}
    captions = sorted(c for split in splits.values() for caps in split["captions"] for c in caps)
    assert captions == sorted(f"a photo, number {i}" for i in range(12))
    assert "text" not in splits["train"].column_names


def test_imagefolder_split_subfolders_with_validation_alias(tmp_path: Path) -> None:
    root = tmp_path / "splits"
    _write_folder(root / "train", 6, start=0)
    _write_folder(root / "validation", 3, start=100)
    _write_folder(root / "test", 2, start=200)
    (root / "notes").mkdir()  # not a split: ignored
    splits = load_splits(_folder_settings(root))
    assert {name: len(split) for name, split in splits.items()} == {"train": 6, "val": 3, "test": 2}
    assert all(Path(p["path"]).parent.name == "validation" for p in splits["val"]["image"])
    assert splits["val"]["captions"] == [[_caption(100 + i)] for i in range(3)]
    assert sorted(_names(splits["train"])) == [f"img{i:03d}.png" for i in range(6)]


def test_imagefolder_split_subfolders_get_a_val_split_when_missing(tmp_path: Path) -> None:
    root = tmp_path / "splits"
    _write_folder(root / "train", 20)
    splits = load_splits(_folder_settings(root, val_size=5, test_size=0))
    assert {name: len(split) for name, split in splits.items()} == {"train": 18, "val": 2}


def test_imagefolder_custom_image_and_caption_columns(tmp_path: Path) -> None:
    rows = [{"description": f"custom caption {i}", "caption": "not this one"} for i in range(10)]
    root = _write_folder(tmp_path / "custom", 10, rows=rows, image_key="photo_file_name")
    settings = _folder_settings(root, image_column="photo", caption_column="description", val_size=1, test_size=0)
    splits = load_splits(settings)
    rows_out = [row for split in splits.values() for row in split]
    assert len(rows_out) == 10
    for row in rows_out:
        index = int(Path(row["image"]["path"]).stem[3:])
        assert row["captions"] == [f"custom caption {index}"]
    assert "photo" not in splits["train"].column_names and "description" not in splits["train"].column_names


def test_imagefolder_caption_lists_and_empty_captions(tmp_path: Path) -> None:
    rows = [
        {"captions": ["first", "  second  "]},
        {"captions": []},
        {"captions": ["", "   "]},
        {"captions": ["only", ""]},
        {"captions": None},
    ] + [{"captions": [f"filler {i}"]} for i in range(5)]
    root = _write_folder(tmp_path / "lists", len(rows), rows=rows)
    splits = load_splits(_folder_settings(root, val_size=1, test_size=0))
    kept = {Path(row["image"]["path"]).name: row["captions"] for split in splits.values() for row in split}
    assert len(kept) == 7
    assert kept["img000.png"] == ["first", "second"]
    assert kept["img003.png"] == ["only"]
    for dropped in ("img001.png", "img002.png", "img004.png"):
        assert dropped not in kept


def test_imagefolder_rows_with_empty_caption_strings_are_dropped(tmp_path: Path) -> None:
    rows = [{"caption": c} for c in ["a cat", "", "   ", None, "a dog"]]
    root = _write_folder(tmp_path / "strings", len(rows), rows=rows)
    splits = load_splits(_folder_settings(root, val_size=1, test_size=0))  # 5 rows: nothing to carve
    assert set(splits) == {"train"}
    assert sorted(splits["train"]["captions"]) == [["a cat"], ["a dog"]]


def test_train_sizes_limit_a_user_folder(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 30)
    splits = load_splits(_folder_settings(root, train_size=5, val_size=2, test_size=0))
    assert len(splits["train"]) == 5 and len(splits["val"]) == 2


# ---------------------------------------------------------------- errors


def test_unknown_source_lists_the_allowed_ones() -> None:
    with pytest.raises(ConfigError) as err:
        load_splits(DataSettings(source="ftp:somewhere"))
    message = str(err.value)
    assert "ftp:somewhere" in message
    assert "synthetic" in message and "imagefolder" in message


@pytest.mark.parametrize("spec", ["imagefolder:{missing}", "imagefolder:{file}", "imagefolder:", "imagefolder"])
def test_imagefolder_needs_an_existing_directory(tmp_path: Path, spec: str) -> None:
    (tmp_path / "a-file.txt").write_text("not a folder", encoding="utf-8")
    source = spec.format(missing=tmp_path / "missing", file=tmp_path / "a-file.txt")
    with pytest.raises(ConfigError, match="not a directory") as err:
        load_splits(DataSettings(source=source))
    assert source.partition(":")[2] in str(err.value)
    assert "imagefolder:PATH" in str(err.value)


def test_imagefolder_without_metadata_is_a_config_error(tmp_path: Path) -> None:
    root = tmp_path / "bare"
    root.mkdir()
    for i in range(3):
        _png(root / f"{i}.png", seed=i)
    with pytest.raises(ConfigError, match="no metadata.jsonl or metadata.csv") as err:
        load_splits(_folder_settings(root))
    assert str(root) in str(err.value)


def test_metadata_without_caption_column_lists_the_columns(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "labels", 4, rows=[{"label": "cat", "score": 1}] * 4)
    with pytest.raises(ConfigError) as err:
        load_splits(_folder_settings(root))
    message = str(err.value)
    assert "caption" in message
    assert "columns: image, label, score" in message
    assert "data.caption_column" in message


def test_named_caption_column_that_does_not_exist(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 4)
    with pytest.raises(ConfigError, match="'alt_text'") as err:
        load_splits(_folder_settings(root, caption_column="alt_text"))
    assert "caption" in str(err.value)


def test_named_image_column_that_does_not_exist(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "photos", 4)
    with pytest.raises(ConfigError, match="'picture'") as err:
        load_splits(_folder_settings(root, image_column="picture"))
    assert "data.image_column" in str(err.value)


def test_split_folders_without_train_are_a_config_error(tmp_path: Path) -> None:
    _write_folder(tmp_path / "only-val" / "validation", 3)
    with pytest.raises(ConfigError, match="no train split") as err:
        load_splits(_folder_settings(tmp_path / "only-val"))
    assert "val" in str(err.value)


def test_folder_whose_captions_are_all_empty_is_a_data_error(tmp_path: Path) -> None:
    root = _write_folder(tmp_path / "empty", 3, rows=[{"caption": ""}] * 3)
    with pytest.raises(DataError, match="no training examples"):
        load_splits(_folder_settings(root))


# ---------------------------------------------------------------- dataset and collator


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe([c for i in range(20) for c in generate("train", i, seed=0)[1]], vocab_size=400)


@pytest.fixture
def synthetic_train(data_cache: Path):
    return load_splits(DataSettings(source="synthetic", cache_dir=data_cache, train_size=64, val_size=16,
                                    test_size=16))["train"]


def test_batches_hold_uint8_pixels_and_eos_terminated_padded_captions(synthetic_train, tokenizer) -> None:
    dataset = CaptionDataset(synthetic_train, image_size=32, max_pixels=10**6, seed=0)
    collate = CaptionCollator(tokenizer, max_tokens=48)
    examples = [dataset[(i, 0)] for i in range(6)]
    batch = collate(examples)
    assert len(batch) == 6 and batch.skipped == 0
    assert batch.pixels.dtype == torch.uint8 and batch.pixels.shape == (6, 3, 32, 32)
    assert batch.caption_ids.dtype == torch.long and batch.caption_mask.shape == batch.caption_ids.shape
    lengths = batch.caption_mask.sum(dim=1)
    assert len(set(lengths.tolist())) > 1, "captions of different lengths should be padded"
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    for row, caption in enumerate(batch.captions):
        n = int(lengths[row])
        ids, mask = batch.caption_ids[row], batch.caption_mask[row]
        assert mask[:n].eq(1).all() and mask[n:].eq(0).all()  # contiguous real tokens, then padding
        assert ids[n - 1] == eos
        assert ids[n:].eq(pad).all()
        assert eos not in ids[: n - 1].tolist() and pad not in ids[:n].tolist()
        assert tokenizer.decode(ids[: n - 1].tolist()) == caption
        assert caption in synthetic_train[row]["captions"]


def test_long_captions_are_cut_and_still_end_with_eos(synthetic_train, tokenizer) -> None:
    dataset = CaptionDataset(synthetic_train, image_size=16, max_pixels=10**6)
    long = dataset[(0, 0)]
    long.caption = " ".join(["a large red circle left of a small blue star"] * 5)
    short = dataset[(1, 0)]
    short.caption = "a star"
    batch = CaptionCollator(tokenizer, max_tokens=6)([long, short])
    assert batch.caption_ids.shape[1] == 7
    assert batch.caption_ids[0, -1] == tokenizer.eos_token_id
    assert batch.caption_mask[0].eq(1).all()
    full = tokenizer(long.caption, add_special_tokens=False)["input_ids"]
    assert batch.caption_ids[0, :6].tolist() == full[:6]
    short_len = int(batch.caption_mask[1].sum())
    assert short_len < 7 and batch.caption_ids[1, short_len - 1] == tokenizer.eos_token_id


def test_caption_choice_is_deterministic_per_index_and_epoch(synthetic_train) -> None:
    a = CaptionDataset(synthetic_train, image_size=16, max_pixels=10**6, seed=0)
    b = CaptionDataset(synthetic_train, image_size=16, max_pixels=10**6, seed=0)
    for index in (0, 5):
        by_epoch = [a[(index, epoch)].caption for epoch in range(12)]
        assert by_epoch == [b[(index, epoch)].caption for epoch in range(12)]
        assert len(set(by_epoch)) >= 3, "the caption should change across epochs"
        assert set(by_epoch) <= set(synthetic_train[index]["captions"])
    assert torch.equal(a[(3, 0)].pixels, a[(3, 7)].pixels)  # only the caption varies with the epoch


def test_corrupt_image_is_skipped_with_a_warning_and_counted(tmp_path: Path, tokenizer, capsys) -> None:
    root = _write_folder(tmp_path / "photos", 3)
    (root / "img001.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 20)
    split = load_splits(_folder_settings(root, val_size=1, test_size=0))["train"]
    dataset = CaptionDataset(split, image_size=16, max_pixels=10**6)
    examples = [dataset[(i, 0)] for i in range(len(split))]
    bad = [i for i, ex in enumerate(examples) if ex is None]
    assert [Path(split[i]["image"]["path"]).name for i in bad] == ["img001.png"]
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "img001.png" in line]
    assert len(lines) == 1 and lines[0].startswith("warning")
    batch = CaptionCollator(tokenizer, max_tokens=16)(examples)
    assert batch.skipped == 1 and len(batch) == 2
    assert batch.pixels.shape == (2, 3, 16, 16) and batch.caption_ids.shape[0] == 2


def test_a_batch_of_only_corrupt_images_is_empty(tokenizer) -> None:
    batch = CaptionCollator(tokenizer, max_tokens=16)([None, None])
    assert len(batch) == 0 and batch.skipped == 2
    assert batch.pixels.shape[0] == 0 and batch.caption_ids.shape[0] == 0


# ---------------------------------------------------------------- corrupt-data policy, end to end


def _train_val_folder(root: Path, n_train: int, corrupt: list[int]) -> Path:
    _write_folder(root / "train", n_train)
    _write_folder(root / "val", 4, start=500)
    for index in corrupt:
        (root / "train" / f"img{index:03d}.png").write_bytes(b"garbage, not a PNG" * 10)
    return root


def _pretrain_settings(settings_factory, root: Path, bad_fraction: float):
    return settings_factory(
        "run",
        **{
            "data.source": f"imagefolder:{root}",
            "data.test_size": 0,
            "data.max_bad_fraction": bad_fraction,
            "pretrain.engine.epochs": 1,
            "pretrain.engine.max_steps": 3,
            "pretrain.engine.batch_size": 8,
            "pretrain.engine.grad_accum": 1,
            "runtime.device": "cpu",
            "runtime.quiet": True,
        },
    )


def test_pretrain_skips_and_counts_a_corrupt_image(tmp_path: Path, settings_factory, capsys) -> None:
    from capcli.phases import pretrain

    root = _train_val_folder(tmp_path / "photos", 24, corrupt=[17])
    result = pretrain(_pretrain_settings(settings_factory, root, 0.5))
    assert result.steps == 3
    assert result.skipped == 1  # every training image is read once in the 3 steps of 8
    assert result.samples == 23
    assert result.best_checkpoint is not None and result.best_checkpoint.is_dir()
    assert "img017.png" in capsys.readouterr().err


def test_pretrain_fails_with_a_count_when_too_many_images_are_corrupt(tmp_path: Path, settings_factory) -> None:
    from capcli.phases import pretrain

    corrupt = random.Random(0).sample(range(24), 18)
    root = _train_val_folder(tmp_path / "photos", 24, corrupt=corrupt)
    with pytest.raises(DataError) as err:
        pretrain(_pretrain_settings(settings_factory, root, 0.01))
    message = str(err.value)
    assert "18 of 24" in message
    assert "max_bad_fraction 0.01" in message


def test_caption_text_that_spells_a_special_token_is_not_padding(synthetic_train, tokenizer) -> None:
    example = CaptionDataset(synthetic_train, image_size=16, max_pixels=10**6)[(0, 0)]
    example.caption = "a sign that reads <|pad|> and <|endoftext|>"
    batch = CaptionCollator(tokenizer, max_tokens=48)([example])
    real = batch.caption_ids[0, : int(batch.caption_mask[0].sum()) - 1].tolist()
    assert tokenizer.pad_token_id not in real
    assert tokenizer.eos_token_id not in real


def test_imagefolder_rows_repeating_a_file_are_one_image_with_all_its_captions(tmp_path: Path) -> None:
    rows = [{"caption": "a red circle"}, {"caption": "two blue squares"}, {"caption": "a green star"}]
    root = _write_folder(tmp_path / "photos", 3, rows=rows)
    lines = (root / "metadata.jsonl").read_text().splitlines()
    again = json.loads(lines[0]) | {"caption": "one red circle"}  # img000 once more, with another caption
    (root / "metadata.jsonl").write_text("\n".join([*lines, json.dumps(again)]) + "\n")
    split = load_splits(_folder_settings(root, val_size=1, test_size=0))["train"]
    by_name = dict(zip(_names(split), split["captions"], strict=True))
    assert by_name == {"img000.png": ["a red circle", "one red circle"], "img001.png": ["two blue squares"],
                       "img002.png": ["a green star"]}
