"""Tests for the procedural "synthetic" dataset: scenes, captions, pixels, files."""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from capcli.data import synthetic as syn
from capcli.data.synthetic import generate, materialise
from capcli.errors import ConfigError
from capcli.scenes import (
    BACKGROUNDS,
    COLOURS,
    NOVEL_COMBOS,
    SHAPE_PLURALS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Scene,
    SceneObject,
    compute_relations,
    describe,
    render,
)

SMALL_SIZES = {"train": 6, "val": 2, "test": 0, "test_novel": 3}


def _scenes(split: str, n: int, seed: int = 0) -> list[tuple[Scene, list[str]]]:
    return [generate(split, i, seed) for i in range(n)]


def _png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _combos(scene: Scene) -> set[tuple[str, str]]:
    return {(o.colour, o.shape) for o in scene.objects}


def _words(caption: str) -> set[str]:
    return set(re.findall(r"[a-z]+", caption))


# --- determinism -------------------------------------------------------------


def test_same_seed_gives_identical_scene_captions_and_pixels() -> None:
    for split in syn.SPLITS:
        for index in range(5):
            scene_a, caps_a = generate(split, index, seed=3)
            scene_b, caps_b = generate(split, index, seed=3)
            assert scene_a.to_dict() == scene_b.to_dict()
            assert caps_a == caps_b
            assert _png_bytes(render(scene_a)) == _png_bytes(render(scene_b))


def test_generation_does_not_depend_on_the_process_hash_seed() -> None:
    # frozenset/dict iteration of strings varies with PYTHONHASHSEED; output must not.
    code = (
        "import json; from capcli.data.synthetic import generate;"
        "print(json.dumps([[generate(s, i, 0)[0].to_dict(), generate(s, i, 0)[1]]"
        " for s in ('train', 'test_novel') for i in range(5)]))"
    )
    outputs = []
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                              text=True, check=True, cwd=Path(__file__).resolve().parents[1])
        outputs.append(done.stdout)
    assert outputs[0] == outputs[1]
    here = [[generate(s, i, 0)[0].to_dict(), generate(s, i, 0)[1]]
            for s in ("train", "test_novel") for i in range(5)]
    assert json.loads(outputs[0]) == here


def test_different_seed_split_or_index_gives_different_scenes() -> None:
    base = [generate("train", i, 0)[0].to_dict() for i in range(20)]
    assert base != [generate("train", i, 1)[0].to_dict() for i in range(20)]
    assert base != [generate("val", i, 0)[0].to_dict() for i in range(20)]
    assert len({json.dumps(d, sort_keys=True) for d in base}) == 20


def test_unknown_split_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        generate("training", 0, 0)


# --- held-out combinations ---------------------------------------------------------


def test_novel_combos_leave_every_colour_and_shape_in_training() -> None:
    assert 4 <= len(NOVEL_COMBOS) <= 8
    assert all(colour in COLOURS and shape in SHAPES for colour, shape in NOVEL_COMBOS)
    assert max(Counter(c for c, _ in NOVEL_COMBOS).values()) == 1
    assert max(Counter(s for _, s in NOVEL_COMBOS).values()) <= 2
    seen = set().union(*(_combos(scene) for scene, _ in _scenes("train", 600)))
    assert {c for c, _ in seen} == set(COLOURS)
    assert {s for _, s in seen} == set(SHAPES)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_regular_splits_never_contain_a_novel_combo(split: str) -> None:
    for scene, _ in _scenes(split, 300):
        assert not _combos(scene) & NOVEL_COMBOS


def test_every_test_novel_scene_has_a_novel_combo() -> None:
    hit = Counter()
    for scene, _ in _scenes("test_novel", 300):
        novel = _combos(scene) & NOVEL_COMBOS
        assert novel
        hit.update(novel)
    assert set(hit) == NOVEL_COMBOS


# --- scene layout ------------------------------------------------------------------


def test_every_pair_of_small_shapes_differs_visibly_at_64_px() -> None:
    # Same colour, place and background: only the outline differs, and a pixel counts only if
    # a channel differs by more than the grain and lighting can (about 15 levels at the
    # centre). v1's small shapes failed this: square and hexagon differed in 24 pixels, circle
    # and hexagon in 40. v2's closest pair, circle and square, differs in 52.
    def pixels(shape: str) -> np.ndarray:
        scene = Scene((SceneObject(shape, "red", "small", 0.5, 0.5),), (), "white")
        return np.asarray(render(scene, 64), dtype=np.int16)

    drawn = {shape: pixels(shape) for shape in SHAPES}
    for a, b in itertools.combinations(SHAPES, 2):
        differing = int((np.abs(drawn[a] - drawn[b]).max(axis=-1) > 40).sum())
        assert differing >= 45, (a, b, differing)


