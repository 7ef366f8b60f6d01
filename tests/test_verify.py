"""redblue.verify: every X_file / X_sha256 pair in every JSON under a folder is checked."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from redblue.artifacts import save_model
from redblue.cache import Cache
from redblue.errors import ConfigError
from redblue.models import build_model
from redblue.utils import atomic_write_json, sha256_bytes
from redblue.verify import find_pairs, verify_dir


def make_outputs(out: Path) -> dict[str, Path]:
    """An output folder with one artifact of each kind redblue records."""
    save_model(out, "baseline", build_model("cnn"), {"model_name": "cnn"})
    entry = Cache(out / "cache").put("adv", {"eps": 0.25}, {"x_adv": torch.rand(3, 1, 28, 28)})
    # The backdoor helper's convention: poison_indices_file / poison_indices_sha256.
    payload = st_save({"poison_indices": torch.tensor([5, 17, 42, 99])})
    (out / "poison").mkdir()
    (out / "poison" / "indices.safetensors").write_bytes(payload)
    atomic_write_json(
        out / "metrics" / "poison_metrics.json",
        {
            "stage": "poison",
            "runs": [
                {"rate": 0.01, "poison": {"poison_indices_file": "../poison/indices.safetensors",
                                          "poison_indices_sha256": sha256_bytes(payload)}},
            ],
        },
    )
    return {
        "weights": out / "models" / "baseline.safetensors",
        "tensors": entry.tensors_path,
        "poison_indices": out / "poison" / "indices.safetensors",
    }


def test_untouched_outputs_verify(tmp_path: Path) -> None:
    artifacts = make_outputs(tmp_path)
    report = verify_dir(tmp_path)
    assert report.exit_code() == 0
    assert report.records == 3
    assert sorted((c.field, c.status) for c in report.checks) == [
        ("runs[0].poison.poison_indices", "ok"), ("tensors", "ok"), ("weights", "ok"),
    ]
    files = {c.field.rsplit(".", 1)[-1]: c.file for c in report.checks}
    assert files == {k: str(v.relative_to(tmp_path)) for k, v in artifacts.items()}


@pytest.mark.parametrize("artifact", ["weights", "tensors", "poison_indices"])
def test_a_single_flipped_byte_anywhere_is_detected(tmp_path: Path, artifact: str) -> None:
    path = make_outputs(tmp_path)[artifact]
    original = path.read_bytes()
    rng = random.Random(artifact)
    positions = {0, len(original) - 1, *(rng.randrange(len(original)) for _ in range(6))}
    for position in sorted(positions):
        data = bytearray(original)
        data[position] ^= 1 << rng.randrange(8)
        path.write_bytes(bytes(data))
        report = verify_dir(tmp_path)
        assert report.exit_code() == 1, position
        assert [(c.field.rsplit(".", 1)[-1], c.status) for c in report.checks if c.status != "ok"] == [
            (artifact, "modified")
        ]
        bad = next(c for c in report.checks if c.status == "modified")
        assert bad.actual == sha256_bytes(bytes(data)) and bad.expected == sha256_bytes(original)
    path.write_bytes(original)
    assert verify_dir(tmp_path).exit_code() == 0


def test_missing_artifact_and_broken_records(tmp_path: Path) -> None:
    artifacts = make_outputs(tmp_path)
    artifacts["weights"].unlink()
    report = verify_dir(tmp_path)
    assert [(c.field, c.status) for c in report.checks if c.status != "ok"] == [("weights", "missing")]
    assert report.exit_code() == 1
    (tmp_path / "metrics" / "broken.json").write_text('{"weights_file": ')
    report = verify_dir(tmp_path)
    assert report.exit_code() == 2 and len(report.errors) == 1 and "broken.json" in report.errors[0]
    (tmp_path / "metrics" / "broken.json").write_text(json.dumps({"x_file": "a", "x_sha256": "not-a-hash"}))
    report = verify_dir(tmp_path)
    assert [c.status for c in report.checks if c.field == "x"] == ["error"] and report.exit_code() == 2


def test_pairs_are_found_at_any_depth_and_unpaired_files_noted(tmp_path: Path) -> None:
    obj = {"a_file": "x", "a_sha256": "0" * 64, "b_file": "y", "nested": [{"c_file": "z", "c_sha256": "1" * 64}]}
    assert list(find_pairs(obj)) == [("a", "x", "0" * 64), ("b", "y", None), ("nested[0].c", "z", "1" * 64)]
    (tmp_path / "y").write_text("y")
    atomic_write_json(tmp_path / "r.json", {"b_file": "y"})
    report = verify_dir(tmp_path)
    assert report.checks == [] and report.notes == ["r.json: b_file has no b_sha256; not checked"]


def test_a_single_json_record_and_a_missing_folder(tmp_path: Path) -> None:
    make_outputs(tmp_path)
    report = verify_dir(tmp_path / "models" / "baseline.json")
    assert [(c.file, c.status) for c in report.checks] == [("baseline.safetensors", "ok")]
    with pytest.raises(ConfigError, match="no such folder"):
        verify_dir(tmp_path / "nope")
