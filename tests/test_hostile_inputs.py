"""Hostile inputs: names that would escape ``--out``, records that point at devices or FIFOs,
decompression bombs, deep JSON, a second command on a locked folder, leftovers of a killed
write, a full disk. Each ends in one line and exit 2 (or a listed error), quickly, with
nothing written outside the output folder."""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

import redblue.utils
from redblue.cli import main
from redblue.data import MAX_IDX_BYTES, load_dataset
from redblue.errors import DataError, IntegrityError
from redblue.utils import output_lock, read_json, read_regular_file

Cli = Callable[..., CompletedProcess[str]]


def _one_line_exit_2(proc: CompletedProcess[str], *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _copy_model(src: Path, dest: Path) -> Path:
    (dest / "models").mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(src / "models" / f"baseline{suffix}", dest / "models" / f"baseline{suffix}")
    return dest / "models" / "baseline.json"


# --------------------------------------------------------------------------- paths


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped-abs", "a/b", "..", ".hidden", "x" * 200])
def test_a_name_that_would_leave_the_output_folder_is_refused(cli: Cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / "work" / "out"
    proc = cli("train", "--name", name, "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu",
               "--out", str(out))  # fmt: skip
    _one_line_exit_2(proc, "--name")
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == []
    assert not Path("/tmp/escaped-abs").exists()


def test_attack_and_defend_refuse_such_names_too(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    model = str(tiny_model_dir / "models" / "baseline.json")
    _one_line_exit_2(cli("attack", "--model", model, "--name", "../x", "--dataset", "mnist-mini", "--out", str(out)),
                     "--name '../x'")  # fmt: skip
    _one_line_exit_2(cli("defend", "--name", "/etc/x", "--dataset", "mnist-mini", "--out", str(out)), "--name")
    assert not out.exists()


def test_a_record_whose_name_was_edited_into_a_path_is_refused(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = _copy_model(tiny_model_dir, tmp_path / "in")
    record = json.loads(record_path.read_text())
    record["name"] = "../../escaped"
    record_path.write_text(json.dumps(record))
    out = tmp_path / "out"
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(out))
    _one_line_exit_2(proc, "'../../escaped'")
    assert not (tmp_path / "escaped_evaluate_metrics.json").exists() and not list(tmp_path.rglob("escaped*"))


def test_a_record_may_only_name_weights_beside_it(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = _copy_model(tiny_model_dir, tmp_path / "in")
    record = json.loads(record_path.read_text())
    for weights_file in ("/dev/zero", "../../baseline.safetensors", "sub/baseline.safetensors"):
        record["weights_file"] = weights_file
        record_path.write_text(json.dumps(record))
        proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
        _one_line_exit_2(proc, "is not a file name in the record's own folder")


# --------------------------------------------------------------------------- special files, bounded reads


def test_weights_that_are_a_device_or_a_fifo_are_refused_without_reading(cli: Cli, tmp_path: Path,
                                                                          tiny_model_dir: Path) -> None:
    record_path = _copy_model(tiny_model_dir, tmp_path / "in")
    weights = record_path.with_suffix(".safetensors")
    weights.unlink()
    weights.symlink_to("/dev/zero")
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    _one_line_exit_2(proc, "is a device, expected a regular file")
    weights.unlink()
    os.mkfifo(weights)
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    _one_line_exit_2(proc, "is a FIFO, expected a regular file")


def test_verify_lists_a_fifo_instead_of_hanging(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = _copy_model(tiny_model_dir, tmp_path / "in")
    weights = record_path.with_suffix(".safetensors")
    weights.unlink()
    os.mkfifo(weights)
    os.mkfifo(tmp_path / "in" / "models" / "fifo.json")
    proc = cli("verify", str(tmp_path / "in"))  # run_cli's own timeout would fail a hang
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "is a FIFO" in proc.stdout + proc.stderr


def test_reads_are_bounded(tmp_path: Path) -> None:
    big = tmp_path / "big.json"
    big.write_bytes(b" " * 2048)
    with pytest.raises(IntegrityError, match="2048 bytes, more than the 1024"):
        read_regular_file(big, 1024)
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(IntegrityError, match="nested too deeply"):
        read_json(deep)


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


# --------------------------------------------------------------------------- locks, leftovers, full disk


def test_every_writing_command_takes_the_output_lock(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    model = str(tiny_model_dir / "models" / "baseline.json")
    with output_lock(out):
        for args in (
            ("train", "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu"),
            ("evaluate", "--model", model, "--dataset", "mnist-mini"),
            ("attack", "--model", model, "--dataset", "mnist-mini", "--n-examples", "10", "--no-checks"),
        ):
            _one_line_exit_2(cli(*args, "--out", str(out)), "another redblue command is using this folder")
    assert sorted(p.name for p in out.iterdir()) == [".redblue.lock"]  # nothing else written


def test_leftovers_of_a_killed_write_are_removed_by_the_next_lock_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    leftover = out / "models" / ".baseline.json.x1y2z3.tmp"
    leftover.write_text("{half")
    keep = out / "models" / "baseline.json"
    keep.write_text("{}")
    with output_lock(out):
        assert not leftover.exists() and keep.exists()


def test_a_full_disk_is_one_line_and_leaves_nothing_half_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path
) -> None:
    def full(path: Path, data: bytes) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(redblue.utils, "atomic_write_bytes", full)
    out = tmp_path / "out"
    code = main(["evaluate", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--dataset", "mnist-mini",
                 "--device", "cpu", "--out", str(out)])  # fmt: skip
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "No space left on device" in err[0] and "baseline_evaluate" in err[0]
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != ".redblue.lock"]
