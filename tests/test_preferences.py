"""Tests for preference pairs: the caption parser, one-fact corruptions, and the pair loaders.

Scenes come straight from ``synthetic.generate`` (no rendering); the file, disk and
UltraFeedback loaders read small fixtures written into ``tmp_path``; nothing is downloaded
(``HF_HUB_OFFLINE=1`` comes from conftest).
"""

from __future__ import annotations

import difflib
import json
import random
import re
from collections import Counter
from pathlib import Path

import datasets
import pytest
from PIL import Image

from capcli.data.preferences import (
    PAIR_FEATURES,
    PairReport,
    generate_pairs,
    known_pairs,
    load_preferences,
    pairs_for_image,
)
from capcli.data.synthetic import generate
from capcli.errors import ConfigError, DataError
from capcli.scenes import (
    COLOURS,
    NOVEL_COMBOS,
    SHAPE_PLURALS,
    SHAPES,
    Relation,
    Scene,
    SceneObject,
    compute_relations,
)
from capcli.scenes.corrupt import CORRUPTIONS, scene_negatives, text_negatives
from capcli.scenes.reader import Claims, Mention, is_true, parse
from capcli.settings import DataSettings

N_SCENES = 1000
SCENE_KINDS = {"object", "colour", "size", "count", "relation", "swap"}


def _scenes(n: int = N_SCENES, split: str = "train") -> list[tuple[Scene, list[str]]]:
    return [generate(split, i, seed=0) for i in range(n)]


def _scene(*objects: tuple[str, str, str, float, float], background: str = "white") -> Scene:
    objs = tuple(SceneObject(shape, colour, size, x, y) for shape, colour, size, x, y in objects)
    return Scene(objs, compute_relations(objs), background)


def _grammatical(text: str) -> bool:
    """Articles agree with the next word, and "is"/"are" with the count and the noun."""
    plural = "|".join(SHAPE_PLURALS.values())
    singular = "|".join(SHAPES)
    bad = [r"\ba [aeiou]", r"\ban [^aeiou]", r"\bis (two|three)\b", r"\bare (a|an)\b",
           rf"\b({plural}),? (which )?is\b", rf"\b({singular}),? (which )?are\b"]
    return not any(re.search(pattern, text) for pattern in bad)


def _differences(a: Claims, b: Claims) -> list[tuple]:
    """What changed between the claims of two captions of the same shape."""
    assert len(a.mentions) == len(b.mentions) and len(a.relations) == len(b.relations)
    assert a.background == b.background
    diffs: list[tuple] = []
    for i, (x, y) in enumerate(zip(a.mentions, b.mentions)):
        fields = {f for f in ("count", "colour", "shape", "size") if getattr(x, f) != getattr(y, f)}
        if fields:
            diffs.append(("mention", i, frozenset(fields)))
    for r, s in zip(a.relations, b.relations):
        assert (r.subject, r.object) == (s.subject, s.object)
        if r.relation != s.relation:
            diffs.append(("relation",))
    if a.total != b.total:
        diffs.append(("total",))
    return diffs


def _changed_words(a: str, b: str) -> int:
    """How many word positions differ (the longer side of each changed run when lengths differ)."""
    if len(a.split()) == len(b.split()):
        return sum(x != y for x, y in zip(a.split(), b.split()))
    ops = difflib.SequenceMatcher(None, a.split(), b.split(), autojunk=False).get_opcodes()
    return sum(max(i2 - i1, j2 - j1) for tag, i1, i2, j1, j2 in ops if tag != "equal")


def _png(path: Path, shade: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (shade % 256, 0, 0)).save(path)
    return path


def _caption_split(root: Path, n: int, split: str = "train", scenes: bool = True) -> datasets.Dataset:
    """A caption split like the sources return: undecoded images on disk, captions, scene graphs."""
    rows = _scenes(n, split)
    columns = {
        "image": [{"bytes": None, "path": str(_png(root / split / f"{i}.png", i))} for i in range(n)],
        "captions": [captions for _, captions in rows],
    }
    if scenes:
        columns["scene"] = [scene.to_dict() for scene, _ in rows]
    return datasets.Dataset.from_dict(columns).cast_column("image", datasets.Image(decode=False))


