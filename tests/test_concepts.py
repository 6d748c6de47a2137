"""The concept head and the tiny tower's convolutional stem.

Targets are read from the captions and, where there is one, the scene graph; the head lives in the model and its checkpoint; pretrain
trains it where the source names its objects and warns where nothing names them; and
checkpoints written before either part existed still load as they were.
"""

from __future__ import annotations

import io
import itertools
import json
from pathlib import Path

import pytest
import torch
from test_engine import fit_phase, train_log
from test_grounding import _scene
from test_sources import _write_folder

from capcli.data.batches import CaptionCollator, CaptionExample, _Examples
from capcli.data.concepts import (
    canonical,
    caption_words,
    concept_targets,
    scene_concepts,
)
from capcli.data.sources import concept_words
from capcli.data.synthetic import generate
from capcli.model import Captioner, build_model
from capcli.model.captioner import CONFIG_FILE, CaptionerConfig
from capcli.model.towers import build_vision, conv_stem, vision_spec_tiny
from capcli.phases import prepare_pretrain
from capcli.scenes import (
    COLOURS,
    NOVEL_COMBOS,
    SHAPES,
    SIZES,
    render,
)
from capcli.settings import ModelSettings
from capcli.train.sampler import SampleKey


@pytest.fixture(scope="module")
def captions() -> list[str]:
    return [c for index in range(8) for c in generate("train", index, seed=0)[1]]


def _pixels(batch: int, size: int) -> torch.Tensor:
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))


def test_targets_mark_whole_words_in_singular_and_plural() -> None:
    captions = ["Two red CROSSES and a circle.", "a starry sky over squares", "three stars", ""]
    targets = concept_targets(captions, ("circle", "cross", "star", "square"))
    assert targets.tolist() == [[1, 1, 0, 0], [0, 0, 0, 1], [0, 0, 1, 0], [0, 0, 0, 0]]


def test_targets_mark_phrases_only_where_their_words_stand_together() -> None:
    captions = ["two red crosses and a blue circle", "a red, blue circle", "a blue cross beside a red circle"]
    targets = concept_targets(captions, ("red cross", "blue circle", "red circle", "cross"))
    assert targets.tolist() == [[1, 1, 0, 1], [0, 1, 0, 0], [0, 0, 1, 1]]


def test_synthetic_names_its_shapes_colours_and_sizes_as_separate_words() -> None:
    words = concept_words("synthetic")
    assert words == (*SHAPES, *COLOURS, *SIZES) and len(set(words)) == 6 + 8 + 2
    # No pair is a label of its own, so the unseen ones (test_novel) are no labels the head never saw.
    assert not any(" " in w for w in words) and not NOVEL_COMBOS & {tuple(w.split()) for w in words}
    assert concept_words("imagefolder:photos") == ()


def test_a_scene_graph_names_each_relation_one_way_round() -> None:
    # A square right of a circle, a star below the square and on the circle's diagonal (no relation).
    scene = _scene(("square", "red", "large", 0.7, 0.2), ("circle", "blue", "small", 0.2, 0.2),
                   ("star", "red", "small", 0.55, 0.55)).to_dict()
    assert {r["relation"] for r in scene["relations"]} == {"left of", "right of", "above", "below"}
    assert scene_concepts(scene) == {
        "square", "circle", "star", "red", "blue", "small", "large",
        "red square", "blue circle", "red star", "large square", "small circle", "small star",
        "large red", "small blue", "small red", "large red square", "small blue circle", "small red star",
        "circle left of square",  # both "circle left of square" and "square right of circle"
        "square above star",  # both "square above star" and "star below square"
    }
    assert canonical("square right of circle") == "circle left of square"
    assert canonical("star below square") == "square above star"
    assert canonical("red circle") == "red circle" and canonical("right of") == "right of"


