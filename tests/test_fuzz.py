"""Fuzzing (Hypothesis): valid IDX files (raw and gzipped), safetensors files, model records,
TOML configs and pickles are mutated, and every outcome must be success on a still-valid
input or redblue's own error -- never another exception (a traceback), never more than a
few seconds, never a file outside the output folder.

The budget is fixed so that CI stays bounded: ``REDBLUE_FUZZ_EXAMPLES`` examples per
target (default 200; the model-record target, which runs ``redblue evaluate``, a quarter of
that), each under a deadline, derandomized so a CI run is reproducible. A longer run
(``REDBLUE_FUZZ_EXAMPLES=2000 REDBLUE_FUZZ_RANDOM=1``) and what it found is recorded in
docs/security.md.
"""

from __future__ import annotations

import _compat_pickle
import contextlib
import dataclasses
import gzip
import io
import json
import math
import os
import pickle
import struct
import tempfile
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, ClassVar
from unittest import mock

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from safetensors.torch import load as st_load

from redblue.artifacts import load_model, save_model
from redblue.cli import main
from redblue.config import (
    AttackConfig,
    BackdoorDefenseConfig,
    DataConfig,
    DefendConfig,
    PoisonConfig,
    RunConfig,
    TrainConfig,
    build,
    load_toml,
)
from redblue.data import _read_maybe_gzip, parse_idx
from redblue.errors import RedblueError
from redblue.models import build_model
from redblue.scan import is_allowed, scan_file
from redblue.utils import sha256_bytes
from tests.test_scan import CallablePayload, SystemPayload

EXAMPLES = int(os.environ.get("REDBLUE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=timedelta(seconds=3),
    derandomize=not os.environ.get("REDBLUE_FUZZ_RANDOM"),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture],
)
SECTIONS: dict[str, type[Any]] = {
    "data": DataConfig, "train": TrainConfig, "run": RunConfig, "defend": DefendConfig,
    "poison": PoisonConfig, "backdoor": BackdoorDefenseConfig, "attack": AttackConfig,
}  # fmt: skip
BOUNDARY_INTS = [0, 1, 2, 7, 8, 255, 256, 2049, 2051, 0x7FFFFFFF, 0xFFFFFFFF, 1 << 32, 1 << 62, (1 << 64) - 1]


# --------------------------------------------------------------------------- mutations


@st.composite
def mutated(draw: st.DrawFn, seed: bytes) -> bytes:
    """``seed`` with 1-6 mutations: bit flips, byte sets, inserts, deletes, truncation,
    duplicated spans and boundary integers written over 1, 2, 4 or 8 bytes."""
    data = bytearray(seed)
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete", "truncate", "duplicate", "int"]))
        pos = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del data[pos : pos + draw(st.integers(1, 16))]
        elif op == "truncate":
            del data[pos:]
        elif op == "duplicate":
            span = data[pos : pos + draw(st.integers(1, 64))]
            data[pos:pos] = span
        elif op == "int":
            width = draw(st.sampled_from([1, 2, 4, 8]))
            value = draw(st.sampled_from(BOUNDARY_INTS)) % (1 << (8 * width))
            order = draw(st.sampled_from(["little", "big"]))
            data[pos : pos + width] = value.to_bytes(width, order)  # type: ignore[arg-type]
    return bytes(data)


def _within(err: BaseException | None, *allowed: type[BaseException]) -> None:
    if err is not None and not isinstance(err, allowed):
        raise AssertionError(f"{type(err).__name__} escaped: {err}") from err


# --------------------------------------------------------------------------- IDX


def _idx(kind: str, n: int) -> bytes:
    rng = np.random.default_rng(0)
    if kind == "labels":
        return struct.pack(">II", 2049, n) + rng.integers(0, 10, n, dtype=np.uint8).tobytes()
    return struct.pack(">IIII", 2051, n, 28, 28) + rng.integers(0, 256, n * 784, dtype=np.uint8).tobytes()


IDX_SEEDS = {("labels", 10): _idx("labels", 10), ("images", 3): _idx("images", 3)}


def _check_idx(data: bytes, kind: str, n: int) -> None:
    try:
        array = parse_idx(data, kind, n, "fuzzed.idx")
    except RedblueError:
        return
    assert array.dtype == np.uint8 and array.shape == ((n,) if kind == "labels" else (n, 28, 28))
    if kind == "labels":
        assert int(array.max(initial=0)) <= 9