def _data(**kwargs) -> DataSettings:
    return DataSettings(**{"train_size": 1000, "val_size": 100, "test_size": 100, **kwargs})


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def _chat(role: str, text: str, image: bool = False) -> list[dict]:
    content = ([{"type": "image", "text": None}] if image else []) + [{"type": "text", "text": text}]
    return [{"role": role, "content": content}]


# --- the parser --------------------------------------------------------------------


def test_parser_reads_every_describe_caption_as_true() -> None:
    seen = Counter()
    for split in ("train", "test_novel"):
        for scene, captions in _scenes(N_SCENES // 2, split):
            for caption in captions:
                claims = parse(caption)
                assert claims is not None, caption
                assert is_true(caption, scene), (caption, scene)
                seen["relation"] += bool(claims.relations)
                seen["chained relation"] += len(claims.relations) == 2
                seen["total"] += claims.total is not None
                seen["background"] += claims.background is not None
                seen["size"] += any(m.size for m in claims.mentions)
                seen["count"] += any(m.count > 1 for m in claims.mentions)
                seen["single"] += caption.startswith("a single ")
                seen["there are"] += caption.startswith("there are ")
                seen["lead"] += caption.startswith(("a picture of", "an image of", "a drawing of", "a render of"))
    # Every phrasing family of describe() was exercised, so "all parse" means something.
    assert all(seen[k] > 0 for k in ("relation", "chained relation", "total", "background", "size", "count",
                                      "single", "there are", "lead")), seen


def test_parser_gives_the_claims_of_a_relation_caption() -> None:
    claims = parse("two small red circles are to the left of a blue square, which is above a green star")
    assert claims == Claims(
        mentions=(Mention(2, "red", "circle", "small"), Mention(1, "blue", "square"), Mention(1, "green", "star")),
        relations=(Relation(0, "left of", 1), Relation(1, "above", 2)),
    )
    assert parse("Three shapes: a red circle, a blue square and a green star.").total == 3
    assert parse("a red circle on a light gray background").background == "light gray"


@pytest.mark.parametrize("text", ["a red circle!", "a dog on a sofa", "red circle", "a red circle and",
                                  "a red circle is", "a circle", "two shapes a red circle", ""])
def test_parser_rejects_text_outside_the_grammar(text: str) -> None:
    assert parse(text) is None


def test_is_true_checks_each_kind_of_claim_against_the_scene() -> None:
    # A small red circle left of a large blue square, with a small red circle twin above it.
    scene = _scene(("circle", "red", "small", 0.2, 0.7), ("square", "blue", "large", 0.75, 0.7),
                   ("circle", "red", "small", 0.2, 0.2), background="beige")
    assert is_true("two red circles and a blue square", scene)
    assert is_true("two small red circles and a large blue square on a beige background", scene)
    assert is_true("three shapes: two red circles and a blue square", scene)
    assert not is_true("a red circle and a blue square", scene)  # there are two red circles
    assert not is_true("two red circles and a green square", scene)
    assert not is_true("two large red circles and a blue square", scene)
    assert not is_true("two shapes: two red circles and a blue square", scene)
    assert not is_true("two red circles and a blue square on a black background", scene)
    # The twins are not both left of the square in the same way: (0.2, 0.2) is diagonal to it.
    assert not is_true("two red circles are left of a blue square", scene)
    left = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.75, 0.5))
    assert is_true("a red circle is left of a blue square", left)
    assert is_true("a blue square on the right of a red circle", left)
    assert not is_true("a red circle is right of a blue square", left)
    assert not is_true("a red circle is above a blue square", left)
    assert not is_true("a dog", left)


# --- corruptions of synthetic captions ------------------------------------------------


