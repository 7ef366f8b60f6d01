"""Typed stage results: frozen dataclasses that are exactly what gets written as JSON.

Every result JSON carries ``"schema": {"name": ..., "version": ...}`` and validates against
the JSON Schema of that name shipped in ``redblue/schemas/`` (:func:`validate_result`).
One vocabulary throughout: ``clean_accuracy``, ``robust_accuracy``, ``eps``, ``alpha``
(a step size only), ``n_examples`` (test images attacked or scored), ``n_test`` (test
images a clean accuracy was measured on).

A result reads like the JSON it writes: ``result.metrics["clean_accuracy"]`` or
``result["metrics"]["clean_accuracy"]``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from typing import Any, ClassVar, TypeVar

from redblue.errors import IntegrityError

R = TypeVar("R", bound="Result")

SCHEMA_VERSION = 1


@cache
def load_schema(name: str) -> dict[str, Any]:
    """The JSON Schema ``redblue/schemas/<name>.schema.json`` shipped in the package."""
    text = resources.files("redblue").joinpath("schemas", f"{name}.schema.json").read_text(encoding="utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


SCHEMAS = (
    "baseline", "evaluate", "attack", "defend", "poison", "poison_sweep", "backdoor_defense", "backdoor_audit", "summary",
    "sweep", "sweep_cell",
)
"""Every result schema shipped in the package."""


def validate_result(data: Any, name: str) -> None:
    """Raise :class:`~redblue.errors.IntegrityError` (one line: where and what) unless ``data``
    validates against schema ``name``."""
    import jsonschema  # deferred: only validation needs it, and it is slow to import

    validator = jsonschema.Draft202012Validator(load_schema(name))
    error = jsonschema.exceptions.best_match(validator.iter_errors(data))
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "(top level)"
        raise IntegrityError(f"result does not match schema redblue.{name}/{SCHEMA_VERSION} at {where}: {error.message}")


@dataclass(frozen=True)
class Result(Mapping[str, Any]):
    """Base of the typed results: JSON in and out; reads like the JSON dict it writes
    (``result["metrics"]``, ``"after" in result``, ``dict(result)``)."""

    SCHEMA: ClassVar[str] = ""
    # Not written to the JSON: whether this call reused a saved result.
    reused: bool = field(default=False, kw_only=True, compare=False, metadata={"json": False})

    def to_json(self) -> dict[str, Any]:
        """The JSON form: the schema tag, then every field in order."""
        data: dict[str, Any] = {"schema": {"name": f"redblue.{self.SCHEMA}", "version": SCHEMA_VERSION}}
        for f in dataclasses.fields(self):
            if f.metadata.get("json", True):
                data[f.name] = getattr(self, f.name)
        return data

    @classmethod
    def from_json(cls: type[R], data: dict[str, Any], *, reused: bool = False) -> R:
        """The result a JSON file holds (as written by :meth:`to_json`)."""
        names = {f.name for f in dataclasses.fields(cls) if f.metadata.get("json", True)}
        return cls(**{k: v for k, v in data.items() if k in names}, reused=reused)

    def __getitem__(self, key: str) -> Any:
        if key == "schema":
            return self.to_json()["schema"]
        if not any(f.name == key for f in dataclasses.fields(self)):
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.to_json())

    def __len__(self) -> int:
        return len(self.to_json())


@dataclass(frozen=True)
class StageResult(Result):
    """What every stage result starts with: the stage, the result's name, and the cache key
    (the SHA-256 of what determines it; a rerun with the same key reuses the file)."""

    stage: str
    name: str
    cache_key: str


@dataclass(frozen=True)
class BaselineResult(StageResult):
    """``train`` / the baseline stage: a trained model and its clean test metrics."""

    SCHEMA: ClassVar[str] = "baseline"
    model: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    dataset_notice: str | None
    training: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]


@dataclass(frozen=True)
class EvaluateResult(StageResult):
    """``evaluate``: a saved model's clean test metrics."""

    SCHEMA: ClassVar[str] = "evaluate"
    model: dict[str, Any]
    dataset: dict[str, Any]
    metrics: dict[str, Any]
    versions: dict[str, str]