def test_objects_lie_inside_the_image_and_do_not_overlap() -> None:
    assert SIZE_RADIUS["small"] * 2 * 64 >= 9  # still visible at 64 px
    assert 1.7 <= SIZE_RADIUS["large"] / SIZE_RADIUS["small"] <= 2.3
    for scene, _ in _scenes("train", 400) + _scenes("test_novel", 100):
        boxes = [(o.x, o.y, SIZE_RADIUS[o.size]) for o in scene.objects]
        for x, y, r in boxes:
            assert r <= x <= 1 - r and r <= y <= 1 - r
        for i, (xa, ya, ra) in enumerate(boxes):
            for xb, yb, rb in boxes[i + 1:]:
                assert abs(xa - xb) >= ra + rb or abs(ya - yb) >= ra + rb


def test_object_counts_twins_and_backgrounds_are_spread() -> None:
    scenes = [scene for scene, _ in _scenes("train", 900)]
    counts = Counter(len(s.objects) for s in scenes)
    assert set(counts) == {1, 2, 3}
    assert all(0.25 < counts[n] / len(scenes) < 0.42 for n in (1, 2, 3))
    multi = [s for s in scenes if len(s.objects) > 1]
    twins = [s for s in multi if len({(o.shape, o.colour, o.size) for o in s.objects})
             < len(s.objects)]
    assert 0.12 < len(twins) / len(multi) < 0.32
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert not set(BACKGROUNDS) & set(COLOURS)


def test_relations_follow_geometry() -> None:
    red = SceneObject("circle", "red", "small", 0.2, 0.5)
    blue = SceneObject("square", "blue", "large", 0.75, 0.55)
    assert {(r.subject, r.relation, r.object) for r in compute_relations((red, blue))} == {
        (0, "left of", 1), (1, "right of", 0)}
    top = SceneObject("star", "green", "small", 0.5, 0.15)
    assert {(r.subject, r.relation, r.object) for r in compute_relations((top, blue))} == {
        (0, "above", 1), (1, "below", 0)}
    diagonal = SceneObject("star", "green", "small", 0.2, 0.2)
    far = SceneObject("star", "green", "small", 0.7, 0.7)
    assert compute_relations((diagonal, far)) == ()


def test_scene_dict_round_trips_through_json_with_a_fixed_schema() -> None:
    for scene, _ in _scenes("train", 50):
        data = json.loads(json.dumps(scene.to_dict()))
        assert list(data) == ["background", "objects", "relations"]
        assert all(list(o) == ["shape", "colour", "size", "x", "y"] for o in data["objects"])
        assert all(list(r) == ["subject", "relation", "object"] for r in data["relations"])
        assert Scene.from_dict(data) == scene


# --- captions ------------------------------------------------------------------


ALL_SHAPE_WORDS = set(SHAPES) | set(SHAPE_PLURALS.values())
SINGULAR = {plural: shape for shape, plural in SHAPE_PLURALS.items()}


def test_captions_are_five_distinct_short_lowercase_strings() -> None:
    for scene, captions in _scenes("train", 300) + _scenes("test_novel", 100):
        assert len(captions) == 5 and len(set(captions)) == 5
        for caption in captions:
            assert caption == caption.lower() and caption == caption.strip()
            assert not caption.endswith(".")
            assert len(caption.split()) <= 20


def test_captions_name_every_object_and_nothing_absent() -> None:
    for scene, captions in _scenes("train", 300) + _scenes("test_novel", 100):
        colours = {o.colour for o in scene.objects}
        shapes = {o.shape for o in scene.objects}
        sizes = {o.size for o in scene.objects}
        for caption in captions:
            words = _words(caption)
            for o in scene.objects:
                assert o.colour in words, caption
                assert {o.shape, SHAPE_PLURALS[o.shape]} & words, caption
                # The colour word must directly qualify that object's shape.
                assert re.search(rf"\b{o.colour} {o.shape}", caption), caption
            assert words & set(COLOURS) == colours, caption
            assert {SINGULAR.get(w, w) for w in words & ALL_SHAPE_WORDS} == shapes, caption
            assert words & set(SIZES) <= sizes, caption
            if "background" in words:
                assert f"{scene.background} background" in caption


def test_count_phrases_match_the_scene() -> None:
    number = {"two": 2, "three": 3}
    checked = 0
    for scene, captions in _scenes("train", 400):
        for caption in captions:
            pattern = r"\b(two|three) (?:(small|large) )?(\w+) (\w+)\b"
            for count, size, colour, plural in re.findall(pattern, caption):
                if colour not in COLOURS:
                    continue
                shape = SINGULAR[plural]
                same = [o for o in scene.objects if o.colour == colour and o.shape == shape
                        and (not size or o.size == size)]
                assert len(same) == number[count], caption
                checked += 1
            total = re.match(r"^(two|three) (objects|shapes):", caption)
            if total:
                assert number[total.group(1)] == len(scene.objects)
    assert checked > 20  # twins really produce count phrases