def test_generated_negatives_are_false_and_change_exactly_one_fact() -> None:
    kinds = Counter()
    for index, (scene, captions) in enumerate(_scenes()):
        for chosen, rejected, kind in pairs_for_image(captions, scene, random.Random(index)):
            kinds[kind] += 1
            assert chosen in captions and is_true(chosen, scene)
            assert rejected is not None and not is_true(rejected, scene), (chosen, rejected, kind)
            assert _grammatical(rejected), rejected
            diffs = _differences(parse(chosen), parse(rejected))
            if kind == "relation":
                assert diffs == [("relation",)]
            elif kind == "swap":
                (_, i, fi), (_, j, fj) = diffs
                a, b = parse(chosen).mentions, parse(rejected).mentions
                assert fi == fj == {"colour"} and (a[i].colour, a[j].colour) == (b[j].colour, b[i].colour)
            elif kind == "count" and diffs == [("total",)]:
                pass
            else:
                field = {"object": "shape"}.get(kind, kind)
                assert len(diffs) == 1 and diffs[0][0] == "mention" and diffs[0][2] == {field}, (chosen, rejected)
            # One word, or one phrase with its article/verb: "a red circle is" -> "two red circles are".
            assert 1 <= _changed_words(chosen, rejected) <= (4 if kind == "swap" else 3), (chosen, rejected)
    assert set(kinds) == SCENE_KINDS, kinds
    assert min(kinds.values()) > 0.03 * sum(kinds.values()), kinds  # no kind is starved


def test_every_scene_negative_of_every_caption_is_false_and_grammatical() -> None:
    for scene, captions in _scenes(100):
        assert all(_grammatical(c) for c in captions)
        for caption in captions:
            negatives = scene_negatives(caption, scene)
            assert {"object", "colour", "count"} <= set(negatives)
            for kind, texts in negatives.items():
                assert kind in CORRUPTIONS
                for text in texts:
                    assert not is_true(text, scene) and parse(text) is not None and _grammatical(text), (caption, text)


def test_corruptions_fix_articles_and_verbs() -> None:
    scene = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "large", 0.75, 0.5))
    negatives = scene_negatives("there is a red circle and a blue square", scene)
    assert "there is an orange circle and a blue square" in negatives["colour"]
    assert "there are two red circles and a blue square" in negatives["count"]
    assert "there is a large red circle and a blue square" in negatives["size"]
    assert "there is a blue circle and a red square" in negatives["swap"]
    relation = scene_negatives("a red circle is to the left of a blue square", scene)
    assert relation["relation"] == ["a red circle is to the right of a blue square"]
    assert "three red circles are to the left of a blue square" in relation["count"]
    total = scene_negatives("two objects: a red circle and a blue square", scene)
    assert {"one object: a red circle and a blue square",
            "three objects: a red circle and a blue square"} <= set(total["count"])


def test_colour_and_shape_corruptions_name_something_absent() -> None:
    # A red circle and a blue circle: "a red circle" must never become "a blue circle".
    scene = _scene(("circle", "red", "small", 0.2, 0.5), ("circle", "blue", "small", 0.75, 0.5))
    negatives = scene_negatives("a red circle and a blue circle", scene)
    assert not any(text.startswith("a blue circle") for text in negatives["colour"])
    assert "swap" not in negatives  # same shape: swapping colours would say the same thing
    # A swap must not name a pair that exists: "a blue circle, a red square and a blue circle".
    scene = _scene(("circle", "red", "small", 0.2, 0.5), ("square", "blue", "small", 0.5, 0.5),
                   ("circle", "blue", "small", 0.8, 0.5))
    assert "swap" not in scene_negatives("a red circle, a blue square and a blue circle", scene)


def test_training_pairs_name_only_the_colour_shape_pairs_the_training_scenes_show(tmp_path: Path) -> None:
    """A rejected caption never names a pair no training scene shows (test_novel's): such a pair would
    be taught as wrong in itself. Held-out pairs follow the same rule; evaluation's are unrestricted."""
    # By hand: a yellow square alone, with only yellow squares and red circles known.
    scene = _scene(("square", "yellow", "small", 0.5, 0.5))
    known = frozenset({("yellow", "square"), ("red", "circle"), ("red", "square")})
    negatives = scene_negatives("a yellow square", scene, known=known)
    assert negatives.get("object", []) == [] and negatives["colour"] == ["a red square"]
    assert {"a yellow circle", "a red square"} <= set(scene_negatives("a yellow square", scene)["object"]
                                                       + scene_negatives("a yellow square", scene)["colour"])

    splits = {name: _caption_split(tmp_path, n, name) for name, n in (("train", 40), ("val", 10))}
    known = known_pairs(splits["train"])
    assert known and not known & NOVEL_COMBOS  # the training scenes hold no novel pair
    pairs, _ = load_preferences(None, _data(), splits, pairs_per_image=5)
    named = {(colour, shape) for split in pairs.values() for text in split["rejected"]
             for colour in COLOURS for shape in SHAPES
             if re.search(rf"\b{colour} ({shape}|{SHAPE_PLURALS[shape]})\b", text)}
    assert named and named <= known
    unrestricted = generate_pairs(splits["train"], seed=0, name="train", per_image=5)["rejected"]
    assert any(re.search(rf"\b{c} {s}", text) for text in unrestricted for c, s in NOVEL_COMBOS)


