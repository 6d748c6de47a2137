"""``capcli export``: ONNX graphs whose greedy captions, run by onnxruntime with numpy alone, equal
capcli's own, for the tiny preset and for the full-size clip-gpt2 architecture (random weights)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from capcli.cli import app
from capcli.model import Captioner, build_model
from capcli.model.generation import DecodeSettings, generate_captions
from capcli.settings import ModelSettings

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

runner = CliRunner()
CAPTIONS = ["a red circle above a blue square", "two green triangles", "a small yellow star left of a big red circle",
            "a blue star", "three red squares right of a green circle"]
WORDS = ("red", "blue", "green", "yellow", "circle", "square", "triangle", "star", "small", "big")


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny ops, one thread


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path]:
    """The tiny preset as it trains by default (token prefix, concept head on the patches), random
    weights, exported through the CLI: (checkpoint, export folder)."""
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("export")
    model = build_model(ModelSettings(prefix_mapper="tokens", concept_source="patches", concept_words=list(WORDS)),
                        CAPTIONS * 8, WORDS)
    assert model.config.prefix_mapper == "tokens" and model.config.concept_source == "patches"
    with torch.no_grad():  # a head that sees half the words and rules the others out: guidance terms far from 0
        model.concept_head.bias.copy_(torch.tensor([6.0, -6.0] * (len(WORDS) // 2)))
    model.save_pretrained(root / "checkpoint")
    result = runner.invoke(app, ["export", str(root / "checkpoint"), "--output", str(root / "onnx"),
                                 "--max-length", "10"])
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(root / "onnx")
    return root / "checkpoint", root / "onnx"


def test_the_export_folder_holds_both_graphs_the_tokenizer_and_the_settings(exported):
    import json

    import onnx

    _, folder = exported
    for name in ("vision.onnx", "decoder.onnx"):
        onnx.checker.check_model(str(folder / name))
    settings = json.loads((folder / "decoding.json").read_text())
    assert settings["max_length"] == 10 and settings["concept_token_ids"] and settings["concept_patches"]
    assert settings["concept_slots"]["word_slots"] and settings["concept_prior"] == 0.2  # slot guidance exported
    decoder = onnx.load(str(folder / "decoder.onnx"))
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in decoder.graph.input}
    assert dims["input_ids"] == ["batch", "tokens"] and dims["past_key_0"][0] == "batch"
    assert dims["past_key_0"][2] == "past"
    assert (folder / "tokenizer.json").is_file()


@pytest.mark.parametrize("guidance", [1.0, 0.0])
def test_onnx_greedy_captions_equal_capclis(exported, guidance):
    from capcli.serving import OnnxCaptioner

    checkpoint, folder = exported
    model = Captioner.from_pretrained(checkpoint).eval()
    torch.manual_seed(1)
    pixels = torch.randint(0, 256, (5, 3, model.image_size, model.image_size), dtype=torch.uint8)
    expected = generate_captions(model, pixels, DecodeSettings(beams=1, max_length=10, concept_guidance=guidance,
                                                                    spatial_guidance=False))
    onnx = OnnxCaptioner(folder, threads=1)
    assert onnx.caption_pixels(pixels.numpy(), concept_guidance=guidance) == expected
    assert onnx.caption_pixels(pixels[:1].numpy(), concept_guidance=guidance) == expected[:1]  # another batch size


def test_the_vision_graph_gives_capclis_prefix_and_guidance_terms(exported):
    """The concept guidance of the ONNX search is guidance.ConceptGuidance's, term for term."""
    import numpy as np
    import onnxruntime as ort

    from capcli.model.guidance import ConceptGuidance

    checkpoint, folder = exported
    model = Captioner.from_pretrained(checkpoint).eval()
    pixels = torch.randint(0, 256, (3, 3, model.image_size, model.image_size), dtype=torch.uint8)
    prefix, alone, follows = ort.InferenceSession(str(folder / "vision.onnx")).run(None, {"pixels": pixels.numpy()})
    with torch.no_grad():
        features = model.image_features(pixels)
        guidance = ConceptGuidance(model, features, 1.0, beams=1)
        np.testing.assert_allclose(prefix, model.prefix(features).numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(alone, guidance.alone.numpy(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(follows, guidance.follows.numpy(), rtol=1e-4, atol=1e-4)
    assert alone.min() < -3 and follows.min() < -3  # words ruled out: the terms are not all 0


def test_export_errors_are_one_line_and_exit_2(exported, tmp_path, monkeypatch):
    checkpoint, _ = exported
    result = runner.invoke(app, ["export", str(checkpoint), "--output", str(tmp_path / "x"), "--format", "tflite"])
    assert result.exit_code == 2 and result.stderr == "error: unknown --format 'tflite' (allowed: onnx)\n"
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # the extra is not installed
    result = runner.invoke(app, ["export", str(checkpoint), "--output", str(tmp_path / "x")])
    assert result.exit_code == 2 and 'pip install "capcli[onnx]"' in result.stderr
    assert len(result.stderr.splitlines()) == 1 and not (tmp_path / "x").exists()


@pytest.mark.slow(seconds=45)
def test_full_size_clip_gpt2_exports_and_runs_on_random_weights(tmp_path, offline_hub):
    """ViT-B/32 at 224 px and GPT-2 small (124M), random weights, built from local parts."""
    from test_model import EXTRA_TEXT, _gpt2_tokenizer_without_pad
    from transformers import GPT2Config, GPT2LMHeadModel

    from capcli.inference.export import export_onnx
    from capcli.serving import OnnxCaptioner

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config()).save_pretrained(str(tmp_path / "gpt2"))
    _gpt2_tokenizer_without_pad(CAPTIONS + EXTRA_TEXT).save_pretrained(str(tmp_path / "gpt2"))
    model = build_model(ModelSettings(preset="clip-gpt2", vision_weights="none", decoder=str(tmp_path / "gpt2")))
    model.eval().save_pretrained(tmp_path / "checkpoint")
    pixels = torch.randint(0, 256, (2, 3, 224, 224), dtype=torch.uint8)
    expected = generate_captions(model, pixels, DecodeSettings(beams=1, max_length=4))
    del model  # the export loads the checkpoint itself
    settings = export_onnx(tmp_path / "checkpoint", tmp_path / "onnx", max_length=4)
    assert (settings["layers"], settings["heads"], settings["image_size"]) == (12, 12, 224)
    assert OnnxCaptioner(tmp_path / "onnx").caption_pixels(pixels.numpy()) == expected


@pytest.fixture
def offline_hub(monkeypatch, tmp_path):
    """Nothing is fetched: the hub is offline with an empty cache."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))


def test_captioning_from_the_export_imports_no_pytorch(exported):
    import subprocess

    _, folder = exported
    code = ("import sys, numpy as np; from capcli.serving import OnnxCaptioner; c = OnnxCaptioner(sys.argv[1]); "
            "s = c.settings['image_size']; print(c.caption_pixels(np.zeros((2, 3, s, s), np.uint8), max_length=3)); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    done = subprocess.run([sys.executable, "-c", code, str(folder)], capture_output=True, text=True,
                          timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("[")
