"""Red-team plots, rendered from an attack stage's JSON result and its saved example images.

The example images live in ``metrics/<name>_examples.safetensors`` (tensors ``clean``,
``y``, one tensor of adversarial images per attack, and ``pred_<key>`` predictions).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from redblue.report.plots import legend_below, pyplot, save_figure
from redblue.utils import sha256_file
from redblue.validate import FILE_NAME_PATTERN, is_safe_name


def load_samples(path: Path) -> dict[str, torch.Tensor]:
    """The example tensors saved by the attack stage (safetensors, no pickle)."""
    return load_file(str(path))


def strongest_attack(result: Mapping[str, Any]) -> str:
    """The evaluated attack with the lowest robust accuracy (first on ties)."""
    attacks: dict[str, Any] = result["metrics"]["attacks"]
    return str(min(attacks, key=lambda a: attacks[a]["robust_accuracy"]))


def as_image(image: torch.Tensor) -> tuple[Any, dict[str, Any]]:
    """One (C, H, W) image in [0, 1] as what ``imshow`` draws: grey for one channel, RGB for three."""
    if image.shape[0] == 3:
        return image.permute(1, 2, 0).float().clamp(0, 1).numpy(), {}
    return image[0].float().numpy(), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0}


LABEL_PT = 11
"""Font size of the per-image labels: about 17 px at the plots' 110 dpi, 10 px or more when the
report shows the grid at 60% of its size (a 700 px wide window)."""


def class_label(index: int, names: Sequence[str] | None) -> str:
    """A class as the plots name it: its name when the model or data has class names, else its index."""
    return str(names[index]) if names is not None and 0 <= index < len(names) else str(index)


def class_names_of(result: Mapping[str, Any]) -> list[str] | None:
    """The class names a result records (the model's ``--class-names``, else the data's folders)."""
    for where in ("model", "dataset"):
        entry = result.get(where)
        names = entry.get("class_names") if isinstance(entry, Mapping) else None
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
    return None


def adversarial_grid(
    samples: Mapping[str, torch.Tensor], attack: str, title: str, path: Path, names: Sequence[str] | None = None
) -> Path:
    """Clean images (top row) over adversarial ones (bottom row), each with its prediction
    (red when wrong); grey or RGB by the images' channels."""
    plt = pyplot()
    clean, adv, y = samples["clean"], samples[attack], samples["y"]
    clean_pred, adv_pred = samples["pred_clean"], samples[f"pred_{attack}"]
    n = int(clean.shape[0])
    fig, axes = plt.subplots(2, max(n, 1), figsize=(1.3 * max(n, 1), 3.9), squeeze=False)
    for i in range(n):
        for row, (images, pred, label) in enumerate(((clean, clean_pred, "clean"), (adv, adv_pred, attack))):
            ax = axes[row][i]
            pixels, style = as_image(images[i])
            ax.imshow(pixels, **style)
            ok = int(pred[i]) == int(y[i])
            ax.set_title(f"{label}: {class_label(int(pred[i]), names)}", fontsize=LABEL_PT, color="black" if ok else "red")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0][i].set_xlabel(f"true {class_label(int(y[i]), names)}", fontsize=LABEL_PT)
    fig.suptitle(title, fontsize=LABEL_PT + 1)
    return save_figure(fig, path)


def perturbation_heatmap(samples: Mapping[str, torch.Tensor], attack: str, eps: float, title: str, path: Path) -> Path:
    """The perturbation ``x_adv − x`` of each example (averaged over colour channels), blue
    (darker) to red (brighter), each labelled with its L∞ size; an unchanged image says why."""
    plt = pyplot()
    full = samples[attack].float() - samples["clean"].float()
    delta = full.mean(1)  # one map per image; its label gives the L∞ size over all channels
    n = int(delta.shape[0])
    bound = max(float(delta.abs().max()), eps, 1e-6)
    fig, axes = plt.subplots(1, max(n, 1), figsize=(1.3 * max(n, 1) + 0.8, 2.3), squeeze=False)
    image = None
    wrong = samples["pred_clean"] != samples["y"] if "pred_clean" in samples else torch.zeros(n, dtype=torch.bool)
    for i in range(n):
        ax = axes[0][i]
        image = ax.imshow(delta[i].numpy(), cmap="seismic", vmin=-bound, vmax=bound)
        size = float(full[i].abs().max())
        if size == 0.0:
            reason = "already wrong:\nnot attacked" if bool(wrong[i]) else "unchanged"
            ax.text(0.5, 0.5, reason, transform=ax.transAxes, ha="center", va="center", fontsize=LABEL_PT - 1)
        ax.set_xlabel(f"max |δ| {size:.2f}", fontsize=LABEL_PT - 1)
        ax.set_xticks([])
        ax.set_yticks([])
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), fraction=0.02)
    fig.suptitle(title, fontsize=LABEL_PT + 1)
    return save_figure(fig, path)