# --- free text ------------------------------------------------------------------------


def test_text_negatives_swap_lexicon_words_keeping_grammar() -> None:
    found = text_negatives("A red car parked left of two trees")
    assert "An orange car parked left of two trees" in found["colour"]
    assert "A red car parked right of two trees" in found["relation"]
    assert "A red car parked left of three trees" in found["count"]
    assert "A red car parked left of two dogs" in found["object"]  # plural stays plural
    assert "A man riding a horse" in text_negatives("A man riding an elephant")["object"]
    assert text_negatives("a small red car and a blue bus")["swap"] == ["a small blue car and a red bus"]
    assert text_negatives("a big dog")["size"] == ["a small dog", "a little dog"]
    assert "swap" not in text_negatives("a red car next to a blue car")
    assert text_negatives("nothing to see here") == {}


def test_free_text_pairs_use_the_lexicon_and_fall_back_to_another_image(tmp_path: Path) -> None:
    captions = [["a red car on a street"], ["hello there"], ["good morning"], ["what a view"]]
    split = datasets.Dataset.from_dict({
        "image": [{"bytes": None, "path": str(_png(tmp_path / f"{i}.png", i))} for i in range(4)],
        "captions": captions,
    }).cast_column("image", datasets.Image(decode=False))
    pairs = generate_pairs(split, seed=0, name="train", per_image=1)
    assert pairs.features == PAIR_FEATURES
    rows = pairs.to_list()
    assert rows[0]["corruption"] in {"colour", "object", "relation"} and rows[0]["rejected"] != rows[0]["chosen"]
    for row, own in zip(rows[1:], captions[1:]):
        assert row["corruption"] == "other_image"
        assert row["rejected"] not in own and any(row["rejected"] in c for c in captions)


def test_an_image_with_no_possible_negative_is_counted(tmp_path: Path) -> None:
    split = datasets.Dataset.from_dict({"image": [None], "captions": [["hello there"]]})
    report = PairReport()
    assert len(generate_pairs(split, seed=0, name="train", report=report)) == 0
    assert report.dropped == {"no negative": 1}


def test_generated_pairs_are_deterministic_in_the_seed_and_per_image(tmp_path: Path) -> None:
    split = _caption_split(tmp_path, 40)
    a = generate_pairs(split, seed=0, name="train").to_list()
    assert a == generate_pairs(split, seed=0, name="train").to_list()
    assert a != generate_pairs(split, seed=1, name="train").to_list()
    # A pure function of the image's index: a prefix of the split gives a prefix of the pairs.
    assert generate_pairs(split.select(range(10)), seed=0, name="train").to_list() == a[:20]


# --- load_preferences: generated ------------------------------------------------------


def test_generated_preferences_follow_the_caption_splits(tmp_path: Path) -> None:
    splits = {name: _caption_split(tmp_path, n, name) for name, n in (("train", 30), ("val", 10), ("test", 5))}
    pairs, report = load_preferences(None, _data(), splits)
    assert {name: len(split) for name, split in pairs.items()} == {"train": 60, "val": 20, "test": 10}
    assert all(split.features == PAIR_FEATURES for split in pairs.values())
    assert report.summary() == "preferences: 90 pairs kept, 0 dropped"
    val_images = {img["path"] for img in pairs["val"]["image"]}
    assert all("/val/" in path for path in val_images)
    assert set(pairs["train"]["corruption"]) <= SCENE_KINDS


