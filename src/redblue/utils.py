"""Small shared helpers: seeding, devices, precision, hashing, atomic writes."""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import platform
import random
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

import filelock
import numpy as np
import safetensors
import torch

from redblue._version import __version__
from redblue.errors import ConfigError, IntegrityError, RedblueError


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def progress_line(progress: bool, message: str) -> None:
    """One plain line of progress on stderr, where the progress bars are off because stderr
    is not a terminal (a log file, ``nohup``, a pipe): a long run then still says what it
    finished and when. Silent when ``progress`` is off or stderr is a terminal (the bars
    show there)."""
    stream = sys.stderr
    if progress and stream is not None and not stream.isatty():
        print(message, file=stream, flush=True)


def resolve_device(device: str) -> torch.device:
    """Turn ``auto|cpu|cuda|cuda:N`` into a torch.device, refusing CUDA when there is none."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
        return torch.device(device)
    raise ConfigError(f"--device {device!r}: expected auto, cpu or cuda")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager[Any]:
    """Autocast context for ``precision`` on ``device`` (a no-op for fp32)."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


MAX_READ_BYTES = 4 << 30
"""The largest file redblue reads whole (4 GiB): weights, records, cache entries."""
MAX_JSON_BYTES = 256 << 20
"""The largest JSON record or result redblue reads (256 MiB)."""


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket or other special file"


def _require_regular(path: Path, info: os.stat_result, max_bytes: int | None) -> int:
    if not stat.S_ISREG(info.st_mode):
        raise IntegrityError(f"{path}: is {_kind_of(info.st_mode)}, expected a regular file")
    if max_bytes is not None and info.st_size > max_bytes:
        raise IntegrityError(f"{path}: {info.st_size} bytes, more than the {max_bytes} a redblue file may hold")
    return info.st_size


def check_regular_file(path: Path, max_bytes: int | None = None) -> int:
    """The size of ``path`` after checking that it is a regular file (not a device, FIFO or
    socket, which could hang a read or never end) of at most ``max_bytes``; IntegrityError
    (one line naming the path) otherwise, FileNotFoundError when it does not exist."""
    try:
        info = path.stat()  # follows symlinks: what matters is what a read would open
    except ValueError as exc:  # a NUL byte in the path
        raise IntegrityError(f"{str(path)!r}: not a usable path ({exc})") from None
    return _require_regular(path, info, max_bytes)


@contextlib.contextmanager
def open_regular(path: Path, max_bytes: int | None = None) -> Iterator[BinaryIO]:
    """``path`` opened for reading, after :func:`check_regular_file`, and checked again on the
    open descriptor: it is opened non-blocking, so a FIFO swapped in after the check cannot
    hang the open, and ``fstat`` must still say a regular file of bounded size."""
    check_regular_file(path, max_bytes)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        _require_regular(path, os.fstat(fd), max_bytes)
        os.set_blocking(fd, True)
        handle = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with handle:
        yield handle


def read_regular_file(path: Path, max_bytes: int = MAX_READ_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes`` (see :func:`open_regular`)."""
    with open_regular(path, max_bytes) as handle:
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # grew since the check
        raise IntegrityError(f"{path}: more than the {max_bytes} bytes a redblue file may hold")
    return data


def read_input_file(
    path: Path, error: type[RedblueError], *, option: str = "", missing: str = "file not found"
) -> bytes:
    """The bytes of the regular file ``path``; a missing, unreadable, irregular or oversized
    file is one ``error`` line that starts with ``option`` (the flag that named it) and the path."""
    where = f"{option} {path}".strip()
    try:
        return read_regular_file(path)
    except FileNotFoundError:
        raise error(f"{where}: {missing}") from None
    except IntegrityError as exc:  # a directory, a FIFO, a device, too large (the message names the path)
        raise error(f"{option} {exc}".strip()) from None
    except OSError as exc:
        raise error(f"{where}: cannot read ({exc.strerror or exc})") from None


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open_regular(path) as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sha256_json(obj: Any) -> str:
    """Hash of a JSON-serialisable object in canonical form (sorted keys, no spaces)."""
    return sha256_bytes(json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())


def sha256_tensor(tensor: torch.Tensor) -> str:
    """Hash of a tensor's dtype, shape and bytes (on CPU, contiguous)."""
    t = tensor.detach().cpu().contiguous()
    header = f"{t.dtype}:{tuple(t.shape)}:".encode()
    return sha256_bytes(header + t.numpy().tobytes())


def _new_file_mode() -> int:
    """The mode ``open()`` gives a new file here: 0o666 less the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder, then rename.

    The file ends with the permissions a plain ``open()`` would give it (umask applied), not
    the owner-only 0o600 of the temporary file, so a report or model can be shared as usual.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _new_file_mode())
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    """Atomically write ``obj`` as indented JSON (floats stay numbers)."""
    text = json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode("utf-8"))


def read_json(path: Path, max_bytes: int = MAX_JSON_BYTES) -> Any:
    """A JSON file's content; IntegrityError (one line naming the file) when it is missing, not a
    regular file, too large, not UTF-8, not JSON or nested too deeply to parse."""
    try:
        return json.loads(read_regular_file(path, max_bytes).decode("utf-8"))
    except FileNotFoundError:
        raise IntegrityError(f"{path}: file not found") from None
    except RecursionError:
        raise IntegrityError(f"{path}: JSON nested too deeply to be a redblue file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise IntegrityError(f"{path}: not a readable JSON file ({exc})") from None


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Put ``model`` in eval mode and restore the mode it had."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def library_versions() -> dict[str, str]:
    return {
        "redblue": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "safetensors": safetensors.__version__,
    }


def one_line(text: str) -> str:
    """``text`` with every character that could break or hide a line (newlines, NUL, record
    separators, other control characters) written as an escape, so an error is one line
    whatever a hostile file name or record field holds."""
    return "".join(ch if ch.isprintable() else ascii(ch)[1:-1] for ch in text)


def pct(value: Any, digits: int = 2, missing: str = "n/a") -> str:
    """A share as a percentage (``0.1234`` -> ``"12.34%"``); ``missing`` for None or a non-number."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value != value:
        return missing
    return f"{100 * value:.{digits}f}%"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.redblue.lock`` while a command writes under ``out``; a second command on
    the same folder is refused (one line, exit 2) instead of interleaving its files.

    The lock is an OS-level ``flock``: it is released when the process ends, even by
    ``kill -9``, so an interrupted command never blocks the next one. Once it is held, the
    temporary files that a killed atomic write left behind are removed.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / ".redblue.lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RedblueError(
            f"--out {out}: another redblue command is using this folder (lock {out / '.redblue.lock'}); "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        remove_leftovers(out)
        yield
    finally:
        lock.release()


def remove_leftovers(out: Path) -> list[Path]:
    """Delete the ``.NAME.*.tmp`` files that an interrupted :func:`atomic_write_bytes` left
    under ``out`` (only call it while holding :func:`output_lock`); returns what it removed."""
    removed = []
    for path in out.rglob(".*.tmp"):
        if path.is_file() and not path.is_symlink():
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
                removed.append(path)
    return removed


def model_device(model: torch.nn.Module) -> torch.device:
    """The device of a model's first parameter or buffer (an ONNX graph has buffers only); CPU
    for a model with neither."""
    for tensor in itertools.chain(model.parameters(), model.buffers()):
        return tensor.device
    return torch.device("cpu")
