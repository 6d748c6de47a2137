"""The preprocessing cache: images decoded once, the same pixels back, nothing lost.

A cached read must equal a fresh decode; an unreadable image must still be warned about and
counted every epoch; a half-written row must be decoded again; worker processes and later
runs share the files; an oversized cache is declined with a note.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from test_sources import _folder_settings, _write_folder

from capcli.data.batches import CaptionDataset, caption_dataset
from capcli.data.pixel_cache import PixelCache, pixel_cache_for
from capcli.data.sources import load_splits
from capcli.settings import DataSettings


@pytest.fixture
def folder_split(tmp_path: Path):
    root = _write_folder(tmp_path / "photos", 5)
    return load_splits(_folder_settings(root, val_size=1, test_size=0))["train"], root


def cached_dataset(split, tmp_path: Path, size: int = 16) -> CaptionDataset:
    data = DataSettings(cache_dir=tmp_path / "cache", max_pixels=10**6)
    return caption_dataset(split, size, data)


def test_cached_pixels_equal_a_fresh_decode_and_fill_once(folder_split, tmp_path: Path) -> None:
    split, _ = folder_split
    cached = cached_dataset(split, tmp_path)
    plain = CaptionDataset(split, 16, 10**6)
    assert cached.cache is not None and cached.cache.filled() == 0
    first = [cached[(i, 0)] for i in range(len(split))]
    assert cached.cache.filled() == len(split)
    again = [cached[(i, 1)] for i in range(len(split))]  # served from the cache
    for i in range(len(split)):
        fresh = plain[(i, 1)]
        assert torch.equal(first[i].pixels, fresh.pixels) and torch.equal(again[i].pixels, fresh.pixels)
        assert again[i].caption == fresh.caption  # the epoch's caption choice is unchanged


def test_cached_rows_are_read_back_without_decoding(folder_split, tmp_path: Path, monkeypatch) -> None:
    split, _ = folder_split
    dataset = cached_dataset(split, tmp_path)
    expected = [dataset[(i, 0)].pixels for i in range(len(split))]

    def refuse(*args, **kwargs):
        raise AssertionError("a cached image was decoded again")

    monkeypatch.setattr("capcli.data.batches.load_image_field", refuse)
    reopened = cached_dataset(split, tmp_path)  # another run of the same split: the same files
    assert all(torch.equal(reopened[(i, 2)].pixels, expected[i]) for i in range(len(split)))


def test_an_unreadable_image_is_warned_about_and_skipped_every_epoch(tmp_path: Path, capsys) -> None:
    root = _write_folder(tmp_path / "photos", 4)
    (root / "img002.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not image data" * 20)
    split = load_splits(_folder_settings(root, val_size=1, test_size=0))["train"]
    dataset = cached_dataset(split, tmp_path)
    bad = next(i for i in range(len(split)) if Path(split[i]["image"]["path"]).name == "img002.png")
    for epoch in range(2):
        assert all(dataset[(i, epoch)] is not None for i in range(len(split)) if i != bad)
        assert dataset[(bad, epoch)] is None
        assert "img002.png" in capsys.readouterr().err
    assert dataset.cache.filled() == len(split) - 1  # every other image was cached, the bad one never


def test_a_row_written_but_never_marked_is_decoded_again(folder_split, tmp_path: Path) -> None:
    split, _ = folder_split
    dataset = cached_dataset(split, tmp_path)
    good = dataset[(0, 0)].pixels
    dataset.cache._pixels[0] = 0  # a process killed mid-row: pixels torn ...
    dataset.cache._filled[0] = 0  # ... and the mark never written
    assert torch.equal(dataset[(0, 0)].pixels, good)
    assert dataset.cache.filled() == 1


def test_a_pickled_cache_reopens_the_same_files_instead_of_copying_them(folder_split, tmp_path: Path) -> None:
    split, _ = folder_split
    dataset = cached_dataset(split, tmp_path)
    dataset[(1, 0)]
    blob = pickle.dumps(dataset.cache)  # what a DataLoader worker receives
    assert len(blob) < 2000  # the path and sizes, not the pixels
    worker = pickle.loads(blob)
    worker.put(3, torch.full((3, 16, 16), 7, dtype=torch.uint8))
    assert torch.equal(dataset.cache.get(3), torch.full((3, 16, 16), 7, dtype=torch.uint8))  # seen by the parent
    assert torch.equal(worker.get(1), dataset.cache.get(1))


def test_each_resolution_and_split_has_its_own_file(folder_split, tmp_path: Path) -> None:
    split, _ = folder_split
    small, _ = pixel_cache_for(split, tmp_path, 16, max_gb=1)
    large, _ = pixel_cache_for(split, tmp_path, 32, max_gb=1)
    other, _ = pixel_cache_for(split.select(range(3)), tmp_path, 16, max_gb=1)
    assert len({small.path, large.path, other.path}) == 3
    assert large.nbytes == 4 * small.nbytes == 4 * len(split) * 3 * 16 * 16


def test_a_cache_over_the_size_limit_is_declined_with_a_note(folder_split, tmp_path: Path, capsys) -> None:
    split, _ = folder_split
    data = DataSettings(cache_dir=tmp_path / "cache", pixel_cache_max_gb=1e-9)
    dataset = caption_dataset(split, 16, data)
    assert dataset.cache is None
    assert "pixel_cache_max_gb" in capsys.readouterr().err
    assert dataset[(0, 0)].pixels.shape == (3, 16, 16)  # still read, without a cache


def test_pixel_cache_off_reads_without_one(folder_split, tmp_path: Path) -> None:
    split, _ = folder_split
    dataset = caption_dataset(split, 16, DataSettings(cache_dir=tmp_path / "cache", pixel_cache=False))
    assert dataset.cache is None and not (tmp_path / "cache" / "pixels").exists()


def test_a_cache_file_is_grown_never_truncated(tmp_path: Path) -> None:
    cache = PixelCache(tmp_path / "p.u8", rows=2, size=4)
    cache.put(1, torch.full((3, 4, 4), 9, dtype=torch.uint8))
    again = PixelCache(tmp_path / "p.u8", rows=2, size=4)  # a second process opening it
    assert torch.equal(again.get(1), torch.full((3, 4, 4), 9, dtype=torch.uint8))
    assert again.get(0) is None


def test_a_cache_that_cannot_be_made_is_declined_with_the_reason(folder_split, tmp_path: Path, capsys) -> None:
    split, _ = folder_split
    blocker = tmp_path / "cache"
    blocker.write_text("a file where the cache folder should be")
    dataset = caption_dataset(split, 16, DataSettings(cache_dir=blocker))
    assert dataset.cache is None
    assert "cannot make the pixel cache" in capsys.readouterr().err
    assert dataset[(0, 0)].pixels.shape == (3, 16, 16)


def test_the_cache_is_off_across_nodes(folder_split, tmp_path: Path, monkeypatch) -> None:
    split, _ = folder_split
    monkeypatch.setenv("WORLD_SIZE", "16")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")  # two nodes of 8
    assert cached_dataset(split, tmp_path).cache is None
    monkeypatch.setenv("WORLD_SIZE", "8")  # one node
    assert cached_dataset(split, tmp_path).cache is not None
