"""Hostile inputs, paths: no name given on the command line, in a config file or in a record
can make redblue write or read outside the folders it was given."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from redblue.errors import ConfigError
from redblue.report import attack_plots
from redblue.validate import check_name
from redblue.verify import verify_dir
from tests.hostile_helpers import copy_model, one_line_exit_2

Cli = Callable[..., CompletedProcess[str]]
ESCAPES = ["../../escaped", "/tmp/escaped-abs", "a/b", "..", ".", ".hidden", "x" * 200, "a\\b", "nul\0byte", ""]


@pytest.mark.parametrize("name", ESCAPES)
def test_check_name_refuses_anything_that_is_not_one_plain_file_name(name: str) -> None:
    with pytest.raises(ConfigError, match="--name"):
        check_name("--name", name)


@pytest.mark.parametrize("name", ["baseline", "defended_pgd", "model-2.v1", "A9"])
def test_check_name_accepts_plain_names(name: str) -> None:
    assert check_name("--name", name) == name


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped-abs", "a/b", "..", ".hidden", "x" * 200])
def test_a_name_that_would_leave_the_output_folder_is_refused(cli: Cli, tmp_path: Path, name: str) -> None:
    out = tmp_path / "work" / "out"
    proc = cli("train", "--name", name, "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu",
               "--out", str(out))  # fmt: skip
    one_line_exit_2(proc, "--name")
    assert not out.exists() and sorted(p.name for p in tmp_path.rglob("*")) == []
    assert not Path("/tmp/escaped-abs").exists()


def test_attack_defend_and_poison_refuse_such_names_too(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    model = str(tiny_model_dir / "models" / "baseline.json")
    one_line_exit_2(cli("attack", "--model", model, "--name", "../x", "--dataset", "mnist-mini", "--out", str(out)),
                    "--name '../x'")  # fmt: skip
    one_line_exit_2(cli("defend", "--name", "/etc/x", "--dataset", "mnist-mini", "--out", str(out)), "--name")
    one_line_exit_2(cli("poison", "--name", "../../p", "--dataset", "mnist-mini", "--out", str(out)), "--name")
    assert not out.exists() and not (tmp_path / "x_attack_metrics.json").exists()


def test_a_name_from_a_config_file_is_checked_like_an_option(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[poison]\nname = "../../escaped"\n')
    out = tmp_path / "out"
    proc = cli("poison", "--config", str(config), "--dataset", "mnist-mini", "--out", str(out))
    one_line_exit_2(proc, "'../../escaped'")
    assert not out.exists() and not list(tmp_path.parent.glob("escaped*"))


@pytest.mark.parametrize("name", ["../../escaped", "/tmp/escaped-rec", "sub/dir"])
def test_a_record_whose_name_was_edited_into_a_path_is_refused(cli: Cli, tmp_path: Path, tiny_model_dir: Path,
                                                               name: str) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    record = json.loads(record_path.read_text())
    record["name"] = name
    record_path.write_text(json.dumps(record))
    out = tmp_path / "out"
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(out))
    one_line_exit_2(proc, repr(name))
    assert not list(tmp_path.rglob("*escaped*")) and not Path("/tmp/escaped-rec_evaluate_metrics.json").exists()


def test_a_record_may_only_name_weights_beside_it(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    record = json.loads(record_path.read_text())
    for weights_file in ("/dev/zero", "../../baseline.safetensors", "sub/baseline.safetensors", "..", ""):
        record["weights_file"] = weights_file
        record_path.write_text(json.dumps(record))
        proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
        one_line_exit_2(proc, "is not a file name in the record's own folder")


def test_weights_that_are_a_link_out_of_the_record_folder_are_refused(cli: Cli, tmp_path: Path,
                                                                      tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    weights = record_path.with_suffix(".safetensors")
    elsewhere = tmp_path / "elsewhere.safetensors"
    weights.rename(elsewhere)
    weights.symlink_to(elsewhere)  # same bytes, same hash: only where it points is wrong
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "resolves outside the record's own folder")
    weights.unlink()
    weights.symlink_to("/dev/zero")
    proc = cli("evaluate", "--model", str(record_path), "--dataset", "mnist-mini", "--out", str(tmp_path / "o"))
    one_line_exit_2(proc, "resolves outside the record's own folder")


def test_verify_reports_a_record_that_points_outside_the_folder(tmp_path: Path, tiny_model_dir: Path) -> None:
    record_path = copy_model(tiny_model_dir, tmp_path / "in")
    secret = tmp_path / "secret.bin"
    secret.write_bytes(b"not yours")
    record = json.loads(record_path.read_text())
    record["weights_file"] = "../../secret.bin"
    record_path.write_text(json.dumps(record))
    report = verify_dir(tmp_path / "in")
    assert [c.status for c in report.checks] == ["error"]
    assert "points outside the verified folder" in report.checks[0].message
    assert report.exit_code() == 2


@pytest.mark.parametrize("samples_file", ["../../secret.bin", "/etc/hostname", "sub/x.safetensors", 7])
def test_the_report_reads_no_example_file_outside_metrics(monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                          samples_file: object) -> None:
    out = tmp_path / "out"
    (out / "metrics").mkdir(parents=True)
    opened: list[Path] = []
    monkeypatch.setattr(attack_plots, "sha256_file", lambda path: opened.append(path) or "")
    paths = attack_plots.render_attack_plots(out, "fgsm", {"metrics": {}, "samples_file": samples_file})
    assert paths == [] and opened == []
    assert "is not a file name in metrics/" in capsys.readouterr().err
