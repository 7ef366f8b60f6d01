"""The poison stage: train (or reuse) a BadNets model, save it, measure clean accuracy / ASR / RA.

``poison_stage`` writes ``models/<name>.safetensors`` + ``.json`` (the record holds the
trigger, target, rate, seed and the poison indices' file and SHA-256),
``models/<name>_poison_indices.safetensors`` and ``metrics/poison_metrics.json``.
``poison_sweep_stage`` repeats it over poison rates and writes
``metrics/poison_sweep_metrics.json``.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn

from redblue.artifacts import model_paths
from redblue.config import DataConfig, PoisonConfig, TrainConfig
from redblue.data import Dataset
from redblue.errors import ConfigError, IntegrityError
from redblue.evaluation.checks import check_backdoor_implanted
from redblue.metrics import BackdoorMetrics, backdoor_metrics, json_dict
from redblue.models import build_model
from redblue.poison.dataset import poison_dataset
from redblue.poison.selection import select_poison_indices
from redblue.poison.trigger import Trigger, apply_trigger
from redblue.results import PoisonResult, PoisonSweepResult
from redblue.stages.common import (
    cached_result,
    config_json,
    train_or_reuse,
    training_cache_key,
    write_result,
)
from redblue.train import fit, predict
from redblue.utils import (
    atomic_write_bytes,
    library_versions,
    read_json,
    seed_everything,
    sha256_bytes,
    sha256_json,
)

INDICES_FORMAT = "redblue.poison_indices/1"
N_EXAMPLES = 8  # clean/triggered example images stored in the JSON result


def poison_settings(poison_cfg: PoisonConfig) -> dict[str, Any]:
    """What determines the poisoned training set (the cache key's stage-specific part)."""
    return {
        "rate": poison_cfg.rate,
        "target": poison_cfg.target,
        "poison_seed": poison_cfg.poison_seed,
        "trigger": poison_cfg.trigger().describe(),
    }


def indices_bytes(indices: torch.Tensor) -> bytes:
    """The poison indices as a safetensors file (deterministic bytes for equal indices)."""
    return st_save(
        {"indices": indices.detach().to("cpu", torch.int64).contiguous()},
        metadata={"format": INDICES_FORMAT},
    )


def indices_path(out: Path, name: str) -> Path:
    return out / "models" / f"{name}_poison_indices.safetensors"


def check_fits(trigger: Trigger, data: Dataset, target: int) -> None:
    """The trigger must fit the dataset's images and the target must be one of its classes."""
    _, height, width = data.image_shape
    trigger.box(height, width)
    if not 0 <= target < data.num_classes:
        raise ConfigError(f"--target {target}: not a class of {data.name} (0..{data.num_classes - 1})")


def build_poisoned(data: Dataset, poison_cfg: PoisonConfig) -> tuple[Dataset, torch.Tensor]:
    """(poisoned dataset, poison indices) — deterministic given the data and the config."""
    trigger = poison_cfg.trigger()
    check_fits(trigger, data, poison_cfg.target)
    indices = select_poison_indices(
        data.y_train, poison_cfg.rate, poison_cfg.target, poison_cfg.poison_seed
    )
    return poison_dataset(data, indices, trigger, poison_cfg.target), indices


def poison_config_from_record(record: dict[str, Any]) -> PoisonConfig:
    """The PoisonConfig a poisoned model's JSON record was trained with."""
    poison = record.get("poison")
    if not isinstance(poison, dict) or "trigger" not in poison:
        raise IntegrityError(
            f"model {record.get('name')!r}: its record has no poison settings "
            "(expected a model saved by 'redblue poison')"
        )
    trigger = poison["trigger"]
    try:
        return PoisonConfig(
            rate=poison["rate"],
            target=poison["target"],
            poison_seed=poison["poison_seed"],
            size=trigger["size"],
            position=trigger["position"],
            pattern=trigger["pattern"],
            blend=trigger["blend"] if "blend" in trigger else trigger["alpha"],  # "alpha" before 0.1.0's rename
            name=str(record.get("name", "poisoned")),
        )
    except (KeyError, TypeError) as exc:
        raise IntegrityError(f"model {record.get('name')!r}: malformed poison settings ({exc})") from None


def verify_indices(record: dict[str, Any], indices: torch.Tensor) -> None:
    """Refuse when recomputed poison indices do not hash to the recorded SHA-256."""
    digest = sha256_bytes(indices_bytes(indices))
    if digest != record.get("poison_indices_sha256"):
        raise IntegrityError(
            f"model {record.get('name')!r}: the poison indices rebuilt from this dataset "
            f"(SHA-256 {digest[:16]}…) differ from the recorded "
            f"{str(record.get('poison_indices_sha256'))[:16]}…: not the dataset it was trained on"
        )


def _examples(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, trigger: Trigger, target: int
) -> dict[str, Any]:
    """A few non-target test images, clean and triggered, with the predictions (as data)."""
    idx = torch.nonzero(y != target).flatten()[:N_EXAMPLES]
    clean = x[idx]
    triggered = apply_trigger(clean, trigger)
    blank = apply_trigger(torch.zeros_like(x[:1]), trigger)
    return {
        "test_indices": [int(i) for i in idx.tolist()],
        "labels": [int(v) for v in y[idx].tolist()],
        "clean": clean[:, 0].cpu().tolist(),
        "triggered": triggered[:, 0].cpu().tolist(),
        "pred_clean": [int(v) for v in predict(model, clean).tolist()],
        "pred_triggered": [int(v) for v in predict(model, triggered).tolist()],
        "trigger_image": blank[0, 0].cpu().tolist(),
        "pixel_max": 255 if x.dtype == torch.uint8 else 1,
    }


def _baseline(out: Path, data: Dataset) -> dict[str, Any] | None:
    """The clean baseline's accuracy from ``out/metrics/baseline_metrics.json`` when it was
    measured on the same dataset files (for the C-Acc drop); None otherwise."""
    path = out / "metrics" / "baseline_metrics.json"
    if not path.is_file():
        return None
    try:
        result = read_json(path)
        if result["dataset"]["files"] != data.files:
            return None
        return {
            "clean_accuracy": float(result["metrics"]["clean_accuracy"]),
            "weights_sha256": result["model"]["weights_sha256"],
            "file": str(path),
        }
    except (IntegrityError, KeyError, TypeError, ValueError):
        return None


def train_poisoned(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    poison_cfg: PoisonConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    progress: bool = True,
    reuse_names: tuple[str, ...] = (),
) -> tuple[nn.Module, dict[str, Any], bool, torch.Tensor]:
    """Train (or reuse) the poisoned model ``poison_cfg.name``.

    Returns (model on the training device, its saved record, reused?, poison indices).
    ``reuse_names``: other saved models that may be reused when their cache key matches.
    """
    name = poison_cfg.name
    poisoned, indices = build_poisoned(data, poison_cfg)
    settings = poison_settings(poison_cfg)
    key = training_cache_key("poisoned", train_cfg, data, extra={"poison": settings})
    index_payload = indices_bytes(indices)
    index_sha = sha256_bytes(index_payload)
    idx_path = indices_path(out, name)
    if not idx_path.is_file() or idx_path.read_bytes() != index_payload:  # a rerun rewrites nothing
        atomic_write_bytes(idx_path, index_payload)

    def train() -> tuple[nn.Module, dict[str, Any]]:
        seed_everything(train_cfg.seed)
        model = build_model(train_cfg.model_name)
        return model, fit(model, poisoned, train_cfg, progress=progress, desc=name).summary()

    record = {
        "model_name": train_cfg.model_name,
        "stage": "poisoned",
        "config": config_json(train=train_cfg, poison=poison_cfg, data=data_cfg),
        "dataset": data.describe(),
        "poison": {
            **settings,
            "n_poison": int(indices.numel()),
            "n_eligible": int((data.y_train != poison_cfg.target).sum()),
            "n_train": int(data.y_train.numel()),
            "label_map": "all-to-one",
        },
        "poison_indices_file": indices_path(out, name).name,
        "poison_indices_sha256": index_sha,
    }
    trained = train_or_reuse(
        out, name, key, train, record, device=train_cfg.device, force_retrain=force_retrain,
        reuse_names=reuse_names, accept=lambda r: r.get("poison_indices_sha256") == index_sha,
    )  # fmt: skip
    return trained.model, trained.record, trained.reused, indices


def _summary(metrics: BackdoorMetrics) -> dict[str, Any]:
    return {"clean_accuracy": metrics.clean_accuracy, "asr": metrics.asr, "ra": metrics.ra}


def poison_stage(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    poison_cfg: PoisonConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    progress: bool = True,
) -> PoisonResult:
    """Train (or reuse) the BadNets model and evaluate it; writes ``metrics/poison_metrics.json``.

    The model's record holds the trigger and the poison indices' file and SHA-256.
    """
    model, record, reused, _ = train_poisoned(
        out, data, train_cfg, poison_cfg, data_cfg=data_cfg, force_retrain=force_retrain,
        progress=progress,
    )
    key = sha256_json({"stage": "poison", "weights": record["weights_sha256"], "baseline": _baseline(out, data),
                       "data": data.identity(), "poison": poison_settings(poison_cfg)})
    if reused and (cached := cached_result(out, "poison", key, PoisonResult)) is not None:
        return cached
    result = evaluate_poisoned(out, data, model, record, poison_cfg, key=key, reused=reused)
    write_result(out, "poison", result)
    return result


def evaluate_poisoned(
    out: Path,
    data: Dataset,
    model: nn.Module,
    record: dict[str, Any],
    poison_cfg: PoisonConfig,
    *,
    key: str,
    reused: bool = False,
) -> PoisonResult:
    """The result of one poisoned model: clean accuracy / ASR / RA, breakdowns and examples."""
    device = next(model.parameters()).device
    test = data.to(device)
    trigger = poison_cfg.trigger()
    metrics = backdoor_metrics(model, test.x_test, test.y_test, trigger, poison_cfg.target,
                               num_classes=data.num_classes)
    baseline = _baseline(out, data)
    comparison = None
    if baseline is not None:
        comparison = {**baseline, "clean_accuracy_drop_pp": 100 * (baseline["clean_accuracy"] - metrics.clean_accuracy)}
    name = str(record["name"])
    weights, _ = model_paths(out, name)
    return PoisonResult(
        stage="poison",
        name=name,
        cache_key=key,
        model={
            "name": name,
            "path": str(weights),
            "model_name": record["model_name"],
            "weights_sha256": record["weights_sha256"],
            # Relative to this JSON's folder (metrics/), as redblue verify resolves it.
            "poison_indices_file": f"../models/{record['poison_indices_file']}",
            "poison_indices_sha256": record["poison_indices_sha256"],
        },
        config=record["config"],
        dataset=data.describe(),
        dataset_notice=data.notice,
        poison=record["poison"],
        trigger=trigger.describe(),
        training=record["training"],
        metrics=metrics.to_dict(),
        baseline=json_dict(comparison) if comparison else None,
        examples=_examples(model, test.x_test, test.y_test, trigger, poison_cfg.target),
        warnings=[w for w in [check_backdoor_implanted(metrics.asr, metrics.n_triggered)] if w is not None],
        versions=library_versions(),
        reused=reused,
    )


def sweep_name(name: str, rate: float) -> str:
    return f"{name}_rate{rate:g}"


def poison_sweep_stage(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    poison_cfg: PoisonConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    progress: bool = True,
) -> PoisonSweepResult:
    """Train one poisoned model per rate in ``poison_cfg.sweep_rates`` (each saved as
    ``<name>_rate<R>``, reusing the main model when its settings match) and record clean
    accuracy, ASR and RA against the rate in ``metrics/poison_sweep_metrics.json``."""
    points = []
    all_reused = True
    for rate in sorted(set(poison_cfg.sweep_rates)):
        cfg = replace(poison_cfg, rate=rate, name=sweep_name(poison_cfg.name, rate))
        model, record, reused, indices = train_poisoned(
            out, data, train_cfg, cfg, data_cfg=data_cfg, force_retrain=force_retrain,
            progress=progress, reuse_names=(poison_cfg.name,),
        )
        all_reused = all_reused and reused
        device = next(model.parameters()).device
        test = data.to(device)
        metrics = backdoor_metrics(model, test.x_test, test.y_test, cfg.trigger(), cfg.target,
                                   num_classes=data.num_classes)
        points.append(
            {
                "rate": rate,
                "n_poison": int(indices.numel()),
                **_summary(metrics),
                "model": {"name": record["name"], "weights_sha256": record["weights_sha256"]},
                "training_seconds": record["training"].get("seconds"),
            }
        )
        print(f"rate {rate:g}: {indices.numel()} poisoned, clean accuracy {100 * metrics.clean_accuracy:.2f}%, "
              f"ASR {100 * metrics.asr:.2f}%, RA {100 * metrics.ra:.2f}%", file=sys.stderr)
    crossing = next((p["rate"] for p in points if p["asr"] is not None and p["asr"] >= 0.9), None)
    config = config_json(train=train_cfg, poison=poison_cfg, data=data_cfg)
    key = sha256_json({"stage": "poison_sweep", "points": [p["model"] for p in points], "data": data.identity(),
                       "config": config, "baseline": _baseline(out, data)})
    if all_reused and (cached := cached_result(out, "poison_sweep", key, PoisonSweepResult)) is not None:
        return cached
    result = PoisonSweepResult(
        stage="poison_sweep",
        name="poison_sweep",
        cache_key=key,
        config=config,
        dataset=data.describe(),
        trigger=poison_cfg.trigger().describe(),
        target=poison_cfg.target,
        points=json_dict({"points": points})["points"],
        asr_90_first_rate=crossing,
        baseline=_baseline(out, data),
        versions=library_versions(),
    )
    write_result(out, "poison_sweep", result)
    return result