@dataclass(frozen=True)
class AttackStageResult(StageResult):
    """``attack``: clean, per-attack and worst-case robust accuracy of a saved model."""

    SCHEMA: ClassVar[str] = "attack"
    model: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    dataset_notice: str | None
    metrics: dict[str, Any]
    warnings: list[dict[str, Any]]
    checks: dict[str, Any]
    samples_file: str
    samples_sha256: str
    versions: dict[str, str]
    # --save-adversarial: {"images_file", "images_sha256", "n", "format"} (None when off).
    adversarial: dict[str, Any] | None = None


@dataclass(frozen=True)
class DefendResult(StageResult):
    """``defend``: an adversarially trained model and how robust it is."""

    SCHEMA: ClassVar[str] = "defend"
    model: dict[str, Any]
    recipe: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    evaluation: dict[str, Any]
    eps_sweep: dict[str, Any]
    warnings: list[dict[str, Any]]
    versions: dict[str, str]


@dataclass(frozen=True)
class PoisonResult(StageResult):
    """``poison``: a BadNets model and its clean accuracy, ASR and RA."""

    SCHEMA: ClassVar[str] = "poison"
    model: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    dataset_notice: str | None
    poison: dict[str, Any]
    trigger: dict[str, Any]
    training: dict[str, Any]
    metrics: dict[str, Any]
    baseline: dict[str, Any] | None
    examples: dict[str, Any]
    warnings: list[dict[str, Any]]
    versions: dict[str, str]


@dataclass(frozen=True)
class PoisonSweepResult(StageResult):
    """``poison --sweep``: clean accuracy, ASR and RA against the poison rate."""

    SCHEMA: ClassVar[str] = "poison_sweep"
    config: dict[str, Any]
    dataset: dict[str, Any]
    trigger: dict[str, Any]
    target: int
    points: list[dict[str, Any]]
    asr_90_first_rate: float | None
    baseline: dict[str, Any] | None
    versions: dict[str, str]


@dataclass(frozen=True)
class BackdoorDefenseResult(StageResult):
    """``defend-backdoor``: one detection method on one poisoned model's training set, scored
    against the true poison indices, and the model retrained without what it flagged."""

    SCHEMA: ClassVar[str] = "backdoor_defense"
    method: str
    poisoned_model: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    params: dict[str, Any]
    detection: dict[str, Any]
    per_class: list[dict[str, Any]]
    before: dict[str, Any]
    after: dict[str, Any] | None
    retrained_model: dict[str, Any] | None
    versions: dict[str, str]


@dataclass(frozen=True)
class BackdoorAuditResult(StageResult):
    """``audit-backdoor``: Neural Cleanse on a model and clean images: a reversed trigger per
    class, the anomaly index of its mask norm, the flagged classes and the verdict."""

    SCHEMA: ClassVar[str] = "backdoor_audit"
    model: dict[str, Any]
    config: dict[str, Any]
    dataset: dict[str, Any]
    params: dict[str, Any]
    classes: list[dict[str, Any]]
    flagged: list[int]
    threshold: float
    size_ratio: float
    max_anomaly_index: float | None
    verdict: str
    true_trigger: dict[str, Any] | None
    triggers_file: str
    triggers_sha256: str
    strip: dict[str, Any] | None
    before: dict[str, Any] | None
    repairs: list[dict[str, Any]]
    seconds: float
    versions: dict[str, str]
    restored: dict[str, Any] | None = None  # the flagged classes' compact triggers (None: none restored)


@dataclass(frozen=True)
class Summary(Result):
    """``metrics_summary.json``: the scenario table of a run."""

    SCHEMA: ClassVar[str] = "summary"
    dataset: dict[str, Any] | None
    quick: bool
    columns: list[dict[str, Any]]
    rows: list[dict[str, Any]]
    notes: list[str]


@dataclass(frozen=True)
class SweepCellResult(Result):
    """``cell.json``: how one cell ended (done or failed), with its key metrics."""

    SCHEMA: ClassVar[str] = "sweep_cell"
    cell: str
    key: str
    stage: str
    axes: dict[str, Any]
    status: str  # done | failed
    seconds: float
    metrics: dict[str, float]
    result: str | None  # the stage's result JSON, relative to the cell folder
    error: str | None


@dataclass(frozen=True)
class SweepResult(Result):
    """``sweep_summary.json``: one row per cell, in grid order."""

    SCHEMA: ClassVar[str] = "sweep"
    name: str
    stage: str
    axes: dict[str, list[Any]]
    fixed: dict[str, Any]
    cells: list[dict[str, Any]]
    counts: dict[str, int]
    seconds: float
    engine: dict[str, Any] = field(default_factory=dict)
