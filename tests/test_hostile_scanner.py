"""Hostile inputs, scanner: it fails closed. A pickle of any protocol (0-5) is found by its
content whatever its name; a file it cannot classify, named on the command line, is an error
(exit 2, "unrecognised format"); nothing is ever loaded (the tripwires of test_scan)."""

from __future__ import annotations

import json
import pickle
import random
from pathlib import Path

import pytest

from redblue.cli import main
from redblue.scan import scan_file, scan_paths
from tests.test_scan import SYSTEM, SystemPayload, _tripwires, marker_command, marker_fixture  # noqa: F401 (fixtures)

DISGUISES = ["weights.json", "model", "notes.txt", "image.png", "report.html", "data.csv"]
PROTOCOLS = range(pickle.HIGHEST_PROTOCOL + 1)


def _evil(marker_path: Path, protocol: int) -> bytes:
    return pickle.dumps(SystemPayload(marker_command(marker_path)), protocol=protocol)


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_malicious_pickle_of_every_protocol_is_found_whatever_its_name(tmp_path: Path, marker: Path,
                                                                          protocol: int) -> None:
    for name in DISGUISES:
        path = tmp_path / name
        path.write_bytes(_evil(marker, protocol))
        report = scan_file(path)
        assert (report.kind, report.status, report.worst) == ("pickle", "findings", "critical"), (name, report)
        assert [f.name for f in report.findings] == [SYSTEM]
        assert scan_file(path, explicit=False).worst == "critical"  # found while walking a folder too


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_benign_pickle_of_every_protocol_is_recognised_as_a_pickle(tmp_path: Path, protocol: int) -> None:
    path = tmp_path / "numbers.txt"
    path.write_bytes(pickle.dumps({"a": [1, 2.5, "x"], "b": (None, True)}, protocol=protocol))
    report = scan_file(path)
    assert (report.kind, report.status) == ("pickle", "clean"), report


def test_a_pickle_that_breaks_after_an_import_keeps_its_findings_and_is_an_error(tmp_path: Path,
                                                                                 marker: Path) -> None:
    data = _evil(marker, 0)
    path = tmp_path / "cut.txt"
    path.write_bytes(data[: data.index(b"R")] if b"R" in data else data[:-2])  # import seen, no STOP
    report = scan_file(path)
    assert report.status == "error" and "malformed pickle" in str(report.error)
    assert report.worst == "critical"  # pickle.load would have imported it before failing


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("photo.png", b"\x89PNG\r\n\x1a\n" + b"\0" * 64),
        ("page.html", b"<!doctype html><p>hi</p>"),
        ("empty", b""),
        ("model.onnx", b"\x08\x07\x12\x07pytorch" + random.Random(0).randbytes(64)),  # fixed: xdist workers collect the same ids
        ("notes.txt", b"(this starts like a pickle MARK but is prose"),
        ("weights", b"\xff" * 100),
        ("bad.json", b'{"unterminated": '),
    ],
)
def test_a_file_it_cannot_classify_named_explicitly_is_an_error(tmp_path: Path, name: str, content: bytes) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = scan_file(path)
    assert report.status == "error" and str(report.error).startswith("unrecognised format"), report
    walked = scan_file(path, explicit=False)
    assert walked.status == "skipped" and walked.notes[0].startswith("unrecognised format")


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("model.pkl", b"{not a pickle}", "not a pickle"),
        ("model.pt", b"\x80\x04garbage", "malformed pickle"),
        ("ckpt.pth", b"PK\x03\x04 truncated zip", "not a readable zip archive"),
        ("arr.npy", b"NUMPY?", "not a .npy file"),
        ("w.safetensors", b"\x02\x00\x00\x00\x00\x00\x00\x00{}extra", ""),
    ],
)
def test_a_file_named_as_a_model_format_but_not_one_is_an_error(tmp_path: Path, name: str, content: bytes,
                                                                 message: str) -> None:
    path = tmp_path / name
    path.write_bytes(content)
    report = scan_file(path)
    assert report.status == "error" and message in str(report.error), report