def test_the_scene_graph_adds_the_facts_a_caption_leaves_out() -> None:
    scene = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "small", 0.8, 0.5)).to_dict()
    words = ("circle left of square", "square right of circle", "square left of circle", "red circle", "blue",
             "small square", "small blue square", "circle above square")
    captions = ["a red circle and a blue square"] * 2
    assert concept_targets(captions, words).tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]] * 2
    # The caption's own words still count beside the graph's; a row without a graph reads only its caption.
    assert concept_targets(captions, words, [scene, None]).tolist() == [[1, 1, 0, 1, 1, 1, 1, 0],
                                                                       [0, 0, 0, 1, 1, 0, 0, 0]]
    # A "scene" column that is not a scene graph is no graph.
    assert concept_targets(captions[:1], words, ["a string"]).tolist() == [[0, 0, 0, 1, 1, 0, 0, 0]]


@pytest.mark.parametrize("pixel_cache", [True, False])
def test_the_synthetic_training_data_carries_its_scene_graphs_to_the_targets(settings_factory, pixel_cache) -> None:
    settings = settings_factory(**{"pretrain.concept_weight": 1.0, "data.pixel_cache": pixel_cache})
    phase = prepare_pretrain(settings)
    words = phase.model.config.concept_words
    batch = phase.data.collate([phase.data.train[SampleKey(index, 0)] for index in range(32)])
    expected = torch.zeros(len(batch), len(words))
    for index in range(32):
        true = scene_concepts(generate("train", index, seed=settings.data.seed)[0].to_dict())
        expected[index] = torch.tensor([float(w in true) for w in words])
    assert torch.equal(batch.concepts, expected)
    sizes = [c for c in range(len(words)) if words[c].split()[0] in SIZES]
    assert batch.concepts[:, sizes].sum(dim=1).ge(1).all()  # from the graph: no caption says "small circle"


def test_a_streamed_row_brings_its_scene_graph() -> None:
    scene, captions = generate("train", 1, seed=0)
    buffer = io.BytesIO()
    render(scene, 16).save(buffer, format="PNG")
    row = {"image": {"bytes": buffer.getvalue(), "path": None}, "captions": captions, "scene": scene.to_dict()}
    examples = list(_Examples([row, {**row, "scene": None}], 16, 10**6, epoch=0, skip_batches=0, batch_size=1))
    assert [e.scene for e in examples] == [scene.to_dict(), None]


def test_the_collator_adds_targets_only_when_given_words(captions: list[str]) -> None:
    model = build_model(ModelSettings(), captions)
    examples = [CaptionExample(_pixels(1, 8)[0], "a red circle"), CaptionExample(_pixels(1, 8)[0], "two blue stars")]
    assert CaptionCollator(model.tokenizer, 32)(examples).concepts is None
    batch = CaptionCollator(model.tokenizer, 32, ("circle", "star"))(examples)
    assert batch.concepts.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert batch.to(torch.device("cpu")).concepts.tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_a_model_with_concept_words_has_a_head_that_round_trips(tmp_path: Path, captions: list[str]) -> None:
    torch.manual_seed(0)
    model = build_model(ModelSettings(), captions, ("circle", "square", "star")).eval()
    pixels = _pixels(2, model.image_size)
    with torch.no_grad():
        logits = model.concept_logits(model.image_features(pixels))
    assert logits.shape == (2, 3)
    model.save_pretrained(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / CONFIG_FILE).read_text())
    assert saved["concept_words"] == ["circle", "square", "star"]
    assert saved["concept_slots"] == [-1, -1, -1] == model.config.concept_slots  # shapes alone: no colour is a concept
    loaded = Captioner.from_pretrained(tmp_path / "ckpt").eval()
    assert loaded.config.concept_slots == [-1, -1, -1]
    with torch.no_grad():
        assert torch.equal(loaded.concept_logits(loaded.image_features(pixels)), logits)

    plain = build_model(ModelSettings(), captions)
    assert plain.concept_head is None
    with pytest.raises(ValueError, match="no concept head"):
        plain.concept_logits(torch.zeros(1, plain.config.vision["arch"]["output_dim"]))


