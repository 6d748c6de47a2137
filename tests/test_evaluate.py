"""``capcli evaluate``: the results document, its intervals, and its errors.

The metric functions themselves are pinned in test_metrics.py and test_grounding.py; here
the pipeline is checked end to end on a briefly trained tiny model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from capcli.cli import app
from capcli.evaluate.evaluation import _shuffled

runner = CliRunner()

CAPTION_METRICS = {"bleu_1", "bleu_2", "bleu_3", "bleu_4", "rouge_l", "cider_d"}
OTHER_METRICS = {"clip_score_self", "ref_clip_score_self", "win_rate", "preference_accuracy"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_cache) -> Path:
    from conftest import make_settings

    from capcli.phases import pretrain

    settings = make_settings(tmp_path_factory.mktemp("evaluate") / "pretrain", data_cache,
                             **{"pretrain.engine.max_steps": 8})
    return pretrain(settings).best_checkpoint


@pytest.fixture(scope="module")
def env(data_cache) -> dict[str, str]:
    return {"CAPCLI_DATA__CACHE_DIR": str(data_cache), "CAPCLI_RUNTIME__DEVICE": "cpu",
            "CAPCLI_DATA__TRAIN_SIZE": "64", "CAPCLI_DATA__VAL_SIZE": "16", "CAPCLI_DATA__TEST_SIZE": "16"}


def run_evaluate(tmp_path: Path, checkpoint: Path, env: dict, *extra: str):
    out = tmp_path / "results" / "evaluation_metrics.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--beams", "2", "--limit", "12",
                                 "--output", str(out), "--quiet", "--json", *extra], env=env)
    return result, out


def test_results_document_has_every_metric_with_an_interval(tmp_path, checkpoint, env):
    result, out = run_evaluate(tmp_path, checkpoint, env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc == json.loads(out.read_text(encoding="utf-8"))  # --json prints what the file holds
    assert doc["n"] == 12 and doc["split"] == "test" and doc["checkpoint"] == str(checkpoint)
    assert doc["decoding"]["beams"] == 2
    assert doc["tokenizer"] in ("ptb", "python")
    assert doc["judge"].startswith("self:")
    assert doc["baseline"].startswith("shuffled captions")
    assert {"capcli", "torch", "transformers", "pycocoevalcap"} <= set(doc["versions"])
    metrics = doc["metrics"]
    assert CAPTION_METRICS | OTHER_METRICS <= set(metrics)
    assert any(name.startswith("grounding_") for name in metrics)  # synthetic has scene graphs
    for name, m in metrics.items():
        if m["value"] is None:
            continue
        assert m["low"] - 1e-9 <= m["value"] <= m["high"] + 1e-9 or name.startswith("meteor"), (name, m)
        assert math.isfinite(m["low"]) and math.isfinite(m["high"])
    assert 0.0 <= metrics["win_rate"]["value"] <= 1.0
    assert 0.0 <= metrics["clip_score_self"]["value"] <= 2.5


def distinct_captions(model, pixels, options) -> list[str]:
    """A caption of its own for each image: the briefly trained model writes one caption for all,
    which would make every CLIP score tie with the shuffled baseline's and the win rate 0.5."""
    words = [(colour, shape) for shape in ("circle", "square", "star") for colour in ("red", "blue", "green", "yellow")]
    return [f"a {colour} {shape} on a white background" for colour, shape in words[: len(pixels)]]