def test_more_pairs_per_training_image_leave_the_held_out_pairs_as_they_were(tmp_path: Path) -> None:
    splits = {name: _caption_split(tmp_path, n, name) for name, n in (("train", 30), ("val", 10))}
    two, _ = load_preferences(None, _data(), splits)
    five, report = load_preferences(None, _data(), splits, pairs_per_image=5)
    assert five["val"].to_list() == two["val"].to_list()
    assert len(five["train"]) == 150 and report.splits == {"train": 150, "val": 20}  # five captions each
    by_image: dict[str, list[str]] = {}
    for row in five["train"]:
        by_image.setdefault(row["image"]["path"], []).append(row["corruption"])
    scenes, known = _scenes(30, "train"), known_pairs(splits["train"])
    for path, kinds in by_image.items():
        scene, captions = scenes[int(Path(path).stem)]
        allowed = {kind for caption in captions for kind in scene_negatives(caption, scene, known=known)}
        # Each kind the captions allow comes once before any comes twice.
        assert len(set(kinds)) == min(len(kinds), len(allowed)), (kinds, allowed)


def test_generated_preferences_carve_val_by_image_when_the_source_has_none(tmp_path: Path) -> None:
    pairs, _ = load_preferences("generated", _data(seed=3), {"train": _caption_split(tmp_path, 50)})
    train_images = {img["path"] for img in pairs["train"]["image"]}
    val_images = {img["path"] for img in pairs["val"]["image"]}
    assert len(pairs["val"]) == 10 and len(pairs["train"]) == 90  # a tenth, both pairs of each image
    assert not train_images & val_images
    again, _ = load_preferences("generated", _data(seed=3), {"train": _caption_split(tmp_path, 50)})
    assert again["val"].to_list() == pairs["val"].to_list()


def test_generated_preferences_drop_and_count_missing_images(tmp_path: Path) -> None:
    split = _caption_split(tmp_path, 20)
    (tmp_path / "train" / "3.png").unlink()
    pairs, report = load_preferences(None, _data(), {"train": split})
    assert report.dropped == {"missing image": 2}
    assert report.kept == 38 and sum(len(s) for s in pairs.values()) == 38


def test_unknown_spec_and_stray_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"allowed: generated, jsonl:PATH, hf:NAME\[:CONFIG\]"):
        load_preferences("pairs:x", _data(), {})
    with pytest.raises(ConfigError, match="no argument"):
        load_preferences("generated:x", _data(), {})


# --- load_preferences: given pairs ----------------------------------------------------


def test_jsonl_pairs_with_relative_absolute_and_no_images(tmp_path: Path) -> None:
    img = _png(tmp_path / "pairs" / "imgs" / "a.png", 1)
    other = _png(tmp_path / "elsewhere" / "b.png", 2)
    rows = [
        {"image": "imgs/a.png", "chosen": "a red circle", "rejected": "a blue circle"},
        {"image": str(other), "chosen": _chat("assistant", "a cat"), "rejected": _chat("assistant", "a dog"),
         "prompt": _chat("user", "Describe the image.", image=True)},
        {"image": None, "chosen": "good", "rejected": "bad", "prompt": "Say something."},
        {"chosen": "kept", "rejected": "dropped", "split": "validation"},
        {"image": "imgs/a.png", "chosen": "same ", "rejected": " same"},
        {"image": "imgs/missing.png", "chosen": "x", "rejected": "y"},
        {"image": "imgs/a.png", "chosen": "", "rejected": "y"},
    ]
    path = _write_jsonl(tmp_path / "pairs" / "pairs.jsonl", rows)
    pairs, report = load_preferences(f"jsonl:{path}", _data(), {})
    train = pairs["train"].to_list()
    assert [r["chosen"] for r in train] == ["a red circle", "a cat", "good"]
    assert train[0]["image"] == {"bytes": None, "path": str(img)}
    assert train[1]["image"]["path"] == str(other) and train[1]["prompt"] == "Describe the image."
    assert train[2]["image"] is None and train[2]["prompt"] == "Say something."
    assert {r["corruption"] for r in train} == {"given"}
    assert pairs["val"]["chosen"] == ["kept"]
    assert report.dropped == {"identical": 1, "missing image": 1, "empty": 1}
    assert report.summary() == "preferences: 4 pairs kept, 3 dropped (1 identical, 1 missing image, 1 empty)"


def test_jsonl_folder_splits_by_file_and_carves_val_keeping_images_together(tmp_path: Path) -> None:
    rows = []
    for i in range(30):
        _png(tmp_path / "imgs" / f"{i}.png", i)
        rows += [{"image": f"imgs/{i}.png", "chosen": f"caption {i}", "rejected": f"wrong {i} {k}"} for k in range(2)]
    _write_jsonl(tmp_path / "train.jsonl", rows)
    _write_jsonl(tmp_path / "test.jsonl", rows[:4])
    pairs, _ = load_preferences(f"jsonl:{tmp_path}", _data(), {})
    assert {name: len(s) for name, s in pairs.items()} == {"train": 54, "val": 6, "test": 4}
    paths = {name: {img["path"] for img in s["image"]} for name, s in pairs.items()}
    assert not paths["train"] & paths["val"]


