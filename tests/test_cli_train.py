"""`redblue train` / `redblue evaluate` as a user runs them (subprocesses on temp folders)."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

Cli = Callable[..., CompletedProcess[str]]


def _one_clean_error_line(result: CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("redblue: error:"), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def test_help_explains_every_option(cli: Cli) -> None:
    result = cli("train", "--help")
    assert result.returncode == 0
    for option in (
        "--dataset",
        "--data-dir",
        "--epochs",
        "--batch-size",
        "--seed",
        "--device",
        "--out",
        "--config",
        "--precision",
    ):
        assert option in result.stdout


def test_train_writes_safetensors_json_and_plots_then_reuses(
    cli: Cli, tmp_path: Path, files_under: Callable[[Path], list[str]]
) -> None:
    out = tmp_path / "out"
    args = ("train", "--dataset", "mnist-mini", "--epochs", "1", "--out", str(out), "--device", "cpu")
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert files_under(out) == [
        ".redblue.lock",  # the output folder's lock, held while the command writes
        "images/baseline_confusion_matrix.png",
        "images/baseline_training_curves.png",
        "metrics/baseline_config.json",
        "metrics/baseline_metrics.json",
        "models/baseline.json",
        "models/baseline.safetensors",
    ]
    metrics = json.loads((out / "metrics" / "baseline_metrics.json").read_text())
    assert metrics["dataset"]["name"] == "mnist-mini" and metrics["dataset"]["files"]
    assert isinstance(metrics["metrics"]["clean_accuracy"], float) and metrics["metrics"]["clean_accuracy"] > 0.8
    assert len(metrics["model"]["weights_sha256"]) == 64 and "reused" not in metrics
    # stderr is a pipe, not a terminal: the bar is off, so the finished epoch says so in one plain line
    epoch = metrics["training"]["history"][0]
    assert (f"baseline epoch 1/1: loss {epoch['loss']:.4f}, training accuracy {epoch['train_accuracy']:.2%}, "
            f"test accuracy {epoch['test_accuracy']:.2%}, ") in first.stderr, first.stderr  # fmt: skip
    before = (out / "metrics" / "baseline_metrics.json").read_bytes()
    second = cli(*args)
    assert second.returncode == 0 and "reusing" in second.stderr
    assert (out / "metrics" / "baseline_metrics.json").read_bytes() == before  # the result is reused as it was
    forced = cli(*args, "--force-retrain")
    assert forced.returncode == 0 and "reusing" not in forced.stderr

    evaluated = cli(
        "evaluate",
        "--model",
        str(out / "models" / "baseline.safetensors"),
        "--dataset",
        "mnist-mini",
        "--out",
        str(out),
    )
    assert evaluated.returncode == 0, evaluated.stderr
    assert f"{100 * metrics['metrics']['clean_accuracy']:.2f}%" in evaluated.stdout


def test_a_refused_command_answers_without_loading_the_plotting_library(tmp_path: Path) -> None:
    """Matplotlib is imported only when a stage has plots to draw: ``--help`` and a command
    refused at its input (every subcommand registered) answer without it, which keeps them
    about half a second faster."""
    code = (
        "import sys\n"
        "from redblue.cli import main\n"
        "assert main(['--help']) == 0\n"
        f"code = main(['attack', '--model', {str(tmp_path / 'missing.json')!r}, '--out', {str(tmp_path / 'out')!r}])\n"
        "print(code, 'matplotlib' in sys.modules, 'ray' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "2 False False", proc.stdout + proc.stderr
    assert not (tmp_path / "out").exists()


def test_config_file_is_overridden_by_cli_and_saved(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text('[data]\ndataset = "mnist-mini"\n[train]\nepochs = 1\nseed = 5\nbatch_size = 256\n')
    out = tmp_path / "out"
    result = cli("train", "--config", str(config), "--seed", "7", "--out", str(out), "--device", "cpu")
    assert result.returncode == 0, result.stderr
    saved = json.loads((out / "metrics" / "baseline_config.json").read_text())
    assert saved["train"]["seed"] == 7 and saved["train"]["batch_size"] == 256 and saved["train"]["epochs"] == 1
    assert saved["data"]["dataset"] == "mnist-mini"


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (("--epochs", "-1"), "--epochs -1: must be at least 1"),
        (("--dataset", "cifar"), "--dataset 'cifar': expected one of auto, mnist"),
        (("--data-dir", "/nonexistent/dir"), "directory does not exist"),
        (("--config", "/nonexistent/c.toml"), "--config /nonexistent/c.toml: file not found"),
        (("--device", "tpu"), "--device 'tpu'"),
        (("--precision", "fp8"), "Invalid value for '--precision': 'fp8' is not one of 'auto', 'fp32', 'bf16'."),
        (("--batch-size", "abc"), "'abc' is not a valid integer"),
        (("--bogus",), "No such option"),
    ],
)
def test_bad_values_give_one_line_and_write_nothing(
    cli: Cli, tmp_path: Path, args: tuple[str, ...], expected: str
) -> None:
    out = tmp_path / "out"
    line = _one_clean_error_line(cli("train", "--dataset", "mnist-mini", *args, "--out", str(out)))
    assert expected in line
    assert not out.exists()


def test_unreadable_config_is_one_line(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[train\nepochs = ")
    line = _one_clean_error_line(cli("train", "--config", str(config), "--out", str(tmp_path / "o")))
    assert "not valid TOML" in line and str(config) in line
    config.write_text("[train]\nepochz = 3\n")
    assert "unknown setting" in _one_clean_error_line(
        cli("train", "--config", str(config), "--out", str(tmp_path / "o"))
    )
    assert not (tmp_path / "o").exists()


def test_tampered_weights_are_refused_by_evaluate(cli: Cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = tmp_path / "models"
    copy.mkdir()
    for name in ("baseline.json", "baseline.safetensors"):
        (copy / name).write_bytes((tiny_model_dir / "models" / name).read_bytes())
    weights = copy / "baseline.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    weights.write_bytes(bytes(raw))
    out = tmp_path / "eval_out"
    line = _one_clean_error_line(cli("evaluate", "--model", str(weights), "--dataset", "mnist-mini", "--out", str(out)))
    assert "SHA-256 mismatch" in line and str(weights) in line
    assert not out.exists()


def test_truncated_idx_file_is_one_line(cli: Cli, mnist_dir: Path, tmp_path: Path) -> None:
    import gzip

    data = tmp_path / "data"
    data.mkdir()
    for name in (
        "train-images-idx3-ubyte",
        "train-labels-idx1-ubyte",
        "t10k-images-idx3-ubyte",
        "t10k-labels-idx1-ubyte",
    ):
        src = next(p for p in (mnist_dir / f"{name}.gz", mnist_dir / "mnist" / f"{name}.gz") if p.is_file())
        raw = gzip.decompress(src.read_bytes())
        (data / name).write_bytes(raw[:-784] if name == "t10k-images-idx3-ubyte" else raw)
    out = tmp_path / "out"
    line = _one_clean_error_line(cli("train", "--dataset", "mnist", "--data-dir", str(data), "--out", str(out)))
    assert "t10k-images-idx3-ubyte" in line and "truncated" in line
    assert not out.exists()


def test_unwritable_out_fails_before_any_training(cli: Cli, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    line = _one_clean_error_line(cli("train", "--dataset", "mnist-mini", "--out", str(blocker)))
    assert "not a directory" in line


@pytest.mark.slow
def test_train_on_full_mnist_reaches_99_and_reloads(cli: Cli, mnist_dir: Path, baseline_dir: Path, tmp_path: Path) -> None:
    """A bound: 99.11% (AMD EPYC, avx512_bf16) and 99.10% (Intel Xeon, AMX bf16) measured.

    The first ``redblue train`` is the session's ``baseline_dir`` fixture (the same command in
    a subprocess); this test checks what it wrote, then reruns it on a copy."""
    out = tmp_path / "out"
    shutil.copytree(baseline_dir, out)
    metrics = json.loads((out / "metrics" / "baseline_metrics.json").read_text())
    assert metrics["dataset"]["name"] == "mnist" and metrics["dataset"]["n_train"] == 60_000
    assert metrics["metrics"]["clean_accuracy"] >= 0.990
    again = cli("train", "--data-dir", str(mnist_dir), "--out", str(out), "--device", "cpu")
    assert again.returncode == 0 and "reusing" in again.stderr
    assert (
        json.loads((out / "metrics" / "baseline_metrics.json").read_text())["metrics"]["clean_accuracy"]
        == metrics["metrics"]["clean_accuracy"]
    )


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize(
    ("stderr", "progress", "printed"),
    [(io.StringIO(), True, True), (io.StringIO(), False, False), (_Terminal(), True, False), (None, True, False)],
    ids=["log-file", "progress-off", "terminal", "no-stderr"],
)
def test_progress_line_only_where_the_bars_cannot_show(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], stderr: io.StringIO | None,
    progress: bool, printed: bool,
) -> None:  # fmt: skip
    from redblue.utils import progress_line

    monkeypatch.setattr(sys, "stderr", stderr)
    progress_line(progress, "robust epoch 1/8: done")
    assert capsys.readouterr().out == ""  # never on stdout, even with no stderr at all (pythonw)
    if stderr is not None:
        assert stderr.getvalue() == ("robust epoch 1/8: done\n" if printed else "")
