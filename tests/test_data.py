"""The data layer: IDX parsing, checksums, sources, mnist-mini and the download path."""

from __future__ import annotations

import gzip
import http.server
import shutil
import socket
import struct
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest
import torch

from redblue import data as data_mod
from redblue.data import load_dataset, parse_idx
from redblue.errors import ConfigError, DataError

MNIST_NAMES = [
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
]


def _labels_idx(n: int) -> bytes:
    return struct.pack(">II", 0x801, n) + bytes(i % 10 for i in range(n))


def test_parse_idx_reads_labels_and_images() -> None:
    labels = parse_idx(_labels_idx(60_000), "labels", 60_000, "x")
    assert labels.shape == (60_000,) and labels[:12].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1]
    images = struct.pack(">IIII", 0x803, 10_000, 28, 28) + bytes(10_000 * 784)
    assert parse_idx(images, "images", 10_000, "x").shape == (10_000, 28, 28)


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        (struct.pack(">II", 0x803, 60_000) + bytes(60_000), "wrong IDX magic number 0x00000803, expected 0x00000801"),
        (_labels_idx(60_000)[:-5], "truncated"),
        (_labels_idx(59_999), "59999 items, expected 60000"),
        (b"\x00\x00", "truncated IDX file"),
    ],
)
def test_parse_idx_refuses_bad_files(payload: bytes, message: str) -> None:
    with pytest.raises(DataError, match="train-labels") as info:
        parse_idx(payload, "labels", 60_000, "dir/train-labels-idx1-ubyte")
    assert message in str(info.value)


def _copy_mnist(src: Path, dest: Path, gz: bool = True) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for name in MNIST_NAMES:
        found = next(p for p in (src / f"{name}.gz", src / "mnist" / f"{name}.gz", src / name) if p.is_file())
        if gz:
            shutil.copyfile(found, dest / f"{name}.gz")
        else:
            (dest / name).write_bytes(gzip.decompress(found.read_bytes()))
    return dest


def test_full_mnist_from_data_dir(mnist_dir: Path) -> None:
    ds = load_dataset("mnist", mnist_dir, download=False)
    assert ds.x_train.shape == (60_000, 1, 28, 28) and ds.x_train.dtype == torch.uint8
    assert ds.x_test.shape == (10_000, 1, 28, 28) and ds.y_test.dtype == torch.int64
    assert torch.bincount(ds.y_train).tolist()[:3] == [5923, 6742, 5958]
    assert ds.files["train-images-idx3-ubyte"].startswith("ba891046")
    assert ds.describe()["n_train"] == 60_000


def test_uncompressed_files_in_subfolder_are_found(mnist_dir: Path, tmp_path: Path) -> None:
    _copy_mnist(mnist_dir, tmp_path / "mnist", gz=False)
    ds = load_dataset("mnist", tmp_path, download=False)
    assert ds.source == f"data dir: {tmp_path}" and ds.y_test.shape == (10_000,)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "truncated"),
        ("flip", "SHA-256 mismatch"),
        ("magic", "wrong IDX magic number"),
    ],
)
def test_damaged_file_in_data_dir_is_refused(mnist_dir: Path, tmp_path: Path, damage: str, message: str) -> None:
    folder = _copy_mnist(mnist_dir, tmp_path, gz=False)
    target = folder / "t10k-labels-idx1-ubyte"
    raw = bytearray(target.read_bytes())
    if damage == "truncate":
        raw = raw[:-100]
    elif damage == "flip":
        raw[5000] ^= 0x01
    else:
        raw[3] = 0x03
    target.write_bytes(bytes(raw))
    with pytest.raises(DataError) as info:
        load_dataset("mnist", folder, download=False)
    assert str(target) in str(info.value) and message in str(info.value)


def test_missing_data_dir_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="directory does not exist"):
        load_dataset("mnist", tmp_path / "nope")


def test_unknown_dataset_is_refused() -> None:
    with pytest.raises(ConfigError, match="unknown dataset"):
        load_dataset("cifar")


