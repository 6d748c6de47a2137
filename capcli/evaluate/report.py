"""Training curves: ``curves.png`` from a run's ``metrics.jsonl``.

Written at the end of each phase and by ``capcli report RUN_DIR...``. Matplotlib draws with
its ``Agg`` canvas directly (no pyplot, no display), so it works on a headless server.

One row per run (pretrain, then align): the total loss, then one small panel per loss
component, each on its own scale (a logarithmic one where the loss falls by more than
:data:`LOG_RANGE` times), so that a weighted loss in the hundreds cannot flatten one near 1.
Train is a line, validation dots; the best checkpoint (the lowest validation value the engine
ranks by) is a star on the total loss and a dotted line on each of its run's panels. The last
row holds the learning rate and, for align, α(t) and the reward accuracy, the runs laid end to
end on one step axis.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from capcli.errors import ConfigError
from capcli.train.runlog import METRICS_FILE, read_metrics

WIDTH, HEIGHT, DPI = 12.0, 9.0, 100  # inches and dots per inch: a 1200 × 900 image
LOG_RANGE = 20.0  # a loss whose largest value is this many times its smallest is drawn on a log axis
BEST_COLOUR = "tab:green"


def _series(records: list[dict[str, Any]], split: str, key: str, offset: int) -> tuple[list[int], list[float]]:
    points = [(r["step"] + offset, r[key]) for r in records if r.get("split") == split and _finite(r.get(key))]
    return [s for s, _ in points], [v for _, v in points]


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_step(records: list[dict[str, Any]]) -> tuple[int, float, str] | None:
    """The validation the best checkpoint was kept at: (step, value, key), or None without validations.

    The key is what the engine ranks by: align's ``loss_unweighted`` (its weighted total moves
    with α(t)), else ``loss``; the first of equal values wins, as the engine keeps the first.
    """
    for key in ("val_loss_unweighted", "val_loss"):
        points = [(r["step"], r[key]) for r in records if r.get("split") == "val" and _finite(r.get(key))]
        if points:
            step, value = min(points, key=lambda p: p[1])
            return step, value, key
    return None


def _scale(ax, values: list[float]) -> None:
    """A log axis where the values are positive and span more than LOG_RANGE times."""
    positive = [v for v in values if v > 0]
    if positive and len(positive) == len(values) and max(positive) > LOG_RANGE * min(positive):
        ax.set_yscale("log")


def draw_curves(runs: list[tuple[Path, list[dict[str, Any]]]]):
    """The figure of ``runs`` (run directory, its metrics records), pretrain before align."""
    from matplotlib.figure import Figure

    components = [sorted({k for r in records for k in r if k.endswith("_loss") and not k.startswith("val_")})
                  for _, records in runs]
    columns = max(2, *(1 + len(c) for c in components))
    figure = Figure(figsize=(WIDTH, HEIGHT), dpi=DPI, layout="constrained")
    grid = figure.add_gridspec(len(runs) + 1, 2 * columns)
    offsets, offset = [], 0
    for _, records in runs:
        offsets.append(offset)
        offset += max((r["step"] for r in records), default=0)

    for row, ((run_dir, records), keys, offset) in enumerate(zip(runs, components, offsets, strict=True)):
        name = run_dir.name
        best = best_step(records)
        panels = [("loss", "loss", "val_loss")] + [(key, key, f"val_{key}") for key in keys]
        for column, (title, train_key, val_key) in enumerate(panels):
            ax = figure.add_subplot(grid[row, 2 * column : 2 * column + 2])
            x, y = _series(records, "train", train_key, offset)
            vx, vy = _series(records, "val", val_key, offset)
            ax.plot(x, y, linewidth=1.0, label="train")
            if vx:
                ax.plot(vx, vy, "o--", markersize=3, linewidth=0.8, label="val")
            _scale(ax, y + vy)
            if best is not None:
                ax.axvline(best[0] + offset, color=BEST_COLOUR, linestyle=":", linewidth=1.0)
                if column == 0:
                    value = next((v for s, v in zip(vx, vy, strict=True) if s == best[0] + offset), None)
                    if value is not None:
                        ax.plot([best[0] + offset], [value], "*", color=BEST_COLOUR, markersize=11,
                                label=f"best checkpoint (step {best[0]})")
            ax.set_title(f"{name}: {title}" if column == 0 else title.replace("_", " "), fontsize=9)
            ax.tick_params(labelsize=7, which="both")
            ax.grid(alpha=0.3, which="both" if ax.get_yscale() == "log" else "major")
            if column == 0:
                ax.legend(fontsize=6)

    lr = figure.add_subplot(grid[len(runs), :columns])
    align = figure.add_subplot(grid[len(runs), columns:])
    for (run_dir, records), offset in zip(runs, offsets, strict=True):
        name = run_dir.name
        x, y = _series(records, "train", "lr", offset)
        lr.plot(x, y, label=name)
        for key in ("alpha", "reward_accuracy"):
            x, y = _series(records, "train", key, offset)
            if x:
                align.plot(x, y, label=f"{name} {key}")
            x, y = _series(records, "val", f"val_{key}", offset)
            if x:
                align.plot(x, y, "o--", markersize=3, label=f"{name} val {key}")
        if len(runs) > 1:
            for ax in (lr, align):
                ax.axvline(offset, color="grey", linewidth=0.8, linestyle=":")
    for ax, title in ((lr, "learning rate"), (align, "align: α(t) and reward accuracy")):
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("optimizer step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=6)
    if not align.get_legend_handles_labels()[0]:
        align.text(0.5, 0.5, "no align phase in these runs", ha="center", va="center", transform=align.transAxes)
    figure.suptitle(" → ".join(str(run_dir) for run_dir, _ in runs), fontsize=10)
    return figure


def write_curves(run_dirs: list[Path], output: Path | None = None) -> Path:
    """Draw the runs' curves into ``output`` (default: the single run's ``curves.png``).

    Raises:
        ConfigError: a run directory has no metrics.jsonl.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    runs = []
    for run_dir in run_dirs:
        path = Path(run_dir) / METRICS_FILE
        if not path.is_file():
            raise ConfigError(f"no {METRICS_FILE} in {run_dir}: pass run directories (runs/pretrain, runs/align)")
        runs.append((Path(run_dir), read_metrics(path)))
    if output is None:
        output = runs[0][0] / "curves.png" if len(runs) == 1 else Path("curves.png")
    figure = draw_curves(runs)
    FigureCanvasAgg(figure)
    output.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(output)
    return output
