"""The backdoor-defence stage: detect the poison in a poisoned model's training set, score the
detection against the true poison indices, retrain without what was flagged, measure again
(:func:`defend_backdoor_stage`, redblue's poisoned models); or screen a user's training set
with the model trained on it (:func:`detect_training_set_stage`).

Writes ``metrics/backdoor_defense_<method>_metrics.json`` and the retrained model
``models/<name>_<method>_retrained``. The detection is cached by the poisoned model's
weights SHA-256, the detector's settings and the data; the retrained model by what was
removed and the training config.
"""

from __future__ import annotations

import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from redblue.artifacts import LoadedModel, load_model, write_tensors
from redblue.config import BackdoorDefenseConfig, DataConfig, TrainConfig, build
from redblue.data import Dataset
from redblue.defenses.backdoor import detect
from redblue.errors import ConfigError, IntegrityError
from redblue.metrics import BackdoorMetrics, backdoor_metrics, detection_scores, json_dict
from redblue.models import build_model
from redblue.poison.dataset import remove_examples
from redblue.results import BackdoorDefenseResult
from redblue.stages.common import (
    cached_result,
    config_json,
    file_intact,
    model_intact,
    model_json,
    stage_cache,
    train_or_reuse,
    training_cache_key,
    write_result,
)
from redblue.stages.poison import build_poisoned, poison_config_from_record, verify_indices
from redblue.train import accuracy, fit
from redblue.utils import library_versions, resolve_device, seed_everything, sha256_json, sha256_tensor
from redblue.validate import check_name

DETECTION_SETTINGS = (
    "method", "n_components", "reduce", "analysis", "max_share", "min_silhouette", "reclass_threshold",
    "expected_share", "spectral_factor", "detection_seed",
)  # fmt: skip
"""The settings a detection depends on (``retrain`` only decides what happens after it)."""


def _retrained_model_ok(out: Path, retrained: dict[str, Any] | None) -> bool:
    """A saved result may be reused only while the retrained model it names is still there, unchanged."""
    return retrained is None or model_intact(out, str(retrained["name"]), retrained["weights_sha256"])


