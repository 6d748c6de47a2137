"""``capcli caption`` and scored decoding, tested by behaviour on a tiny random model on CPU.

A corpus of bad files is built in tmp_path; each file gets an asserted outcome: captioned,
or exactly one ``error: PATH: reason`` line on stderr while the other images are still
captioned. Also: input order across batches, stdin, globs, folders, the three formats, the
scores' definitions (checked against transformers' own beam scores), and exit codes 0/1/2.
"""

from __future__ import annotations

import io
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_claiming_size
from PIL import Image
from torch.testing import assert_close
from typer.testing import CliRunner

from capcli.cli import app
from capcli.data.images import load_image, resize_center_crop
from capcli.errors import ConfigError
from capcli.inference.captioning import (
    Item,
    escape,
    expand_inputs,
    format_record,
    write_captions,
)
from capcli.model import Captioner, build_model
from capcli.model.generation import (
    DecodeSettings,
    ScoredCaption,
    caption_logprobs,
    generate_captions,
    generate_scored_captions,
    scored_mask,
)
from capcli.settings import ModelSettings, load_settings
from capcli.train.checkpoint import default_checkpoint

runner = CliRunner()
CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a big red circle"]
FAST = ["--max-length", "6", "--quiet"]  # short captions keep beam search quick on CPU
JSON_KEYS = {"path", "caption", "score", "logprob", "tokens"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops, one thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model with random weights, saved as a checkpoint directory."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("caption") / "checkpoint"
    build_model(ModelSettings(), CAPTIONS * 10).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def model(checkpoint) -> Captioner:
    return Captioner.from_pretrained(checkpoint).eval()


def picture(seed: int, size: tuple[int, int] = (48, 32)) -> Image.Image:
    """A random RGB picture, (width, height)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def write_images(folder: Path, names: list[str]) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / name for name in names]
    for seed, path in enumerate(paths):
        picture(seed).save(path)
    return paths


def invoke(*args: str, **kwargs):
    return runner.invoke(app, ["caption", *args], **kwargs)


def stdout_paths(result) -> list[str]:
    return [line.split("\t")[0] for line in result.stdout.splitlines()]


# --- the corpus of bad files ---------------------------------------------------------------------------------


def _jpeg_bytes(img: Image.Image, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", **kwargs)
    return buf.getvalue()


def _exif_rotated(path: Path) -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    picture(7).save(path, exif=exif)


CORPUS = {
    # name: (writer, None if captioned else the reason it must give)
    "truncated.jpg": (lambda p: p.write_bytes(_jpeg_bytes(picture(1))[:400]), "corrupt or truncated image"),
    "page.jpg": (lambda p: p.write_text("<!doctype html><html><body>404</body></html>"), "not an image"),
    "empty.jpg": (lambda p: p.write_bytes(b""), "not an image"),
    "bomb.png": (lambda p: p.write_bytes(png_claiming_size(100_000, 100_000)),
                 "10000000000 pixels exceeds the cap of 89478485"),
    "icon.ico": (lambda p: picture(2, (16, 16)).save(p), "format ICO is not allowed"),
    "cmyk.jpg": (lambda p: picture(3).convert("CMYK").save(p), None),
    "gray16.png": (lambda p: Image.fromarray((np.arange(48 * 32, dtype=np.uint16) * 40).reshape(32, 48)).save(p), None),
    "rgba.png": (lambda p: picture(4).convert("RGBA").save(p), None),
    "exif-rotated.jpg": (_exif_rotated, None),
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("corpus")
    for name, (write, _) in CORPUS.items():
        write(folder / name)
    picture(0).save(folder / "good.png")
    return folder


@pytest.fixture(scope="module")
def corpus_run(corpus, checkpoint):
    """One run over every corpus file named on the command line, plus a missing one, in a fixed order."""
    names = [*CORPUS, "missing.jpg", "good.png"]
    return names, invoke(*[str(corpus / name) for name in names], "--checkpoint", str(checkpoint),
                         "--format", "jsonl", *FAST)


def test_corpus_file_modes_are_what_they_claim(corpus):
    assert Image.open(corpus / "cmyk.jpg").mode == "CMYK"
    assert Image.open(corpus / "gray16.png").mode.startswith("I")
    assert Image.open(corpus / "rgba.png").mode == "RGBA"
    assert Image.open(corpus / "exif-rotated.jpg").getexif()[0x0112] == 6


@pytest.mark.parametrize("name", [*CORPUS, "missing.jpg"])
def test_each_corpus_file_is_captioned_or_gets_exactly_one_error_line(corpus, corpus_run, name):
    _, result = corpus_run
    path = str(corpus / name)
    reason = CORPUS[name][1] if name in CORPUS else "no such file or directory"
    errors = [line for line in result.stderr.splitlines() if line.startswith(f"error: {path}:")]
    captioned = [json.loads(line) for line in result.stdout.splitlines() if json.loads(line)["path"] == path]
    if reason is None:
        assert (len(captioned), errors) == (1, [])
        assert captioned[0]["caption"] == captioned[0]["caption"].strip()
    else:
        assert (captioned, len(errors)) == ([], 1)
        assert reason in errors[0]


def test_bad_files_do_not_stop_the_good_ones_and_exit_1(corpus, corpus_run):
    names, result = corpus_run
    assert result.exit_code == 1
    good = [str(corpus / n) for n in names if n in CORPUS and CORPUS[n][1] is None or n == "good.png"]
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == good
    bad = [n for n in names if n == "missing.jpg" or n in CORPUS and CORPUS[n][1] is not None]
    assert len(result.stderr.splitlines()) == len(bad)  # --quiet: the error lines and nothing else
    assert all(line.startswith("error: ") for line in result.stderr.splitlines())


def test_reading_in_worker_processes_gives_the_same_lines_in_the_same_order(corpus, corpus_run, checkpoint):
    """The corpus again, read by two DataLoader workers, in batches of 2 so that reading and
    captioning interleave: the same captions, the same error lines, in the same order."""
    names, serial = corpus_run
    paths = [str(corpus / name) for name in names]
    read_ahead = invoke(*paths, "--checkpoint", str(checkpoint), "--format", "jsonl", "--workers", "2", *FAST)
    assert read_ahead.exit_code == serial.exit_code == 1
    assert read_ahead.stderr == serial.stderr
    by_batch = invoke(*paths, "--checkpoint", str(checkpoint), "--format", "jsonl", "--batch-size", "2", *FAST)
    workers = invoke(*paths, "--checkpoint", str(checkpoint), "--format", "jsonl", "--batch-size", "2",
                     "--workers", "2", *FAST)
    assert workers.stdout == by_batch.stdout and workers.stderr == by_batch.stderr
    assert read_ahead.stdout == serial.stdout


def test_readers_take_their_cores_from_the_models_threads_until_the_run_ends(tmp_path, checkpoint, monkeypatch):
    from capcli.api import ImageCaptioner

    seen = []
    original = ImageCaptioner.caption_pixels

    def recording(self, pixels, decode):
        seen.append(torch.get_num_threads())
        return original(self, pixels, decode)

    monkeypatch.setattr(ImageCaptioner, "caption_pixels", recording)
    paths = write_images(tmp_path, [f"{i}.png" for i in range(3)])
    settings = load_settings(cli={"runtime.device": "cpu", "runtime.quiet": True, "caption.batch_size": 2,
                                  "caption.workers": 1, "caption.decode.max_length": 4}, environ={})
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        assert write_captions([Item(str(p)) for p in paths], checkpoint, settings, out=io.StringIO()) == 0
        assert seen == [2, 2] and torch.get_num_threads() == 3
    finally:
        torch.set_num_threads(threads)


def test_closing_a_run_halfway_gives_the_model_its_threads_back(tmp_path, checkpoint):
    """What ``write_captions`` does on its way out, a closed pipe or Ctrl-C: close the batches."""
    from capcli.inference.captioning import (
        caption_items,
        checkpoint_image_size,
        load_captioner,
    )
    from capcli.model.generation import DecodeSettings

    paths = write_images(tmp_path, [f"{i}.png" for i in range(4)])
    settings = load_settings(cli={"runtime.device": "cpu", "runtime.quiet": True}, environ={})
    errors: list[str] = []
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        batches = caption_items([Item(str(p)) for p in paths], lambda: load_captioner(checkpoint, settings),
                                DecodeSettings(max_length=3), 2, settings.data.max_pixels, errors.append,
                                checkpoint_image_size(checkpoint), workers=1)
        assert len(next(batches)) == 2 and torch.get_num_threads() == 2
        batches.close()
        assert torch.get_num_threads() == 3 and errors == []
    finally:
        torch.set_num_threads(threads)


def test_a_checkpoint_without_its_model_configuration_exits_1_naming_it(tmp_path, checkpoint):
    broken = tmp_path / "broken"
    shutil.copytree(checkpoint, broken)
    config = json.loads((broken / "model.json").read_text(encoding="utf-8"))
    (broken / "model.json").write_text(json.dumps({**config, "vision": {}}), encoding="utf-8")  # no image size
    (image,) = write_images(tmp_path, ["a.png"])
    result = invoke(str(image), "--checkpoint", str(broken), *FAST)
    assert result.exit_code == 1 and "cannot read the model configuration" in result.stderr
    assert result.stdout == ""


def test_pixel_cap_from_the_settings_refuses_before_decoding(tmp_path, checkpoint):
    small, large = write_images(tmp_path, ["small.png", "large.png"])
    picture(1, (8, 8)).save(small)  # 64 pixels; large is 48×32 = 1536
    result = invoke(str(small), str(large), "--checkpoint", str(checkpoint), *FAST,
                    env={"CAPCLI_DATA__MAX_PIXELS": "100"})
    assert result.exit_code == 1
    assert stdout_paths(result) == [str(small)]
    assert result.stderr == f"error: {large}: 1536 pixels exceeds the cap of 100\n"


def test_exif_orientation_is_applied_before_captioning(tmp_path, checkpoint):
    """The same pixels, once stored rotated with an EXIF tag and once stored upright, caption the same."""
    upright = picture(5, (48, 32))
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated 90° anticlockwise; display rotates it back clockwise
    upright.transpose(Image.Transpose.ROTATE_90).save(tmp_path / "tagged.png", exif=exif)
    upright.save(tmp_path / "upright.png")
    tagged = resize_center_crop(load_image(tmp_path / "tagged.png"), 32)
    assert torch.equal(tagged, resize_center_crop(load_image(tmp_path / "upright.png"), 32))
    assert not torch.equal(tagged, resize_center_crop(Image.open(tmp_path / "tagged.png").convert("RGB"), 32))

    result = invoke(str(tmp_path / "tagged.png"), str(tmp_path / "upright.png"), "--checkpoint", str(checkpoint),
                    "--format", "jsonl", *FAST)
    assert result.exit_code == 0, result.stderr
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["caption"] == second["caption"]
    assert first["logprob"] == pytest.approx(second["logprob"], abs=1e-4)


# --- inputs: order, stdin, globs, folders --------------------------------------------------------------------


def test_input_order_is_kept_across_batches(tmp_path, checkpoint):
    paths = write_images(tmp_path, [f"{c}.png" for c in "gcaefbd"])  # not in sorted order
    args = [str(p) for p in paths]
    args.insert(3, str(tmp_path / "gone.png"))  # a failure in the middle of a batch
    result = invoke(*args, "--checkpoint", str(checkpoint), "--batch-size", "3", *FAST)
    assert result.exit_code == 1
    assert stdout_paths(result) == [str(p) for p in paths]
    assert result.stderr == f"error: {tmp_path / 'gone.png'}: no such file or directory\n"


def test_batched_captions_equal_one_at_a_time(tmp_path, checkpoint):
    paths = [str(p) for p in write_images(tmp_path, [f"{i}.png" for i in range(5)])]
    batched = invoke(*paths, "--checkpoint", str(checkpoint), "--batch-size", "4", "--format", "jsonl", *FAST)
    single = invoke(*paths, "--checkpoint", str(checkpoint), "--batch-size", "1", "--format", "jsonl", *FAST)
    assert batched.exit_code == single.exit_code == 0
    for a, b in zip(batched.stdout.splitlines(), single.stdout.splitlines(), strict=True):
        a, b = json.loads(a), json.loads(b)
        assert (a["path"], a["caption"], a["tokens"]) == (b["path"], b["caption"], b["tokens"])
        assert a["logprob"] == pytest.approx(b["logprob"], abs=1e-3)


def test_output_is_written_and_flushed_batch_by_batch(tmp_path, checkpoint):
    paths = write_images(tmp_path, [f"{i}.png" for i in range(7)])

    class Recorder(io.StringIO):
        def __init__(self) -> None:
            super().__init__()
            self.lines_at_flush: list[int] = []

        def flush(self) -> None:
            self.lines_at_flush.append(self.getvalue().count("\n"))

    out = Recorder()
    settings = load_settings(cli={"runtime.device": "cpu", "runtime.quiet": True, "caption.batch_size": 3,
                                  "caption.decode.max_length": 4}, environ={})
    assert write_captions([Item(str(p)) for p in paths], checkpoint, settings, out=out) == 0
    assert out.lines_at_flush == [3, 6, 7]


def test_stdin_dash_reads_one_path_per_line(tmp_path, checkpoint):
    a, b, c = write_images(tmp_path, ["a.png", "b.png", "c.png"])
    result = invoke(str(c), "-", "--checkpoint", str(checkpoint), *FAST, input=f"{b}\n\n{a}\n")
    assert result.exit_code == 0, result.stderr
    assert stdout_paths(result) == [str(c), str(b), str(a)]


def test_stdin_with_no_paths_is_an_error(checkpoint):
    result = invoke("-", "--checkpoint", str(checkpoint), *FAST, input="\n")
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr == "error: <stdin>: no paths were read from stdin\n"


def test_quoted_globs_are_expanded_sorted(tmp_path, checkpoint):
    write_images(tmp_path, ["b.png", "a.png", "c.jpg"])
    write_images(tmp_path / "sub", ["d.png"])
    result = invoke(str(tmp_path / "*.png"), str(tmp_path / "**" / "d.png"), "--checkpoint", str(checkpoint), *FAST)
    assert result.exit_code == 0, result.stderr
    assert stdout_paths(result) == [str(tmp_path / "a.png"), str(tmp_path / "b.png"), str(tmp_path / "sub" / "d.png")]


def test_glob_matching_nothing_is_an_error_and_the_rest_is_captioned(tmp_path, checkpoint):
    (good,) = write_images(tmp_path, ["good.png"])
    pattern = str(tmp_path / "*.webp")
    result = invoke(pattern, str(good), "--checkpoint", str(checkpoint), *FAST)
    assert result.exit_code == 1
    assert stdout_paths(result) == [str(good)]
    assert result.stderr == f"error: {pattern}: no files match this pattern\n"


def test_folders_are_searched_recursively_sorted_skipping_hidden_and_non_images(tmp_path):
    write_images(tmp_path, ["b.png", "A.JPG", ".hidden.png"])
    write_images(tmp_path / "sub", ["c.webp"])
    write_images(tmp_path / ".cache", ["x.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    items = expand_inputs([str(tmp_path)])
    assert [item.path for item in items] == [str(tmp_path / n) for n in ["A.JPG", "b.png", "sub/c.webp"]]


def test_empty_folder_is_an_error(tmp_path, checkpoint):
    (tmp_path / "empty").mkdir()
    result = invoke(str(tmp_path / "empty"), "--checkpoint", str(checkpoint), *FAST)
    assert (result.exit_code, result.stdout) == (1, "")
    assert result.stderr.startswith(f"error: {tmp_path / 'empty'}: folder holds no images")
    assert len(result.stderr.splitlines()) == 1


def test_without_quiet_progress_goes_to_stderr_and_errors_still_once(tmp_path, checkpoint):
    (good,) = write_images(tmp_path, ["good.png"])
    result = invoke(str(good), str(tmp_path / "gone.png"), "--checkpoint", str(checkpoint), "--max-length", "4")
    assert result.exit_code == 1
    assert stdout_paths(result) == [str(good)]
    assert result.stderr.count(f"error: {tmp_path / 'gone.png'}:") == 1
    assert "caption step 2/2" in result.stderr


# --- formats -------------------------------------------------------------------------------------------------


def test_formats(tmp_path, checkpoint):
    paths = [str(p) for p in write_images(tmp_path, ["a.png", "b.png"])]
    runs = {fmt: invoke(*paths, "--checkpoint", str(checkpoint), "--format", fmt, *FAST)
            for fmt in ("text", "tsv", "jsonl")}
    assert all(r.exit_code == 0 and r.stderr == "" for r in runs.values())

    records = [json.loads(line) for line in runs["jsonl"].stdout.splitlines()]
    assert [set(r) for r in records] == [JSON_KEYS, JSON_KEYS]
    assert [r["path"] for r in records] == paths
    text = [line.split("\t") for line in runs["text"].stdout.splitlines()]
    assert text == [[r["path"], r["caption"]] for r in records]
    header, *rows = [line.split("\t") for line in runs["tsv"].stdout.splitlines()]
    assert header == ["path", "caption", "score", "logprob", "tokens"]
    assert rows == [[r["path"], r["caption"], str(r["score"]), str(r["logprob"]), str(r["tokens"])] for r in records]


def test_score_is_the_length_normalised_logprob(tmp_path, checkpoint):
    (path,) = write_images(tmp_path, ["a.png"])
    for penalty in ("1.0", "0.5"):
        result = invoke(str(path), "--checkpoint", str(checkpoint), "--format", "jsonl",
                        "--length-penalty", penalty, *FAST)
        record = json.loads(result.stdout)
        assert record["logprob"] < 0 and 1 <= record["tokens"] <= 6
        assert record["score"] == pytest.approx(record["logprob"] / record["tokens"] ** float(penalty), abs=1e-5)


def test_text_and_tsv_fields_never_break_a_line():
    result = ScoredCaption("a red\ncircle\tabove", -1.5, -0.5, 3)
    assert escape("dir\\odd\tname\n.png") == "dir\\\\odd\\tname\\n.png"
    assert format_record("text", "x\ty.png", result) == "x\\ty.png\ta red circle above"
    assert format_record("tsv", "x.png", ScoredCaption("a", -math.inf, -math.inf, 1)) == "x.png\ta\t\t\t1"
    assert json.loads(format_record("jsonl", "x.png", ScoredCaption("a", math.nan, -1.0, 1)))["logprob"] is None


# --- exit codes and the default checkpoint -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "no images given"),
        (["a.png", "--format", "xml"], "'caption.format': Input should be 'text', 'jsonl' or 'tsv' (got 'xml')"),
        (["a.png", "--beams", "0"], "'caption.decode.beams': Input should be greater than or equal to 1 (got 0)"),
        (["a.png", "--batch-size", "0"], "'caption.batch_size': Input should be greater than or equal to 1 (got 0)"),
        (["a.png", "--min-length", "9", "--max-length", "8"], "min_length (9) cannot exceed max_length (8)"),
        (["a.png", "--length-penalty", "nan"], "'caption.decode.length_penalty': Input should be a finite number"),
        (["a.png", "--device", "tpu"], "'runtime.device'"),
        (["-", "-"], "can be given only once"),
    ],
    ids=["no-inputs", "format", "beams", "batch-size", "min-length", "length-penalty", "device", "stdin-twice"],
)
def test_usage_errors_exit_2_with_one_line(checkpoint, args, message):
    result = invoke(*args, "--checkpoint", str(checkpoint))
    assert (result.exit_code, result.stdout) == (2, "")
    assert result.stderr.startswith("error: ") and message in result.stderr
    assert len(result.stderr.splitlines()) == 1


def test_missing_checkpoint_exits_2_naming_what_was_looked_for(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_images(tmp_path, ["a.png"])
    result = invoke("a.png")
    assert (result.exit_code, result.stdout) == (2, "")
    assert "runs/align/checkpoints/best" in result.stderr and "runs/pretrain/checkpoints/best" in result.stderr
    assert len(result.stderr.splitlines()) == 1
    result = invoke("a.png", "--checkpoint", "nowhere")
    assert result.exit_code == 2 and "no checkpoint at nowhere" in result.stderr


def test_unloadable_checkpoint_exits_1_with_one_line(tmp_path):
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{}")
    (good,) = write_images(tmp_path, ["a.png"])
    result = invoke(str(good), "--checkpoint", str(tmp_path / "broken"), *FAST)
    assert result.exit_code == 1
    assert result.stderr.startswith(f"error: damaged checkpoint {tmp_path / 'broken'}: model.json lacks preset")
    assert len(result.stderr.splitlines()) == 1


def test_default_checkpoint_prefers_align_then_pretrain(tmp_path, monkeypatch, checkpoint):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="runs/align/checkpoints/best or runs/pretrain/checkpoints/best"):
        default_checkpoint()
    shutil.copytree(checkpoint, tmp_path / "runs/pretrain/checkpoints/best")
    assert default_checkpoint() == Path("runs/pretrain/checkpoints/best")
    (tmp_path / "runs/align").mkdir()  # an align run with no checkpoint yet does not count
    assert default_checkpoint() == Path("runs/pretrain/checkpoints/best")
    shutil.copytree(checkpoint, tmp_path / "runs/align/checkpoints/best")
    assert default_checkpoint() == Path("runs/align/checkpoints/best")

    write_images(tmp_path, ["a.png"])
    result = invoke("a.png", *FAST)  # no --checkpoint: the align run's
    assert result.exit_code == 0, result.stderr
    assert stdout_paths(result) == ["a.png"]


# --- scored decoding -----------------------------------------------------------------------------------------


def test_scored_mask_stops_after_the_first_end_of_text():
    eos, pad = 0, 9
    ids = torch.tensor([[5, 6, eos, pad], [5, eos, pad, pad], [5, 6, 7, 8], [eos, pad, pad, pad]])
    assert scored_mask(ids, eos).tolist() == [[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_caption_logprobs_ignore_padding(model):
    """Each row's log-prob, padded in a batch, equals the same caption scored alone and unpadded, by hand."""
    eos, pad = model.tokenizer.eos_token_id, model.tokenizer.pad_token_id
    pixels = torch.stack([resize_center_crop(picture(s), model.image_size) for s in range(3)])
    ids = torch.tensor([[20, 21, eos, pad], [22, eos, pad, pad], [23, 24, 25, 26]])
    with torch.no_grad():
        features = model.image_features(pixels)
        logprobs, lengths = caption_logprobs(model, features, ids)
        for row, length in enumerate([3, 2, 4]):
            alone = ids[row : row + 1, :length]
            logits = model.caption_logits(features[row : row + 1], alone, torch.ones_like(alone))
            by_hand = sum(torch.log_softmax(logits[0, t], -1)[alone[0, t]] for t in range(length))
            assert_close(logprobs[row], by_hand, atol=1e-4, rtol=0)
    assert lengths.tolist() == [3, 2, 4]


@pytest.fixture(scope="module")
def ending_model(checkpoint) -> Captioner:
    """The tiny model nudged towards end-of-text, so its captions end instead of running to max length."""
    model = Captioner.from_pretrained(checkpoint).eval()
    embedding = model.decoder.transformer.wte.weight[model.tokenizer.eos_token_id]
    with torch.no_grad():
        model.decoder.transformer.ln_f.bias += 4.0 * embedding / embedding.norm() ** 2
    return model


@pytest.mark.parametrize("ends", [False, True], ids=["runs-to-max-length", "ends-with-eos"])
@pytest.mark.parametrize(("beams", "penalty"), [(1, 1.0), (4, 0.5)])
def test_scores_match_what_beam_search_ranks_by(model, ending_model, ends, beams, penalty):
    chosen = ending_model if ends else model
    pixels = torch.stack([resize_center_crop(picture(s), chosen.image_size) for s in range(4)])
    # Unguided: transformers' own scores below know no concept guidance.
    decode = DecodeSettings(beams=beams, max_length=6, min_length=2, length_penalty=penalty, concept_guidance=0.0)
    scored = generate_scored_captions(chosen, pixels, decode)
    assert [s.text for s in scored] == generate_captions(chosen, pixels, decode)  # the same search
    assert {s.tokens for s in scored} == ({3} if ends else {6})  # min_length 2, then end-of-text
    for s in scored:
        assert s.score == pytest.approx(s.logprob / s.tokens**penalty, abs=1e-5)

    prefix = chosen.prefix(chosen.image_features(pixels))
    with torch.no_grad():
        out = chosen.decoder.generate(
            inputs_embeds=prefix, attention_mask=torch.ones(prefix.shape[:2], dtype=torch.long),
            max_new_tokens=6, min_new_tokens=2, num_beams=beams, length_penalty=penalty, do_sample=False,
            eos_token_id=chosen.tokenizer.eos_token_id, pad_token_id=chosen.tokenizer.pad_token_id,
            return_dict_in_generate=True, output_scores=True, output_logits=True,
        )
    if beams > 1:  # transformers' own score of each returned beam
        assert_close(torch.tensor([s.score for s in scored]), out.sequences_scores.float(), atol=1e-4, rtol=0)
    else:  # the raw logits of the KV-cached search, summed over the scored tokens
        logps = torch.stack(out.logits, 1).log_softmax(-1).gather(-1, out.sequences.unsqueeze(-1)).squeeze(-1)
        mask = scored_mask(out.sequences, chosen.tokenizer.eos_token_id)
        assert_close(torch.tensor([s.logprob for s in scored]), (logps * mask).sum(1), atol=1e-4, rtol=0)


def test_captioning_a_file_imports_no_training_vision_or_data_library(tmp_path, checkpoint):
    """A shell loop pays each process's imports once per image. Neither `open_clip` (with `timm`)
    nor `datasets` (with `pandas` and `pyarrow`) is needed to caption a file: together they took
    about 2 s of the 8.5 s of `capcli caption one.png` on a 2-core CPU. (`torchvision` and `sympy`
    still come in through transformers' GPT-2.)"""
    image = tmp_path / "one.png"
    picture(0).save(image)
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "capcli", "caption", str(image),
                           "--checkpoint", str(checkpoint), "--quiet"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.startswith(f"{image}\t")
    imported = {line.rsplit("|", 1)[1].strip().split(".")[0] for line in done.stderr.splitlines()
                if line.startswith("import time:") and "|" in line}
    assert {"torch", "transformers", "capcli"} <= imported  # the trace is read
    assert not imported & {"open_clip", "timm", "datasets", "pandas", "pyarrow"}