def test_test_novel_split_and_saved_captions(tmp_path, checkpoint, env, monkeypatch):
    monkeypatch.setattr("capcli.evaluate.evaluation._decode", distinct_captions)
    saved = tmp_path / "captions.jsonl"
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--split", "test_novel", "--save-captions", str(saved))
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["split"] == "test_novel"
    lines = [json.loads(line) for line in saved.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 12
    assert {"image", "caption", "references", "clip_score_self", "cider_d", "grounding_errors"} <= set(lines[0])
    assert len(lines[0]["references"]) == 5
    # The caption length stands beside the grounding rates: mean words of the captions, and of their references.
    metrics = json.loads(result.stdout)["metrics"]
    assert metrics["caption_length"]["value"] == pytest.approx(sum(len(r["caption"].split()) for r in lines) / 12)
    per_image = [sum(len(c.split()) for c in r["references"]) / len(r["references"]) for r in lines]
    assert metrics["reference_length"]["value"] == pytest.approx(sum(per_image) / 12)
    assert "grounding_relations_stated" in metrics
    kinds = [name for name in metrics if name.startswith("preference_accuracy_")]
    assert kinds and all(0.0 <= metrics[name]["value"] <= 1.0 for name in kinds)
    assert_the_saved_captions_give_the_metrics(json.loads(result.stdout), lines, checkpoint, env)


def assert_the_saved_captions_give_the_metrics(doc: dict, lines: list[dict], checkpoint: Path, env: dict) -> None:
    """What ``--save-captions`` wrote is what was scored: each line's image is the split's row with
    its references, its CLIP score is that image's with that caption, and the caption metrics and
    the win rate against shuffled captions come back from the file alone."""
    import torch

    from capcli.data.sources import load_splits
    from capcli.evaluate.judge import load_judge
    from capcli.metrics import caption_metrics, clip_score
    from capcli.model import Captioner
    from capcli.settings import load_settings

    data = load_settings(environ=env).data
    rows = load_splits(data)[doc["split"]].select(range(len(lines)))
    assert [line["image"] for line in lines] == [row["image"]["path"] for row in rows]
    assert [line["references"] for line in lines] == [list(row["captions"]) for row in rows]

    captions = [line["caption"] for line in lines]
    references = [line["references"] for line in lines]
    scores = caption_metrics(dict(enumerate(captions)), dict(enumerate(references)), tokenizer=doc["tokenizer"])
    for name in CAPTION_METRICS:
        assert doc["metrics"][name]["value"] == pytest.approx(scores.corpus[name], rel=1e-12), name
    assert [line["cider_d"] for line in lines] == pytest.approx(scores.per_image["cider_d"], rel=1e-12)

    model = Captioner.from_pretrained(checkpoint).eval()
    judge = load_judge("self", model, checkpoint, torch.device("cpu"), data.max_pixels, data.max_caption_tokens)
    with torch.no_grad():
        images = judge.embed_images([line["image"] for line in lines])
        ours = clip_score(images, judge.embed_texts(captions)).tolist()
        # The baseline: each image given another image's caption (a seeded derangement).
        theirs = clip_score(images, judge.embed_texts(_shuffled(captions, doc["bootstrap"]["seed"]))).tolist()
    assert [line["clip_score_self"] for line in lines] == pytest.approx(ours, abs=1e-5)
    assert doc["metrics"]["clip_score_self"]["value"] == pytest.approx(sum(ours) / len(ours), abs=1e-5)
    wins = [1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(ours, theirs, strict=True)]
    assert wins.count(0.5) < len(wins), "every caption ties with its baseline: the win rate says nothing"
    assert doc["metrics"]["win_rate"]["value"] == pytest.approx(sum(wins) / len(wins))


def test_baseline_checkpoint_is_named_and_itself_ties(tmp_path, checkpoint, env):
    """Against itself every caption ties, and ties count half: the win rate is exactly 0.5."""
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--baseline", str(checkpoint))
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["baseline"] == f"checkpoint:{checkpoint}"
    assert doc["metrics"]["win_rate"]["value"] == pytest.approx(0.5)


def test_table_output_names_metrics_and_intervals(tmp_path, checkpoint, env):
    out = tmp_path / "r.json"
    result = runner.invoke(app, ["evaluate", "--checkpoint", str(checkpoint), "--beams", "1", "--limit", "6",
                                 "--output", str(out)], env=env)
    assert result.exit_code == 0, result.output
    assert "cider_d" in result.stdout and "95% interval" in result.stdout
    assert out.is_file()


def test_unknown_split_and_missing_checkpoint_exit_2(tmp_path, checkpoint, env, monkeypatch):
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--split", "nope")
    assert result.exit_code == 2 and "no 'nope' split" in result.stderr
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["evaluate"], env=env)
    assert result.exit_code == 2 and "no checkpoint given" in result.stderr


