"""Hostile inputs, bounded reads: sizes are checked against what the format allows before a
byte is read, and decompression stops one byte past the bound."""

from __future__ import annotations

import gzip
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from redblue.config import MAX_CONFIG_BYTES, load_toml
from redblue.data import MAX_IDX_BYTES, _gunzip_bounded, _read_maybe_gzip, load_dataset
from redblue.errors import ConfigError, DataError, IntegrityError
from redblue.scan import scan_file
from redblue.utils import MAX_JSON_BYTES, MAX_READ_BYTES, read_json, read_regular_file
from tests.hostile_helpers import copy_model, one_line_exit_2

Cli = Callable[..., CompletedProcess[str]]


def _sparse(path: Path, size: int, head: bytes = b"") -> Path:
    """A file of ``size`` bytes that takes no disk space (all but ``head`` is a hole)."""
    with open(path, "wb") as handle:
        handle.write(head)
        handle.truncate(size)
    return path


def test_reads_are_bounded_by_the_size_on_disk_before_reading(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(IntegrityError, match="2048 bytes, more than the 1024"):
        read_regular_file(big, 1024)
    huge = _sparse(tmp_path / "huge.safetensors", MAX_READ_BYTES + 1)
    start = time.monotonic()
    with pytest.raises(IntegrityError, match=f"{MAX_READ_BYTES + 1} bytes, more than the {MAX_READ_BYTES}"):
        read_regular_file(huge)
    assert time.monotonic() - start < 2  # refused from stat, not after reading 4 GiB


def test_deep_or_huge_json_is_one_error(tmp_path: Path) -> None:
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IntegrityError, match="nested too deeply"):
        read_json(deep)
    huge = _sparse(tmp_path / "huge.json", MAX_JSON_BYTES + 1, b"{")
    with pytest.raises(IntegrityError, match="more than the"):
        read_json(huge)
    binary = tmp_path / "bin.json"
    binary.write_bytes(b"\xff\xfe{}")
    with pytest.raises(IntegrityError, match="not a readable JSON file"):
        read_json(binary)


def test_a_huge_record_is_refused_by_the_cli_in_one_line(cli: Cli, tmp_path: Path) -> None:
    record = _sparse(tmp_path / "m.json", MAX_JSON_BYTES + 10, b'{"format": "redblue.model/1", "pad": "')
    proc = cli("evaluate", "--model", str(record), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "m.json", "more than the")


def test_weights_larger_than_their_bound_are_refused_before_reading(cli: Cli, tmp_path: Path,
                                                                     tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    _sparse(record_path.with_suffix(".safetensors"), MAX_READ_BYTES + 1)
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "baseline.safetensors", "more than the")


def test_a_config_file_larger_than_its_bound_is_refused(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "c.toml", MAX_CONFIG_BYTES + 1, b"# ")
    with pytest.raises(ConfigError, match=r"--config .*more than the"):
        load_toml(path)


def test_a_gzip_bomb_in_place_of_an_idx_file_is_refused_at_its_bound(tmp_path: Path) -> None:
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    bomb = gzip.compress(b"\0" * (MAX_IDX_BYTES + (8 << 20)), compresslevel=9)
    assert len(bomb) < MAX_IDX_BYTES // 100  # a few hundred KB that expand past the bound
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):  # fmt: skip
        (mnist / f"{name}.gz").write_bytes(bomb)
    with pytest.raises(DataError, match="gzip bomb"):
        load_dataset("mnist", tmp_path, download=False)


def test_gunzip_stops_one_byte_past_the_bound_and_reads_every_member(tmp_path: Path) -> None:
    assert _gunzip_bounded(gzip.compress(b"a" * 100), 100) == b"a" * 100
    assert _gunzip_bounded(gzip.compress(b"a" * 101), 100) is None
    two = gzip.compress(b"a" * 60) + gzip.compress(b"b" * 60)  # together past the bound
    assert _gunzip_bounded(two, 100) is None
    assert _gunzip_bounded(two, 120) == b"a" * 60 + b"b" * 60
    truncated = tmp_path / "t.gz"
    truncated.write_bytes(gzip.compress(b"x" * 1000)[:-12])
    with pytest.raises(DataError, match="corrupt or truncated gzip"):
        _read_maybe_gzip(truncated)


def test_an_idx_file_larger_than_any_mnist_file_is_refused_before_reading(tmp_path: Path) -> None:
    path = _sparse(tmp_path / "train-images-idx3-ubyte", MAX_IDX_BYTES + 1)
    with pytest.raises(DataError, match="more than the"):
        _read_maybe_gzip(path)


def test_the_scanner_checks_declared_sizes_before_reading(tmp_path: Path) -> None:
    # a safetensors header length far past the file's end
    lying = tmp_path / "lying.safetensors"
    lying.write_bytes((1 << 60).to_bytes(8, "little") + b'{"a": 1}')
    report = scan_file(lying)
    assert report.status == "error" and "exceeds the" in str(report.error)
    # a header length that fits a sparse file but passes the library's 100 MiB limit
    big = _sparse(tmp_path / "big.safetensors", 200 << 20, (150 << 20).to_bytes(8, "little") + b"{")
    start = time.monotonic()
    report = scan_file(big)
    assert report.status == "error" and "100 MiB" in str(report.error)
    assert time.monotonic() - start < 2
    # a header that claims more tensor data than the file holds
    header = json.dumps({"w": {"dtype": "F32", "shape": [1 << 20], "data_offsets": [0, 4 << 20]}}).encode()
    short = tmp_path / "short.safetensors"
    short.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    report = scan_file(short)
    assert report.status == "error" and "truncated" in str(report.error)
    assert os.path.getsize(short) < 1024