def test_objects_that_a_caption_cannot_tell_apart_are_counted_not_repeated() -> None:
    noun = r"\b(?:a|an|two|three) (?:(?:small|large) )?[a-z]+ [a-z]+"
    checked = 0
    for scene, captions in _scenes("train", 600):
        if len({(o.colour, o.shape) for o in scene.objects}) == len(scene.objects):
            continue
        for caption in captions:
            phrases = [p for p in re.findall(noun, caption) if not p.endswith(" background")]
            assert len(phrases) == len(set(phrases)), caption  # no "a red circle and a red circle"
            checked += 1
    assert checked > 100


def test_size_words_in_captions_are_true() -> None:
    for scene, captions in _scenes("train", 300):
        for caption in captions:
            for size, colour, noun in re.findall(r"\b(small|large) (\w+) (\w+)\b", caption):
                shape = SINGULAR.get(noun, noun)
                assert any(o.size == size and o.colour == colour and o.shape == shape
                           for o in scene.objects), caption


def test_relation_captions_are_geometrically_true() -> None:
    words_to_relation = {"left": "left of", "right": "right of", "above": "above",
                         "over": "above", "below": "below", "under": "below",
                         "beneath": "below"}
    checked = 0
    for scene, captions in _scenes("train", 500):
        kinds = {(o.colour, o.shape) for o in scene.objects}
        if len(scene.objects) != 2 or len(kinds) != 2:
            continue  # the two objects must be identifiable by colour and shape
        for caption in captions:
            match = re.search(r"\b(left|right|above|over|below|under|beneath)\b", caption)
            if not match or "background" in caption:
                continue
            head, tail = caption[:match.start()], caption[match.end():]
            subject = next(o for o in scene.objects if f"{o.colour} {o.shape}" in head)
            other = next(o for o in scene.objects if f"{o.colour} {o.shape}" in tail)
            dx, dy = other.x - subject.x, other.y - subject.y
            relation = words_to_relation[match.group(1)]
            if relation in ("left of", "right of"):
                assert abs(dx) > abs(dy) and (dx > 0) == (relation == "left of"), caption
            else:
                assert abs(dy) > abs(dx) and (dy > 0) == (relation == "above"), caption
            checked += 1
    assert checked > 50


def test_a_relation_caption_is_used_when_a_relation_exists() -> None:
    red = SceneObject("circle", "red", "small", 0.2, 0.5)
    blue = SceneObject("square", "blue", "large", 0.75, 0.5)
    scene = Scene((red, blue), compute_relations((red, blue)), "white")
    captions = describe(scene, random.Random(0))
    assert any(re.search(r"red circle .*left of .*blue square", c)
               or re.search(r"blue square .*right of .*red circle", c) for c in captions)


def test_group_relations_are_claimed_only_when_every_member_satisfies_them() -> None:
    square = SceneObject("square", "blue", "large", 0.75, 0.5)
    # Both circles are left of the square: the group relation is true.
    both = (SceneObject("circle", "red", "small", 0.15, 0.3),
            SceneObject("circle", "red", "small", 0.15, 0.7), square)
    # Only the lower circle is left of the square; the upper one is diagonal to it.
    one = (SceneObject("circle", "red", "small", 0.3, 0.15),
           SceneObject("circle", "red", "small", 0.2, 0.5), square)
    claim = re.compile(r"two (small )?red circles .*left of")
    assert "left of" not in {r.relation for r in compute_relations(one) if r.subject == 0}
    for scene_objects, expected in ((both, True), (one, False)):
        scene = Scene(scene_objects, compute_relations(scene_objects), "white")
        captions = [c for seed in range(40) for c in describe(scene, random.Random(seed))]
        assert any(claim.search(c) for c in captions) == expected


# --- rendering -------------------------------------------------------------------


def _close(a: tuple[int, ...], b: tuple[int, ...], tolerance: int = 40) -> bool:
    return sum((x - y) ** 2 for x, y in zip(a, b)) ** 0.5 < tolerance


@pytest.mark.parametrize("image_size", [64, 32, 96])
def test_render_returns_rgb_image_of_requested_size(image_size: int) -> None:
    image = render(generate("train", 1, 0)[0], image_size=image_size)
    assert image.mode == "RGB" and image.size == (image_size, image_size)


def test_each_colour_and_shape_is_drawn_at_its_centre() -> None:
    for colour in COLOURS:
        for shape in SHAPES:
            for size in SIZES:
                obj = SceneObject(shape, colour, size, 0.5, 0.5)
                image = render(Scene((obj,), (), "light gray"))
                assert _close(image.getpixel((32, 32)), COLOURS[colour]), (colour, shape, size)
                assert _close(image.getpixel((2, 2)), BACKGROUNDS["light gray"], 25)