@FUZZ
@given(st.sampled_from(sorted(IDX_SEEDS)).flatmap(lambda key: st.tuples(st.just(key), mutated(IDX_SEEDS[key]))))
def test_fuzz_idx_raw(case: tuple[tuple[str, int], bytes]) -> None:
    (kind, n), data = case
    _check_idx(data, kind, n)


@FUZZ
@given(st.sampled_from(sorted(IDX_SEEDS)).flatmap(
    lambda key: st.tuples(st.just(key), mutated(gzip.compress(IDX_SEEDS[key], mtime=0)))
))  # fmt: skip
def test_fuzz_idx_gzip(case: tuple[tuple[str, int], bytes]) -> None:
    (kind, n), compressed = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed-idx.gz"
        path.write_bytes(compressed)
        try:
            data = _read_maybe_gzip(path, max_bytes=16 << 10)
        except RedblueError:
            return
        assert len(data) <= 16 << 10
        _check_idx(data, kind, n)


# --------------------------------------------------------------------------- safetensors


@pytest.fixture(scope="module")
def saved_model(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, dict[str, Any]]:
    out = tmp_path_factory.mktemp("fuzz_model")
    torch.manual_seed(0)
    save_model(out, "m", build_model("cnn"), {"model_name": "cnn"})
    return (out / "models" / "m.safetensors").read_bytes(), json.loads((out / "models" / "m.json").read_text())


def _head_mutations(payload: bytes) -> st.SearchStrategy[bytes]:
    """Mutations aimed at the 8-byte length and the JSON header, where the parsing happens."""
    header_end = 8 + int.from_bytes(payload[:8], "little")
    return mutated(payload[:header_end]).map(lambda head: head + payload[header_end:])


@FUZZ
@given(data=st.data())
def test_fuzz_safetensors(saved_model: tuple[bytes, dict[str, Any]], data: st.DataObject) -> None:
    payload, record = saved_model
    fuzzed = data.draw(st.one_of(_head_mutations(payload), mutated(payload)))
    with tempfile.TemporaryDirectory() as folder:
        models = Path(folder) / "models"
        models.mkdir()
        (models / "m.safetensors").write_bytes(fuzzed)
        report = scan_file(models / "m.safetensors")
        assert report.status in ("clean", "error", "findings"), report
        if report.status == "clean" and report.kind == "safetensors":
            st_load(fuzzed)  # the scanner's verdict agrees with the library's parser
        # an attacker who can rewrite both files: the hash matches, the parser must still hold
        (models / "m.json").write_text(json.dumps({**record, "weights_sha256": sha256_bytes(fuzzed)}))
        err: BaseException | None = None
        try:
            loaded = load_model(models / "m.json")
            assert isinstance(loaded.model, torch.nn.Module)
        except Exception as exc:  # the property is about which exceptions escape
            err = exc
        _within(err, RedblueError)


# --------------------------------------------------------------------------- model records

PATHISH = st.sampled_from(["../../escaped", "/tmp/fuzz-escaped", "a/b", "..", ".", "", "m.safetensors",
                           "/dev/zero", "x" * 300, "m.json", "\0"])  # fmt: skip
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-(1 << 70), 1 << 70) | st.floats(allow_nan=False) | st.text(max_size=20)
    | PATHISH,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated_record(draw: st.DrawFn, record: dict[str, Any]) -> bytes:
    if draw(st.booleans()):  # structure: replace, delete or add fields
        fuzzed = dict(record)
        for _ in range(draw(st.integers(1, 4))):
            key = draw(st.sampled_from([*sorted(record), "extra"]))
            if draw(st.integers(0, 3)) == 0:
                fuzzed.pop(key, None)
            else:
                fuzzed[key] = draw(JSON_VALUES)
        return json.dumps(fuzzed).encode()
    return draw(mutated(json.dumps(record, indent=2).encode()))  # bytes


