"""Backdoor plots, rendered from the JSON result dicts of the poison and defence stages."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from redblue.report.attack_plots import LABEL_PT
from redblue.report.plots import legend_below, pyplot, save_figure
from redblue.utils import pct


def _show(ax: Any, image: Any, pixel_max: float) -> None:
    """An (H, W) grey or (H, W, 3) RGB image with pixels in [0, pixel_max]."""
    pixels = np.asarray(image, dtype=np.float32) / pixel_max
    if pixels.ndim == 3:
        ax.imshow(pixels.clip(0, 1))
    else:
        ax.imshow(pixels, cmap="gray", vmin=0.0, vmax=1.0)


def clean_vs_triggered(result: dict[str, Any], path: Path) -> Path:
    """Top row: clean test images with the model's prediction; bottom row: the same images
    with the trigger, and the prediction (red when it is the target)."""
    plt = pyplot()
    ex = result["examples"]
    target = result["metrics"]["target"]
    n = len(ex["clean"])
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.3 * max(n, 1), 3.9), squeeze=False)
    vmax = ex.get("pixel_max", 255)
    for j in range(n):
        for i, (key, pred_key) in enumerate((("clean", "pred_clean"), ("triggered", "pred_triggered"))):
            ax = axes[i][j]
            _show(ax, ex[key][j], vmax)
            pred = ex[pred_key][j]
            ax.set_title(
                f"y={ex['labels'][j]} → {pred}", fontsize=LABEL_PT,
                color="red" if i == 1 and pred == target else "black",
            )
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][j].set_ylabel("clean" if j == 0 else "", fontsize=LABEL_PT)
        axes[1][j].set_ylabel("triggered" if j == 0 else "", fontsize=LABEL_PT)
    m = result["metrics"]
    fig.suptitle(
        f"{result['model']['name']}: clean accuracy {pct(m['clean_accuracy'])}, ASR {pct(m['asr'])}, "
        f"RA {pct(m['ra'])} (target {target})",
        fontsize=LABEL_PT + 1,
    )
    return save_figure(fig, path)


def trigger_image(result: dict[str, Any], path: Path) -> Path:
    """The trigger alone, stamped on a black image."""
    plt = pyplot()
    ex = result["examples"]
    trig = result["trigger"]
    fig, ax = plt.subplots(figsize=(3, 3))
    _show(ax, ex["trigger_image"], ex.get("pixel_max", 255))
    ax.set_title(
        f"trigger: {trig['size']}x{trig['size']} {trig['pattern']}, {trig['position']}, blend {trig['blend']:g}",
        fontsize=8,
    )
    ax.set_xticks([])
    ax.set_yticks([])
    return save_figure(fig, path)


def triggered_predictions(result: dict[str, Any], path: Path) -> Path:
    """Bar chart: how many triggered non-target test images were predicted as each class."""
    plt = pyplot()
    m = result["metrics"]
    counts = m["triggered_predicted_counts"]
    target = m["target"]
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    colors = ["tab:red" if c == target else "tab:blue" for c in range(len(counts))]
    ax.bar(range(len(counts)), counts, color=colors)
    ax.set_xticks(range(len(counts)))
    ax.set(
        xlabel="predicted class",
        ylabel="triggered test images",
        title=f"predictions on {m['n_triggered']} triggered non-target images (ASR {pct(m['asr'])})",
    )
    ax.title.set_fontsize(9)
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def asr_vs_rate(sweep: dict[str, Any], path: Path) -> Path:
    """ASR, RA and clean accuracy against the poison rate (log axis; rate 0 drawn at the left edge)."""
    plt = pyplot()
    points = sorted(sweep["points"], key=lambda p: p["rate"])
    positive = [p["rate"] for p in points if p["rate"] > 0]
    floor = min(positive) / 3 if positive else 1e-4
    xs = [p["rate"] if p["rate"] > 0 else floor for p in points]
    fig, ax = plt.subplots(figsize=(6, 3.8))
    for key, label, style in (("asr", "ASR", "o-"), ("clean_accuracy", "clean accuracy", "s-"), ("ra", "RA", "^--")):
        ys = [100 * p[key] if p[key] is not None else float("nan") for p in points]
        ax.plot(xs, ys, style, label=label)
    ax.axhline(90, color="gray", lw=0.8, ls=":")
    ax.set_xscale("log")
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{100 * p['rate']:g}%" for p in points])
    ax.set(
        xlabel="poison rate (share of non-target training images)",
        ylabel="%",
        title=f"BadNets: ASR vs poison rate (target {sweep['target']})",
        ylim=(-2, 102),
    )
    legend_below(ax)
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def defense_summary(result: dict[str, Any], path: Path) -> Path:
    """Clean accuracy / ASR / RA of the poisoned model and after removing the flagged examples and
    retraining, with the detector's precision and recall in the title."""
    plt = pyplot()
    before = result["before"]
    after = result.get("after") or {}
    labels = {"clean_accuracy": "clean acc.", "asr": "ASR", "ra": "RA"}
    keys = [k for k in labels if before.get(k) is not None]  # a screened user's model: no known trigger, no ASR
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    xs = range(len(keys))
    ax.bar([x - 0.2 for x in xs], [100 * before[k] for k in keys], width=0.4,
           label="poisoned model" if "asr" in keys else "the screened model")  # fmt: skip
    if after:
        ax.bar(
            [x + 0.2 for x in xs], [100 * (after[k] or 0) for k in keys], width=0.4, label="retrained without flagged"
        )
    ax.set_xticks(list(xs))
    ax.set_xticklabels([labels[k] for k in keys])
    det = result["detection"]
    ax.set(
        ylabel="%",
        ylim=(0, 105),
        title=f"{result['method']}: precision {pct(det['precision'])}, recall {pct(det['recall'])}",
    )
    ax.title.set_fontsize(9)
    legend_below(ax, offset=0.1)  # inside the axes it covered the ASR bars
    ax.grid(axis="y", alpha=0.3)
    return save_figure(fig, path)


