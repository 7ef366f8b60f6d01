"""What every stage shares: the data loader, cache keys, "train or reuse, then save", and
the stage-result cache.

A stage is a function ``config in, typed result out``: it trains (or reuses) what it needs,
evaluates it, writes its result JSON under ``OUT/metrics/`` and returns the result. Two
levels of caching make a rerun cheap:

- a trained model is reused when its record's ``cache_key`` (training config, data hashes,
  stage settings) matches (:func:`train_or_reuse`);
- a stage's whole result is reused, byte for byte, when ``OUT/metrics/<name>_metrics.json``
  carries the same ``cache_key`` (what determines it: weights SHA-256, settings, data
  hashes) and validates against its schema (:func:`cached_result`);
- expensive intermediate results (robustness evaluations, sanity checks, detections) go
  through the safe JSON/safetensors cache in ``OUT/cache`` (:func:`stage_cache`).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from torch import nn

from redblue.artifacts import LoadedModel, find_reusable, model_paths, save_model
from redblue.cache import Cache
from redblue.config import DataConfig, TrainConfig
from redblue.data import Dataset, load_dataset
from redblue.errors import ConfigError, IntegrityError
from redblue.results import Result, validate_result
from redblue.utils import atomic_write_json, read_json, resolve_device, sha256_file, sha256_json

R = TypeVar("R", bound=Result)


BUILTIN_INPUT = (1, 28, 28)
BUILTIN_CLASSES = 10


def load_data(cfg: DataConfig, device: str = "cpu", *, builtin: bool = True) -> Dataset:
    """The dataset ``cfg`` names, from the first source that has it (SHA-256 verified).

    ``builtin``: the data will train or feed one of redblue's own architectures (1x28x28
    images, 10 classes, a training split): a user's data that does not fit is refused here,
    before anything is written. Commands that take the user's model pass ``False``.
    """
    data = load_dataset(cfg.dataset, cfg.data_dir, cache_dir=cfg.cache_dir, device=device)
    if builtin:
        if data.image_shape != BUILTIN_INPUT:
            shape = "x".join(map(str, data.image_shape))
            raise ConfigError(
                f"--dataset {cfg.dataset}: {shape} images; redblue's own architectures take 1x28x28 "
                "(to audit a model of yours on this data: attack/evaluate/defend --model FILE.py:FUNCTION)"
            )
        if data.num_classes > BUILTIN_CLASSES:
            raise ConfigError(f"--dataset {cfg.dataset}: {data.num_classes} classes; redblue's own architectures output 10")
        if data.x_train.shape[0] == 0:
            raise ConfigError(f"--dataset {cfg.dataset}: no training images (x_train/y_train, or a train/ folder)")
    return data


def config_json(**configs: Any) -> dict[str, Any]:
    """Frozen configs as plain JSON values (tuples become lists; ``None`` stays ``None``)."""
    data = {name: (asdict(cfg) if cfg is not None else None) for name, cfg in configs.items()}
    result: dict[str, Any] = json.loads(json.dumps(data))
    return result


def training_cache_key(stage: str, train_cfg: TrainConfig, data: Dataset, extra: dict[str, Any] | None = None) -> str:
    """Hash of what determines a trained model: stage, training config (less the device),
    dataset name and file hashes, and any stage-specific settings."""
    train = asdict(train_cfg)
    train.pop("device", None)
    return sha256_json({"stage": stage, "train": train, "data": data.identity(), "extra": extra or {}})


USER_MODEL_KEYS = ("source", "files", "factory", "input_shape", "num_classes", "mean", "std", "class_names",
                   "onnx_parity_max_abs_diff")  # fmt: skip
"""What a result records about a model redblue did not train (:mod:`redblue.model_sources`)."""


def model_json(loaded: LoadedModel, name: str) -> dict[str, Any]:
    """The ``model`` entry of a result: name, path, weights hash; for a user's model also the
    SHA-256 of every file that defined it and what it expects."""
    entry: dict[str, Any] = {"name": name, "path": str(loaded.weights_path),
                             "weights_sha256": str(loaded.record.get("weights_sha256"))}  # fmt: skip
    entry.update({k: loaded.record[k] for k in USER_MODEL_KEYS if k in loaded.record})
    return entry


@dataclass(frozen=True)
class Trained:
    """A model from :func:`train_or_reuse`: the module, its saved record, whether it was reused."""

    model: nn.Module
    record: dict[str, Any]
    reused: bool


def train_or_reuse(
    out: Path,
    name: str,
    key: str,
    train: Callable[[], tuple[nn.Module, dict[str, Any]]],
    record: Mapping[str, Any],
    *,
    device: str = "auto",
    force_retrain: bool = False,
    reuse_names: tuple[str, ...] = (),
    accept: Callable[[dict[str, Any]], bool] | None = None,
) -> Trained:
    """Reuse the saved model ``name`` when its ``cache_key`` matches ``key``, else train and save it.

    ``train()`` returns ``(model, training summary)``; the saved record is ``record`` plus
    ``cache_key`` and ``training``. ``reuse_names``: other saved models whose weights may
    be reused (saved again under ``name``) when their key matches; ``accept(record)`` can
    refuse a candidate (e.g. a different poison set). ``force_retrain`` always trains.
    ``reused`` is True only when the saved ``name`` itself was reused as it was.
    """
    dev = resolve_device(device)
    candidate = None
    if not force_retrain:
        for other in (name, *reuse_names):
            found = find_reusable(out, other, key)
            if found is not None and (accept is None or accept(found.record)):
                candidate = found
                break
    if candidate is not None and candidate.record.get("name") == name:
        print(f"reusing {candidate.json_path} (same config and data; --force-retrain to retrain)", file=sys.stderr)
        return Trained(candidate.model.to(dev), candidate.record, True)
    if candidate is not None:
        print(f"reusing {candidate.json_path} for {name} (same config and data)", file=sys.stderr)
        model, training = candidate.model.to(dev), candidate.record["training"]
    else:
        model, training = train()
    saved = save_model(out, name, model, {**record, "cache_key": key, "training": training})
    return Trained(model, saved, False)


def file_intact(path: Path, sha256: object) -> bool:
    """``path`` is a file whose SHA-256 is ``sha256`` (what a cached result's files must be to
    reuse the result)."""
    return path.is_file() and sha256_file(path) == sha256


def model_intact(out: Path, name: str, weights_sha256: object) -> bool:
    """The saved model ``name`` (record and weights) is still there, its weights unchanged."""
    weights, record = model_paths(out, name)
    return record.is_file() and file_intact(weights, weights_sha256)


def metrics_path(out: Path, name: str) -> Path:
    return out / "metrics" / f"{name}_metrics.json"


def cached_result(out: Path, name: str, key: str, cls: type[R]) -> R | None:
    """The saved result ``metrics/<name>_metrics.json`` when its ``cache_key`` is ``key`` and
    it validates against ``cls``'s schema; None otherwise (then the stage recomputes)."""
    path = metrics_path(out, name)
    if not path.is_file():
        return None
    try:
        saved = read_json(path)
    except IntegrityError:
        return None
    if not isinstance(saved, dict) or saved.get("cache_key") != key:
        return None
    try:
        validate_result(saved, cls.SCHEMA)
    except IntegrityError as exc:
        print(f"notice: not reusing {path}: {exc}", file=sys.stderr)
        return None
    print(f"reusing {path} (same model, settings and data)", file=sys.stderr)
    return cls.from_json(saved, reused=True)


