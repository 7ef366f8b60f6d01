"""redblue.scan: malicious pickles, zip checkpoints, NumPy object arrays and safetensors
headers are found WITHOUT loading anything.

The malicious files are written here with pickle.dumps (never loaded): their __reduce__
would run a command that creates a marker file. Every test checks the marker never
appears, and an autouse tripwire makes any unpickling or shell call fail the test.
"""

from __future__ import annotations

import collections
import datetime
import math
import os
import pickle
import shlex
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save as st_save

from redblue.artifacts import save_model
from redblue.errors import ConfigError
from redblue.models import build_model
from redblue.scan import FileReport, classify_global, scan_file, scan_paths, validate_safetensors_header

SYSTEM = f"{os.system.__module__}.system"  # posix.system on Linux/macOS, nt.system on Windows
REAL_SYSTEM = os.system  # captured before the tripwire below replaces os.system


def marker_command(marker: Path) -> str:
    """A shell command that creates ``marker``."""
    code = f"open({str(marker)!r}, 'w').close()"
    return f"{shlex.quote(sys.executable)} -c {shlex.quote(code)}"


class SystemPayload:
    """Unpickling this runs ``os.system(command)``."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[Any, ...]:
        return (REAL_SYSTEM, (self.command,))


class CallablePayload:
    """Unpickling this runs ``function(*args)``."""

    def __init__(self, function: Any, *args: Any) -> None:
        self.function, self.args = function, args

    def __reduce__(self) -> tuple[Any, ...]:
        return (self.function, self.args)


@pytest.fixture(name="marker")
def marker_fixture(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "PWNED"
    yield path
    assert not path.exists(), "a malicious payload was executed"


@pytest.fixture(autouse=True)
def _tripwires(monkeypatch: pytest.MonkeyPatch) -> None:
    """Scanning must never unpickle, torch.load, np.load or start a process."""

    def tripped(*args: object, **kwargs: object) -> None:
        raise AssertionError("the scanner called a loader or started a process")

    for target, name in [
        (pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load"),
        (np, "load"), (os, "system"), (subprocess, "Popen"),
    ]:
        monkeypatch.setattr(target, name, tripped)


def only(report: FileReport, name: str) -> Any:
    hits = [f for f in report.findings if f.name == name]
    assert len(hits) == 1, report.findings
    return hits[0]


def test_payload_would_really_run_its_command(tmp_path: Path) -> None:
    # Calling the (function, args) that __reduce__ hands to pickle creates the marker,
    # so the markers' absence elsewhere means the scanner really executed nothing.
    witness = tmp_path / "witness"
    function, args = SystemPayload(marker_command(witness)).__reduce__()
    assert function is REAL_SYSTEM
    assert function(*args) == 0
    assert witness.exists()


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_malicious_pickle_is_critical_at_every_protocol(tmp_path: Path, marker: Path, protocol: int) -> None:
    path = tmp_path / "model.pkl"
    path.write_bytes(pickle.dumps({"weights": [1.0, 2.0], "x": SystemPayload(marker_command(marker))}, protocol=protocol))
    report = scan_file(path)
    assert report.status == "findings" and report.kind == "pickle"
    finding = only(report, SYSTEM)
    assert finding.severity == "critical" and finding.rule == "dangerous-call"
    assert finding.offset is not None and 0 <= finding.offset < path.stat().st_size
    assert SYSTEM in report.imports


@pytest.mark.parametrize(
    ("function", "args", "name"),
    [
        (subprocess.check_call, (["true"],), "subprocess.check_call"),
        (eval, ("1 + 1",), "builtins.eval"),
        (exec, ("x = 1",), "builtins.exec"),
        (__import__, ("os",), "builtins.__import__"),
        (getattr, (CallablePayload(__import__, "os"), "system"), "builtins.getattr"),
        (compile, ("1", "f", "eval"), "builtins.compile"),
    ],
)
def test_code_execution_globals_are_critical(tmp_path: Path, function: Any, args: tuple[Any, ...], name: str) -> None:
    path = tmp_path / "payload.pickle"
    path.write_bytes(pickle.dumps(CallablePayload(function, *args), protocol=2))
    report = scan_file(path)
    assert only(report, name).severity == "critical"
    assert report.worst == "critical"


def test_runpy_and_os_module_variants_are_critical() -> None:
    for module, name in [("runpy", "run_path"), ("posix", "system"), ("nt", "system"), ("os", "popen"),
                         ("importlib", "import_module"), ("pickle", "loads"), ("socket", "socket")]:
        assert classify_global(module, name, called=True)[0] == "critical", (module, name)


def test_torch_zip_checkpoint_hides_a_malicious_object(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "checkpoint.pt"
    state = build_model("cnn").state_dict()
    torch.save({"state_dict": state, "epoch": 3, "hook": SystemPayload(marker_command(marker))}, path)
    report = scan_file(path)
    assert report.kind == "torch-zip"
    finding = only(report, SYSTEM)
    assert finding.severity == "critical" and finding.member == "checkpoint/data.pkl"
    assert [f.name for f in report.findings] == [SYSTEM]  # the tensors themselves are allowlisted
    assert "torch._utils._rebuild_tensor_v2" in report.imports


def test_hand_built_zip_checkpoint_with_renamed_suffix(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "weights.ckpt"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/data/0", b"\x00" * 64)
        archive.writestr("archive/data.pkl", pickle.dumps(SystemPayload(marker_command(marker))))
    report = scan_file(path)
    assert only(report, SYSTEM).member == "archive/data.pkl"


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_of_a_state_dict_is_clean(tmp_path: Path, zip_format: bool) -> None:
    path = tmp_path / "state.pth"
    state = collections.OrderedDict(build_model("cnn").state_dict())
    state["bf16"] = torch.ones(2, dtype=torch.bfloat16)
    state["param"] = torch.nn.Parameter(torch.zeros(3))
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    report = scan_file(path)
    assert report.status == "clean", report.findings
    assert report.kind == ("torch-zip" if zip_format else "torch-legacy")
    assert {"collections.OrderedDict", "torch._utils._rebuild_tensor_v2", "torch.FloatStorage"} <= set(report.imports)


def test_legacy_torch_save_with_payload_is_found(tmp_path: Path, marker: Path) -> None:
    path = tmp_path / "old.pt"
    torch.save({"w": torch.zeros(2), "x": SystemPayload(marker_command(marker))}, path, _use_new_zipfile_serialization=False)
    report = scan_file(path)
    assert report.kind == "torch-legacy"
    assert only(report, SYSTEM).severity == "critical"


def test_unusual_but_safe_global_is_low(tmp_path: Path) -> None:
    path = tmp_path / "extras.pkl"
    path.write_bytes(pickle.dumps({"when": datetime.date(2024, 5, 1), "f": math.sqrt, "w": [0.5]}))
    report = scan_file(path)
    assert report.status == "findings" and report.worst == "low"
    assert {f.name: f.rule for f in report.findings} == {"datetime.date": "unusual-call", "math.sqrt": "unusual-global"}


def test_unknown_third_party_global_is_medium_imported_high_called(tmp_path: Path) -> None:
    imported = tmp_path / "ref.pkl"
    imported.write_bytes(b"\x80\x02cmypkg.layers\nBlock\n.")
    assert only(scan_file(imported), "mypkg.layers.Block").severity == "medium"
    called = tmp_path / "call.pkl"
    called.write_bytes(b"\x80\x02cmypkg.layers\nBlock\n)R.")
    finding = only(scan_file(called), "mypkg.layers.Block")
    assert (finding.severity, finding.rule) == ("high", "unknown-call")


def test_stack_global_names_assembled_through_the_memo_are_resolved(tmp_path: Path) -> None:
    # "os" and "system" are pushed, memoised, dropped, then fetched back with BINGET.
    stream = (
        b"\x80\x04\x8c\x02os\x940\x8c\x06system\x940"
        b"h\x00h\x01\x93\x8c\x04echo\x85R."
    )
    path = tmp_path / "memo.pkl"
    path.write_bytes(stream)
    finding = only(scan_file(path), "os.system")
    assert (finding.severity, finding.rule, finding.count) == ("critical", "dangerous-call", 1)


def test_protocol0_inst_opcode(tmp_path: Path) -> None:
    path = tmp_path / "inst.pkl"
    path.write_bytes(b"(S'echo hi'\nios\nsystem\n.")
    assert only(scan_file(path), "os.system").rule == "dangerous-call"


def test_calls_and_imports_that_cannot_be_resolved_are_high(tmp_path: Path) -> None:
    computed_call = tmp_path / "call.pkl"  # calls the result of OrderedDict()
    computed_call.write_bytes(b"\x80\x02ccollections\nOrderedDict\n)R)R.")
    assert only(scan_file(computed_call), "<computed callable>").severity == "high"
    computed_import = tmp_path / "import.pkl"  # STACK_GLOBAL on values that are not strings
    computed_import.write_bytes(b"\x80\x04ccollections\nOrderedDict\n)RK\x01\x93.")
    assert only(scan_file(computed_import), "<computed import>").severity == "high"
    extension = tmp_path / "ext.pkl"
    extension.write_bytes(b"\x80\x02\x82\x01.")
    assert only(scan_file(extension), "<extension 1>").severity == "medium"


def test_malformed_pickles_are_errors_but_keep_findings(tmp_path: Path, marker: Path) -> None:
    truncated = tmp_path / "cut.pkl"
    data = pickle.dumps(SystemPayload(marker_command(marker)))
    truncated.write_bytes(data[:-1])  # everything but STOP: pickle.load would still run REDUCE
    report = scan_file(truncated)
    assert report.status == "error" and "malformed pickle" in str(report.error)
    assert only(report, SYSTEM).severity == "critical"
    underflow = tmp_path / "underflow.pkl"
    underflow.write_bytes(b"\x80\x02R.")
    assert "stack underflow" in str(scan_file(underflow).error)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\xff\xfe not a pickle")
    assert scan_file(garbage).status == "error"


def test_pickle_with_a_misleading_name_is_found_by_content(tmp_path: Path, marker: Path) -> None:
    for name in ("results.json", "model.safetensors"):
        path = tmp_path / name
        path.write_bytes(pickle.dumps(SystemPayload(marker_command(marker))))
        assert only(scan_file(path), SYSTEM).severity == "critical", name


def test_numpy_object_arrays_are_flagged_and_their_payload_scanned(tmp_path: Path, marker: Path) -> None:
    benign = tmp_path / "objects.npy"
    np.save(benign, np.array([1, "two", None], dtype=object), allow_pickle=True)
    report = scan_file(benign)
    assert report.kind == "npy" and report.worst == "medium"
    assert [f.rule for f in report.findings] == ["object-array"]
    evil = tmp_path / "evil.npz"
    np.savez(evil, clean=np.arange(4.0), bad=np.array([SystemPayload(marker_command(marker))], dtype=object))
    report = scan_file(evil)
    assert report.kind == "npz"
    assert only(report, SYSTEM).member == "bad.npy (pickled payload)"
    assert only(report, "numpy object array").member == "bad.npy"


def test_plain_numpy_files_are_clean_and_truncation_is_an_error(tmp_path: Path) -> None:
    plain = tmp_path / "x.npy"
    np.save(plain, np.arange(12, dtype=np.float32).reshape(3, 4))
    assert scan_file(plain).status == "clean"
    np.savez(tmp_path / "xs.npz", a=np.zeros(3), b=np.ones((2, 2), dtype=np.int16))
    assert scan_file(tmp_path / "xs.npz").status == "clean"
    cut = tmp_path / "cut.npy"
    cut.write_bytes(plain.read_bytes()[:-4])
    report = scan_file(cut)
    assert report.status == "error" and "truncated" in str(report.error)
    bad_header = tmp_path / "bad.npy"
    bad_header.write_bytes(plain.read_bytes().replace(b"'descr'", b"__import__('os')", 1))
    assert scan_file(bad_header).status == "error"


def test_safetensors_written_by_redblue_scans_clean(tmp_path: Path) -> None:
    record = save_model(tmp_path, "fresh", build_model("cnn"), {"model_name": "cnn"})
    report = scan_file(tmp_path / "models" / record["weights_file"])
    assert report.kind == "safetensors" and report.status == "clean"
    assert report.findings == [] and report.error is None


def _safetensors_bytes() -> bytes:
    return st_save({"a": torch.zeros(3), "b": torch.ones(2, 2, dtype=torch.bfloat16)})


def _with_header(header: bytes, data: bytes) -> bytes:
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda b: b[:-3], "truncated"),
        (lambda b: b[:5], "too short"),
        (lambda b: (10**9).to_bytes(8, "little") + b[8:], "exceeds"),
        (lambda b: b[:8] + b"{" + b"\xff" * (int.from_bytes(b[:8], "little") - 1) + b[8 + int.from_bytes(b[:8], "little"):], "JSON"),
        (lambda b: b + b"\x00" * 8, "after the last tensor"),
        (lambda b: _with_header(b'{"a":{"dtype":"F99","shape":[1],"data_offsets":[0,4]}}', b"\x00" * 4), "unknown dtype"),
        (lambda b: _with_header(b'{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,4]}}', b"\x00" * 4), "needs 8 bytes"),
        (lambda b: _with_header(b'{"a":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"\x00" * 4), "non-negative"),
        (lambda b: _with_header(
            b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},"b":{"dtype":"F32","shape":[1],"data_offsets":[2,6]}}',
            b"\x00" * 6), "overlaps"),
        (lambda b: _with_header(b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"\x00" * 8), "gap"),
        (lambda b: _with_header(b'{"__metadata__":{"k":1}}', b""), "__metadata__"),
    ],
)
def test_corrupted_safetensors_are_errors(tmp_path: Path, make: Any, expected: str) -> None:
    path = tmp_path / "bad.safetensors"
    path.write_bytes(make(_safetensors_bytes()))
    report = scan_file(path)
    assert report.status == "error", report
    assert expected in str(report.error)


def test_safetensors_header_validation_accepts_the_library_output() -> None:
    data = _safetensors_bytes()
    size = int.from_bytes(data[:8], "little")
    header = validate_safetensors_header(data[8 : 8 + size], len(data))
    assert header["b"] == {"dtype": "BF16", "shape": [2, 2], "data_offsets": [12, 20]}


def test_directories_are_walked_and_other_files_skipped(tmp_path: Path, marker: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "evil.pkl").write_bytes(pickle.dumps(SystemPayload(marker_command(marker))))
    (tmp_path / "notes.txt").write_text("hello")
    save_model(tmp_path, "m", build_model("cnn"), {"model_name": "cnn"})
    report = scan_paths([tmp_path, tmp_path / "missing.pt"])
    by_name = {Path(f.path).name: f for f in report.files}
    assert set(by_name) == {"notes.txt", "evil.pkl", "m.safetensors", "m.json", "missing.pt"}
    assert by_name["notes.txt"].status == "skipped" and not by_name["notes.txt"].explicit
    assert (by_name["m.json"].status, by_name["m.json"].kind) == ("clean", "json")  # data, never executed
    assert by_name["m.safetensors"].status == "clean"
    assert by_name["evil.pkl"].worst == "critical"
    assert by_name["missing.pt"].error == "file not found"
    assert report.exit_code() == 2
    assert scan_paths([tmp_path]).exit_code() == 1
    assert scan_paths([tmp_path / "models"]).exit_code() == 0


def test_exit_code_threshold(tmp_path: Path) -> None:
    path = tmp_path / "low.pkl"
    path.write_bytes(pickle.dumps(math.sqrt))
    report = scan_paths([path])
    assert [f.severity for f in report.files[0].findings] == ["low"]
    assert (report.exit_code("low"), report.exit_code("medium"), report.exit_code("critical")) == (1, 0, 0)
    with pytest.raises(ConfigError, match="--fail-on"):
        report.exit_code("severe")
    assert scan_paths([]).exit_code() == 0


@pytest.mark.parametrize("protocol", [2, 5])
def test_numpy_arrays_pickled_at_any_protocol_are_clean(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "arrays.pkl"
    path.write_bytes(pickle.dumps({"a": np.arange(5.0), "s": np.float32(2), "d": np.dtype("f4")}, protocol=protocol))
    report = scan_file(path)
    assert report.status == "clean", report.findings
    assert "numpy.dtype" in report.imports


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_torchscript_archive_is_treated_as_code(tmp_path: Path) -> None:
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), str(path))
    report = scan_file(path)
    assert report.kind == "torch-zip" and report.worst == "medium"
    assert {f.rule for f in report.findings} == {"torchscript-code", "torchscript-class"}


@pytest.mark.parametrize(
    ("module", "name"),
    [
        ("torch.serialization", "os.system"),  # protocol 4+ walks dotted names attribute by attribute
        ("collections", "OrderedDict.__init__.__globals__"),
        ("torch._utils", "_rebuild_tensor_v2.__builtins__"),
        ("torch.storage", "_load_from_bytes"),  # a nested torch.load
    ],
)
def test_attribute_walks_and_nested_loaders_are_critical(tmp_path: Path, module: str, name: str) -> None:
    m, n = module.encode(), name.encode()
    path = tmp_path / "walk.pkl"
    path.write_bytes(b"\x80\x04\x8c" + bytes([len(m)]) + m + b"\x8c" + bytes([len(n)]) + n + b"\x93)R.")
    finding = only(scan_file(path), f"{module}.{name}")
    assert finding.severity == "critical"


def test_build_on_an_imported_object_is_high(tmp_path: Path) -> None:
    # GLOBAL collections.OrderedDict, then BUILD with a state dict: monkey-patches the class.
    path = tmp_path / "patch.pkl"
    path.write_bytes(b"\x80\x02ccollections\nOrderedDict\n}X\x07\x00\x00\x00__len__K\x01sb.")
    finding = only(scan_file(path), "collections.OrderedDict")
    assert (finding.severity, finding.rule) == ("high", "build-on-global")


class PlainObject:
    def __init__(self) -> None:
        self.value = 1


def test_classes_handed_to_copyreg_helpers_count_as_called(tmp_path: Path) -> None:
    path = tmp_path / "old.pkl"
    path.write_bytes(pickle.dumps(PlainObject(), protocol=0))  # copyreg._reconstructor(cls, object, None)
    finding = only(scan_file(path), f"{__name__}.PlainObject")
    assert (finding.severity, finding.rule) == ("high", "unknown-call")
