"""The stages of the red/blue workflow, each usable from Python and from the CLI.

A stage takes frozen configs and an output folder, reuses a saved model whose config
and data hashes match (unless forced), and writes its JSON results (and the plots
rendered from them) atomically.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

from torch import nn

from redblue.artifacts import find_reusable, save_model
from redblue.config import DataConfig, TrainConfig
from redblue.data import Dataset, load_dataset
from redblue.models import build_model
from redblue.report import plots
from redblue.train import evaluate, fit
from redblue.utils import atomic_write_json, library_versions, resolve_device, sha256_json


def load_data(cfg: DataConfig, device: str = "cpu") -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cache_dir=cfg.cache_dir, device=device)


def training_cache_key(stage: str, train_cfg: TrainConfig, data: Dataset, extra: dict[str, Any] | None = None) -> str:
    """Hash of what determines a trained model: stage, training config (less the device),
    dataset name and file hashes, and any stage-specific settings."""
    train = asdict(train_cfg)
    train.pop("device", None)
    return sha256_json({"stage": stage, "train": train, "data": data.describe(), "extra": extra or {}})


def train_baseline(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    name: str = "baseline",
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reload) the clean model and evaluate it; writes ``metrics/<name>_metrics.json``."""
    key = training_cache_key(name, train_cfg, data)
    device = resolve_device(train_cfg.device)
    reused = None if force_retrain else find_reusable(out, name, key)
    model: nn.Module
    if reused is not None:
        model = reused.model.to(device)
        fit_info = reused.record["training"]
        print(f"reusing {reused.json_path} (same config and data; --force-retrain to retrain)", file=sys.stderr)
    else:
        model = build_model(train_cfg.model_name, seed=train_cfg.seed)
        result = fit(model, data, train_cfg, progress=progress, desc=name)
        fit_info = {
            "history": result.history,
            "seconds": result.seconds,
            "images_per_s": result.images_per_s,
            "device": result.device,
            "precision": result.precision,
        }
    test = data.to(device)
    ev = evaluate(model, test.x_test, test.y_test)
    metrics = {"accuracy": ev.accuracy, "loss": ev.loss, "n": ev.n, "latency": ev.latency}
    record = {
        "model_name": train_cfg.model_name,
        "stage": name,
        "cache_key": key,
        "config": {"train": asdict(train_cfg), "data": asdict(data_cfg) if data_cfg else None},
        "dataset": data.describe(),
        "training": fit_info,
        "metrics": metrics,
    }
    saved = reused.record if reused is not None else save_model(out, name, model, record)
    result_json = {
        "stage": name,
        "reused": reused is not None,
        "model": {"name": name, "model_name": train_cfg.model_name, "weights_sha256": saved["weights_sha256"]},
        "config": record["config"],
        "dataset": data.describe(),
        "dataset_notice": data.notice,
        "training": fit_info,
        "metrics": {**metrics, "confusion": ev.confusion},
        "versions": library_versions(),
    }
    atomic_write_json(out / "metrics" / f"{name}_metrics.json", result_json)
    render_training_plots(out, name, result_json)
    return result_json


def render_training_plots(out: Path, name: str, result: dict[str, Any]) -> list[Path]:
    """Training curves and confusion matrix PNGs from a stage's JSON result."""
    images = out / "images"
    paths = [
        plots.confusion_matrix(
            result["metrics"]["confusion"],
            f"{name}: confusion matrix (test accuracy {100 * result['metrics']['accuracy']:.2f}%)",
            images / f"{name}_confusion_matrix.png",
        )
    ]
    history = result["training"].get("history") or []
    if history:
        paths.append(plots.training_curves(history, name, images / f"{name}_training_curves.png"))
    return paths
