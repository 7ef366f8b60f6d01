"""A cache of intermediate results that is safe by construction: no pickle anywhere.

Tensors (adversarial examples, activations, ...) are stored in safetensors, metadata in
JSON, under a key that is the SHA-256 of the stage name and its inputs in canonical JSON
(tensors among the inputs are hashed by dtype, shape and bytes). An entry is two files::

    ROOT/STAGE/KEY.safetensors   the tensors
    ROOT/STAGE/KEY.json          {"format": "redblue.cache/1", "stage", "key", "inputs",
                                  "tensors_file": "KEY.safetensors", "tensors_sha256": ...,
                                  "tensors": {name: {"dtype", "shape"}}, "metadata", ...}

Both are written atomically, tensors first: the JSON is the commit marker. Reading
re-hashes the exact bytes it parses, so a modified entry is refused with
:class:`~redblue.errors.IntegrityError`; ``tensors_file``/``tensors_sha256`` follow the
``X_file``/``X_sha256`` convention that ``redblue verify`` checks. Loading an entry can
only ever produce tensors and JSON values, whatever an attacker wrote into the folder.

Example:
    >>> import tempfile, torch
    >>> cache = Cache(tempfile.mkdtemp())
    >>> inputs = {"attack": "fgsm", "eps": 0.25, "x": torch.zeros(2, 1, 28, 28)}
    >>> cache.get("adv", inputs) is None
    True
    >>> entry = cache.put("adv", inputs, {"x_adv": torch.ones(2, 1, 28, 28)}, {"accuracy": 0.5})
    >>> hit = cache.get("adv", inputs)
    >>> bool(torch.equal(hit.tensors["x_adv"], torch.ones(2, 1, 28, 28))), hit.metadata
    (True, {'accuracy': 0.5})
"""

from __future__ import annotations

import math
import re
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save

from redblue.artifacts import read_verified_tensors
from redblue.errors import ConfigError, IntegrityError
from redblue.utils import (
    atomic_write_bytes,
    atomic_write_json,
    library_versions,
    read_json,
    sha256_bytes,
    sha256_json,
    sha256_tensor,
)

FORMAT = "redblue.cache/1"
_STAGE = re.compile(r"[a-z0-9][a-z0-9_.-]{0,63}")


def canonical_inputs(inputs: Mapping[str, Any], where: str = "inputs") -> dict[str, Any]:
    """``inputs`` as plain JSON: tensors become ``{"tensor_sha256", "dtype", "shape"}``.

    Raises ConfigError for a value that has no stable JSON form (objects, NaN, ...).
    """

    def convert(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            return {"tensor_sha256": sha256_tensor(value), "dtype": str(value.dtype), "shape": list(value.shape)}
        if isinstance(value, Mapping):
            out = {}
            for key, item in value.items():
                if not isinstance(key, str):
                    raise ConfigError(f"cache {path}: key {key!r} is not a string")
                out[key] = convert(item, f"{path}.{key}")
            return out
        if isinstance(value, list | tuple):
            return [convert(item, f"{path}[{i}]") for i, item in enumerate(value)]
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"cache {path}: {value} has no JSON form (use a finite number or a string)")
        if value is None or isinstance(value, str | int | float | bool):
            return value
        if isinstance(value, Path):
            return str(value)
        raise ConfigError(f"cache {path}: a {type(value).__name__} is not a JSON value or a tensor")

    return dict(convert(dict(inputs), where))


def cache_key(stage: str, inputs: Mapping[str, Any]) -> str:
    """SHA-256 (hex) of the stage name and its inputs in canonical JSON."""
    return sha256_json({"stage": stage, "inputs": canonical_inputs(inputs)})


@dataclass
class CacheEntry:
    """A verified cache entry: its tensors (on the requested device) and metadata."""

    stage: str
    key: str
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, Any]
    json_path: Path
    tensors_path: Path