def test_mnist_mini_is_a_stratified_deterministic_split() -> None:
    a = load_dataset("mnist-mini")
    b = load_dataset("mnist-mini")
    assert a.x_train.shape == (4000, 1, 28, 28) and a.x_test.shape == (1000, 1, 28, 28)
    assert torch.bincount(a.y_test).tolist() == [100] * 10
    assert torch.bincount(a.y_train).tolist() == [400] * 10
    assert torch.equal(a.x_train, b.x_train) and torch.equal(a.y_test, b.y_test)
    assert int(a.x_train.max()) == 255 and a.files == {"mnist_5k.csv.gz": data_mod.MINI_SHA256}


def test_auto_falls_back_to_mnist_mini_with_a_notice(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDBLUE_DATA_DIR", raising=False)
    ds = load_dataset("auto", download=False)
    err = capsys.readouterr().err
    assert ds.name == "mnist-mini" and ds.notice is not None
    assert err.count("\n") == 1 and "using mnist-mini" in err and "REDBLUE_DATA_DIR" in err


# ----------------------------------------------------------------- downloads over loopback


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """An HTTP server on 127.0.0.1 serving files from a folder; yields (url, folder)."""
    monkeypatch.delenv("REDBLUE_DATA_DIR", raising=False)
    root = tmp_path / "mirror"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/", root
    finally:
        server.shutdown()
        server.server_close()


def _closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/"


def test_download_verifies_then_caches(mnist_dir: Path, mirror: tuple[str, Path], tmp_path: Path) -> None:
    url, root = mirror
    _copy_mnist(mnist_dir, root)
    cache = tmp_path / "cache"
    ds = load_dataset("mnist", cache_dir=cache, download=True, mirrors=[url])
    assert ds.source == f"download into {cache / 'mnist'}"
    assert sorted(p.name for p in (cache / "mnist").iterdir()) == sorted(f"{n}.gz" for n in MNIST_NAMES)
    again = load_dataset("mnist", cache_dir=cache, download=False)
    assert again.source.startswith("cache:") and torch.equal(again.y_train, ds.y_train)


def test_corrupted_download_is_refused_and_leaves_nothing(
    mnist_dir: Path, mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    _copy_mnist(mnist_dir, root)
    target = root / "train-labels-idx1-ubyte.gz"
    content = bytearray(gzip.decompress(target.read_bytes()))
    content[1000] ^= 0x01
    target.write_bytes(gzip.compress(bytes(content)))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match="SHA-256 mismatch") as info:
        load_dataset("mnist", cache_dir=cache, download=True, mirrors=[url])
    assert "train-labels-idx1-ubyte" in str(info.value)
    leftovers = [p.name for p in (cache / "mnist").iterdir()]
    assert "train-labels-idx1-ubyte.gz" not in leftovers
    assert not [name for name in leftovers if name.endswith(".part")]


def test_unreachable_mirror_falls_through_to_the_next(
    mnist_dir: Path, mirror: tuple[str, Path], tmp_path: Path
) -> None:
    url, root = mirror
    _copy_mnist(mnist_dir, root)
    ds = load_dataset("mnist", cache_dir=tmp_path / "c", download=True, mirrors=[_closed_port_url(), url])
    assert ds.x_test.shape[0] == 10_000


def test_all_mirrors_unreachable_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDBLUE_DATA_DIR", raising=False)
    bad = [_closed_port_url(), _closed_port_url()]
    with pytest.raises(DataError) as info:
        load_dataset("mnist", cache_dir=tmp_path / "c", download=True, mirrors=bad)
    message = str(info.value)
    assert message.startswith("mnist: not found") and bad[0] in message and bad[1] in message
    assert not list((tmp_path / "c" / "mnist").iterdir())


def test_auto_uses_mnist_mini_when_every_mirror_fails(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("REDBLUE_DATA_DIR", raising=False)
    ds = load_dataset("auto", cache_dir=tmp_path, download=True, mirrors=[_closed_port_url()])
    assert ds.name == "mnist-mini" and "using mnist-mini" in capsys.readouterr().err
