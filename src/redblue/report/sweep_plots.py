"""A sweep's plots and table, rendered from its ``sweep_summary.json`` alone.

- the main metric against a numeric axis (``eps`` when it is one), one line per value of the
  other axes (e.g. robust accuracy vs eps, one line per model);
- for a two-axis grid, a heat-map of the main metric;
- the rows sorted by the main metric (for the report's table).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from redblue.report.plots import pyplot, save_figure

METRIC_ORDER = ("robust_accuracy", "asr", "clean_accuracy")
"""The main metric of a sweep: the first of these that its finished cells report."""
LABELS = {"robust_accuracy": "robust accuracy", "asr": "attack success rate (ASR)", "clean_accuracy": "clean accuracy"}


def main_metric(summary: Mapping[str, Any]) -> str | None:
    done = [c for c in summary["cells"] if c["status"] == "done"]
    for metric in METRIC_ORDER:
        if done and all(metric in c["metrics"] for c in done):
            return metric
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _shown(key: str, value: Any) -> str:
    return Path(str(value)).stem if key == "model" else f"{value:g}" if _is_number(value) else str(value)


def sorted_rows(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The cells, best main metric first (failed cells last)."""
    metric = main_metric(summary)

    def rank(cell: Mapping[str, Any]) -> tuple[int, float]:
        value = cell["metrics"].get(metric) if metric else None
        if cell["status"] == "done" and isinstance(value, int | float):
            return (0, -float(value))
        return (1, 0.0)

    return sorted(summary["cells"], key=rank)


def metric_vs_axis(summary: Mapping[str, Any], path: Path) -> Path | None:
    """The main metric against the numeric axis (eps first), one line per other-axes value."""
    plt = pyplot()
    metric = main_metric(summary)
    axes: dict[str, list[Any]] = summary["axes"]
    numeric = [k for k, values in axes.items() if all(_is_number(v) for v in values) and len(values) > 1]
    if metric is None or not numeric:
        return None
    x_key = next((k for k in numeric if k.rpartition(".")[2] == "eps"), numeric[0])
    others = [k for k in axes if k != x_key]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for combo in itertools.product(*(axes[k] for k in others)):
        fixed = dict(zip(others, combo, strict=True))
        points = sorted(
            (c["axes"][x_key], c["metrics"][metric])
            for c in summary["cells"]
            if c["status"] == "done" and _is_number(c["axes"].get(x_key)) and _is_number(c["metrics"].get(metric))
            and all(c["axes"].get(k) == v for k, v in fixed.items())
        )
        if points:
            label = ", ".join(f"{k.rpartition('.')[2]} {_shown(k, v)}" for k, v in fixed.items()) or metric
            ax.plot([p[0] for p in points], [100 * p[1] for p in points], marker="o", label=label)
    ax.set(xlabel=x_key, ylabel=f"{LABELS.get(metric, metric)} (%)", ylim=(-2, 102),
           title=f"sweep {summary['name']}: {LABELS.get(metric, metric)} vs {x_key.rpartition('.')[2]}")  # fmt: skip
    ax.grid(alpha=0.3)
    if others:
        ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))  # outside: covers nothing
    return save_figure(fig, path)


def heatmap(summary: Mapping[str, Any], path: Path) -> Path | None:
    """For a grid of exactly two axes: the main metric in every cell, annotated."""
    plt = pyplot()
    metric = main_metric(summary)
    axes: dict[str, list[Any]] = summary["axes"]
    if metric is None or len(axes) != 2:
        return None
    row_key, col_key = list(axes)
    rows, cols = axes[row_key], axes[col_key]
    grid = [[float("nan")] * len(cols) for _ in rows]
    for cell in summary["cells"]:
        r, c, value = cell["axes"].get(row_key), cell["axes"].get(col_key), cell["metrics"].get(metric)
        if cell["status"] == "done" and r in rows and c in cols and _is_number(value):
            grid[rows.index(r)][cols.index(c)] = 100 * value
    fig, ax = plt.subplots(figsize=(1.2 * len(cols) + 3, 0.6 * len(rows) + 2))
    image = ax.imshow(grid, cmap="viridis", vmin=0, vmax=100, aspect="auto")
    ax.set_xticks(range(len(cols)), [_shown(col_key, v) for v in cols], fontsize=10)
    ax.set_yticks(range(len(rows)), [_shown(row_key, v) for v in rows], fontsize=10)
    ax.set(xlabel=col_key, ylabel=row_key, title=f"sweep {summary['name']}: {LABELS.get(metric, metric)} (%)")
    for i, j in itertools.product(range(len(rows)), range(len(cols))):
        value = grid[i][j]
        text = "failed" if value != value else f"{value:.1f}"
        ax.text(j, i, text, ha="center", va="center", fontsize=10, color="white" if value < 60 else "black")
    fig.colorbar(image, ax=ax)
    return save_figure(fig, path)


def render_sweep_plots(root: Path, summary: Mapping[str, Any]) -> list[Path]:
    """Every plot of one sweep, written under ``root/images``."""
    images = root / "images"
    made: Sequence[Path | None] = (
        metric_vs_axis(summary, images / "sweep_metric_vs_axis.png"),
        heatmap(summary, images / "sweep_heatmap.png"),
    )
    return [p for p in made if p is not None]