class Cache:
    """Cache of intermediate results under ``root`` (safetensors + JSON, SHA-256 verified).

    Args:
        root: the cache folder, e.g. ``OUT/cache``; created on first write.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def paths(self, stage: str, key: str) -> tuple[Path, Path]:
        """(tensors, json) paths of entry ``key`` of ``stage``."""
        if not _STAGE.fullmatch(stage):
            raise ConfigError(f"cache stage {stage!r}: expected 1-64 characters of a-z, 0-9, '_', '-', '.'")
        folder = self.root / stage
        return folder / f"{key}.safetensors", folder / f"{key}.json"

    def put(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        tensors: Mapping[str, torch.Tensor],
        metadata: Mapping[str, Any] | None = None,
    ) -> CacheEntry:
        """Store ``tensors`` and JSON ``metadata`` under the key of (``stage``, ``inputs``)."""
        key = cache_key(stage, inputs)
        tensors_path, json_path = self.paths(stage, key)
        for name, tensor in tensors.items():
            if not isinstance(tensor, torch.Tensor):
                raise ConfigError(f"cache {stage}: value {name!r} is a {type(tensor).__name__}, expected a tensor")
        state = {name: t.detach().cpu().contiguous().clone() for name, t in tensors.items()}
        meta = canonical_inputs(metadata or {}, "metadata")
        payload = st_save(state, metadata={"format": FORMAT, "stage": stage, "key": key})
        record = {
            "format": FORMAT,
            "stage": stage,
            "key": key,
            "inputs": canonical_inputs(inputs),
            "tensors_file": tensors_path.name,
            "tensors_sha256": sha256_bytes(payload),
            "tensors": {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in state.items()},
            "metadata": meta,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "versions": library_versions(),
        }
        atomic_write_bytes(tensors_path, payload)
        atomic_write_json(json_path, record)
        return CacheEntry(stage, key, state, meta, json_path, tensors_path)

    def get(self, stage: str, inputs: Mapping[str, Any], device: torch.device | str = "cpu") -> CacheEntry | None:
        """The entry for (``stage``, ``inputs``), or None when there is none.

        Raises IntegrityError when an entry exists but its record is malformed or its
        tensors file is missing, modified or not valid safetensors.
        """
        key = cache_key(stage, inputs)
        tensors_path, json_path = self.paths(stage, key)
        if not json_path.is_file():
            return None
        record = read_json(json_path)
        if not isinstance(record, dict) or record.get("format") != FORMAT:
            raise IntegrityError(f"{json_path}: not a redblue cache record (format {FORMAT})")
        if record.get("key") != key or record.get("stage") != stage or record.get("tensors_file") != tensors_path.name:
            raise IntegrityError(f"{json_path}: record does not belong to key {key[:16]}… of stage {stage!r}")
        state = read_verified_tensors(tensors_path, record.get("tensors_sha256"), json_path, kind="cached tensors")
        described = record.get("tensors")
        actual = {name: {"dtype": str(t.dtype), "shape": list(t.shape)} for name, t in state.items()}
        if described != actual:
            raise IntegrityError(f"{json_path}: tensors described in the record do not match {tensors_path.name}")
        metadata = record.get("metadata")
        if not isinstance(metadata, dict):
            raise IntegrityError(f"{json_path}: metadata is not a JSON object")
        dev = torch.device(device)
        return CacheEntry(stage, key, {k: v.to(dev) for k, v in state.items()}, metadata, json_path, tensors_path)

    def get_or_compute(
        self,
        stage: str,
        inputs: Mapping[str, Any],
        compute: Callable[[], tuple[Mapping[str, torch.Tensor], Mapping[str, Any]]],
        device: torch.device | str = "cpu",
    ) -> tuple[CacheEntry, bool]:
        """(entry, hit): the cached entry, or ``compute()``'s (tensors, metadata) stored now.

        A corrupted or modified entry is reported on stderr and recomputed (and replaced).
        """
        try:
            entry = self.get(stage, inputs, device=device)
        except IntegrityError as exc:
            print(f"notice: not using cached {stage} result: {exc}; recomputing", file=sys.stderr)
            entry = None
        if entry is not None:
            return entry, True
        tensors, metadata = compute()
        stored = self.put(stage, inputs, tensors, metadata)
        dev = torch.device(device)
        stored.tensors = {k: v.to(dev) for k, v in stored.tensors.items()}
        return stored, False
