"""Results for stdout: a rich table for people, one JSON document for scripts (DESIGN §8)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from capcli import faults
from capcli.train.engine import FitResult

stdout = Console(highlight=False)


def fit_summary(phase: str, result: FitResult) -> dict[str, Any]:
    """The JSON-able outcome of a training phase."""
    return {
        "phase": phase,
        "run_dir": str(result.run_dir),
        "best_checkpoint": str(result.best_checkpoint) if result.best_checkpoint else None,
        "steps": result.steps,
        "epochs": result.epochs,
        "samples": result.samples,
        "seconds": round(result.seconds, 1),
        "stopped_early": result.stopped_early,
        "skipped_images": result.skipped,
        "best_val_loss": None if math.isinf(result.best_val_loss) else result.best_val_loss,
        "train": result.train,
        "val_start": result.first_val,
        "val": result.val,
    }


def print_fit(summary: dict[str, Any], as_json: bool) -> None:
    """Final losses as a table (train, val at the start, val at the end), or as JSON."""
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    table = Table(title=f"{summary['phase']}: {summary['steps']} steps, {summary['epochs']} epochs, "
                        f"{summary['seconds']:.0f} s")
    table.add_column("metric")
    for column in ("train", "val (start)", "val (end)"):
        table.add_column(column, justify="right")
    keys = [k for k in summary["val"] or summary["train"] if k != "grad_norm"]
    for key in keys:
        cells = [summary[part].get(key) for part in ("train", "val_start", "val")]
        table.add_row(key, *("" if c is None else f"{c:.4f}" for c in cells))
    stdout.print(table)
    stdout.print(f"best checkpoint: {summary['best_checkpoint']}")


ALIGN_ROWS = {
    "reward_accuracy": "held-out reward accuracy (vs reference)",
    "preference_accuracy": "held-out preference accuracy (log-prob)",
    "val_caption_loss": "val caption loss",
    "retrieval_r1": "val image→text R@1",
}


def align_summary(result: Any) -> dict[str, Any]:
    """``fit_summary`` plus the held-out numbers before and after alignment."""
    return {**fit_summary("align", result.fit), "start_checkpoint": str(result.start), "pairs": result.pairs,
            "before": result.before, "after": result.after, "retrieval_drop": result.retrieval_drop,
            "alignment_tax_warning": result.tax_warning}


def print_align(summary: dict[str, Any], as_json: bool) -> None:
    """The fit table, then held-out before/after, or the whole summary as JSON."""
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print_fit(summary, as_json=False)
    table = Table(title=f"align: held-out, before and after ({summary['pairs']})")
    table.add_column("metric")
    for column in ("before", "after", "change"):
        table.add_column(column, justify="right")
    for key, label in ALIGN_ROWS.items():
        before, after = summary["before"].get(key), summary["after"].get(key)
        if before is None or after is None:
            continue
        table.add_row(label, f"{before:.4f}", f"{after:.4f}", f"{after - before:+.4f}")
    stdout.print(table)
    if summary["alignment_tax_warning"]:
        stdout.print(f"[yellow]warning:[/] {summary['alignment_tax_warning']}")


def print_evaluation(results: dict[str, Any], as_json: bool) -> None:
    """Metric, value and 95% interval, or the whole results document as JSON."""
    if as_json:
        print(json.dumps(results, indent=2))
        return
    table = Table(title=f"evaluate: {results['checkpoint']} on {results['split']} (n={results['n']}, "
                        f"beams={results['decoding']['beams']}, tokenizer={results['tokenizer']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    table.add_column("95% interval", justify="right")
    for name, m in results["metrics"].items():
        if m["value"] is None:
            table.add_row(name, "n/a", "")
        else:
            table.add_row(name, f"{m['value']:.4f}", f"[{m['low']:.4f}, {m['high']:.4f}]")
    stdout.print(table)
    stdout.print(f"judge: {results['judge']}; win rate against: {results['baseline']}")
    for name, reason in results["skipped_metrics"].items():
        stdout.print(f"skipped {name}: {reason}")


def write_json(document: dict[str, Any], path: Path) -> Path:
    """Write a results document atomically (a reader never sees half a file), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        faults.point("results.write", path)
        tmp.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
    except OSError as err:  # a full disk or a read-only folder: no half file left, the error names the file
        tmp.unlink(missing_ok=True)
        raise OSError(err.errno, err.strerror, str(path)) from err
    return path


def print_benchmark(document: dict[str, Any], as_json: bool) -> None:
    """Each figure with the min-max of its repeats, ratios against their baselines marked, or JSON."""
    if as_json:
        print(json.dumps(document, indent=2))
        return
    context = document["context"]
    table = Table(title=f"benchmark: {context['preset']} on {context['device']} ({context['device_name']}), "
                        f"{context['precision']}, median of {context['repeats']}")
    table.add_column("figure")
    table.add_column("median", justify="right")
    table.add_column("min - max", justify="right")
    for key, value in document.items():
        if key in ("range", "context"):
            continue
        low, high = document["range"][key]
        style = "bold" if key.endswith("_speedup") or key in ("mfu", "align_mfu") else None
        table.add_row(key, _figure(value), f"{_figure(low)} - {_figure(high)}", style=style)
    stdout.print(table)


def _figure(value: float) -> str:
    """Three significant figures: a benchmark's repeats rarely agree beyond that."""
    return f"{value:.3g}"
