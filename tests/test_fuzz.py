"""Property-based tests (hypothesis) of the readers that take a user's input whole.

Each reader either returns its result or raises capcli's documented error: ``ConfigError``
(exit 2) for settings and metadata, ``ConfigError``/``DataError`` for preference files,
``ImageLoadError`` for images, and nothing at all for the grounding metric's caption reader.
Never another exception, so never a traceback. The example counts are small so that the
file runs in seconds; ``HYPOTHESIS_PROFILE=long`` runs many more.
"""

from __future__ import annotations

import io
import json
import os
import random
import struct
import tempfile
import zlib
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.images import ImageLoadError, load_image
from capcli.data.preferences import load_preferences
from capcli.data.sources import check_metadata
from capcli.errors import CapcliError, ConfigError
from capcli.metrics import caption_errors, read_caption
from capcli.scenes import sample_scene
from capcli.settings import DataSettings, Settings, load_settings

settings.register_profile("fast", max_examples=40, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("long", max_examples=2000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "fast"))

_GROUPS = list(Settings.model_fields)
_KEYS = ["epochs", "batch_size", "lr", "device", "precision", "seed", "source", "train_size", "preset", "beta",
         "engine", "optimizer", "max_steps", "quiet", "output", "patience", "max_bad_steps"]
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**12, 10**12), st.floats(allow_nan=True),
                     st.text(max_size=20))
_trees = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(st.sampled_from(_KEYS) | st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)


def _file(content: bytes, suffix: str = ".yaml") -> Path:
    handle, name = tempfile.mkstemp(suffix=suffix)
    with os.fdopen(handle, "wb") as f:
        f.write(content)
    return Path(name)


def _settings_or_config_error(**kwargs) -> None:
    try:
        assert isinstance(load_settings(**kwargs), Settings)
    except ConfigError:
        pass


# --- the settings loader --------------------------------------------------------------------------------------------


@given(st.binary(max_size=300) | st.text(max_size=300).map(lambda s: s.encode("utf-8", "surrogatepass")))
def test_any_config_file_bytes_give_settings_or_a_config_error(content):
    path = _file(content)
    try:
        _settings_or_config_error(config=path, environ={})
    finally:
        path.unlink()


@given(st.dictionaries(st.sampled_from(_GROUPS) | st.text(max_size=8), _trees, max_size=4))
def test_any_yaml_shaped_like_settings_gives_settings_or_a_config_error(tree):
    path = _file(yaml.safe_dump(tree, allow_unicode=True).encode("utf-8"))
    try:
        _settings_or_config_error(config=path, environ={})
    finally:
        path.unlink()


_env_keys = st.builds(lambda group, sep, field: f"CAPCLI_{group}{sep}{field}".upper(),
                      st.sampled_from(_GROUPS) | st.text("abcxyz_", max_size=6),
                      st.sampled_from(["__", "_", "___", ""]),
                      st.sampled_from(_KEYS + ["engine__epochs", "optimizer__lr", "engine__batch_size"])
                      | st.text("abz_", max_size=6))
_env_values = st.text(st.characters(blacklist_categories=("Cs",), blacklist_characters="\x00"), max_size=20) | \
    st.sampled_from(["1", "-1", "0", "1e9", "nan", "inf", "true", "[1, 2]", '{"a": 1}', "null", "cpu", "tpu"])


@given(st.dictionaries(_env_keys, _env_values, max_size=4))
def test_any_capcli_environment_gives_settings_or_a_config_error(environ):
    _settings_or_config_error(environ=environ)


@settings(max_examples=8)
@given(st.binary(min_size=1, max_size=200))
def test_the_cli_answers_any_config_file_with_a_documented_exit_code(content):
    path = _file(content)
    try:
        result = CliRunner().invoke(app, ["pretrain", "--config", str(path), "--max-steps", "0"])
    finally:
        path.unlink()
    # --max-steps 0 is itself refused: a good file still stops at exit 2, before any training
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output
    assert len(result.stderr.strip().splitlines()) == 1


# --- the JSONL preference reader -------------------------------------------------------------------------------------

_pref_values = st.one_of(st.none(), st.text(max_size=15), st.integers(), st.lists(st.text(max_size=5), max_size=2),
                         st.dictionaries(st.sampled_from(["role", "content", "path", "bytes"]), st.text(max_size=5),
                                         max_size=2))
_pref_rows = st.dictionaries(st.sampled_from(["chosen", "rejected", "image", "images", "prompt", "split"]),
                             _pref_values, max_size=6)
_pref_lines = st.one_of(_pref_rows.map(json.dumps), st.text(max_size=30), st.just(""),
                        st.sampled_from(['{"chosen": "a", "rejected": "b"}', "[1, 2]", "null", '"x"', "{"]))