def anomaly_chart(result: dict[str, Any], path: Path) -> Path:
    """Neural Cleanse: the L1 norm of each class's reversed mask (bars, red when flagged) against
    the size-ratio line, and its anomaly index against the threshold line and the MAD test's
    ceiling (the index of a trigger of size 0)."""
    plt = pyplot()
    classes = result["classes"]
    labels = [str(c.get("name") or c["class"]) for c in classes]
    l1 = [c["l1"] if c["l1"] is not None else 0.0 for c in classes]
    index = [c["anomaly_index"] for c in classes]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9.5, 3.6))
    colours = ["#c0392b" if c["flagged"] else "#5b7fa6" for c in classes]
    ax1.bar(range(len(classes)), l1, color=colours)
    for k, c in enumerate(classes):
        if c["l1"] is None:  # no trigger reached the target success rate: not judged, not a small trigger
            ax1.text(k, 0, "n/a", ha="center", va="bottom", fontsize=8, rotation=90)
    ax1.set_xticks(range(len(classes)), labels, fontsize=9)
    ax1.set_ylabel("L1 norm of the reversed mask (pixels)")
    ax1.set_title("Smallest trigger per class (red: flagged)", fontsize=9)
    finite = [c["l1"] for c in classes if c["l1"] is not None]
    if result.get("size_ratio") and finite:
        line = result["size_ratio"] * float(np.median(finite))
        ax1.axhline(line, color="black", linestyle="--", linewidth=1, label=f"size rule: {result['size_ratio']:g} x median norm")
        legend_below(ax1)
    ax2.bar(range(len(classes)), index, color=colours)
    ax2.axhline(result["threshold"], color="black", linestyle="--", linewidth=1, label=f"threshold {result['threshold']:g}")
    if result.get("max_anomaly_index") is not None:
        ax2.axhline(result["max_anomaly_index"], color="grey", linestyle=":", linewidth=1,
                    label=f"ceiling {result['max_anomaly_index']:.2f} (a trigger of size 0)")  # fmt: skip
    ax2.set_xticks(range(len(classes)), labels, fontsize=9)
    ax2.set_ylabel("anomaly index (MAD units)")
    ax2.set_title("Anomaly index (paper's rule: above the line)", fontsize=9)
    legend_below(ax2)
    fig.suptitle(f"{result['name']}: Neural Cleanse, {result['verdict'].split(':')[0]}", fontsize=LABEL_PT)
    return save_figure(fig, path)


def reversed_triggers(result: dict[str, Any], masks: Any, patterns: Any, path: Path) -> Path:
    """Each class's reversed trigger (mask x pattern) and its mask, titled with the L1 norm."""
    plt = pyplot()
    classes = result["classes"]
    n = len(classes)
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.25 * max(n, 1) + 0.6, 3.3), squeeze=False)
    for k, c in enumerate(classes):
        mask = np.asarray(masks[k], dtype=np.float32)
        pattern = np.asarray(patterns[k], dtype=np.float32)
        trigger = (mask[None] * pattern).transpose(1, 2, 0)
        _show(axes[0][k], trigger if trigger.shape[2] == 3 else trigger[..., 0], 1.0)
        axes[1][k].imshow(mask, cmap="magma", vmin=0.0, vmax=1.0)
        colour = "red" if c["flagged"] else "black"
        axes[0][k].set_title(f"{c.get('name') or c['class']}", fontsize=LABEL_PT, color=colour)
        axes[1][k].set_xlabel(f"L1 {c['l1']:.0f}" if c["l1"] is not None else "none", fontsize=LABEL_PT - 1, color=colour)
        for ax in (axes[0][k], axes[1][k]):
            ax.set_xticks([])
            ax.set_yticks([])
    axes[0][0].set_ylabel("trigger", fontsize=LABEL_PT - 1)
    axes[1][0].set_ylabel("mask", fontsize=LABEL_PT - 1)
    fig.suptitle(f"{result['name']}: reversed triggers (red: flagged)", fontsize=LABEL_PT)
    return save_figure(fig, path)
