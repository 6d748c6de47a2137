"""Results for stdout: a rich table for people, one JSON document for scripts (DESIGN §8)."""

from __future__ import annotations

import json
import math
from typing import Any

from rich.console import Console
from rich.table import Table

from capcli.engine import FitResult

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