@given(st.lists(_pref_lines.map(str.encode) | st.binary(max_size=30), max_size=8))
def test_any_preference_jsonl_gives_pairs_or_a_capcli_error(lines):
    path = _file(b"\n".join(lines), suffix=".jsonl")
    try:
        splits, _ = load_preferences(f"jsonl:{path}", DataSettings(train_size=8, val_size=2, test_size=2), {})
        assert len(splits["train"]) > 0
    except CapcliError:
        pass
    finally:
        path.unlink()


# --- the imagefolder metadata reader --------------------------------------------------------------------------------

_names = st.one_of(st.text(max_size=20), st.sampled_from(["a.png", "../a.png", "/etc/passwd", "x/../../a.png",
                                                          "C:\\a.png", "./a.png", "sub/a.png", "..", "."]))
_meta_rows = st.one_of(
    st.builds(lambda n, t: json.dumps({"file_name": n, "text": t}), _names, st.text(max_size=10)),
    st.text(max_size=40), _pref_rows.map(json.dumps))


@given(st.lists(_meta_rows.map(str.encode) | st.binary(max_size=30), max_size=6), st.booleans())
def test_any_metadata_file_passes_or_names_itself(lines, csv):
    name = "metadata.csv" if csv else "metadata.jsonl"
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / name).write_bytes(b"\n".join([b"file_name,text", *lines] if csv else lines))
        try:
            check_metadata(Path(folder))
        except ConfigError as err:
            assert name in str(err) or "metadata is not UTF-8" in str(err)


@given(st.lists(st.sampled_from(["..", "a", "b", ".", "..."]), min_size=1, max_size=6))
def test_a_file_name_that_leads_out_of_the_folder_is_always_refused(parts):
    name = "/".join(parts)
    with tempfile.TemporaryDirectory() as parent:
        folder = Path(parent) / "images"
        folder.mkdir()
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "t"}), encoding="utf-8")
        resolved = (folder / name).resolve()
        escapes = not resolved.is_relative_to(folder.resolve()) or ".." in parts
        if escapes:
            with pytest.raises(ConfigError, match="points outside"):
                check_metadata(folder)
        else:
            check_metadata(folder)


# --- the grounding metric's caption reader ---------------------------------------------------------------------------

_SCENES = [sample_scene(random.Random(seed)) for seed in range(5)]
_caption_words = st.lists(st.sampled_from(
    ["a", "an", "the", "two", "three", "red", "blue", "green", "small", "large", "circle", "circles", "square", "triangle", "star", "left", "of", "right", "above", "below", "and", "which", "is", "are", "background", "on", "white", "black", "next", "to", ",", ".", "there", "one", "single"]), max_size=14).map(" ".join)


@given(st.text(max_size=80) | _caption_words, st.sampled_from(_SCENES), st.booleans())
def test_the_grounding_reader_never_raises(caption, scene, lenient):
    reading = read_caption(caption, lenient)
    assert isinstance(reading.mentions, tuple)
    errors = caption_errors(caption, scene, lenient)
    assert all(isinstance(e, str) for e in errors)


# --- the image loader ------------------------------------------------------------------------------------------------


def _png(size=(4, 4)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


_PNG = _png()


def _load(data: bytes) -> None:
    try:
        image = load_image(data, max_pixels=10_000)
        assert image.mode == "RGB"
    except ImageLoadError:
        pass


@given(st.binary(max_size=400))
def test_random_bytes_load_or_raise_image_load_error(data):
    _load(data)


@given(st.sampled_from([b"IHDR", b"PLTE", b"IDAT", b"IEND", b"tEXt", b"iCCP", b"eXIf", b"sRGB", b"gAMA", b"zTXt",
                        b"acTL", b"fcTL", b"tRNS", b"aBcD"]),
       st.binary(max_size=64), st.integers(8, len(_PNG)), st.booleans())
def test_a_png_with_a_random_chunk_loads_or_raises_image_load_error(kind, data, at, good_crc):
    chunk = _chunk(kind, data)
    if not good_crc:
        chunk = chunk[:-1] + bytes([chunk[-1] ^ 0xFF])
    _load(_PNG[:at] + chunk + _PNG[at:])


@given(st.integers(8, len(_PNG) - 1), st.integers(0, 255), st.integers(0, 40))
def test_a_png_with_flipped_or_cut_bytes_loads_or_raises_image_load_error(at, value, cut):
    damaged = bytearray(_PNG)
    damaged[at] = value
    _load(bytes(damaged[: len(damaged) - cut]))