def defend_backdoor_stage(
    out: Path,
    data: Dataset,
    model_path: Path,
    defense_cfg: BackdoorDefenseConfig,
    *,
    train_cfg: TrainConfig | None = None,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    progress: bool = True,
) -> BackdoorDefenseResult:
    """Detect the poison in a poisoned model's training set, score the detection, retrain
    without the flagged examples and measure clean accuracy / ASR / RA again.

    The poisoned training set is rebuilt from ``data`` and the settings in the model's
    record (trigger, target, rate, seed); the rebuilt poison indices must hash to the
    recorded SHA-256. ``train_cfg`` (default: the poisoned model's own) drives the
    retraining.
    """
    device = resolve_device(train_cfg.device if train_cfg else "auto")
    loaded = load_model(model_path, device=device)
    record = loaded.record
    poison_cfg = poison_config_from_record(record)
    if train_cfg is None:
        recorded = (record.get("config") or {}).get("train")
        if not isinstance(recorded, dict):
            raise IntegrityError(f"{loaded.json_path}: no training config in the record")
        train_cfg = build(TrainConfig, recorded, {}, "train")
    method = defense_cfg.method
    result_name = f"backdoor_defense_{method}"
    detection_inputs = {
        "poisoned_weights": record["weights_sha256"],
        "detector": {k: getattr(defense_cfg, k) for k in DETECTION_SETTINGS},
        "data": data.identity(),
    }
    retrain = training_cache_key("backdoor_retrain", train_cfg, data) if defense_cfg.retrain else None
    key = sha256_json({"stage": "backdoor_defense", **detection_inputs, "retrain": retrain})
    cached = None if force_retrain else cached_result(out, result_name, key, BackdoorDefenseResult)
    if cached is not None and _retrained_model_ok(out, cached.retrained_model):
        return cached
    poisoned, indices = build_poisoned(data, poison_cfg)
    verify_indices(record, indices)
    poisoned = poisoned.to(device)
    trigger = poison_cfg.trigger()

    def measure(model: nn.Module) -> BackdoorMetrics:
        return backdoor_metrics(model, poisoned.x_test, poisoned.y_test, trigger, poison_cfg.target,
                                num_classes=data.num_classes)

    before = measure(loaded.model)
    expected = defense_cfg.expected_share if defense_cfg.expected_share is not None else poison_cfg.rate

    def run_detection() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        print(f"{method}: detecting on {int(poisoned.y_train.numel())} training images", file=sys.stderr)
        det = detect(loaded.model, poisoned.x_train, poisoned.y_train, defense_cfg, expected_share=expected,
                     num_classes=data.num_classes, progress=progress)
        found = {"method": det.method, "per_class": det.per_class, "params": det.params, "seconds": det.seconds}
        return {"flagged": det.flagged.cpu()}, json_dict(found)

    entry, _ = stage_cache(out).get_or_compute("detection", {**detection_inputs, "expected_share": expected},
                                               run_detection)
    flagged = entry.tensors["flagged"]
    scores = detection_scores(flagged, indices.cpu(), int(poisoned.y_train.numel()))
    print(f"{method}: flagged {scores['n_flagged']} of {scores['n']} "
          f"(precision {100 * scores['precision']:.2f}%, recall {100 * scores['recall']:.2f}%) "
          f"in {entry.metadata['seconds']:.1f} s", file=sys.stderr)
    per_class_poison = torch.bincount(poisoned.y_train[indices].cpu(), minlength=data.num_classes)
    per_class = [{**row, "n_poison": int(per_class_poison[row["class"]])} for row in entry.metadata["per_class"]]
    after = None
    retrained = None
    if defense_cfg.retrain:
        name = f"{check_name('name', record['name'], error=IntegrityError)}_{method}_retrained"
        clean_part = remove_examples(poisoned, flagged.to(device))
        retrain_key = training_cache_key(
            "backdoor_retrain", train_cfg, data,
            extra={"poisoned": record["weights_sha256"], "removed": sha256_tensor(flagged)},
        )  # fmt: skip

        def train() -> tuple[nn.Module, dict[str, Any]]:
            seed_everything(train_cfg.seed)
            model = build_model(train_cfg.model_name)
            return model, fit(model, clean_part, train_cfg, progress=progress, desc=name).summary()

        trained = train_or_reuse(
            out, name, retrain_key, train,
            {
                "model_name": train_cfg.model_name,
                "stage": "backdoor_retrain",
                "config": config_json(train=train_cfg, backdoor=defense_cfg, data=data_cfg),
                "dataset": data.describe(),
                "removed": {"method": method, "n_removed": int(flagged.numel()),
                            "poisoned_weights_sha256": record["weights_sha256"]},
            },
            device=train_cfg.device, force_retrain=force_retrain,
        )  # fmt: skip
        m = measure(trained.model)
        after = {**m.rates(), "triggered_predicted_counts": m.triggered_predicted_counts,
                 "n_train": int(clean_part.y_train.numel())}
        retrained = {"name": name, "weights_sha256": trained.record["weights_sha256"],
                     "training_seconds": trained.record["training"].get("seconds")}
    result = BackdoorDefenseResult(
        stage="backdoor_defense",
        name=result_name,
        method=method,
        cache_key=key,
        poisoned_model={"name": record["name"], "weights_sha256": record["weights_sha256"],
                        "poison": record["poison"], "poison_indices_sha256": record["poison_indices_sha256"]},
        config={"backdoor": asdict(defense_cfg), "train": asdict(train_cfg),
                "data": asdict(data_cfg) if data_cfg else None},
        dataset=data.describe(),
        params=json_dict({**entry.metadata["params"],
                          "expected_share_used": expected if method == "spectral" else None}),
        detection=json_dict({**scores, "seconds": entry.metadata["seconds"]}),
        per_class=per_class,
        before=json_dict(before.rates()),
        after=json_dict(after) if after else None,
        retrained_model=retrained,
        versions=library_versions(),
    )
    write_result(out, result_name, result)
    return result


FLAGGED_FORMAT = "redblue.flagged-indices/1"


def _flagged_ok(out: Path, result: BackdoorDefenseResult) -> bool:
    return file_intact(out / "metrics" / str(result.detection.get("flagged_file")), result.detection.get("flagged_sha256"))


