"""The attack stage: evaluate a saved model against attacks, with the sanity checks.

Writes ``metrics/<name>_metrics.json`` (metrics, warnings, config, the model's weights hash,
the dataset hashes) and ``metrics/<name>_examples.safetensors`` (example images and
predictions, which the red-team plots are rendered from). The evaluation is cached by what
determines it (weights SHA-256, attack settings, check settings, data hashes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch

from redblue.artifacts import LoadedModel, load_model, write_tensors
from redblue.config import AttackConfig, DataConfig
from redblue.data import Dataset
from redblue.errors import IntegrityError
from redblue.evaluation import evaluate_robustness, sample_predictions
from redblue.results import AttackStageResult
from redblue.stages.common import cached_result, config_json, file_intact, model_json, stage_cache, write_result
from redblue.train import channels_last
from redblue.utils import (
    eval_mode,
    library_versions,
    resolve_device,
    sha256_json,
)
from redblue.validate import check_name

SAMPLES_FORMAT = "redblue.attack-samples/1"
ADVERSARIAL_FORMAT = "redblue.adversarial-examples/1"
ADVERSARIAL_KEYS = ("adversarial.x", "adversarial.y", "adversarial.pred", "adversarial.pred_clean")
"""The tensors of ``--save-adversarial``: every image's worst-case adversarial example (float32
in [0, 1], shaped like the test images), its label, the model's prediction on it and on the
clean image."""


def attack_key(cfg: AttackConfig, weights_sha256: str, data: Dataset, check_options: dict[str, int] | None) -> str:
    """What determines an attack stage's result: settings (less the device), checks, weights, data."""
    settings = dataclasses.asdict(cfg)
    settings.pop("device")
    return sha256_json(
        {"stage": "attack", "attack": settings, "checks": check_options, "weights": weights_sha256, "data": data.identity()}
    )


def _samples_ok(out: Path, result: AttackStageResult) -> bool:
    adv = result.adversarial
    return file_intact(out / "metrics" / result.samples_file, result.samples_sha256) and (
        adv is None or file_intact(out / "metrics" / adv["images_file"], str(adv["images_sha256"]))
    )


def _predict(model: torch.nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad(), eval_mode(model):
        return torch.cat([model(channels_last(x[i : i + batch_size])).argmax(1) for i in range(0, x.shape[0], batch_size)])


def attack_stage(
    out: Path,
    model: str | Path | LoadedModel,
    data: Dataset,
    cfg: AttackConfig,
    *,
    name: str | None = None,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
    check_options: dict[str, int] | None = None,
    checks_note: str | None = None,
) -> AttackStageResult:
    """Evaluate a saved model against ``cfg``'s attacks and write the results.

    ``name`` defaults to ``<model name>_<attack>``. ``check_options`` sizes the sanity checks
    (``check_examples``, ``square_examples``, ``square_queries``); ``checks_note`` says where
    the checks are when ``cfg.checks`` is off. Returns the typed result (as written).
    """
    device = resolve_device(cfg.device)
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model), device=device)
    net = loaded.model.to(device)
    model_name = check_name("name", str(loaded.record.get("name", loaded.json_path.stem)), error=IntegrityError)
    name = check_name("name", name or f"{model_name}_{cfg.attack.replace(',', '+')}")
    weights_sha = str(loaded.record.get("weights_sha256"))
    key = attack_key(cfg, weights_sha, data, check_options)
    cached = cached_result(out, name, key, AttackStageResult)
    if cached is not None and _samples_ok(out, cached):
        return cached
    test = data.to(device)
    n = int(test.x_test.shape[0]) if cfg.n_examples is None else min(cfg.n_examples, int(test.x_test.shape[0]))
    x, y = test.x_test[:n], test.y_test[:n]

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        result = evaluate_robustness(
            net, x, y, attacks=cfg.attack, eps=cfg.eps, norm=cfg.norm, batch_size=cfg.batch_size,
            seed=cfg.seed, sweep=cfg.sweep, checks=cfg.checks, progress=progress,
            alpha=cfg.alpha, steps=cfg.steps, restarts=cfg.restarts, random_start=cfg.random_start,
            n_targets=cfg.n_targets, check_options=check_options, keep_adversarial=cfg.save_adversarial,
        )  # fmt: skip
        predictions = sample_predictions(net, result.samples)
        tensors = {k: v.detach().cpu().contiguous() for k, v in result.samples.items()}
        tensors.update({f"pred_{k}": v.detach().cpu().contiguous() for k, v in predictions.items()})
        if result.adversarial is not None:
            adv = {"x": result.adversarial, "y": y, "pred": _predict(net, result.adversarial, cfg.batch_size),
                   "pred_clean": _predict(net, x.float().div(255.0) if x.dtype == torch.uint8 else x.float(),
                                         cfg.batch_size)}  # fmt: skip
            tensors.update({f"adversarial.{k}": v.detach().cpu().contiguous() for k, v in adv.items()})
        return tensors, {"metrics": result.to_json(), "warnings": result.warnings, "checks_n_examples": result.checks_n_examples}

    entry, _ = stage_cache(out).get_or_compute("attack", {"key": key}, compute)
    examples = {k: v for k, v in entry.tensors.items() if k not in ADVERSARIAL_KEYS}
    samples_rel = f"{name}_examples.safetensors"
    samples_sha256 = write_tensors(out / "metrics" / samples_rel, examples, SAMPLES_FORMAT)
    adversarial: dict[str, Any] | None = None
    if cfg.save_adversarial:
        adv_file = f"{name}_adversarial.safetensors"
        adv_sha256 = write_tensors(out / "metrics" / adv_file, {k: entry.tensors[k] for k in ADVERSARIAL_KEYS},
                                   ADVERSARIAL_FORMAT)  # fmt: skip
        adversarial = {"images_file": adv_file, "images_sha256": adv_sha256,
                       "n": int(entry.tensors["adversarial.y"].shape[0]), "format": ADVERSARIAL_FORMAT}  # fmt: skip
    metrics = entry.metadata["metrics"]
    if cfg.checks:
        checks = {"ran": True, "n_examples": entry.metadata["checks_n_examples"], "note": None}
    else:
        checks = {"ran": False, "n_examples": None, "note": checks_note or "sanity checks turned off (--no-checks)"}
    result = AttackStageResult(
        stage="attack",
        name=name,
        cache_key=key,
        model=model_json(loaded, model_name),
        config=config_json(attack=cfg, data=data_cfg),
        dataset=data.describe(),
        dataset_notice=data.notice,
        metrics=metrics,
        warnings=entry.metadata["warnings"],
        checks=checks,
        # X_file / X_sha256 pairs name files relative to the JSON's own folder (redblue verify).
        samples_file=samples_rel,
        samples_sha256=samples_sha256,
        versions=library_versions(),
        adversarial=adversarial,
    )
    write_result(out, name, result)
    return result
