"""redblue.cache: safetensors + JSON entries keyed by a hash of the inputs, verified on read."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import redblue.utils
from redblue.cache import Cache, cache_key, canonical_inputs
from redblue.errors import ConfigError, IntegrityError
from redblue.scan import scan_paths
from redblue.utils import sha256_file, sha256_tensor


def _inputs(eps: float = 0.25) -> dict[str, object]:
    return {"attack": "pgd", "eps": eps, "steps": 10, "model_sha256": "ab" * 32, "x": torch.arange(6.0).reshape(2, 3)}


def _tensors() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return {"x_adv": torch.rand(4, 1, 28, 28, generator=gen), "labels": torch.tensor([3, 1, 4, 1])}


def _flip_byte(path: Path, index: int) -> None:
    data = bytearray(path.read_bytes())
    data[index] ^= 0x01
    path.write_bytes(bytes(data))


def test_put_then_get_round_trips_tensors_and_metadata(tmp_path: Path) -> None:
    cache = Cache(tmp_path / "cache")
    assert cache.get("adv", _inputs()) is None
    stored = cache.put("adv", _inputs(), _tensors(), {"robust_accuracy": 0.125, "n": 4})
    entry = cache.get("adv", _inputs())
    assert entry is not None
    assert set(entry.tensors) == {"x_adv", "labels"}
    for name, tensor in _tensors().items():
        assert torch.equal(entry.tensors[name], tensor) and entry.tensors[name].dtype == tensor.dtype
    assert entry.metadata == {"robust_accuracy": 0.125, "n": 4}
    assert entry.key == stored.key == cache_key("adv", _inputs())
    assert entry.tensors_path == tmp_path / "cache" / "adv" / f"{entry.key}.safetensors"
    record = json.loads(entry.json_path.read_text())
    assert record["tensors_file"] == entry.tensors_path.name
    assert record["tensors_sha256"] == sha256_file(entry.tensors_path)
    assert record["inputs"]["x"] == {"tensor_sha256": sha256_tensor(_inputs()["x"]), "dtype": "torch.float32", "shape": [2, 3]}  # type: ignore[arg-type]
    assert record["tensors"]["labels"] == {"dtype": "torch.int64", "shape": [4]}
    assert sorted(p.name for p in (tmp_path / "cache" / "adv").iterdir()) == sorted(
        [f"{entry.key}.json", f"{entry.key}.safetensors"]
    )  # no temporary files left behind


def test_key_is_a_hash_of_stage_and_inputs() -> None:
    base = cache_key("adv", _inputs())
    assert len(base) == 64 and int(base, 16) >= 0
    assert cache_key("adv", dict(reversed(list(_inputs().items())))) == base  # order does not matter
    assert cache_key("activations", _inputs()) != base
    assert cache_key("adv", _inputs(eps=0.3)) != base
    changed = _inputs()
    x = changed["x"].clone()  # type: ignore[union-attr]
    x[0, 0] += 1e-6
    changed["x"] = x
    assert cache_key("adv", changed) != base
    changed["x"] = x.double()
    assert cache_key("adv", changed) != cache_key("adv", {**changed, "x": x})


def test_inputs_without_a_stable_json_form_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"inputs\.eps"):
        canonical_inputs({"eps": float("nan")})
    with pytest.raises(ConfigError, match=r"inputs\.model.*object"):
        cache_key("adv", {"model": object()})
    with pytest.raises(ConfigError, match="stage"):
        Cache(tmp_path).put("../escape", {}, {"x": torch.zeros(1)})
    with pytest.raises(ConfigError, match="expected a tensor"):
        Cache(tmp_path).put("adv", {}, {"x": [1, 2]})  # type: ignore[dict-item]


@pytest.mark.parametrize("where", ["start", "header", "middle", "end"])
def test_a_flipped_byte_in_cached_tensors_is_refused(tmp_path: Path, where: str) -> None:
    cache = Cache(tmp_path)
    entry = cache.put("adv", _inputs(), _tensors())
    size = entry.tensors_path.stat().st_size
    index = {"start": 0, "header": 20, "middle": size // 2, "end": size - 1}[where]
    _flip_byte(entry.tensors_path, index)
    with pytest.raises(IntegrityError, match=r"SHA-256 mismatch.*modified"):
        cache.get("adv", _inputs())


def test_tampered_or_swapped_records_are_refused(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    one = cache.put("adv", _inputs(0.1), _tensors())
    two = cache.put("adv", _inputs(0.2), {"x_adv": torch.zeros(1)})
    record = json.loads(one.json_path.read_text())
    record["tensors_sha256"] = "0" * 64
    one.json_path.write_text(json.dumps(record))
    with pytest.raises(IntegrityError, match="SHA-256 mismatch"):
        cache.get("adv", _inputs(0.1))
    one.json_path.write_text(two.json_path.read_text())  # another entry's record under this key
    with pytest.raises(IntegrityError, match="does not belong"):
        cache.get("adv", _inputs(0.1))
    two.tensors_path.unlink()
    with pytest.raises(IntegrityError, match="not found"):
        cache.get("adv", _inputs(0.2))


def test_get_or_compute_recomputes_a_corrupted_entry(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = Cache(tmp_path)
    calls: list[int] = []

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, object]]:
        calls.append(1)
        return _tensors(), {"n": 4}

    first, hit = cache.get_or_compute("adv", _inputs(), compute)
    assert not hit and len(calls) == 1
    second, hit = cache.get_or_compute("adv", _inputs(), compute)
    assert hit and len(calls) == 1 and torch.equal(second.tensors["x_adv"], first.tensors["x_adv"])
    _flip_byte(first.tensors_path, first.tensors_path.stat().st_size - 1)
    third, hit = cache.get_or_compute("adv", _inputs(), compute)
    assert not hit and len(calls) == 2
    assert "not using cached adv result" in capsys.readouterr().err
    assert torch.equal(third.tensors["x_adv"], _tensors()["x_adv"])
    assert cache.get("adv", _inputs()) is not None  # the entry was replaced by a good one


def test_an_interrupted_write_leaves_no_entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_replace = os.replace

    def fail_on_json(src: str, dst: str) -> None:
        if str(dst).endswith(".json"):
            raise OSError("disk full")
        real_replace(src, dst)

    monkeypatch.setattr(redblue.utils.os, "replace", fail_on_json)
    cache = Cache(tmp_path)
    with pytest.raises(OSError, match="disk full"):
        cache.put("adv", _inputs(), _tensors())
    monkeypatch.undo()
    assert cache.get("adv", _inputs()) is None  # the JSON record is the commit marker
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_cache_folder_scans_clean(tmp_path: Path) -> None:
    cache = Cache(tmp_path)
    cache.put("adv", _inputs(), _tensors(), {"note": "fgsm"})
    cache.put("activations", {"layer": 3}, {"acts": torch.randn(5, 8)})
    report = scan_paths([tmp_path])
    assert report.exit_code() == 0
    assert sorted(f.kind for f in report.files if f.status == "clean") == ["json", "json", "safetensors", "safetensors"]