def test_jsonl_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"chosen": "a", "rejected": "b"}\n{not json}\n', encoding="utf-8")
    with pytest.raises(ConfigError, match=r"bad.jsonl:2: not valid JSON"):
        load_preferences(f"jsonl:{bad}", _data(), {})
    split = _write_jsonl(tmp_path / "split.jsonl", [{"chosen": "a", "rejected": "b", "split": "holdout"}])
    with pytest.raises(ConfigError, match=r"split.jsonl:1: unknown split 'holdout'"):
        load_preferences(f"jsonl:{split}", _data(), {})
    with pytest.raises(ConfigError, match="is not a file or folder"):
        load_preferences(f"jsonl:{tmp_path / 'nope.jsonl'}", _data(), {})


def test_a_source_whose_pairs_are_all_bad_is_a_data_error(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"chosen": "same", "rejected": "same"}] * 3)
    with pytest.raises(DataError, match=r"no training pairs \(preferences: 0 pairs kept, 3 dropped \(3 identical\)\)"):
        load_preferences(f"jsonl:{path}", _data(), {})


def test_pair_report_summary_line() -> None:
    report = PairReport(splits={"train": 4500, "val": 500}, dropped=Counter({"identical": 2, "missing image": 1}))
    assert report.kept == 5000
    assert report.summary() == "preferences: 5000 pairs kept, 3 dropped (2 identical, 1 missing image)"


