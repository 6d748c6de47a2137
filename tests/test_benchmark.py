"""``capcli benchmark``: every figure present with its baseline ratio, computed from what was timed.

Speed itself is never asserted here (this machine is shared and noisy): the tests check that
each figure is measured on the work it names, that ratios are ratios of the timed sides, and
that the FLOPs behind MFU are the formula's for the batches the engine really ran.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from capcli.bench import measure
from capcli.bench.benchmark import SECTIONS
from capcli.bench.flops import pretrain_step_flops
from capcli.bench.measure import (
    MatmulShapes,
    Report,
    matmul_flops,
    matmul_peak,
    percentile,
    shapes_peak,
)
from capcli.bench.training import Counted, timed_fit
from capcli.cli import app
from capcli.phases import prepare_pretrain

runner = CliRunner()

SMALL = {
    "CAPCLI_BENCHMARK__IMAGES": "8", "CAPCLI_BENCHMARK__CAPTION_BATCH": "4",
    "CAPCLI_BENCHMARK__METRIC_CAPTIONS": "12", "CAPCLI_BENCHMARK__MATMUL_SIZE": "256",
    "CAPCLI_ALIGN__ENGINE__GRAD_ACCUM": "1", "CAPCLI_RUNTIME__DEVICE": "cpu",
}
FIGURES = {
    "data": ["data_samples_per_s", "data_uncached_samples_per_s", "data_cache_speedup"],
    "pretrain": ["pretrain_samples_per_s", "pretrain_tokens_per_s", "pretrain_eager_samples_per_s",
                 "pretrain_speedup", "peak_flops", "pretrain_model_flops_per_s", "mfu", "model_shapes_peak_flops",
                 "mfu_at_model_shapes", "pretrain_peak_memory_mb"],
    "align": ["align_samples_per_s", "align_tokens_per_s", "align_live_samples_per_s", "align_cache_speedup",
              "align_mfu", "align_cache_build_s", "align_peak_memory_mb"],
    "caption": [f"caption_beam{b}_{f}" for b in (1, 5) for f in
                ("images_per_s", "naive_images_per_s", "speedup", "p50_ms", "p95_ms", "agreement",
                 "peak_memory_mb")],
    "onnx": ["caption_onnx_images_per_s", "caption_onnx_torch_images_per_s", "caption_onnx_speedup",
             "caption_onnx_agreement"],
    "policy": ["policy_pairs_per_s", "policy_captions_per_s", "policy_judge_share"],
    "metrics": ["metrics_s", "metrics_captions_per_s"],
}


# Figures measured once, not once per repeat: memory peaks, latency percentiles over every timing, agreements.
ONCE = ("_peak_memory_mb", "_p50_ms", "_p95_ms", "_agreement")


@pytest.fixture
def measured(monkeypatch) -> dict[str, list[float]]:
    """Each figure's repeat values, as the benchmark hands them to its report."""
    values: dict[str, list[float]] = {}
    add = Report.add

    def recording(self, key, repeats):
        values[key] = list(repeats)
        add(self, key, repeats)

    monkeypatch.setattr(Report, "add", recording)
    return values


def assert_figures_are_their_repeats(document: dict, measured: dict[str, list[float]], repeats: int) -> None:
    """Each figure the median of its repeats and its range their min and max, exactly; one value per repeat."""
    for key, values in measured.items():
        assert len(values) == (1 if key.endswith(ONCE) else repeats), (key, values)
        assert document[key] == statistics.median(values), key
        assert document["range"][key] == [min(values), max(values)], key


@pytest.mark.slow(seconds=65)
def test_benchmark_json_reports_every_figure_with_its_baseline(tmp_path: Path, measured) -> None:
    out = tmp_path / "bench" / "results.json"
    result = runner.invoke(app, ["benchmark", "--json", "--quiet", "--repeats", "2", "--steps", "2",
                                 "--batch-size", "8", "--out", str(out)], env=SMALL)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert json.loads(out.read_text()) == document
    expected = [key for section in SECTIONS for key in FIGURES[section]]
    assert [k for k in document if k not in ("range", "context")] == expected
    assert set(measured) == set(expected)
    assert_figures_are_their_repeats(document, measured, repeats=2)
    for key in expected:
        # Random weights write no caption the judge can rank (all equally wrong), so pairs may be 0.
        assert document[key] > 0 or key == "policy_pairs_per_s", key
    assert 0 < document["policy_judge_share"] < 1
    # Each ratio is of the two sides timed in the same repeat of this run.
    ratios = {"mfu": ("pretrain_model_flops_per_s", "peak_flops"),
              "mfu_at_model_shapes": ("pretrain_model_flops_per_s", "model_shapes_peak_flops"),
              "pretrain_speedup": ("pretrain_samples_per_s", "pretrain_eager_samples_per_s"),
              **{f"caption_beam{b}_speedup": (f"caption_beam{b}_images_per_s", f"caption_beam{b}_naive_images_per_s")
                 for b in (1, 5)}}
    for ratio, (top, bottom) in ratios.items():
        assert measured[ratio] == pytest.approx([t / b for t, b in zip(measured[top], measured[bottom])]), ratio
    assert document["context"]["policy_images"] == 8 and document["context"]["policy_candidates"] == 8
    assert document["caption_beam1_agreement"] == document["caption_beam5_agreement"] == 1.0
    assert document["caption_beam5_p50_ms"] <= document["caption_beam5_p95_ms"]
    context = document["context"]
    assert context["device"] == "cpu" and context["preset"] == "tiny" and context["weights"] == "random"
    assert context["pretrain_batch"] == 8 and context["align_batch"] == 8 and context["repeats"] == 2
    assert context["matmul_size"] == 256 and context["metrics_captions"] == 12
    assert 0.5 < context["model_shapes_flops_share"] < 1  # the rest: attention in SDPA, the convolutions