def test_a_checkpoint_from_before_the_stem_and_the_head_loads_as_it_was(tmp_path: Path, captions: list[str]) -> None:
    """Its model.json has neither the vision spec's "stem" nor "concept_words" (nor "concept_slots"): a
    patch embedding, no head."""
    current = build_model(ModelSettings(), captions)
    config = dict(current.config.__dict__)
    config.pop("concept_words")
    config.pop("concept_slots")
    config["vision"] = {k: v for k, v in config["vision"].items() if k != "stem"}
    torch.manual_seed(1)
    old = Captioner(CaptionerConfig(**config), current.tokenizer).eval()
    old.save_pretrained(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / CONFIG_FILE).read_text())
    saved.pop("concept_words")
    saved.pop("concept_slots")
    (tmp_path / "old" / CONFIG_FILE).write_text(json.dumps(saved))

    loaded = Captioner.from_pretrained(tmp_path / "old").eval()
    assert isinstance(loaded.vision.conv1, torch.nn.Conv2d) and loaded.concept_head is None
    assert loaded.config.concept_slots == []  # absent: guidance stays additive (guidance.slot_layout)
    pixels = _pixels(2, loaded.image_size)
    with torch.no_grad():
        assert torch.equal(loaded.image_features(pixels), old.image_features(pixels))


def test_the_tiny_tower_has_a_convolutional_stem_on_the_patch_grid() -> None:
    spec = vision_spec_tiny()
    tower = build_vision(spec)
    assert isinstance(tower.conv1, torch.nn.Sequential)
    grid = spec["arch"]["image_size"] // spec["arch"]["patch_size"]
    assert tower.conv1(torch.zeros(1, 3, 64, 64)).shape == (1, spec["arch"]["width"], grid, grid)
    assert tower(torch.zeros(2, 3, 64, 64)).shape == (2, spec["arch"]["output_dim"])
    with pytest.raises(ValueError, match="power of 2"):
        conv_stem(6, 128)


def test_pretrain_trains_the_concept_head_on_the_synthetic_shapes(settings_factory) -> None:
    """One batch of 8 images, 4 steps: the head changes, and the concept loss falls at every step
    (a loss above zero whose gradient pushed the wrong way would change the head as well)."""
    settings = settings_factory(**{"data.train_size": 8, "data.val_size": 1, "pretrain.engine.epochs": 4,
                                   "pretrain.engine.patience": None, "pretrain.concept_weight": 5.0})
    phase = prepare_pretrain(settings)
    assert phase.model.config.concept_words == list(concept_words("synthetic"))
    before = phase.model.concept_head.weight.detach().clone()
    fit_phase(settings, phase)
    assert not torch.equal(phase.model.concept_head.weight, before)
    losses = [row["concept_loss"] for row in train_log(settings.pretrain.engine.output)]
    assert len(losses) == 4 and all(b < a for a, b in itertools.pairwise(losses)), losses


def test_own_concept_words_override_the_sources(settings_factory) -> None:
    settings = settings_factory(**{"pretrain.concept_weight": 1.0, "model.concept_words": ["Red", "circle"]})
    assert prepare_pretrain(settings).model.config.concept_words == ["red", "circle"]


def test_a_source_without_words_of_its_own_takes_the_common_words_of_its_captions(settings_factory,
                                                                                  tmp_path: Path) -> None:
    folder = _write_folder(tmp_path / "photos", 12)
    settings = settings_factory(**{"data.source": f"imagefolder:{folder}", "pretrain.concept_weight": 5.0,
                                   "pretrain.engine.max_steps": 1})
    phase = prepare_pretrain(settings)
    captions = [[row["caption"]] for row in map(json.loads, (folder / "metadata.jsonl").read_text().splitlines())]
    words = phase.model.config.concept_words  # read from the training split, carved from the 12
    assert set(words) <= set(caption_words(captions, min_share=0)) and phase.model.concept_head is not None
    assert set(words) & set(SHAPES) and not set(words) & {"a", "an", "the", "and", "of"}
    fit_phase(settings, phase)
    assert train_log(settings.pretrain.engine.output)[0]["concept_loss"] > 0


