"""Plots rendered from result dictionaries (the JSON files), never from live objects."""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.figure import Figure

from redblue.utils import atomic_write_bytes


def save_figure(fig: Figure, path: Path) -> Path:
    """Render ``fig`` to PNG and write it atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def training_curves(history: Sequence[dict[str, Any]], title: str, path: Path) -> Path:
    """Loss and accuracy (train, test and any ``*_accuracy`` extras) per epoch."""
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{title}: loss")
    keys = [k for k in history[0] if k.endswith("accuracy")] if history else []
    for key in keys:
        ax_acc.plot(epochs, [100 * h[key] for h in history], marker="o", label=key.replace("_", " "))
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy")
    ax_acc.legend()
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    return save_figure(fig, path)


def confusion_matrix(matrix: Sequence[Sequence[int]], title: str, path: Path) -> Path:
    """Confusion matrix heat-map with counts (rows: true class, columns: predicted)."""
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