def test_json_is_recognised_as_data(tmp_path: Path) -> None:
    path = tmp_path / "record.json"
    path.write_text(json.dumps({"format": "redblue.model/1", "values": [1, 2, 3]}))
    report = scan_file(path)
    assert (report.kind, report.status) == ("json", "clean")


def test_the_cli_fails_closed_on_explicit_files_and_skips_them_in_folders(capsys: pytest.CaptureFixture[str],
                                                                          tmp_path: Path, marker: Path) -> None:
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "record.json").write_text("{}")
    def scan(path: Path) -> tuple[int, str]:  # in-process: the tripwires forbid a subprocess
        try:
            code = main(["scan", str(path)])
        except SystemExit as exc:
            code = int(str(exc.code))
        return code, capsys.readouterr().out

    code, out = scan(tmp_path / "photo.png")
    assert code == 2 and "unrecognised format" in out, out
    code, out = scan(tmp_path)
    assert code == 0 and "1 clean" in out and "1 skipped" in out, out
    (tmp_path / "weights.json").write_bytes(_evil(marker, 0))  # a protocol-0 pickle disguised as JSON
    code, out = scan(tmp_path)
    assert code == 1 and SYSTEM in out, out
    assert scan_paths([tmp_path]).counts()["critical"] == 1


@pytest.mark.parametrize(
    "data",
    [
        b"I0x10\n0cposix\nsystem\n(S'x'\ntR.",  # C reads INT in any base; pickletools only base 10
        b"L0x10L\n0cposix\nsystem\n(S'x'\ntR.",
        "S'\u00e9'\n0cposix\nsystem\n(S'x'\ntR.".encode(),  # torch.load decodes STRING as UTF-8
        b"(0cposix\nsystem\n(S'x'\ntR.",  # POP right after a MARK drops the mark
        b"c\xc3\x80posix\nsystem\n.",  # a UTF-8 module name (pickletools reads ASCII)
    ],
)
def test_text_opcodes_that_pickletools_refuses_but_the_unpickler_reads_are_followed(tmp_path: Path,
                                                                                     data: bytes) -> None:
    path = tmp_path / "model"
    path.write_bytes(data)
    for explicit in (True, False):
        report = scan_file(path, explicit=explicit)
        assert report.status in ("findings", "error") and report.findings, report  # never skipped or clean
        assert report.worst in ("critical", "high", "medium")


def test_a_global_name_too_long_to_resolve_is_a_finding(tmp_path: Path) -> None:
    path = tmp_path / "model"
    path.write_bytes(b"c" + b"\xc3\x80" * 40_000 + b"\nsystem\n.")
    report = scan_file(path, explicit=False)
    assert report.status == "error" and report.worst == "high"


def test_a_tar_archive_is_never_clean(tmp_path: Path, marker: Path) -> None:
    # torch.load tries tarfile first and unpickles the members 'storages', 'tensors' and
    # 'pickle'; a member named 'N.' makes the tar header itself parse as a harmless pickle.
    import io
    import tarfile

    path = tmp_path / "ckpt.pt"
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as archive:
        for name, payload in (("N.", b"x"), ("storages", _evil(marker, 2)), ("pickle", pickle.dumps({"a": 1}))):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            archive.addfile(info, io.BytesIO(payload))
    for explicit in (True, False):
        report = scan_file(path, explicit=explicit)
        assert report.kind == "tar" and report.status == "error" and report.worst == "critical", report
        assert "legacy torch.save format" in str(report.error)


def test_an_npz_member_is_an_array_by_its_magic_whatever_its_name(tmp_path: Path, marker: Path) -> None:
    import io
    import zipfile

    import numpy as np

    buffer = io.BytesIO()
    np.lib.format.write_array(buffer, np.array([SystemPayload("echo x")], dtype=object), allow_pickle=True)
    path = tmp_path / "weights.npz"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("payload", buffer.getvalue())  # np.load(...)["payload"] unpickles it
    report = scan_file(path)
    assert report.kind == "npz" and report.worst == "critical", report
    assert {f.rule for f in report.findings} >= {"object-array"}