def adversarial_by_class(
    tensors: Mapping[str, torch.Tensor], title: str, path: Path, per_class: int = 8, names: Sequence[str] | None = None
) -> Path:
    """One row per class: the worst-case adversarial examples of its first ``per_class`` test
    images, each titled with the model's prediction (red when the attack fooled it)."""
    plt = pyplot()
    x, y, pred = tensors["adversarial.x"], tensors["adversarial.y"], tensors["adversarial.pred"]
    classes = sorted({int(c) for c in y.tolist()})
    fig, axes = plt.subplots(max(len(classes), 1), per_class, figsize=(1.15 * per_class + 0.9, 1.3 * max(len(classes), 1) + 0.7),
                             squeeze=False)  # fmt: skip
    for row, label in enumerate(classes):
        index = (y == label).nonzero().squeeze(1)[:per_class].tolist()
        for col in range(per_class):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            if col >= len(index):
                ax.axis("off")
                continue
            pixels, style = as_image(x[index[col]])
            ax.imshow(pixels, **style)
            guess = int(pred[index[col]])
            ax.set_title(f"→ {class_label(guess, names)}", fontsize=LABEL_PT, color="red" if guess != label else "black")
        axes[row][0].set_ylabel(f"class {class_label(label, names)}", fontsize=LABEL_PT)
    fig.suptitle(title, fontsize=LABEL_PT + 1)
    return save_figure(fig, path)


def accuracy_vs_eps(sweep: Mapping[str, Sequence[Mapping[str, float]]], norm: str, title: str, path: Path) -> Path:
    """Robust accuracy (%) against eps, one line per attack."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for attack, points in sweep.items():
        ax.plot([p["eps"] for p in points], [100 * p["robust_accuracy"] for p in points], marker="o", label=attack)
    ax.set(xlabel=f"eps ({norm})", ylabel="robust accuracy (%)", title=title, ylim=(-2, 102))
    ax.grid(alpha=0.3)
    legend_below(ax)
    return save_figure(fig, path)


def verified_metrics_file(out: Path, file: Any, sha256: Any, what: str) -> Path | None:
    """``OUT/metrics/FILE`` when ``file`` is a plain file name there (no link) whose SHA-256 is
    ``sha256``; else None, with a notice that ``what`` is not rendered."""
    path = out / "metrics" / str(file)
    if not is_safe_name(str(file), FILE_NAME_PATTERN) or path.is_symlink() or not path.is_file() or (
        sha256_file(path) != sha256
    ):
        print(f"notice: {what} not rendered: {str(file)!r} missing, modified or not a file in metrics/", file=sys.stderr)
        return None
    return path


def render_attack_plots(out: Path, name: str, result: Mapping[str, Any]) -> list[Path]:
    """Every red-team plot of one attack stage, from its JSON result and example file."""
    images = out / "images"
    metrics = result["metrics"]
    paths: list[Path] = []
    samples_file = result.get("samples_file")  # a file name in the JSON's own folder, metrics/
    samples_path = out / "metrics" / str(samples_file)
    if samples_file and (not is_safe_name(samples_file, FILE_NAME_PATTERN) or samples_path.is_symlink()):
        print(f"notice: {name}: samples_file {samples_file!r} is not a file name in metrics/; example plots "
              "not rendered", file=sys.stderr)  # fmt: skip
    elif samples_file and not (samples_path.is_file() and sha256_file(samples_path) == result.get("samples_sha256")):
        print(f"notice: {name}: {samples_path.name} missing or modified; example plots not rendered", file=sys.stderr)
    elif samples_file:
        samples = load_samples(samples_path)
        attack = strongest_attack(result)
        paths.append(
            adversarial_grid(
                samples, attack,
                f"{name}: clean vs {attack} (eps {metrics['eps']:g}, {metrics['norm']}); red = wrong",
                images / f"{name}_examples.png", class_names_of(result),
            )
        )  # fmt: skip
        paths.append(
            perturbation_heatmap(
                samples, attack, float(metrics["eps"]),
                f"{name}: {attack} perturbation x_adv - x", images / f"{name}_perturbation.png",
            )
        )  # fmt: skip
    adversarial = result.get("adversarial")
    if isinstance(adversarial, dict):
        adv_path = verified_metrics_file(out, adversarial.get("images_file"), adversarial.get("images_sha256"),
                                         f"{name}: per-class grid")  # fmt: skip
        if adv_path is not None:
            paths.append(
                adversarial_by_class(
                    load_samples(adv_path),
                    f"{name}: worst-case adversarial examples (eps {metrics['eps']:g}, {metrics['norm']}), first "
                    "images of each class; red = fooled",
                    images / f"{name}_adversarial_by_class.png", names=class_names_of(result),
                )
            )
    if metrics.get("sweep"):
        paths.append(
            accuracy_vs_eps(
                metrics["sweep"], metrics["norm"], f"{name}: accuracy vs eps", images / f"{name}_accuracy_vs_eps.png"
            )
        )
    # A plot of data this result no longer has (an earlier run of the stage had --sweep or
    # --save-adversarial) would otherwise sit in the report beside the new numbers.
    for kind, present in (("accuracy_vs_eps", metrics.get("sweep")), ("adversarial_by_class", adversarial)):
        if not present:
            (images / f"{name}_{kind}.png").unlink(missing_ok=True)
    return paths