@settings(FUZZ, max_examples=max(EXAMPLES // 4, 5), deadline=timedelta(seconds=10))
@given(data=st.data())
def test_fuzz_model_record(tiny_model_dir: Path, data: st.DataObject) -> None:
    record = json.loads((tiny_model_dir / "models" / "baseline.json").read_text())
    fuzzed = data.draw(mutated_record(record))
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        models = root / "in" / "models"
        models.mkdir(parents=True)
        (models / "baseline.safetensors").write_bytes((tiny_model_dir / "models" / "baseline.safetensors").read_bytes())
        (models / "baseline.json").write_bytes(fuzzed)
        before = sorted(root.rglob("*"))
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["evaluate", "--model", str(models / "baseline.json"), "--dataset", "mnist-mini",
                         "--device", "cpu", "--out", str(root / "out")])  # fmt: skip
        assert code in (0, 2), err.getvalue()
        if code == 2:
            lines = err.getvalue().strip().splitlines()
            assert len(lines) == 1 and "Traceback" not in err.getvalue(), err.getvalue()
        new = [p for p in sorted(root.rglob("*")) if p not in before and not p.is_relative_to(root / "out")]
        assert new == [], new
    assert not Path("/tmp/fuzz-escaped").exists() and not Path("/tmp/fuzz-escaped_evaluate_metrics.json").exists()


# --------------------------------------------------------------------------- TOML configs


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value) if not isinstance(value, float) or math.isfinite(value) else "nan"
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{json.dumps(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def _toml(sections: dict[str, dict[str, Any]]) -> str:
    lines = []
    for section, values in sections.items():
        lines.append(f"[{json.dumps(section)}]")
        lines += [f"{json.dumps(key)} = {_toml_value(v)}" for key, v in values.items() if v is not None]
    return "\n".join(lines) + "\n"


DEFAULT_SECTIONS = {
    name: {f.name: getattr(cls(), f.name) for f in dataclasses.fields(cls)} for name, cls in SECTIONS.items()
}
TOML_VALUES = st.recursive(
    st.booleans() | st.integers(-(1 << 63), (1 << 63) - 1) | st.floats(allow_nan=False) | st.text(max_size=12)
    | st.sampled_from(["cpu", "auto", "pgd", "fgsm", "trades", "linf", "mnist-mini", "../x", "cuda:0"]),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=6,
)


@st.composite
def fuzzed_config(draw: st.DrawFn) -> bytes:
    choice = draw(st.integers(0, 2))
    if choice == 0:  # bytes of a valid config, mutated
        return draw(mutated(_toml(DEFAULT_SECTIONS).encode()))
    sections = {name: dict(values) for name, values in DEFAULT_SECTIONS.items()}
    for _ in range(draw(st.integers(1, 5))):
        section = draw(st.sampled_from([*SECTIONS, "trian", "x"]))
        keys = [*DEFAULT_SECTIONS.get(section, {}), "epochz", "name"]
        sections.setdefault(section, {})[draw(st.sampled_from(keys))] = draw(TOML_VALUES)
    if choice == 1:
        return _toml(sections).encode()
    return _toml({k: v for k, v in sections.items() if draw(st.booleans())}).encode()


@FUZZ
@given(fuzzed_config())
def test_fuzz_toml_config(text: bytes) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "fuzzed.toml"
        path.write_bytes(text)
        err: BaseException | None = None
        try:
            file = load_toml(path, tuple(SECTIONS))
            for section, cls in SECTIONS.items():
                build(cls, file, {}, section)
        except Exception as exc:  # the property is about which exceptions escape
            err = exc
        _within(err, RedblueError)


# --------------------------------------------------------------------------- pickles


class _Anything:
    """What a stubbed global returns: accepts any call, state and item."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        pass

    def __setstate__(self, state: object) -> None:
        pass

    def __call__(self, *args: object, **kwargs: object) -> _Anything:
        return _Anything()

    def append(self, item: object) -> None:
        pass

    def extend(self, items: object) -> None:
        pass

    def __setitem__(self, key: object, value: object) -> None:
        pass


class _StrictUnframer(pickle._Unframer):  # type: ignore[name-defined,misc]
    """Lines must end in a newline, as in the C unpickler that pickle.load uses (the
    pure-Python one would cut the last byte of a truncated line and go on)."""

    def readline(self) -> bytes:
        line: bytes = super().readline()
        if not line.endswith(b"\n"):
            raise pickle.UnpicklingError("pickle data was truncated")
        return line


class _Recorder(pickle._Unpickler):  # the pure-Python one (same opcodes, no C surprises)
    """Unpickles with every global replaced by a stub: records what ``pickle.load`` would
    import, and runs nothing of it."""

    def __init__(self, data: bytes, encoding: str = "ASCII") -> None:
        super().__init__(io.BytesIO(data), encoding=encoding)
        self.size = len(data)
        self.protocol = data[1] if data[:1] == b"\x80" and len(data) > 1 else 0
        self.requested: list[tuple[str, str, int]] = []

    def _load_bytearray8(self) -> None:
        # the pure-Python unpickler zero-fills bytearray(declared length) before reading:
        # a mutated length of gigabytes would fill memory (the C one does not touch it)
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self.size:
            raise pickle.UnpicklingError("BYTEARRAY8 longer than the data")
        self.append(bytearray(self.read(length)))  # type: ignore[attr-defined]

    dispatch: ClassVar[dict[int, Any]] = {**pickle._Unpickler.dispatch, pickle.BYTEARRAY8[0]: _load_bytearray8}  # type: ignore[attr-defined]

    def find_class(self, module: str, name: str) -> Any:
        self.requested.append((module, name, self.protocol))
        return _Anything

    def persistent_load(self, pid: object) -> object:
        return None


def _pickle_seeds() -> list[bytes]:
    objects: list[Callable[[], object]] = [
        lambda: {"a": [1, 2.5, "x", b"y"], "b": (None, True), "c": {1, 2}},
        lambda: SystemPayload("echo fuzz"),
        lambda: CallablePayload(eval, "1+1"),  # never called, only pickled
        lambda: np.arange(6, dtype=np.float32),
        lambda: {"w": torch.zeros(2)},
    ]
    return [pickle.dumps(make(), protocol=p) for make in objects for p in range(pickle.HIGHEST_PROTOCOL + 1)]


PICKLE_SEEDS = _pickle_seeds()


@FUZZ
@given(st.sampled_from(PICKLE_SEEDS).flatmap(mutated), st.sampled_from(["x.pkl", "x.json", "model", "x.png"]))
@example(b"c osix\nsystem\np0\n(Vecho fuzz\np1\ntp2\nRp3\n.", "x.pkl")  # found by the long run: a module with a space
@example(b"(0cos\nsystem\n(S'echo owned'\ntR.", "model")  # found in review: POP right after a MARK drops the mark
@example(b"iposix\nsystem\np0\n(Vecho fuzz\np1\ntp2\nRp3\n.", "x.pkl")  # found by fuzzing: INST imports before its MARK
@example(b"c\xc3\x80posix\nsystem\np0\n(Vecho fuzz\np1\ntp2\nRp3\n.", "x.pkl")  # found by fuzzing: a UTF-8 module name
def test_fuzz_pickle(data: bytes, name: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / name
        path.write_bytes(data)
        named, walked = scan_file(path), scan_file(path, explicit=False)
    for report in (named, walked):
        assert report.status in ("clean", "findings", "error", "skipped"), report
        # Whatever the verdict (even "not a pickle"), every global that pickle.load would
        # import before it stops was seen by the scanner: allowlisted, or reported.
        _check_imports_were_seen(data, report)


def _check_imports_were_seen(data: bytes, report: Any) -> int:
    """Whatever ``pickle.load`` would import, the scanner saw: allowlisted, or reported.
    Returns how many imports the stubbed unpickling requested."""
    requested = []
    for encoding in ("utf-8", "latin1"):  # how torch.load and np.load decode protocol-0/2 strings
        recorder = _Recorder(data, encoding)
        with contextlib.suppress(Exception), mock.patch.object(pickle, "_Unframer", _StrictUnframer):
            recorder.load()
        requested += recorder.requested
    flagged = {f.name for f in report.findings}
    for module, attr, protocol in requested:
        if not module or not attr:
            continue  # nothing can import an empty name
        if protocol < 3 and (module, attr) in _compat_pickle.NAME_MAPPING:  # as pickle.Unpickler resolves it
            module, attr = _compat_pickle.NAME_MAPPING[module, attr]
        elif protocol < 3 and module in _compat_pickle.IMPORT_MAPPING:
            module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{attr}"
        assert is_allowed(full) or (full in flagged and full in report.imports), (full, report)
    return len(requested)


def test_the_pickle_property_sees_the_imports_of_the_seeds(tmp_path: Path) -> None:
    # the check above is not vacuous: on the unmutated seeds it sees every import
    seen = 0
    for index, data in enumerate(PICKLE_SEEDS):
        path = tmp_path / f"seed{index}"
        path.write_bytes(data)
        seen += _check_imports_were_seen(data, scan_file(path))
    assert seen >= 4 * len(PICKLE_SEEDS) // 5