def test_generated_objects_show_their_colour_near_their_centre() -> None:
    for scene, _ in _scenes("train", 60):
        image = render(scene)
        for o in scene.objects:
            centre = (min(63, int(o.x * 64)), min(63, int(o.y * 64)))
            assert _close(image.getpixel(centre), COLOURS[o.colour]), (scene, o)


def test_shapes_differ_in_pixels() -> None:
    pictures = {shape: render(Scene((SceneObject(shape, "red", "large", 0.5, 0.5),), (),
                                    "white")).tobytes() for shape in SHAPES}
    assert len(set(pictures.values())) == len(SHAPES)


# --- materialise -------------------------------------------------------------------


def _rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_materialise_writes_imagefolder_layout(tmp_path: Path) -> None:
    out = materialise(tmp_path, SMALL_SIZES, seed=5, image_size=32)
    assert out.parent == tmp_path
    assert re.fullmatch(r"synthetic-v2-s5-32px-[0-9a-f]{8}", out.name)
    assert json.loads((out / ".complete").read_text())["sizes"] == SMALL_SIZES
    for split, n in SMALL_SIZES.items():
        rows = _rows(out / split / "metadata.jsonl")
        assert len(rows) == n
        assert sorted(p.name for p in (out / split).glob("*.png")) == [
            f"{i:06d}.png" for i in range(n)]
        for index, row in enumerate(rows):
            scene, captions = generate(split, index, 5)
            assert row == {"file_name": f"{index:06d}.png", "captions": captions,
                           "scene": scene.to_dict()}
            with Image.open(out / split / row["file_name"]) as image:
                assert image.size == (32, 32) and image.mode == "RGB"
                assert image.tobytes() == render(scene, 32).tobytes()
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temp dirs left


def test_materialise_is_idempotent_and_keyed_by_arguments(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    out = materialise(tmp_path, SMALL_SIZES)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    def fail(*args: object, **kwargs: object) -> Image.Image:
        raise AssertionError("render must not run again")

    monkeypatch.setattr(syn, "render", fail)
    assert materialise(tmp_path, dict(SMALL_SIZES)) == out
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes
    monkeypatch.undo()
    # A missing split means size 0, so it names the same dataset.
    assert materialise(tmp_path, {k: v for k, v in SMALL_SIZES.items() if v}) == out
    assert materialise(tmp_path, {**SMALL_SIZES, "val": 1}) != out
    assert materialise(tmp_path, SMALL_SIZES, seed=1) != out


def test_failure_midway_leaves_nothing_that_looks_complete(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    real_render, calls = syn.render, []

    def flaky(scene: Scene, image_size: int = 64) -> Image.Image:
        calls.append(scene)
        if len(calls) == 5:
            raise KeyboardInterrupt  # like Ctrl-C in the middle of a split
        return real_render(scene, image_size)

    monkeypatch.setattr(syn, "render", flaky)
    with pytest.raises(KeyboardInterrupt):
        materialise(tmp_path, SMALL_SIZES)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    out = materialise(tmp_path, SMALL_SIZES)
    assert (out / ".complete").is_file()
    assert len(_rows(out / "train" / "metadata.jsonl")) == SMALL_SIZES["train"]


def test_losing_a_race_uses_the_winners_directory(tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    out = materialise(tmp_path, SMALL_SIZES)
    marker = (out / ".complete").stat().st_mtime_ns
    checks = []

    def stale_first_check(path: Path) -> bool:
        # Pretend the winner finished only after this process looked.
        checks.append(path)
        return len(checks) > 1 and (path / ".complete").is_file()

    monkeypatch.setattr(syn, "_is_complete", stale_first_check)
    assert materialise(tmp_path, SMALL_SIZES) == out
    assert (out / ".complete").stat().st_mtime_ns == marker
    assert [p.name for p in tmp_path.iterdir()] == [out.name]


def test_incomplete_directory_is_rebuilt(tmp_path: Path) -> None:
    out = materialise(tmp_path, SMALL_SIZES)
    (out / ".complete").unlink()
    (out / "train" / "metadata.jsonl").write_text("")
    (out / "junk.txt").write_text("left over")
    assert materialise(tmp_path, SMALL_SIZES) == out
    assert (out / ".complete").is_file() and not (out / "junk.txt").exists()
    assert len(_rows(out / "train" / "metadata.jsonl")) == SMALL_SIZES["train"]


@pytest.mark.parametrize("sizes", [{"training": 3}, {"train": -1}])
def test_materialise_rejects_bad_sizes(tmp_path: Path, sizes: dict[str, int]) -> None:
    with pytest.raises(ConfigError):
        materialise(tmp_path, sizes)
