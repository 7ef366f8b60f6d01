"""Plots rendered from result dictionaries (the JSON files), never from live objects."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from redblue.utils import atomic_write_bytes

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend, imported by the first plot
    drawn rather than with this package: loading matplotlib takes about half a second, which
    every command that draws nothing (``--help``, ``scan``, ``verify``, a refused input)
    would otherwise pay."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    plt = pyplot()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def legend_below(ax: Any, *, fontsize: int = 8, offset: float = 0.16) -> None:
    """The axes' legend under the x label, in up to three columns: inside the axes a legend
    covers bars or points."""
    n = len(ax.get_legend_handles_labels()[1])
    if n:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -offset), ncol=min(3, n), fontsize=fontsize, frameon=False)


def training_curves(history: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """Loss and accuracy (train, test and any ``*_accuracy`` extras) per epoch."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{title}: loss")
    keys = [k for k in history[0] if k.endswith("accuracy")] if history else []
    for key in keys:
        ax_acc.plot(epochs, [100 * h[key] for h in history], marker="o", label=key.replace("_", " "))
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    legend_below(ax_acc)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    return save_figure(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], title: str, path: Path) -> Path:
    """Confusion matrix heat-map with counts (rows: true class, columns: predicted)."""
    plt = pyplot()
    n = len(matrix)
    fig, ax = plt.subplots(figsize=(5.2, 4.6))
    image = ax.imshow(matrix, cmap="Blues")
    fig.colorbar(image, ax=ax)
    peak = max(max(row) for row in matrix) if n else 0
    for i in range(n):
        for j in range(n):
            value = matrix[i][j]
            ax.text(
                j, i, str(value), ha="center", va="center", fontsize=7, color="white" if value > peak / 2 else "black"
            )
    ax.set(xlabel="predicted", ylabel="true", title=title, xticks=range(n), yticks=range(n))
    return save_figure(fig, path)


def models_accuracy_vs_eps(curves: Sequence[dict[str, Any]], path: Path) -> Path:
    """Every evaluated model's robust accuracy (%) against eps in one chart: one colour per
    model, one line style per attack; the legend sits below the axes, covering nothing."""
    plt = pyplot()
    models = list(dict.fromkeys(c["model"] for c in curves))
    attacks = list(dict.fromkeys(c["attack"] for c in curves))
    styles = ["-", "--", ":", "-."]
    markers = ["o", "s", "^", "D", "v"]
    norms = sorted({c["norm"] for c in curves})
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for c in curves:
        i, j = models.index(c["model"]), attacks.index(c["attack"])
        label = f"{c['model']}: {c['attack']}" + (f" ({c['norm']})" if len(norms) > 1 else "")
        ax.plot(c["eps"], [100 * a for a in c["accuracy"]], linestyle=styles[j % len(styles)],
                marker=markers[j % len(markers)], color=f"C{i % 10}", label=label.replace("$", r"\$"))  # fmt: skip
    unit = " / ".join({"linf": "L∞", "l2": "L2"}.get(n, n) for n in norms)
    ax.set(xlabel=f"eps ({unit}, pixels in [0, 1])", ylabel="robust accuracy (%)", ylim=(-2, 102),
           title="Robust accuracy against the perturbation budget, every evaluated model")  # fmt: skip
    ax.title.set_fontsize(10)
    ax.grid(alpha=0.3)
    legend_below(ax, fontsize=9)
    return save_figure(fig, path)
