"""Model cards: every checkpoint's README.md, its front matter checked against model.json, config.yaml,
state.pt and the results JSON that ``capcli evaluate`` adds to it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from capcli.cli import app
from capcli.settings import load_settings
from capcli.train.card import add_evaluation, card_metadata, read_card
from capcli.train.checkpoint import load_state

runner = CliRunner()


def front_matter(path: Path) -> dict:
    """The YAML between the card's two ``---`` lines, parsed independently of capcli.train.card."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    return yaml.safe_load(text.split("\n---\n", 1)[0][4:])


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_cache) -> Path:
    from conftest import make_settings

    from capcli.phases import pretrain

    settings = make_settings(tmp_path_factory.mktemp("card") / "pretrain", data_cache,
                             **{"pretrain.engine.max_steps": 2, "pretrain.engine.epochs": 1})
    pretrain(settings)
    return settings.pretrain.engine.output


def test_every_checkpoint_has_a_card_that_agrees_with_its_files(run):
    config = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8"))
    for name in ("best", "last"):
        checkpoint = run / "checkpoints" / name
        meta = front_matter(checkpoint / "README.md")
        model = json.loads((checkpoint / "model.json").read_text(encoding="utf-8"))
        assert meta["license"] == "mit" and meta["pipeline_tag"] == "image-to-text"
        assert meta["library_name"] == "capcli" and "base_model" not in meta  # tiny: trained from scratch
        block = meta["capcli"]
        assert block["phase"] == "pretrain"
        for key in ("preset", "embed_dim", "prefix_mapper", "prefix_length", "concept_source", "concept_tags"):
            assert block["architecture"][key] == model[key], key
        assert block["architecture"]["concept_words"] == len(model["concept_words"])
        for key, value in block["data"].items():
            assert config["data"][key] == value, key
        assert block["settings"]["lr"] == config["pretrain"]["optimizer"]["lr"]
        assert block["settings"]["batch_size"] == config["pretrain"]["engine"]["batch_size"]
        state = load_state(checkpoint)
        assert block["training"]["step"] == state["step"] and block["training"]["samples"] == state["samples"]
        assert block["training"]["seconds"] is None or block["training"]["seconds"] >= 0
        body = (checkpoint / "README.md").read_text(encoding="utf-8")
        assert "## Architecture" in body and "## Data" in body and "## Training" in body
        assert "## Evaluation" not in body


def test_evaluate_adds_its_results_to_the_card(run, tmp_path):
    checkpoint = run / "checkpoints" / "best"

    out = tmp_path / "r.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(run), "--beams", "1", "--limit", "4",
                                 "--output", str(out), "--quiet", "--device", "cpu"], env={})
    assert result.exit_code == 0, result.output
    results = json.loads(out.read_text(encoding="utf-8"))
    meta = front_matter(checkpoint / "README.md")
    (entry,) = meta["capcli"]["evaluations"]
    assert (entry["split"], entry["n"], entry["judge"], entry["data"]) == ("test", 4, results["judge"], "synthetic")
    assert entry["decoding"] == results["decoding"] and entry["train_overlap"] == results["train_overlap"] == 0
    for name, metric in results["metrics"].items():
        assert entry["metrics"][name] == metric, name
    (index,) = meta["model-index"]
    (result,) = index["results"]
    assert result["dataset"]["split"] == "test"
    assert {m["type"]: m["value"] for m in result["metrics"]}["cider_d"] == results["metrics"]["cider_d"]["value"]
    assert "cider_d" in meta["metrics"]
    assert "## Evaluation: synthetic test (n=4)" in (checkpoint / "README.md").read_text(encoding="utf-8")

    add_evaluation(checkpoint, results)  # the same evaluation again replaces its entry
    assert len(read_card(checkpoint)["capcli"]["evaluations"]) == 1
    add_evaluation(checkpoint, {**results, "split": "val"})
    assert [e["split"] for e in read_card(checkpoint)["capcli"]["evaluations"]] == ["test", "val"]
    assert front_matter(checkpoint / "README.md")["capcli"]["training"]["step"] == load_state(checkpoint)["step"]


def test_clip_gpt2_names_its_base_models_and_a_hub_dataset(tmp_path):
    (tmp_path / "model.json").write_text(json.dumps({"preset": "clip-gpt2", "embed_dim": 512}))
    settings = load_settings(cli={"model.preset": "clip-gpt2", "data.source": "hf:pixparse/cc3m-wds"}, environ={})
    meta = card_metadata(settings, "pretrain", tmp_path, {"step": 3}, 12.5)
    assert meta["base_model"] == ["timm/vit_base_patch32_clip_224.openai", "gpt2"]
    assert meta["datasets"] == ["pixparse/cc3m-wds"]
    assert meta["capcli"]["training"] == {"step": 3, "epoch": 0, "samples": 0, "best_val_loss": None, "seconds": 12.5}