def detect_training_set_stage(
    out: Path,
    loaded: LoadedModel,
    data: Dataset,
    defense_cfg: BackdoorDefenseConfig,
    *,
    poison_indices: torch.Tensor | None = None,
    poison_indices_sha256: str | None = None,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
) -> BackdoorDefenseResult:
    """Screen a user's training set (``data``'s training split) for poison with the model
    trained on it (any ``--model`` source): the detector's flagged indices are written to
    ``metrics/<name>_flagged.safetensors`` (hashed); precision and recall are scored only
    when the true ``poison_indices`` are given. No retraining: redblue does not know how the
    user's model was trained (they retrain without the flagged images themselves)."""
    n = int(data.x_train.shape[0])
    method = defense_cfg.method
    if n == 0:
        raise ConfigError(f"--dataset {data.name}: has no training images to screen; give one with a training split "
                          "(x_train/y_train in an .npz, or train/ in an image folder)")  # fmt: skip
    if method == "spectral" and defense_cfg.expected_share is None:
        raise ConfigError("--expected-share: spectral signatures on a user's training set need the share of a class "
                          "expected to be poisoned (e.g. 0.1); it is not recorded anywhere")  # fmt: skip
    if poison_indices is not None and poison_indices.numel() and not 0 <= int(poison_indices.min()) <= int(poison_indices.max()) < n:
        raise ConfigError(f"--poison-indices: indices must lie in 0..{n - 1} (the training images of {data.name})")
    model_name = check_name("name", str(loaded.record.get("name", loaded.json_path.stem)), error=IntegrityError)
    name = f"{model_name}_backdoor_defense_{method}"
    expected = float(defense_cfg.expected_share) if defense_cfg.expected_share is not None else 0.0
    detection_inputs = {
        "poisoned_weights": loaded.record["weights_sha256"],
        "detector": {k: getattr(defense_cfg, k) for k in DETECTION_SETTINGS},
        "data": data.identity(),
        "expected_share": expected,
    }
    key = sha256_json({"stage": "backdoor_defense", **detection_inputs, "poison_indices": poison_indices_sha256})
    cached = cached_result(out, name, key, BackdoorDefenseResult)
    if cached is not None and _flagged_ok(out, cached):
        return cached
    device = next(iter(loaded.model.parameters()), torch.empty(0)).device
    screened = data.to(device)

    def run_detection() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        print(f"{method}: screening {n} training images of {data.name}", file=sys.stderr)
        det = detect(loaded.model, screened.x_train, screened.y_train, defense_cfg, expected_share=expected,
                     num_classes=data.num_classes, progress=progress)  # fmt: skip
        found = {"method": det.method, "per_class": det.per_class, "params": det.params, "seconds": det.seconds}
        return {"flagged": det.flagged.cpu()}, json_dict(found)

    entry, _ = stage_cache(out).get_or_compute("detection", detection_inputs, run_detection)
    flagged = entry.tensors["flagged"].long()
    flagged_file = f"{name}_flagged.safetensors"
    flagged_sha256 = write_tensors(out / "metrics" / flagged_file, {"flagged": flagged}, FLAGGED_FORMAT)
    if poison_indices is not None:
        scores = detection_scores(flagged, poison_indices.cpu(), n)
        per_poison = torch.bincount(data.y_train.cpu()[poison_indices.cpu().long()], minlength=data.num_classes)
    else:
        scores = {"n": n, "n_flagged": int(flagged.numel()), "n_poison": None, "precision": None, "recall": None}
        per_poison = None
    per_class = [{**row, "n_poison": None if per_poison is None else int(per_poison[row["class"]])}
                 for row in entry.metadata["per_class"]]  # fmt: skip
    result = BackdoorDefenseResult(
        stage="backdoor_defense",
        name=name,
        method=method,
        cache_key=key,
        poisoned_model={**model_json(loaded, model_name), "poison": None, "poison_indices_sha256": poison_indices_sha256},
        config={"backdoor": asdict(defense_cfg), "train": None, "data": asdict(data_cfg) if data_cfg else None},
        dataset=data.describe(),
        params=json_dict({**entry.metadata["params"], "expected_share_used": expected if method == "spectral" else None}),
        detection=json_dict(
            {**scores, "seconds": entry.metadata["seconds"], "flagged_file": flagged_file, "flagged_sha256": flagged_sha256}
        ),
        per_class=per_class,
        before={"clean_accuracy": accuracy(loaded.model, screened.x_test, screened.y_test), "asr": None, "ra": None},
        after=None,
        retrained_model=None,
        versions=library_versions(),
    )
    write_result(out, name, result)
    return result