@pytest.mark.slow
def test_the_caption_command_on_a_folder_of_jpegs_is_timed_read_ahead_and_not(measured) -> None:
    env = {"CAPCLI_BENCHMARK__CAPTION_FILES": "12", "CAPCLI_RUNTIME__DEVICE": "cpu",
           "CAPCLI_CAPTION__BATCH_SIZE": "4", "CAPCLI_CAPTION__DECODE__MAX_LENGTH": "4"}
    result = runner.invoke(app, ["benchmark", "--json", "--quiet", "--repeats", "2", "--sections", "caption_files"],
                           env=env)
    assert result.exit_code == 0, result.output
    document = json.loads(result.stdout)
    assert [k for k in document if k not in ("range", "context")] == [
        "caption_files_images_per_s", "caption_files_serial_images_per_s", "caption_files_overlap_speedup",
        "caption_files_read_images_per_s"]
    assert_figures_are_their_repeats(document, measured, repeats=2)
    assert measured["caption_files_overlap_speedup"] == pytest.approx(
        [f / s for f, s in zip(measured["caption_files_images_per_s"], measured["caption_files_serial_images_per_s"])])
    context = document["context"]
    assert context["caption_files"] == 12 and context["caption_files_size"] == [1024, 768]
    assert context["caption_files_workers"] >= 1 and context["caption_files_batch"] == 4


def test_onnxruntime_is_timed_beside_pytorch_on_the_same_captions() -> None:
    pytest.importorskip("onnxruntime")
    result = runner.invoke(app, ["benchmark", "--json", "--quiet", "--repeats", "1", "--steps", "2",
                                 "--batch-size", "8", "--sections", "onnx"], env=SMALL)
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) - {"range", "context"} == set(FIGURES["onnx"])
    assert d["caption_onnx_agreement"] == 1.0  # the same greedy captions, so the same work
    assert d["caption_onnx_speedup"] == pytest.approx(d["caption_onnx_images_per_s"] / d["caption_onnx_torch_images_per_s"])
    assert d["context"]["onnx"].startswith("onnxruntime on the CPU")


def test_an_unknown_section_is_a_usage_error_naming_the_allowed_ones() -> None:
    result = runner.invoke(app, ["benchmark", "--sections", "pretrain,speed"], env=SMALL)
    assert result.exit_code == 2
    assert result.stdout == ""
    assert "speed" in result.stderr and f"allowed: {', '.join(SECTIONS)}" in result.stderr
    assert "onnx" in SECTIONS


def test_timed_steps_count_the_formula_flops_of_the_batches_the_engine_ran(settings_factory) -> None:
    settings = settings_factory(**{"pretrain.engine.max_steps": 4, "pretrain.engine.batch_size": 8})
    phase = prepare_pretrain(settings)
    seen: list[tuple[int, int]] = []

    def flops_of(batch) -> int:
        seen.append((len(batch), batch.caption_ids.shape[1]))
        return pretrain_step_flops(phase.model, len(batch), batch.caption_ids.shape[1])

    counted = Counted(phase.objective, flops_of, lambda batch: int(batch.caption_mask.sum()))
    steps = timed_fit(phase.model, counted, replace(phase.data, val=None), settings, phase.runtime, "pretrain",
                      settings.pretrain.engine.output)
    assert len(seen) == 4  # validation would add calls; there is none, and each step is one micro-batch
    assert steps.samples == 3 * 8  # steps 2 to 4
    assert steps.flops == sum(pretrain_step_flops(phase.model, b, t) for b, t in seen[1:])
    assert steps.tokens == sum(counted.tokens[1:]) and steps.seconds > 0