def test_disk_dataset_in_trl_conversational_format(tmp_path: Path) -> None:
    paths = [str(_png(tmp_path / "imgs" / f"{i}.png", i)) for i in range(3)]
    features = datasets.Features({
        "images": datasets.List(datasets.Image()),
        "prompt": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "chosen": [{"role": datasets.Value("string"),
                    "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
        "rejected": [{"role": datasets.Value("string"),
                      "content": [{"type": datasets.Value("string"), "text": datasets.Value("string")}]}],
    })
    rows = {
        "images": [[paths[0]], [paths[1]], [paths[0], paths[2]], []],
        "prompt": [_chat("user", f"What is in image {i}?", image=True) for i in range(4)],
        "chosen": [_chat("assistant", text) for text in ("A red circle.", "Two cats.", "x", "y")],
        "rejected": [_chat("assistant", text) for text in ("A blue circle.", "Three dogs.", "z", "w")],
    }
    train = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict({"train": train, "test": train.select([1])}).save_to_disk(tmp_path / "trl")
    pairs, report = load_preferences(f"disk:{tmp_path / 'trl'}", _data(), {})
    got = pairs["train"].to_list()
    assert [(r["chosen"], r["rejected"]) for r in got] == [("A red circle.", "A blue circle."),
                                                          ("Two cats.", "Three dogs."), ("y", "w")]
    assert got[0]["prompt"] == "What is in image 0?" and got[2]["image"] is None
    assert got[0]["image"]["bytes"] is not None or got[0]["image"]["path"] == paths[0]
    assert pairs["train"].features == PAIR_FEATURES
    assert len(pairs["test"]) == 1 and "val" not in pairs  # too few to carve a tenth
    assert report.dropped == {"multiple images": 1}


def test_disk_dataset_with_plain_strings_and_one_image_column(tmp_path: Path) -> None:
    n = 20
    rows = {
        "image": [str(_png(tmp_path / "imgs" / f"{i}.png", i)) for i in range(n)],
        "prompt": ["Describe."] * n,
        "chosen": [f"good {i}" for i in range(n)],
        "rejected": [f"bad {i}" for i in range(n)],
    }
    datasets.Dataset.from_dict(rows).cast_column("image", datasets.Image()).save_to_disk(tmp_path / "plain")
    pairs, report = load_preferences(f"disk:{tmp_path / 'plain'}", _data(), {})
    assert (len(pairs["train"]), len(pairs["val"])) == (18, 2)
    assert all(r["chosen"].startswith("good") and r["rejected"].startswith("bad") for r in pairs["train"])
    assert report.summary() == "preferences: 20 pairs kept, 0 dropped"


def test_disk_dataset_without_preference_columns_lists_its_columns(tmp_path: Path) -> None:
    datasets.Dataset.from_dict({"text": ["a"]}).save_to_disk(tmp_path / "wrong")
    with pytest.raises(ConfigError, match=r"no chosen or rejected column \(columns: text\)"):
        load_preferences(f"disk:{tmp_path / 'wrong'}", _data(), {})
    with pytest.raises(ConfigError, match="is not a dataset saved with save_to_disk"):
        load_preferences(f"disk:{tmp_path / 'absent'}", _data(), {})


def test_ultrafeedback_raw_layout_picks_the_best_and_worst_completion(tmp_path: Path) -> None:
    def completion(text: str, score) -> dict:
        return {"response": text, "overall_score": score, "model": "m"}

    rows = [
        {"instruction": "Name a colour.", "completions": [completion("red", 7.0), completion("blue", 9.5),
                                                          completion("sky", 2.0), completion("green", 9.5)]},
        {"instruction": "Tie.", "completions": [completion("a", 5.0), completion("b", 5.0)]},
        {"instruction": "Alone.", "completions": [completion("only", 8.0)]},
        {"instruction": "Odd scores.", "completions": [completion("x", None), completion("y", 3.0),
                                                      completion("z", 1.0)]},
    ]
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "uf")
    pairs, report = load_preferences(f"ultrafeedback:{tmp_path / 'uf'}", _data(), {})
    got = pairs["train"].to_list()
    assert [(r["prompt"], r["chosen"], r["rejected"]) for r in got] == [("Name a colour.", "blue", "sky"),
                                                                       ("Odd scores.", "y", "z")]
    assert all(r["image"] is None and r["corruption"] == "given" for r in got)
    assert report.dropped == {"tied scores": 1, "too few responses": 1}


def test_ultrafeedback_binarized_layout(tmp_path: Path) -> None:
    def row(i: int) -> dict:
        return {"prompt": f"Question {i}?", "prompt_id": str(i),
                "chosen": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Good {i}."}],
                "rejected": [{"role": "user", "content": f"Question {i}?"}, {"role": "assistant", "content": f"Bad {i}."}],
                "score_chosen": 8.0, "score_rejected": 3.0}

    binarized = datasets.DatasetDict({
        "train_prefs": datasets.Dataset.from_list([row(i) for i in range(20)]),
        "test_prefs": datasets.Dataset.from_list([row(i) for i in range(20, 23)]),
        "train_sft": datasets.Dataset.from_list([row(99)]),
    })
    binarized.save_to_disk(tmp_path / "ufb")
    pairs, _ = load_preferences(f"ultrafeedback:{tmp_path / 'ufb'}", _data(), {})
    assert {name: len(s) for name, s in pairs.items()} == {"train": 18, "test": 3, "val": 2}
    first = pairs["test"][0]
    assert (first["prompt"], first["chosen"], first["rejected"], first["image"]) == ("Question 20?", "Good 20.",
                                                                                     "Bad 20.", None)


def test_given_pairs_are_limited_by_the_data_sizes(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", [{"chosen": f"c{i}", "rejected": f"r{i}"} for i in range(100)])
    pairs, _ = load_preferences(f"jsonl:{path}", _data(train_size=30, val_size=5, seed=1), {})
    assert (len(pairs["train"]), len(pairs["val"])) == (30, 3)  # val: a tenth of the 35 spared rows
    again, _ = load_preferences(f"jsonl:{path}", _data(train_size=30, val_size=5, seed=1), {})
    assert again["train"]["chosen"] == pairs["train"]["chosen"]


@pytest.mark.parametrize("spec", ["hf:capcli-tests/no-such-preferences", "hf:capcli-tests/nothing:config",
                                  "ultrafeedback"])
def test_an_uncached_hub_dataset_offline_says_how_to_provide_it(spec: str) -> None:
    with pytest.raises(ConfigError) as caught:
        load_preferences(spec, _data(), {})
    message = str(caught.value)
    assert "\n" not in message and "cannot load preference dataset" in message
    assert all(hint in message for hint in ("go online once", "HF_HOME", "disk:PATH", "jsonl:PATH"))
