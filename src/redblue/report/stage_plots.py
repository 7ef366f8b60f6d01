"""Every stage's plots, rendered from its result JSON (and the files it names) alone.

:func:`render_stage_plots` takes one stage's result (as written under ``OUT/metrics``) and
writes its PNGs under ``OUT/images``; :func:`render_all_plots` does it for every result in
an output folder, so plots can be rebuilt without re-running anything.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from redblue.report import advtrain_plots, backdoor_plots, plots
from redblue.report.attack_plots import load_samples, render_attack_plots, verified_metrics_file
from redblue.report.summary import stage_results


def render_training_plots(out: Path, name: str, result: Mapping[str, Any]) -> list[Path]:
    """Training curves and confusion matrix PNGs of a baseline (or evaluate) result."""
    images = out / "images"
    metrics = result["metrics"]
    paths = [
        plots.confusion_matrix(
            metrics["confusion"],
            f"{name}: confusion matrix\nclean accuracy {100 * metrics['clean_accuracy']:.2f}% "
            f"on {metrics['n_test']} test images",
            images / f"{name}_confusion_matrix.png",
        )
    ]
    history = (result.get("training") or {}).get("history") or []
    if history:
        paths.append(plots.training_curves(history, name, images / f"{name}_training_curves.png"))
    return paths


def render_defense_plots(out: Path, name: str, result: Mapping[str, Any]) -> list[Path]:
    """Training curves (clean / FGSM / PGD per epoch), robustness bars and eps sweep PNGs."""
    images = out / "images"
    recipe = result["recipe"]
    title = f"{name} ({recipe['recipe']}, eps {recipe['eps']:g})"
    paths = []
    history = result["training"].get("history") or []
    guard = result["training"].get("guard") or {}
    restored = (guard.get("event") or {}).get("restored_epoch")
    if history:
        paths.append(
            advtrain_plots.robust_training_curves(
                history, title, images / f"{name}_training_curves.png", restored_epoch=restored
            )
        )
    m = result["metrics"]
    bars = {k.removesuffix("_accuracy"): float(v) for k, v in m.items() if k.endswith("_accuracy")}
    paths.append(advtrain_plots.robustness_bars(bars, title, images / f"{name}_robustness.png"))
    if result.get("eps_sweep"):
        paths.append(advtrain_plots.eps_sweep(result["eps_sweep"], title, images / f"{name}_eps_sweep.png"))
    return paths


def render_poison_plots(out: Path, result: Mapping[str, Any]) -> list[Path]:
    """The clean-vs-triggered examples, the trigger and the triggered predictions."""
    images = out / "images"
    data = dict(result)
    return [
        backdoor_plots.clean_vs_triggered(data, images / "poison_examples.png"),
        backdoor_plots.trigger_image(data, images / "poison_trigger.png"),
        backdoor_plots.triggered_predictions(data, images / "poison_triggered_predictions.png"),
    ]


def render_audit_plots(out: Path, name: str, result: Mapping[str, Any]) -> list[Path]:
    """Neural Cleanse: the anomaly chart, and the reversed triggers when their file verifies."""
    images = out / "images"
    paths = [backdoor_plots.anomaly_chart(dict(result), images / f"{name}_anomaly.png")]
    path = verified_metrics_file(out, result.get("triggers_file"), result.get("triggers_sha256"), f"{name}: trigger grid")
    if path is None:
        return paths
    tensors = load_samples(path)
    paths.append(backdoor_plots.reversed_triggers(dict(result), tensors["masks"], tensors["patterns"],
                                                  images / f"{name}_triggers.png"))  # fmt: skip
    return paths


def render_stage_plots(out: Path, result: Any) -> list[Path]:
    """The plots of one stage result (a typed result or its JSON dict); returns the PNG paths."""
    data: Mapping[str, Any] = result.to_json() if hasattr(result, "to_json") else result
    stage, name = data.get("stage"), str(data.get("name"))
    if stage == "baseline":
        return render_training_plots(out, name, data)
    if stage == "evaluate":
        return render_training_plots(out, f"{name}_evaluate", data)
    if stage == "attack":
        return render_attack_plots(out, name, data)
    if stage == "defend":
        return render_defense_plots(out, name, data)
    if stage == "poison":
        return render_poison_plots(out, data)
    if stage == "poison_sweep":
        return [backdoor_plots.asr_vs_rate(dict(data), out / "images" / "poison_asr_vs_rate.png")]
    if stage == "backdoor_audit":
        return render_audit_plots(out, name, data)
    if stage == "backdoor_defense":  # named after the result: backdoor_defense_METHOD, or MODEL_backdoor_defense_METHOD
        return [backdoor_plots.defense_summary(dict(data), out / "images" / f"{name}.png")]
    return []


def render_all_plots(out: Path) -> list[Path]:
    """The plots of every valid stage result under ``out/metrics`` (the others are skipped
    with a notice by :func:`redblue.report.summary.stage_results`)."""
    paths: list[Path] = []
    for _, data in stage_results(out):
        paths += render_stage_plots(out, data)
    return paths


def render_plots(out: Path, result: Any = None) -> list[Path]:
    """The plots of one stage result, or of every result under ``out/metrics`` when None."""
    return render_all_plots(out) if result is None else render_stage_plots(out, result)
