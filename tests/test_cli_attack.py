"""``redblue attack`` as a user runs it: files written, JSON content, one-line errors."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from redblue.utils import sha256_file

Cli = Callable[..., CompletedProcess[str]]


def model_json(tiny_model_dir: Path) -> str:
    return str(tiny_model_dir / "models" / "baseline.json")


def test_attack_quick_writes_metrics_examples_and_plots(cli: Cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli(
        "attack", "--model", model_json(tiny_model_dir), "--attack", "quick", "--eps", "0.3", "--steps", "10",
        "--n-examples", "60", "--dataset", "mnist-mini", "--device", "cpu", "--sweep", "--out", str(out),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "baseline_quick: clean" in proc.stdout
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    cached = [f for f in files if f.startswith("cache/attack/")]
    assert len(cached) == 2 and {Path(f).suffix for f in cached} == {".json", ".safetensors"}  # the evaluation
    assert [f for f in files if not f.startswith("cache/")] == [
        ".redblue.lock",  # the output folder's lock, held while the command writes
        "images/baseline_quick_accuracy_vs_eps.png",
        "images/baseline_quick_examples.png",
        "images/baseline_quick_perturbation.png",
        "metrics/baseline_quick_config.json",
        "metrics/baseline_quick_examples.safetensors",
        "metrics/baseline_quick_metrics.json",
    ]
    result = json.loads((out / "metrics" / "baseline_quick_metrics.json").read_text())
    metrics = result["metrics"]
    assert metrics["n_examples"] == 60 and metrics["eps"] == 0.3 and metrics["norm"] == "linf"
    assert set(metrics["attacks"]) == {"fgsm", "pgd"}
    assert metrics["robust_accuracy"] <= min(a["robust_accuracy"] for a in metrics["attacks"].values())
    assert metrics["attacks"]["pgd"]["settings"]["steps"] == 10
    assert isinstance(metrics["attacks"]["fgsm"]["images_per_s"], float)
    assert metrics["attacks"]["fgsm"]["perturbation"]["linf_max"] <= 0.3 + 1e-6
    assert (
        result["model"]["weights_sha256"] == json.loads(Path(model_json(tiny_model_dir)).read_text())["weights_sha256"]
    )
    assert result["dataset"]["name"] == "mnist-mini" and result["dataset"]["files"]
    assert result["config"]["attack"]["attack"] == "quick"
    assert set(metrics["sweep"]) == {"fgsm", "pgd"} and metrics["sweep"]["pgd"][0]["eps"] == 0.0
    assert result["samples_sha256"] == sha256_file(out / "metrics" / result["samples_file"])
    assert isinstance(result["warnings"], list)
    # stderr is a pipe, not a terminal: the bars are off, so each finished attack says so in one plain line
    for name, attack in metrics["attacks"].items():
        robust = round(attack["robust_accuracy"] * 60)
        assert f"{name} eps=0.3: {robust} of 60 images robust, " in proc.stderr, proc.stderr
    warnings = ", ".join(w["id"] for w in result["warnings"]) or "none"
    assert result["checks"]["ran"]
    assert f"sanity checks on {result['checks']['n_examples']} images: {len(result['warnings'])} warning(s) ({warnings})" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--eps", "-0.1"], "--eps -0.1: must be in [0, 1]"),
        (["--eps", "1.5"], "--eps 1.5: must be in [0, 1]"),
        (["--attack", "deepfool"], "--attack 'deepfool': unknown attack"),
        (["--attack", "pgd", "--steps", "0"], "--steps 0: must be at least 1"),
        (["--norm", "l1"], "Invalid value for '--norm': 'l1' is not one of 'linf', 'l2'."),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    cli: Cli, tiny_model_dir: Path, tmp_path: Path, args: list[str], message: str
) -> None:
    out = tmp_path / "out"
    proc = cli("attack", "--model", model_json(tiny_model_dir), "--dataset", "mnist-mini", "--out", str(out), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not (out / "metrics").exists()


def test_a_tampered_model_file_is_refused(cli: Cli, tiny_model_dir: Path, tmp_path: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(tiny_model_dir / "models", models)
    weights = models / "baseline.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    proc = cli(
        "attack", "--model", str(models / "baseline.json"), "--dataset", "mnist-mini", "--out", str(tmp_path / "o")
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "SHA-256 mismatch" in lines[0]
