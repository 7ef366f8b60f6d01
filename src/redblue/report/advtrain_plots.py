"""Plots of adversarial training, rendered from ``metrics/<name>_metrics.json`` dictionaries."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from redblue.report.plots import legend_below, pyplot, save_figure

_CURVES = (
    ("test_accuracy", "clean (test)", "-"),
    ("guard_clean_accuracy", "clean (held-out slice)", "--"),
    ("guard_fgsm_accuracy", "FGSM (held-out slice)", "--"),
    ("guard_pgd_accuracy", "PGD (held-out slice)", "--"),
)


def robust_training_curves(
    history: Sequence[dict[str, Any]], title: str, path: Path, *, restored_epoch: int | None = None
) -> Path:
    """Loss, and clean / FGSM / PGD accuracy per epoch; marks the epoch the guard restored."""
    plt = pyplot()
    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10.5, 3.8))
    ax_loss.plot(epochs, [h["loss"] for h in history], marker="o")
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{title}: loss")
    for key, label, style in _CURVES:
        if history and key in history[0]:
            ax_acc.plot(epochs, [100 * h[key] for h in history], style, marker="o", label=label)
    if restored_epoch is not None:
        ax_acc.axvline(restored_epoch, color="grey", linestyle=":", label=f"restored epoch {restored_epoch}")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title=f"{title}: accuracy per epoch", ylim=(0, 100))
    legend_below(ax_acc)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.set_xticks(epochs)
    return save_figure(fig, path)


def robustness_bars(accuracies: dict[str, float], title: str, path: Path) -> Path:
    """Bar chart of accuracy (%) per attack, e.g. clean, FGSM, PGD, standard, worst case."""
    plt = pyplot()
    names = list(accuracies)
    values = [100 * accuracies[n] for n in names]
    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2.5, 3.6))
    bars = ax.bar(names, values, color=["#4c72b0" if n == "clean" else "#c44e52" for n in names])
    for bar, value in zip(bars, values, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, value + 1, f"{value:.1f}", ha="center", fontsize=8)
    ax.set(ylabel="accuracy (%)", title=title, ylim=(0, 105))
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def eps_sweep(sweep: dict[str, Sequence[float]], title: str, path: Path) -> Path:
    """Accuracy (%) against eps, one line per attack (``sweep["eps"]`` is the x axis)."""
    plt = pyplot()
    eps = list(sweep["eps"])
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for name, values in sweep.items():
        if name != "eps":
            ax.plot(eps, [100 * v for v in values], marker="o", label=name)
    ax.set(xlabel="eps (L-inf, pixel units)", ylabel="accuracy (%)", title=title, ylim=(0, 100))
    ax.grid(alpha=0.3)
    legend_below(ax)
    return save_figure(fig, path)