def write_result(out: Path, name: str, result: Result) -> None:
    """Validate ``result`` against its schema and write it as ``metrics/<name>_metrics.json``."""
    data = result.to_json()
    validate_result(data, result.SCHEMA)
    atomic_write_json(metrics_path(out, name), data)


def stage_cache(out: Path) -> Cache:
    """The output folder's safe cache of intermediate results (``OUT/cache``)."""
    return Cache(out / "cache")


USER_MODEL_FIELDS = ("input_shape", "num_classes", "mean", "std", "class_names")


def derived_record(base: LoadedModel) -> dict[str, Any]:
    """The record fields a model derived from ``base`` (fine-tuned, repaired) inherits: a
    redblue architecture's name, or a user module's factory, files and input settings."""
    if base.record.get("source") != "module":
        return {"model_name": base.record.get("model_name", "cnn")}
    return {"model_name": "user-module", "source": "module", "factory": base.record.get("factory"),
            "base_files": base.record.get("files"), **{k: base.record.get(k) for k in USER_MODEL_FIELDS}}  # fmt: skip


def inner_module(base: LoadedModel, tuned: nn.Module) -> nn.Module:
    """What is saved of a model derived from ``base``: all of it for a redblue model; for a
    user's module, the module itself without the normalisation layer that ``--mean``/``--std``
    put before it (so its weights load the way the original's did)."""
    if base.record.get("source") != "module" or base.definition is None or base.definition is base.model:
        return tuned
    return cast(nn.Sequential, tuned)[1]


def save_derived(out: Path, name: str, base: LoadedModel, tuned: nn.Module, record: Mapping[str, Any]) -> dict[str, Any]:
    """Save a model derived from ``base`` as ``models/NAME``; returns the saved record."""
    return save_model(out, name, inner_module(base, tuned), {**record, **derived_record(base)})
