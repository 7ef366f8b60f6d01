"""The baseline stage: train (or reuse) a clean model and measure it; and ``evaluate``, which
measures any saved model on the clean test set."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from redblue.artifacts import LoadedModel
from redblue.config import DataConfig, TrainConfig
from redblue.data import Dataset
from redblue.errors import IntegrityError
from redblue.models import build_model
from redblue.results import BaselineResult, EvaluateResult
from redblue.stages.common import (
    cached_result,
    config_json,
    model_json,
    train_or_reuse,
    training_cache_key,
    write_result,
)
from redblue.train import evaluate, fit
from redblue.utils import library_versions, model_device, resolve_device, sha256_json
from redblue.validate import check_name


def clean_metrics(model: nn.Module, data: Dataset) -> dict[str, object]:
    """Clean accuracy, loss, latency and confusion matrix on the whole test set."""
    ev = evaluate(model, data.x_test, data.y_test)
    return {
        "clean_accuracy": ev.accuracy,
        "loss": ev.loss,
        "n_test": ev.n,
        "latency": ev.latency,
        "confusion": ev.confusion,
    }


def train_baseline(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    name: str = "baseline",
    progress: bool = True,
) -> BaselineResult:
    """Train (or reuse) the clean model ``name`` and measure it; writes ``metrics/<name>_metrics.json``.

    The model is reused when its training config and data match; the whole result is reused
    (byte for byte) when the model's weights are the ones it was measured on.
    """
    check_name("name", name)
    key = training_cache_key(name, train_cfg, data)
    device = resolve_device(train_cfg.device)

    def train() -> tuple[nn.Module, dict[str, object]]:
        model = build_model(train_cfg.model_name, seed=train_cfg.seed)
        return model, fit(model, data, train_cfg, progress=progress, desc=name).summary()

    config = config_json(train=train_cfg, data=data_cfg)
    trained = train_or_reuse(
        out, name, key, train,
        {"model_name": train_cfg.model_name, "stage": name, "config": config, "dataset": data.describe()},
        device=train_cfg.device, force_retrain=force_retrain,
    )  # fmt: skip
    result_key = sha256_json({"stage": "baseline", "weights": trained.record["weights_sha256"], "key": key})
    if trained.reused and (cached := cached_result(out, name, result_key, BaselineResult)) is not None:
        return cached
    metrics = clean_metrics(trained.model, data.to(device))
    result = BaselineResult(
        stage="baseline",
        name=name,
        cache_key=result_key,
        model={"name": name, "model_name": train_cfg.model_name, "weights_sha256": trained.record["weights_sha256"]},
        config=config,
        dataset=data.describe(),
        dataset_notice=data.notice,
        training=trained.record["training"],
        metrics=metrics,
        versions=library_versions(),
        reused=trained.reused,
    )
    write_result(out, name, result)
    return result


def evaluate_stage(out: Path, loaded: LoadedModel, data: Dataset) -> EvaluateResult:
    """Clean test metrics of a saved (hash-verified) model; writes ``metrics/<name>_evaluate_metrics.json``."""
    name = check_name("name", str(loaded.record.get("name", loaded.json_path.stem)), error=IntegrityError)
    key = sha256_json({"stage": "evaluate", "weights": loaded.record["weights_sha256"], "data": data.identity()})
    if (cached := cached_result(out, f"{name}_evaluate", key, EvaluateResult)) is not None:
        return cached
    device = model_device(loaded.model)
    result = EvaluateResult(
        stage="evaluate",
        name=name,
        cache_key=key,
        model=model_json(loaded, name),
        dataset=data.describe(),
        metrics=clean_metrics(loaded.model, data.to(device)),
        versions=library_versions(),
    )
    write_result(out, f"{name}_evaluate", result)
    return result
