"""The backdoor-audit stage: is a model backdoored, and by what trigger? (Neural Cleanse)

Needs only the model (any ``--model`` source) and clean labelled images: the first
``n_images`` test images. Writes ``metrics/<name>_metrics.json`` (per class: the reversed
mask's L1 norm, its anomaly index, the trigger's success rate, flagged or not; the verdict)
and ``metrics/<name>_triggers.safetensors`` (the reversed masks and patterns, hashed), which
the report's trigger grid and anomaly chart are rendered from. When the model is one of
redblue's poisoned models, its record's true trigger is compared with the reversed one
(is the target flagged, and what share of the target's mask lies on the true patch).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from redblue.artifacts import LoadedModel
from redblue.config import BackdoorAuditConfig, DataConfig
from redblue.data import Dataset, to_float
from redblue.defenses.neural_cleanse import CleanseResult, neural_cleanse
from redblue.errors import IntegrityError
from redblue.results import BackdoorAuditResult
from redblue.stages.common import cached_result, config_json, model_json, stage_cache, write_result
from redblue.stages.poison import poison_config_from_record
from redblue.utils import atomic_write_bytes, library_versions, resolve_device, sha256_bytes, sha256_file, sha256_json
from redblue.validate import check_name

TRIGGERS_FORMAT = "redblue.reversed-triggers/1"


def _true_trigger(loaded: LoadedModel, masks: torch.Tensor, flagged: list[int]) -> dict[str, Any] | None:
    """For a redblue poisoned model: its target, patch box, and the share of the target's
    reversed mask that lies on the true patch."""
    if not isinstance(loaded.record.get("poison"), dict):
        return None
    poison_cfg = poison_config_from_record(loaded.record)
    _, height, width = masks.shape
    row, col, size = poison_cfg.trigger().box(height, width)
    mask = masks[poison_cfg.target]
    total = float(mask.sum())
    on_patch = float(mask[row : row + size, col : col + size].sum())
    return {
        "target": poison_cfg.target,
        "box": [row, col, size],
        "mask_mass_on_patch": on_patch / total if total > 0 else 0.0,
        "target_flagged": poison_cfg.target in flagged,
        "only_target_flagged": flagged == [poison_cfg.target],
    }


def verdict_text(flagged: list[int], names: list[str] | None, classes: int) -> str:
    """The verdict in words."""
    if not flagged:
        return (f"no class flagged: every one of the {classes} classes needs a trigger of ordinary size "
                "(anomaly index at most 2); no sign of a backdoor")  # fmt: skip
    labels = ", ".join(names[k] if names and k < len(names) else str(k) for k in flagged)
    return (f"backdoor suspected: class {labels} can be reached with a much smaller trigger than the others "
            "(anomaly index above 2); its reversed trigger is saved")  # fmt: skip


def audit_backdoor_stage(
    out: Path,
    loaded: LoadedModel,
    data: Dataset,
    cfg: BackdoorAuditConfig,
    *,
    name: str | None = None,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
) -> BackdoorAuditResult:
    """Run Neural Cleanse on ``loaded`` with the first ``cfg.n_images`` test images of ``data``."""
    model_name = check_name("name", str(loaded.record.get("name", loaded.json_path.stem)), error=IntegrityError)
    name = check_name("name", name or f"{model_name}_backdoor_audit")
    weights = str(loaded.record.get("weights_sha256"))
    settings = dataclasses.asdict(cfg)
    settings.pop("device")
    key = sha256_json({"stage": "backdoor_audit", "settings": settings, "weights": weights, "data": data.identity()})
    cached = cached_result(out, name, key, BackdoorAuditResult)
    if cached is not None and (out / "metrics" / cached.triggers_file).is_file() and (
        sha256_file(out / "metrics" / cached.triggers_file) == cached.triggers_sha256
    ):
        return cached
    device = resolve_device(cfg.device)
    n = min(cfg.n_images, int(data.x_test.shape[0]))
    x = to_float(data.x_test[:n].to(device))
    y = data.y_test[:n].to(device)
    net = loaded.model.to(device)

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        result: CleanseResult = neural_cleanse(
            net, x, y, epochs=cfg.epochs, steps_per_epoch=cfg.steps_per_epoch, batch_size=cfg.batch_size, lr=cfg.lr,
            init_cost=cfg.init_cost, target_asr=cfg.target_asr, seed=cfg.seed, progress=progress,
        )  # fmt: skip
        meta = {"l1": [v if math.isfinite(v) else None for v in result.l1], "asr": result.attack_success_rate, "anomaly_index": result.anomaly_index,
                "flagged": result.flagged, "threshold": result.threshold, "epochs": result.epochs,
                "seconds": result.seconds, "params": result.params}  # fmt: skip
        return {"masks": result.masks, "patterns": result.patterns}, meta

    entry, _ = stage_cache(out).get_or_compute("neural_cleanse", {"key": key}, compute)
    meta = entry.metadata
    masks, patterns = entry.tensors["masks"], entry.tensors["patterns"]
    payload = st_save({"masks": masks.contiguous(), "patterns": patterns.contiguous()},
                      metadata={"format": TRIGGERS_FORMAT})  # fmt: skip
    triggers_file = f"{name}_triggers.safetensors"
    atomic_write_bytes(out / "metrics" / triggers_file, payload)
    names = loaded.record.get("class_names") or (list(data.class_names) if data.class_names else None)
    flagged = [int(k) for k in meta["flagged"]]
    classes = [
        {"class": k, "name": names[k] if names and k < len(names) else None,
         "l1": meta["l1"][k],
         "anomaly_index": meta["anomaly_index"][k], "attack_success_rate": meta["asr"][k], "flagged": k in flagged}
        for k in range(len(meta["l1"]))
    ]  # fmt: skip
    result = BackdoorAuditResult(
        stage="backdoor_audit",
        name=name,
        cache_key=key,
        model=model_json(loaded, model_name),
        config=config_json(backdoor_audit=cfg, data=data_cfg),
        dataset=data.describe(),
        params={**meta["params"], "epochs_run": meta["epochs"], "method": "neural-cleanse"},
        classes=classes,
        flagged=flagged,
        threshold=float(meta["threshold"]),
        verdict=verdict_text(flagged, names, len(classes)),
        true_trigger=_true_trigger(loaded, masks, flagged),
        triggers_file=triggers_file,
        triggers_sha256=sha256_bytes(payload),
        seconds=float(meta["seconds"]),
        versions=library_versions(),
    )
    write_result(out, name, result)
    return result
