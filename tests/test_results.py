"""Typed results: every metrics JSON carries its schema tag and validates against the JSON
Schema shipped in the package; the old names of one concept are gone."""

from __future__ import annotations

import json
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import jsonschema
import pytest

from redblue.errors import IntegrityError
from redblue.results import SCHEMAS, BaselineResult, load_schema, validate_result

OLD_NAMES = {"accuracy", "c_acc", "eval_n", "eval_clean_accuracy", "n_clean", "c_acc_drop_pp", "timings_s"}
"""Keys that named a concept twice before one vocabulary (clean_accuracy, n_examples, n_test)."""


def _keys(obj: Any) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    if isinstance(obj, list):
        return {k for v in obj for k in _keys(v)}
    return set()


@pytest.mark.parametrize("name", SCHEMAS)
def test_every_shipped_schema_is_a_valid_json_schema(name: str) -> None:
    schema = load_schema(name)
    jsonschema.Draft202012Validator.check_schema(schema)
    assert schema["properties"]["schema"]["properties"]["name"] == {"const": f"redblue.{name}"}


def test_a_result_that_breaks_its_schema_is_refused() -> None:
    good = {
        "stage": "baseline", "name": "b", "cache_key": "0" * 64,
        "model": {"name": "b", "weights_sha256": "1" * 64}, "config": {}, "dataset": {"name": "mnist"},
        "dataset_notice": None, "training": {}, "versions": {"redblue": "0.1.0"},
        "metrics": {"clean_accuracy": 0.5, "loss": 1.0, "n_test": 2, "latency": {}, "confusion": [[1, 0], [0, 1]]},
    }  # fmt: skip
    result = BaselineResult(**good)  # type: ignore[arg-type]
    data = result.to_json()
    assert data["schema"] == {"name": "redblue.baseline", "version": 1}
    validate_result(data, "baseline")
    assert BaselineResult.from_json(data) == result and result["metrics"]["n_test"] == 2
    for broken in (
        {**data, "metrics": {**data["metrics"], "accuracy": 0.5}},  # an old name
        {**data, "metrics": {**data["metrics"], "clean_accuracy": 1.5}},  # not a share
        {k: v for k, v in data.items() if k != "cache_key"},
        {**data, "schema": {"name": "redblue.attack", "version": 1}},
    ):
        with pytest.raises(IntegrityError, match=r"does not match schema redblue\.baseline/1"):
            validate_result(broken, "baseline")


def test_every_metrics_json_of_a_run_validates_and_uses_one_vocabulary(
    quick_run: tuple[Path, CompletedProcess[str]],
) -> None:
    out, result = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    files = [*sorted((out / "metrics").glob("*_metrics.json")), out / "metrics" / "metrics_summary.json"]
    assert len(files) >= 9
    for path in files:
        data = json.loads(path.read_text())
        name = data["schema"]["name"].removeprefix("redblue.")
        assert name in SCHEMAS, path.name
        validate_result(data, name)
        old = _keys(data) & OLD_NAMES
        assert not old, f"{path.name}: {sorted(old)}"