def test_peak_memory_sees_a_large_allocation() -> None:
    """In a fresh process: a long-lived one (a test worker) may hand the block memory that it freed
    earlier but kept resident, and then its resident set does not grow."""
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("the resettable peak RSS needs Linux")
    script = ("import json, torch\n"
              "from capcli.bench.measure import peak_memory\n"
              "with peak_memory(torch.device('cpu')) as idle:\n"
              "    pass\n"
              "with peak_memory(torch.device('cpu')) as busy:\n"
              "    block = torch.ones(64 * 2**20)  # 256 MiB, touched\n"
              "    del block\n"
              "print(json.dumps([idle['mb'], busy['mb']]))\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    idle, busy = json.loads(done.stdout)
    assert busy >= idle + 200


def test_percentiles_match_numpy() -> None:
    values = sorted(np.random.default_rng(0).random(13).tolist())
    for q in (0.0, 0.5, 0.95, 1.0):
        assert percentile(values, q) == pytest.approx(np.percentile(values, 100 * q))


def test_matmul_peak_is_the_formula_flops_over_the_median_time(monkeypatch) -> None:
    """A 128² × 128² matmul is 2·m·n·k = 2·128³ FLOPs, as torch's own counter says for each of the
    warm-up and the 3 timed ones; with the clock made to take 0.5, 0.25 and 1.0 s, the median is
    0.5 s and the peak exactly 2·128³ / 0.5."""
    from torch.utils.flop_counter import FlopCounterMode

    ticks = iter([10.0, 10.5, 20.0, 20.25, 30.0, 31.0])  # (start, end) of each timed matmul
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(ticks)))
    with FlopCounterMode(display=False) as counter:
        rate = matmul_peak(torch.device("cpu"), torch.float32, 128, repeats=3)
    assert counter.get_total_flops() == 4 * 2 * 128 * 128 * 128
    assert rate == 2 * 128**3 / 0.5


def test_the_products_of_a_step_are_counted_by_shape_forward_and_backward() -> None:
    """A linear layer 3 → 5 on 4 rows: forward addmm(bias, x 4×3, Wᵀ 3×5); backward the input's
    gradient (4×5)·(5×3) and the weight's (5×4)·(4×3). Each is 2·4·3·5 = 120 FLOPs; a bmm of
    2 × (6×7)·(7×8) is 2·2·6·7·8 = 1344."""
    layer = torch.nn.Linear(3, 5)
    x = torch.randn(4, 3, requires_grad=True)
    with MatmulShapes() as products:
        layer(x).sum().backward()
        torch.bmm(torch.randn(2, 6, 7), torch.randn(2, 7, 8))
    assert products.counts == {
        (torch.ops.aten.addmm.default, ((5,), (4, 3), (3, 5)), torch.float32): 1,
        (torch.ops.aten.mm.default, ((4, 5), (5, 3)), torch.float32): 1,
        (torch.ops.aten.mm.default, ((5, 4), (4, 3)), torch.float32): 1,
        (torch.ops.aten.bmm.default, ((2, 6, 7), (2, 7, 8)), torch.float32): 1,
    }
    assert matmul_flops(products.counts) == 3 * 120 + 1344


def test_the_shapes_peak_weights_each_product_by_how_often_it_runs(monkeypatch) -> None:
    """Two products, one run 3 times and one once. The clock moves 0.1 ms a reading: the timed
    first call takes 0.1 ms, so each timing runs 10 calls between two readings, 0.01 ms a call;
    the peak is their FLOPs, weighted by count, over 4 × 0.01 ms."""
    mm, bmm = torch.ops.aten.mm.default, torch.ops.aten.bmm.default
    counts = {(mm, ((8, 16), (16, 4)), torch.float32): 3, (bmm, ((2, 8, 8), (2, 8, 8)), torch.float32): 1}
    clock = iter(float(t) * 1e-4 for t in range(10_000))
    monkeypatch.setattr(measure, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    rate = shapes_peak(counts, torch.device("cpu"), repeats=3)
    assert rate == pytest.approx((3 * 2 * 8 * 16 * 4 + 2 * 2 * 8 * 8 * 8) / (4 * 1e-5))


def test_report_keeps_median_and_range() -> None:
    report = Report()
    report.add("x", [3.0, 1.0, 2.0])
    assert report.as_dict() == {"x": 2.0, "range": {"x": [1.0, 3.0]}, "context": {}}


def test_the_table_shows_each_figure_with_its_range(capsys) -> None:
    from capcli.results import print_benchmark

    report = Report(context={"preset": "tiny", "device": "cpu", "device_name": "a CPU", "precision": "float32",
                             "repeats": 3})
    report.add("caption_beam5_speedup", [6.0, 5.5, 6.5])
    report.add("mfu", [0.52, 0.5, 0.55])
    print_benchmark(report.as_dict(), as_json=False)
    out = capsys.readouterr().out
    assert "caption_beam5_speedup" in out and "5.5 - 6.5" in out
    assert "mfu" in out and "0.5 - 0.55" in out


def test_a_model_the_flop_formula_does_not_cover_is_refused_before_any_timing(tmp_path: Path) -> None:
    result = runner.invoke(app, ["benchmark", "--sections", "pretrain"],
                           env={**SMALL, "CAPCLI_MODEL__PREFIX_MAPPER": "transformer"})
    assert result.exit_code == 2
    assert "not transformer" in result.stderr and result.stdout == ""
