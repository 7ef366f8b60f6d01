"""Hostile inputs, errors: every mistake or failure ends in one line on stderr naming the
file, option or key, exit 2, no traceback and no half-written file."""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
from typing import Any

import pytest

import redblue.utils
from redblue.cli import main


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert "Traceback" not in err and len(lines) == 1, err
    return code, lines[0]


def _train(config: Path, out: Path) -> tuple[str, ...]:
    return ("train", "--config", str(config), "--dataset", "mnist-mini", "--epochs", "1", "--out", str(out))


@pytest.mark.parametrize(
    ("toml", "needles"),
    [
        ("[train]\ndevice = 3\n", ("[train]", "device", "a string")),
        ("[data]\ndata_dir = 5\n", ("[data]", "data_dir", "a string")),
        ("[data]\ncache_dir = [1, 2]\n", ("[data]", "cache_dir")),
        ("[train]\nepochs = \"ten\"\n", ("[train]", "epochs", "an integer")),
        ("[train]\nlr = true\n", ("[train]", "lr", "a number")),
        ("[train]\nseed = 1.5\n", ("[train]", "seed")),
        ("[train]\nepochs = { a = 1 }\n", ("[train]", "epochs")),
        ("[train]\nepochz = 3\n", ("[train]", "epochz")),
        ("[trian]\nepochs = 3\n", ("[trian]",)),
        ("epochs = 3\n", ("epochs",)),
        ("[train]\nbatch_size = 0\n", ("batch_size",)),
        ("[train\nepochs = 3\n", ("not valid TOML",)),
        ("a = " + "[" * 5000 + "]" * 5000 + "\n", ("--config",)),
    ],
)
def test_a_bad_config_is_one_line_naming_the_file_and_key(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          toml: str, needles: tuple[str, ...]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(toml)
    out = tmp_path / "out"
    code, line = _run(capsys, *_train(config, out))
    assert code == 2 and "bad.toml" in line, line
    for needle in needles:
        assert needle in line, (needle, line)
    assert not out.exists()


def test_a_config_that_is_not_utf8_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("[train]\n# épochs\nepochs = 1\n".encode("latin-1"))
    code, line = _run(capsys, *_train(config, tmp_path / "out"))
    assert code == 2 and "latin1.toml" in line and "not UTF-8" in line


def test_a_missing_or_folder_config_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, line = _run(capsys, *_train(tmp_path / "absent.toml", tmp_path / "out"))
    assert code == 2 and "absent.toml" in line and "not found" in line
    code, line = _run(capsys, *_train(tmp_path, tmp_path / "out"))
    assert code == 2 and "is a directory" in line


@pytest.mark.parametrize(
    "content",
    [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe\x00{", b"", b"{}", b'{"format": "redblue.model/1"}',
     b'{"format": "redblue.model/1", "weights_sha256": 5}', b"[]", b"null"],
)
def test_a_damaged_record_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes) -> None:
    record = tmp_path / "m.json"
    record.write_bytes(content)
    code, line = _run(capsys, "evaluate", "--model", str(record), "--dataset", "mnist-mini", "--out",
                      str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and ("m.json" in line or "m.safetensors" in line), line


@pytest.mark.parametrize("weights_file", ["\u0000", "\u001e", "a\nb", "w\u2028x.safetensors", 7, None])
def test_a_record_field_with_control_characters_is_still_one_line(capsys: pytest.CaptureFixture[str],
                                                                 tmp_path: Path, tiny_model_dir: Path,
                                                                 weights_file: object) -> None:
    # found by the long fuzz run: a NUL in weights_file was a ValueError traceback, and a
    # record separator (\x1e) split the error line in two
    record = json.loads((tiny_model_dir / "models" / "baseline.json").read_text())
    record["weights_file"] = weights_file
    path = tmp_path / "m.json"
    path.write_text(json.dumps(record))
    code, line = _run(capsys, "evaluate", "--model", str(path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    assert code == 2 and "is not a file name in the record's own folder" in line, line


def _failing_writes(monkeypatch: pytest.MonkeyPatch, err: int) -> None:
    def fail(path: Path, data: bytes) -> None:
        raise OSError(err, os.strerror(err), str(path))

    monkeypatch.setattr(redblue.utils, "atomic_write_bytes", fail)


@pytest.mark.parametrize("err", [errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EACCES, errno.EROFS])
def test_a_failing_write_is_one_line_and_leaves_nothing_half_written(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_model_dir: Path,
    err: int,
) -> None:
    _failing_writes(monkeypatch, err)
    out = tmp_path / "out"
    code, line = _run(capsys, "evaluate", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--dataset",
                      "mnist-mini", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert code == 2 and os.strerror(err) in line and "baseline_evaluate" in line, line
    assert not [p for p in out.rglob("*") if p.is_file() and p.name != ".redblue.lock"]


def test_a_real_partial_write_leaves_no_temp_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    real_fdopen = os.fdopen

    class Full:
        def __init__(self, handle: Any) -> None:
            self.handle = handle

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *exc: object) -> None:
            self.handle.close()

        def write(self, data: bytes) -> int:
            self.handle.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(redblue.utils.os, "fdopen", lambda fd, mode: Full(real_fdopen(fd, mode)))
    target = tmp_path / "metrics" / "x.json"
    with pytest.raises(OSError, match="No space left"):
        redblue.utils.atomic_write_json(target, {"a": 1})
    assert list(target.parent.iterdir()) == []


def test_an_unreadable_record_is_one_line(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                          tmp_path: Path, tiny_model_dir: Path) -> None:
    real_open = os.open

    def denied(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).endswith("baseline.json"):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(redblue.utils.os, "open", denied)  # chmod 000 does not stop root
    code, line = _run(capsys, "evaluate", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--dataset",
                      "mnist-mini", "--out", str(tmp_path / "o"))  # fmt: skip
    assert code == 2 and "baseline.json" in line and "Permission denied" in line, line


def test_an_output_folder_that_is_a_file_is_one_line(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    blocker = tmp_path / "out"
    blocker.write_text("a file")
    code, line = _run(capsys, "train", "--dataset", "mnist-mini", "--out", str(blocker))
    assert code == 2 and "--out" in line and "not a directory" in line
    assert blocker.read_text() == "a file"
