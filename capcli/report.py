"""Training curves: ``curves.png`` from a run's ``metrics.jsonl``.

Written at the end of each phase and by ``capcli report RUN_DIR...``. Matplotlib draws with
its ``Agg`` canvas directly (no pyplot, no display), so it works on a headless server.

Panels, against optimizer steps: the total loss (train, and val as dots); each loss
component; the learning rate; and, for align, α(t) and the reward accuracy. Several run
directories (pretrain, then align) are laid end to end on one step axis, each phase marked
and named.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from capcli.errors import ConfigError
from capcli.runlog import METRICS_FILE, read_metrics

WIDTH, HEIGHT, DPI = 12.0, 9.0, 100  # inches and dots per inch: a 1200 × 900 image


def _series(records: list[dict[str, Any]], split: str, key: str, offset: int) -> tuple[list[int], list[float]]:
    points = [(r["step"] + offset, r[key]) for r in records if r.get("split") == split and key in r]
    return [s for s, _ in points], [v for _, v in points]


def write_curves(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Draw the runs' curves into ``output`` (default: the single run's ``curves.png``).

    Raises:
        ConfigError: a run directory has no metrics.jsonl.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise ConfigError(f"no {METRICS_FILE} in {run_dir}: pass run directories (runs/pretrain, runs/align)")
        runs.append((Path(run_dir), read_metrics(path)))
    if output is None:
        output = runs[0][0] / "curves.png" if len(runs) == 1 else Path("curves.png")

    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 2)
    total, parts, lr, align = axes[0, 0], axes[0, 1], axes[1, 0], axes[1, 1]
    offset = 0
    for run_dir, records in runs:
        steps = [r["step"] for r in records]
        end = offset + (max(steps) if steps else 0)
        name = run_dir.name
        x, y = _series(records, "train", "loss", offset)
        total.plot(x, y, label=f"{name} train")
        x, y = _series(records, "val", "val_loss", offset)
        total.plot(x, y, "o--", label=f"{name} val")
        components = sorted({k for r in records for k in r if k.endswith("_loss") and not k.startswith("val_")})
        for key in components:
            x, y = _series(records, "train", key, offset)
            line = parts.plot(x, y, label=f"{name} {key}")[0]
            x, y = _series(records, "val", f"val_{key}", offset)
            parts.plot(x, y, "o--", color=line.get_color(), label=f"{name} val {key}")
        x, y = _series(records, "train", "lr", offset)
        lr.plot(x, y, label=name)
        for key, style in (("alpha", "-"), ("reward_accuracy", "-")):
            x, y = _series(records, "train", key, offset)
            if x:
                align.plot(x, y, style, label=f"{name} {key}")
            x, y = _series(records, "val", f"val_{key}", offset)
            if x:
                align.plot(x, y, "o--", label=f"{name} val {key}")
        if len(runs) > 1:
            for ax in axes.flat:
                ax.axvline(offset, color="grey", linewidth=0.8, linestyle=":")
            total.annotate(name, (offset, 1.0), xycoords=("data", "axes fraction"), va="top", fontsize=9)
        offset = end
    for ax, title, ylabel in ((total, "loss", "loss"), (parts, "loss components", "loss"),
                              (lr, "learning rate", "lr"), (align, "align: α(t) and reward accuracy", "value")):
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(ylabel)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    if not align.get_legend_handles_labels()[0]:
        align.text(0.5, 0.5, "no align phase in these runs", ha="center", va="center", transform=align.transAxes)
    figure.suptitle(" → ".join(str(run_dir) for run_dir, _ in runs))
    figure.tight_layout()
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output
