"""The Python API (``capcli.load``): captions equal the CLI's, every input kind is read, embeddings
are normalised, ``score`` is the log-probability ``caption`` reports, and docs/python.md runs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.testing import assert_close
from typer.testing import CliRunner

import capcli
from capcli.cli import app
from capcli.data.images import resize_center_crop
from capcli.errors import CapcliError, ConfigError
from capcli.model import build_model
from capcli.settings import ModelSettings

DOCS = Path(__file__).resolve().parents[1] / "docs" / "python.md"
CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a big red circle"]


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops, one thread


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny model with random weights, as a run directory's best checkpoint."""
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("api") / "runs" / "pretrain"
    build_model(ModelSettings(), CAPTIONS * 10).save_pretrained(run / "checkpoints" / "best")
    return run


@pytest.fixture(scope="module")
def captioner(checkpoint):
    return capcli.load(checkpoint, device="cpu", batch_size=2)


def picture(seed: int, size: tuple[int, int] = (48, 32)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def test_load_takes_a_run_directory_and_says_what_is_missing(checkpoint, tmp_path, captioner):
    assert captioner.checkpoint == checkpoint / "checkpoints" / "best"
    assert isinstance(captioner, capcli.ImageCaptioner) and not captioner.model.training
    with pytest.raises(ConfigError, match="no checkpoint at"):
        capcli.load(tmp_path / "nowhere")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "model.json").write_text("{}")
    with pytest.raises(CapcliError, match="checkpoint"):  # damaged: a one-line error, exit 1 from the CLI
        capcli.load(tmp_path / "broken")


def test_captions_equal_the_cli_and_every_input_kind_gives_the_same(captioner, checkpoint, tmp_path):
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        picture(i).save(paths[-1])
    result = CliRunner().invoke(app, ["caption", *map(str, paths), "--checkpoint", str(checkpoint), "--beams", "2",
                                      "--max-length", "6", "--format", "jsonl", "--quiet", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    cli = [json.loads(line) for line in result.stdout.splitlines()]
    ours = captioner.caption(paths, beams=2, max_length=6)  # batches of 2: a batch and a remainder
    assert [c.text for c in ours] == [r["caption"] for r in cli]
    assert [c.tokens for c in ours] == [r["tokens"] for r in cli]
    assert [round(c.logprob, 6) for c in ours] == [r["logprob"] for r in cli]

    image = picture(0)
    pixels = resize_center_crop(image, captioner.image_size)  # (3, S, S) uint8, as the model reads it
    kinds = [str(paths[0]), paths[0], image, np.asarray(image), pixels, pixels.float() / 255]
    texts = [captioner.caption(kind, beams=2, max_length=6).text for kind in kinds]
    assert texts == [ours[0].text] * len(kinds)
    batch = captioner.caption(torch.stack([pixels, pixels]), beams=2, max_length=6)  # (N, 3, H, W): a list
    assert [c.text for c in batch] == [ours[0].text] * 2
    with pytest.raises(ValueError, match=r"\(3, H, W\)"):
        captioner.caption(torch.zeros(4, 5))


def test_embeddings_are_normalised_and_equal_the_models(captioner):
    images = captioner.embed_images([picture(0), picture(1), picture(2)])
    texts = captioner.embed_texts(CAPTIONS[:2])
    assert images.shape == (3, 512) and texts.shape == (2, 512) and images.dtype == torch.float32
    assert_close(images.norm(dim=1), torch.ones(3)) and assert_close(texts.norm(dim=1), torch.ones(2))
    model = captioner.model
    with torch.no_grad():
        direct = model.embed_image(model.image_features(captioner.pixels([picture(1)])))
    assert_close(images[1:2], direct)
    assert_close(captioner.embed_texts(CAPTIONS[1]), texts[1:2])  # one text, or a batch of two: the same


def test_score_is_the_teacher_forced_logprob_of_the_caption_and_its_end(captioner):
    image = picture(3)
    text = captioner.caption(image, beams=1, max_length=8).text
    model, tokenizer = captioner.model, captioner.model.tokenizer
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]])
    with torch.no_grad():
        logits = model.caption_logits(model.image_features(captioner.pixels(image)), ids, torch.ones_like(ids))
    expected = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[..., None]).sum().item()
    assert captioner.score(image, text) == pytest.approx(expected, abs=1e-4)
    pair = captioner.score([image, image], [text, text + " " + text])
    assert isinstance(pair, list) and pair[0] == pytest.approx(expected, abs=1e-4) and pair[1] < pair[0]
    with pytest.raises(ValueError, match="one caption per image"):
        captioner.score([image, image], ["one caption"])


def test_the_python_docs_run(checkpoint, tmp_path, monkeypatch):
    """Every ``python`` block of docs/python.md, in order, in one namespace."""
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(encoding="utf-8"), flags=re.DOTALL)
    assert len(blocks) >= 4
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "pretrain").symlink_to(checkpoint, target_is_directory=True)
    picture(0).save(tmp_path / "photo.jpg")
    (tmp_path / "more").mkdir()
    for i in (1, 2):
        picture(i).save(tmp_path / "more" / f"{i}.png")
    namespace: dict = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"docs/python.md block {i + 1}", "exec"), namespace)  # noqa: S102 - our own docs
    assert namespace["captioner"].device.type in ("cpu", "cuda", "mps")
