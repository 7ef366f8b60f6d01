"""Safetensors weights + JSON records: round trip, tamper detection, reuse, atomic writes."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch

from redblue.artifacts import find_reusable, load_model, save_model
from redblue.errors import IntegrityError
from redblue.models import build_model
from redblue.utils import atomic_write_json, sha256_file


def _saved(tmp_path: Path) -> tuple[torch.nn.Module, dict[str, object]]:
    torch.manual_seed(0)
    model = build_model("cnn").eval()
    record = save_model(tmp_path, "m", model, {"model_name": "cnn", "cache_key": "k1"})
    return model, record


def test_round_trip_is_exact(tmp_path: Path) -> None:
    model, record = _saved(tmp_path)
    weights = tmp_path / "models" / "m.safetensors"
    assert record["weights_sha256"] == sha256_file(weights)
    loaded = load_model(tmp_path / "models" / "m.json")
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(loaded.model(x), model(x))
    # A safetensors file: 8-byte little-endian header length, then a JSON header; no pickle opcodes.
    raw = weights.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + header_len])
    assert "1.weight" in header and raw[:2] != b"\x80\x04"
    assert json.loads((tmp_path / "models" / "m.json").read_text())["versions"]["torch"] == torch.__version__


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    weights = tmp_path / "models" / "m.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[-10] ^= 0x01
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="SHA-256 mismatch") as info:
        load_model(weights)
    assert str(weights) in str(info.value)


def test_swapped_weights_are_refused(tmp_path: Path) -> None:
    _saved(tmp_path)
    save_model(tmp_path / "other", "m", build_model("cnn"), {"model_name": "cnn"})
    (tmp_path / "models" / "m.safetensors").write_bytes((tmp_path / "other" / "models" / "m.safetensors").read_bytes())
    with pytest.raises(IntegrityError, match=r"does not belong to this record|SHA-256 mismatch"):
        load_model(tmp_path / "models" / "m.json")


def test_missing_or_foreign_record_is_refused(tmp_path: Path) -> None:
    with pytest.raises(IntegrityError, match="not found"):
        load_model(tmp_path / "nothing.json")
    atomic_write_json(tmp_path / "x.json", {"hello": 1})
    with pytest.raises(IntegrityError, match="not a redblue model record"):
        load_model(tmp_path / "x.json")
    with pytest.raises(IntegrityError, match=r"expected a \.safetensors"):
        load_model(tmp_path / "x.pt")


def test_reuse_needs_the_same_cache_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _saved(tmp_path)
    assert find_reusable(tmp_path, "m", "k1") is not None
    assert find_reusable(tmp_path, "m", "k2") is None
    assert find_reusable(tmp_path, "absent", "k1") is None
    weights = tmp_path / "models" / "m.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1] + b"\x00")
    assert find_reusable(tmp_path, "m", "k1") is None
    assert "not reusing" in capsys.readouterr().err


def test_atomic_writes_leave_no_temporary_files(tmp_path: Path) -> None:
    _saved(tmp_path)
    atomic_write_json(tmp_path / "models" / "extra.json", {"a": 1.5})
    names = sorted(p.name for p in (tmp_path / "models").iterdir())
    assert names == ["extra.json", "m.json", "m.safetensors"]
    with pytest.raises(ValueError, match="Out of range float"):
        atomic_write_json(tmp_path / "models" / "nan.json", {"a": float("nan")})
    assert not (tmp_path / "models" / "nan.json").exists()
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == names


def test_the_same_weights_always_give_the_same_file(tmp_path: Path) -> None:
    """The weights' SHA-256 is a function of the weights alone (a reused model saved again
    under another name keeps its hash)."""
    model = build_model("cnn", seed=3)
    hashes = {save_model(tmp_path, f"m{i}", model, {"model_name": "cnn"})["weights_sha256"] for i in range(12)}
    assert len(hashes) == 1


def test_atomic_writes_get_the_permissions_of_a_plain_open(tmp_path: Path) -> None:
    """Not mkstemp's owner-only 0o600: the mode a new file gets from open() under the umask."""
    import os
    import stat

    plain = tmp_path / "plain.json"
    plain.write_text("{}")
    atomic_write_json(tmp_path / "atomic.json", {"a": 1})
    old = os.umask(0o077)
    try:
        atomic_write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    mode = stat.S_IMODE((tmp_path / "atomic.json").stat().st_mode)
    assert mode == stat.S_IMODE(plain.stat().st_mode) == 0o666 & ~old
    assert stat.S_IMODE((tmp_path / "private.json").stat().st_mode) == 0o600