def test_caption_words_are_the_common_content_words_plurals_folded() -> None:
    captions = [["a red apple", "red apple on a table"], ["two green apples"], ["a blue cup"], ["the cup is blue"]]
    # apple 2 images, blue 2, cup 2, green 1, red 1, table 1: ties by the word.
    assert caption_words(captions) == ("apple", "blue", "cup", "green", "red", "table")
    assert caption_words(captions, min_share=0.5) == ("apple", "blue", "cup")
    assert caption_words(captions, limit=2) == ("apple", "blue")
    assert caption_words([["there is one"], ["a the of"]]) == ()


def test_concept_weight_on_a_source_without_words_warns_and_trains_without(settings_factory, tmp_path: Path,
                                                                           capsys) -> None:
    folder = _write_folder(tmp_path / "photos", 12, rows=[{"caption": "there is one"}] * 12)
    settings = settings_factory(**{"data.source": f"imagefolder:{folder}", "pretrain.concept_weight": 5.0,
                                   "pretrain.engine.max_steps": 1})
    phase = prepare_pretrain(settings)
    assert "pretrain.concept_weight is 5 but the model has no concept words" in capsys.readouterr().err
    assert phase.model.concept_head is None
    fit_phase(settings, phase)
    assert "concept_loss" not in train_log(settings.pretrain.engine.output)[0]


def test_concept_tags_add_each_patchs_seen_words_to_its_prefix_vector(tmp_path: Path, captions: list[str]) -> None:
    """prefix_n = mapper_n + Σ_c σ(head_nc)·E[word_c] on the patch positions; the pooled position is unchanged;
    the confidences are detached, so the caption loss does not train the head; the setting round-trips."""
    torch.manual_seed(0)
    settings = ModelSettings(prefix_mapper="tokens", concept_source="patches", concept_tags=True)
    words = ("circle", "red circle", "square")
    model = build_model(settings, captions, words)
    features = model.image_features(_pixels(2, model.image_size))
    plain = model.prefix_mapper(features)
    wte = model.decoder.transformer.wte.weight
    embeddings = torch.stack([wte[model.tokenizer.encode(" " + w, add_special_tokens=False)].mean(0) for w in words])
    tags = torch.sigmoid(model.concept_head(features[:, 1:])) @ embeddings  # (B, N, D)
    prefix = model.prefix(features)
    torch.testing.assert_close(prefix[:, 0], plain[:, 0])
    torch.testing.assert_close(prefix[:, 1:], plain[:, 1:] + tags)
    ids = torch.tensor([[5, 6, 7]] * 2)
    model.caption_logits(features, ids, torch.ones_like(ids)).sum().backward()
    assert model.concept_head.weight.grad is None and wte.grad is not None
    model.save_pretrained(tmp_path / "tags")
    assert Captioner.from_pretrained(tmp_path / "tags").config.concept_tags is True
    # Where there is no patch head or token prefix to carry them, the model has no tags, and says so.
    assert build_model(ModelSettings(prefix_mapper="mlp", concept_tags=True), captions, words).config.concept_tags is False
    assert build_model(settings, captions, ()).config.concept_tags is False


def test_slots_count_the_concept_words_after_each_in_its_commonest_use() -> None:
    """By hand: "a small red circle" puts small 2, red 1, circle 0; "red" alone once is outweighed by
    its two uses before a shape (1); a plural is its word; "left" never follows a run; "drawing",
    always alone, a phrase and an unused word have no slot."""
    from capcli.data.concepts import concept_slots

    captions = ["a small red circle and two blue squares", "a red circle is left of a large square", "red",
                "a drawing of a blue circle", "a drawing"]
    words = ["circle", "square", "red", "blue", "small", "large", "red circle", "green", "drawing"]
    assert concept_slots(captions, words) == [0, 0, 1, 1, 2, 1, -1, -1, -1]
    assert concept_slots(["a red", "red", "a red circle"], ["red", "circle"]) == [-1, 0]  # red: alone 2 of 3
    assert concept_slots([], words) == [-1] * len(words)
