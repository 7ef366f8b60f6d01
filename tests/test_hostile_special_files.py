"""Hostile inputs, special files: a device, a FIFO or a socket where redblue expects a file
is refused by name before it is read (a FIFO would hang a read, /dev/zero never ends)."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

import redblue.utils
from redblue.data import load_dataset
from redblue.errors import DataError, IntegrityError
from redblue.utils import check_regular_file, read_json, read_regular_file, sha256_file
from tests.hostile_helpers import copy_model, one_line_exit_2

Cli = Callable[..., CompletedProcess[str]]


def test_check_regular_file_names_what_it_found(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(IntegrityError, match="is a FIFO, expected a regular file"):
        check_regular_file(fifo)
    with pytest.raises(IntegrityError, match="is a device, expected a regular file"):
        check_regular_file(Path("/dev/zero"))
    with pytest.raises(IntegrityError, match="is a directory, expected a regular file"):
        check_regular_file(tmp_path)
    with socket.socket(socket.AF_UNIX) as server:
        sock = tmp_path / "s"
        server.bind(str(sock))
        with pytest.raises(IntegrityError, match="is a socket or other special file"):
            read_regular_file(sock)
    link = tmp_path / "link"
    link.symlink_to("/dev/zero")
    for reader in (read_regular_file, read_json, sha256_file):
        with pytest.raises(IntegrityError, match="is a device"):
            reader(link)


def test_a_fifo_swapped_in_after_the_check_cannot_hang_the_open(monkeypatch: pytest.MonkeyPatch,
                                                                 tmp_path: Path) -> None:
    fifo = tmp_path / "weights.safetensors"
    os.mkfifo(fifo)  # nobody ever writes to it: a blocking open would wait forever
    monkeypatch.setattr(redblue.utils, "check_regular_file", lambda path, max_bytes=None: 0)  # the race is lost
    start = time.monotonic()
    with pytest.raises(IntegrityError, match="is a FIFO"):
        read_regular_file(fifo)
    assert time.monotonic() - start < 5


def test_weights_that_are_a_fifo_are_refused_without_reading(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    weights = record_path.with_suffix(".safetensors")
    weights.unlink()
    os.mkfifo(weights)
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "is a FIFO, expected a regular file")


def test_a_record_that_is_a_fifo_is_refused(cli: Cli, tmp_path: Path) -> None:
    record = tmp_path / "model.json"
    os.mkfifo(record)
    proc = cli("evaluate", "--model", str(record), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "model.json", "is a FIFO")


def test_verify_lists_a_fifo_instead_of_hanging(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    weights = record_path.with_suffix(".safetensors")
    weights.unlink()
    os.mkfifo(weights)
    os.mkfifo(tmp_path / "in" / "models" / "fifo.json")
    proc = cli("verify", str(tmp_path / "in"))  # run_cli's own timeout would fail a hang
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "is a FIFO" in proc.stdout + proc.stderr


@pytest.mark.parametrize("special", ["/dev/zero", "fifo"])
def test_a_config_file_that_is_special_is_refused(cli: Cli, tmp_path: Path, special: str) -> None:
    path = special
    if special == "fifo":
        os.mkfifo(tmp_path / "c.toml")
        path = str(tmp_path / "c.toml")
    proc = cli("train", "--config", path, "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "--config", "expected a regular file")
    assert not (tmp_path / "o").exists()


def test_a_dataset_file_that_is_a_fifo_or_a_folder_is_refused_by_name(tmp_path: Path) -> None:
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    os.mkfifo(mnist / "train-images-idx3-ubyte")
    for name in ("train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (mnist / name).mkdir()
    with pytest.raises(DataError, match="train-images-idx3-ubyte: is a FIFO"):
        load_dataset("mnist", tmp_path, download=False)


def test_scan_refuses_a_named_fifo_or_device_without_opening_it(cli: Cli, tmp_path: Path) -> None:
    fifo = tmp_path / "model.pt"
    os.mkfifo(fifo)
    proc = cli("scan", str(fifo), "/dev/zero")
    assert proc.returncode == 2, proc.stdout
    assert proc.stdout.count("not a regular file") == 2 and "Traceback" not in proc.stderr
    proc = cli("scan", str(tmp_path))  # found while walking a folder: listed as skipped
    assert proc.returncode == 0 and "1 skipped" in proc.stdout, proc.stdout
