"""Model artifacts: safetensors weights + a JSON record with the SHA-256 of the weights file.

A model ``NAME`` lives in ``models/NAME.safetensors`` beside ``models/NAME.json``. The
JSON holds the model name, the config, the dataset and its file hashes, the metrics,
library versions and ``weights_sha256``. Loading re-hashes the exact bytes it parses,
so a tampered or swapped weights file is refused. No pickle anywhere.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from redblue.errors import IntegrityError
from redblue.models import build_model
from redblue.utils import (
    atomic_write_bytes,
    atomic_write_json,
    library_versions,
    read_input_file,
    read_json,
    sha256_bytes,
)
from redblue.validate import FILE_NAME_PATTERN, is_safe_name

FORMAT = "redblue.model/1"


@dataclass
class LoadedModel:
    model: nn.Module
    record: dict[str, Any]
    json_path: Path
    weights_path: Path
    definition: nn.Module | None = None
    """A user's own module (``FILE.py:FUNCTION``) without the normalisation layer redblue may
    have put before it: the module whose state dict its weights file holds."""


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], fmt: str) -> str:
    """Write ``tensors`` (moved to the CPU) as a safetensors file with metadata
    ``{"format": fmt}``, atomically; returns the file's SHA-256 (to record beside it)."""
    payload = st_save({k: v.detach().cpu().contiguous() for k, v in sorted(tensors.items())}, metadata={"format": fmt})
    atomic_write_bytes(path, payload)
    return sha256_bytes(payload)


def model_paths(out: Path, name: str) -> tuple[Path, Path]:
    """(weights, json) paths of model ``name`` under output folder ``out``."""
    return out / "models" / f"{name}.safetensors", out / "models" / f"{name}.json"


def save_model(out: Path, name: str, model: nn.Module, record: dict[str, Any]) -> dict[str, Any]:
    """Write weights (safetensors) then the JSON record, each atomically; returns the record.

    The order matters: the record is what pins the weights (by SHA-256), and it is published
    last, so a reader (:func:`load_model`) never accepts a pair from two runs."""
    weights_path, json_path = model_paths(out, name)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    # One metadata key only: safetensors writes a metadata map in no fixed order, so two keys
    # gave the same weights two different files (and SHA-256s) at random. The model name is
    # in the JSON record.
    payload = st_save(state, metadata={"format": FORMAT})
    atomic_write_bytes(weights_path, payload)
    full = {
        "format": FORMAT,
        "name": name,
        "weights_file": weights_path.name,
        "weights_sha256": sha256_bytes(payload),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": library_versions(),
        **record,
    }
    atomic_write_json(json_path, full)
    return full


def _resolve(path: Path) -> tuple[Path, Path]:
    if path.suffix == ".json":
        json_path = path
        weights_path = path.with_suffix(".safetensors")
    elif path.suffix == ".safetensors":
        weights_path, json_path = path, path.with_suffix(".json")
    else:
        raise IntegrityError(f"{path}: expected a .safetensors weights file or its .json record")
    return json_path, weights_path


def read_record(path: Path) -> dict[str, Any]:
    json_path, _ = _resolve(path)
    record = read_json(json_path)
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise IntegrityError(f"{json_path}: not a redblue model record (format {FORMAT})")
    return record


class HashMismatchError(IntegrityError):
    """A file's SHA-256 differs from the one its record holds."""


def read_verified_tensors(path: Path, sha256: object, record_path: Path, *, kind: str) -> dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path``, after checking its SHA-256 against ``sha256``
    (recorded in ``record_path``). IntegrityError naming the file when it is missing,
    unreadable, modified or not safetensors; nothing is deserialised before the hash matches."""
    payload = read_input_file(path, IntegrityError, missing=f"{kind} file not found (recorded in {record_path.name})")
    digest = sha256_bytes(payload)
    if digest != sha256:
        raise HashMismatchError(
            f"{path}: SHA-256 mismatch (got {digest[:16]}…, recorded {str(sha256)[:16]}… in "
            f"{record_path.name}): the file was modified or does not belong to this record"
        )
    try:
        return st_load(payload)
    except (SafetensorError, ValueError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not a valid safetensors file ({exc})") from None


def _weights_of(json_path: Path, record: dict[str, Any]) -> Path:
    weights_file = record.get("weights_file", json_path.with_suffix(".safetensors").name)
    if not is_safe_name(weights_file, FILE_NAME_PATTERN):
        raise IntegrityError(
            f"{json_path}: weights_file {weights_file!r} is not a file name in the record's own folder "
            "(letters, digits, '.', '_', '+', '-')"
        )
    weights_path = json_path.parent / weights_file
    if weights_path.is_symlink() and weights_path.resolve().parent != json_path.parent.resolve():
        raise IntegrityError(
            f"{json_path}: weights_file {weights_file!r} is a link that resolves outside the record's own "
            f"folder (to {weights_path.resolve()})"
        )
    return weights_path


PAIR_ATTEMPTS = 3
"""How often :func:`load_model` re-reads a pair whose hashes disagree before refusing it."""


def _read_pair(json_path: Path) -> tuple[dict[str, Any], Path, dict[str, torch.Tensor]]:
    """The record, the weights path and the verified weights, read as one pair.

    :func:`save_model` publishes the weights first and the record second (each by an atomic
    rename, under the output lock), and the record pins the weights by SHA-256, so a reader
    can never use one run's weights with another run's record: it either reads a matching
    pair, or sees the hashes disagree. A disagreement while a writer is between its two
    renames (or has just replaced both) is resolved by reading the pair again; one that lasts
    (a modified file, or a writer killed between the renames) is refused.
    """
    for attempt in range(PAIR_ATTEMPTS):
        record = read_record(json_path)
        weights_path = _weights_of(json_path, record)
        try:
            return record, weights_path, read_verified_tensors(
                weights_path, record.get("weights_sha256"), json_path, kind="weights"
            )
        except HashMismatchError:
            if attempt == PAIR_ATTEMPTS - 1:
                raise
            if read_record(json_path) == record:
                time.sleep(0.05 * (attempt + 1))  # a writer may be between its two renames
    raise AssertionError("unreachable")  # pragma: no cover


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """Load a model saved by :func:`save_model`, verifying the weights' SHA-256 first."""
    json_path, _ = _resolve(Path(path))
    record, weights_path, state = _read_pair(json_path)
    if record.get("source") == "module":
        files = [f for f in record.get("base_files", {}) if str(f).endswith(".py")] or ["FILE.py"]
        raise IntegrityError(
            f"{json_path}: weights fine-tuned from your own module; load them as you loaded the original: "
            f"--model {files[0]}:{record.get('factory')} --weights {weights_path}"
        )
    model = build_model(str(record.get("model_name", "cnn")))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise IntegrityError(
            f"{weights_path}: weights do not fit model {record.get('model_name')!r} ({first})"
        ) from None
    model.to(torch.device(device)).eval()
    return LoadedModel(model=model, record=record, json_path=json_path, weights_path=weights_path)


def find_reusable(out: Path, name: str, cache_key: str) -> LoadedModel | None:
    """The saved model ``name`` when its record's cache key matches and its hash verifies."""
    weights_path, json_path = model_paths(out, name)
    if not json_path.is_file() or not weights_path.is_file():
        return None
    try:
        record = read_record(json_path)
    except IntegrityError:
        return None
    if record.get("cache_key") != cache_key:
        return None
    try:
        return load_model(json_path)
    except IntegrityError as exc:
        print(f"notice: not reusing {json_path.name}: {exc}; retraining", file=sys.stderr)
        return None