def test_shuffled_baseline_never_gives_an_image_its_own_caption():
    captions = [f"caption {i}" for i in range(50)]
    shuffled = _shuffled(captions, seed=3)
    assert sorted(shuffled) == sorted(captions)
    assert all(a != b for a, b in zip(captions, shuffled))
    assert shuffled == _shuffled(captions, seed=3) != _shuffled(captions, seed=4)


@pytest.mark.slow
def test_open_clip_judge_from_a_local_weights_file(tmp_path, checkpoint, env):
    """A full-size ViT-B-32 with random weights, saved as a file, judges through the same path
    as the pretrained one: the scores are named clip_score (not _self) and the judge is named."""
    import open_clip
    import torch

    weights = tmp_path / "vit-b-32.pt"
    torch.save(open_clip.create_model("ViT-B-32").state_dict(), weights)
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--judge", str(weights), "--limit", "4")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["judge"] == f"open_clip:ViT-B-32:{weights}"
    assert {"clip_score", "ref_clip_score", "win_rate"} <= set(doc["metrics"])
    assert "clip_score_self" not in doc["metrics"]


def test_auto_judge_without_cached_weights_is_self_and_unknown_judge_exits_2(tmp_path, checkpoint, env,
                                                                           monkeypatch):
    import capcli.evaluate.judge

    monkeypatch.setattr(capcli.evaluate.judge, "cached_judge_weights", lambda: None)
    from capcli.evaluate.judge import SelfJudge, load_judge
    from capcli.model import Captioner

    judge = load_judge("auto", Captioner.from_pretrained(checkpoint), checkpoint, torch_device(), 10**8, 48)
    assert isinstance(judge, SelfJudge) and judge.name == f"self:{checkpoint}"
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--judge", "nonsense")
    assert result.exit_code == 2 and "unknown judge 'nonsense'" in result.stderr


def torch_device():
    import torch

    return torch.device("cpu")


# --- the HTML gallery (--report) ---------------------------------------------------------------------------------


def _browser() -> str | None:
    import shutil

    for name in ("/usr/lib/chromium/chromium", "chromium", "chromium-browser", "google-chrome", "chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def test_report_writes_one_self_contained_page_with_a_row_per_image(tmp_path, checkpoint, env):
    report = tmp_path / "gallery"
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--report", str(report), "--baseline", str(checkpoint))
    assert result.exit_code == 0, result.output
    page = (report / "index.html").read_text(encoding="utf-8")
    body = page.split("<tbody>", 1)[1].split("</tbody>", 1)[0]
    assert body.count("<tr>") == 12  # --limit 12
    assert body.count('src="data:image/png;base64,') == 12  # images embedded: nothing to fetch
    assert "http://" not in page and "https://" not in page
    for header in ("caption", "baseline caption", "references", "CIDEr-D", "CLIP score", "errors"):
        assert f"<th>{header}</th>" in page
    assert 'class="errors"' in page  # a tiny model after 8 steps gets some facts of its scenes wrong


def test_the_gallery_loads_in_headless_chromium(tmp_path, checkpoint, env):
    """The page's own script counts its rows and records any error; the DOM after it ran says both."""
    import re
    import subprocess

    browser = _browser()
    if browser is None:
        pytest.skip("no chromium on this machine (.ci/run installs it from Debian where it can)")
    report = tmp_path / "gallery"
    result, _ = run_evaluate(tmp_path, checkpoint, env, "--report", str(report))
    assert result.exit_code == 0, result.output
    url = (report / "index.html").resolve().as_uri()
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", f"--user-data-dir={tmp_path / 'profile'}"]
    dom = subprocess.run([browser, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    body = re.search(r"<body([^>]*)>", dom.stdout)
    assert body is not None and 'data-rows="12"' in body.group(1)
    assert "data-errors" not in body.group(1), body.group(1)
    rows = dom.stdout.split("<tbody>", 1)[1].split("</tbody>", 1)[0].split("<tr>")[1:]
    cider = [float(re.findall(r'<td class="num" data-value="([^"]*)"', row)[1]) for row in rows]
    assert cider == sorted(cider)  # the page sorted itself by CIDEr-D, worst first
    shot = tmp_path / "gallery.png"
    subprocess.run([browser, *flags, f"--screenshot={shot}", "--window-size=1280,1600", url],
                   capture_output=True, timeout=120, check=True)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
