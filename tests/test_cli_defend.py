"""``redblue defend`` as a user runs it: a subprocess on a temporary folder."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from redblue.artifacts import load_model
from redblue.report.summary import build_summary

Cli = Callable[..., subprocess.CompletedProcess[str]]

FAST = ("--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu", "--guard-size", "200", "--n-examples", "100")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--alpha", "0"), "redblue: error: --alpha 0: must be in (0, inf)"),
        (("--alpha", "-0.5"), "redblue: error: --alpha -0.5: must be in (0, inf)"),
        (("--eps", "0"), "redblue: error: --eps 0: must be in (0, 1]"),
        (("--eps", "1.2"), "redblue: error: --eps 1.2: must be in (0, 1]"),
        (("--beta", "-1"), "redblue: error: --beta -1: must be in [0, inf)"),
        (("--steps", "0"), "redblue: error: --steps 0: must be at least 1"),
        (("--ratio", "1.5"), "redblue: error: --ratio 1.5: must be in [0, 1]"),
        (("--train-eps-margin", "-0.05"), "redblue: error: --train-eps-margin -0.05: must be in [0, inf)"),
        (("--awp-gamma", "1.5"), "redblue: error: --awp-gamma 1.5: must be in [0, 1]"),
        (
            ("--eps", "0.3", "--train-eps-margin", "0.8"),
            "redblue: error: --train-eps-margin 0.8: the training eps (eps 0.3 + margin) must be at most 1",
        ),
        (
            ("--recipe", "free"),
            "redblue: error: Invalid value for '--recipe': 'free' is not one of 'fgsm', 'fgsm-rs', 'pgd', 'trades', "
            "'mart'. (see 'redblue defend --help')",
        ),
    ],
)
def test_bad_settings_give_one_line_and_exit_2(cli: Cli, tmp_path: Path, args: tuple[str, ...], message: str) -> None:
    out = tmp_path / "out"
    proc = cli("defend", *args, "--dataset", "mnist-mini", "--out", str(out))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
    assert "Traceback" not in proc.stderr
    assert not (out / "models").exists()  # nothing half-written


def test_bad_config_file_setting_names_the_section(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "redblue.toml"
    config.write_text("[defend]\nrecipe = 'pgd'\nbeta = -2.0\n")
    proc = cli("defend", "--config", str(config), "--dataset", "mnist-mini", "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"redblue: error: {config}: [defend] beta = -2.0: must be in [0, inf)"


def test_defend_trains_saves_evaluates_and_reuses(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ("defend", "--recipe", "fgsm-rs", "--eps", "0.3", *FAST, "--out", str(out))
    first = cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("advtrain (fgsm-rs, eps 0.3): clean ")
    for path in (
        "models/advtrain.safetensors",
        "models/advtrain.json",
        "metrics/advtrain_metrics.json",
        "metrics/advtrain_config.json",
        "images/advtrain_training_curves.png",
        "images/advtrain_robustness.png",
    ):
        assert (out / path).is_file(), path
    result = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert result["recipe"] == {
        "recipe": "fgsm-rs", "eps": 0.3, "eps_ramp": 0, "alpha": 0.375, "steps": 1, "random_start": "unclamped"
    }
    assert result["config"]["defend"]["guard_size"] == 200
    assert result["training"]["n_train"] == 3800  # the guard slice is held out
    epoch = result["training"]["history"][0]
    for key in ("guard_clean_accuracy", "guard_fgsm_accuracy", "guard_pgd_accuracy", "test_accuracy"):
        assert isinstance(epoch[key], float) and 0.0 <= epoch[key] <= 1.0
    metrics = result["metrics"]
    assert metrics["n_examples"] == 100 and metrics["n_test"] == 1000
    assert metrics["robust_accuracy"] <= metrics["fgsm_accuracy"] or metrics["robust_accuracy"] <= metrics["pgd_accuracy"]
    loaded = load_model(out / "models" / "advtrain.json")  # hash-verified
    assert loaded.record["training"]["recipe"]["recipe"] == "fgsm-rs"
    assert loaded.record["config"]["defend"]["eps"] == 0.3
    assert loaded.record["weights_sha256"] == result["model"]["weights_sha256"]

    before = (out / "metrics" / "advtrain_metrics.json").read_bytes()
    again = cli(*args)
    assert again.returncode == 0, again.stderr
    assert "reusing" in again.stderr
    assert (out / "metrics" / "advtrain_metrics.json").read_bytes() == before


def test_a_training_eps_margin_trains_beyond_eps_and_evaluates_at_eps(cli: Cli, tmp_path: Path) -> None:
    """--eps 0.2 --train-eps-margin 0.1: the attack in training is 0.3 (its step 1.25 * 0.3), the
    evaluation and the model's robustness record are at 0.2; it is the model --eps 0.3 trains."""
    out = tmp_path / "out"
    common = ("defend", "--recipe", "fgsm-rs", *FAST, "--out", str(out))
    proc = cli(*common, "--eps", "0.2", "--train-eps-margin", "0.1")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("advtrain (fgsm-rs, eps 0.2): clean ")
    result = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert result["recipe"]["eps"] == 0.3 and result["recipe"]["alpha"] == pytest.approx(0.375)
    assert result["config"]["defend"]["eps"] == 0.2 and result["config"]["defend"]["train_eps_margin"] == 0.1
    assert result["evaluation"]["eps"] == 0.2
    record = load_model(out / "models" / "advtrain.json").record
    assert record["robustness"]["threat_model"]["eps"] == 0.2
    assert record["training"]["guard"]["eps"] == 0.3  # the guard watches the attack the model trains against
    (row,) = build_summary(out).rows  # the report's table says both radii
    assert row["detail"].startswith("eps 0.2 (trained at 0.3): FGSM ")

    same = cli(*common, "--eps", "0.3")  # the same training attack: the model is reused, evaluated at 0.3
    assert same.returncode == 0, same.stderr
    assert "reusing" in same.stderr
    again = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert again["model"]["weights_sha256"] == result["model"]["weights_sha256"]
    assert again["evaluation"]["eps"] == 0.3


def test_awp_is_recorded_and_trains_its_own_model(cli: Cli, tmp_path: Path) -> None:
    """--awp-gamma 0.01: the recipe and config record it and it trains other weights than the
    same command without it, which does not reuse the AWP model; --awp-gamma 0 is the plain
    model (reused, the same weights)."""
    out = tmp_path / "out"
    common = ("defend", "--recipe", "fgsm-rs", "--eps", "0.2", *FAST, "--out", str(out))
    proc = cli(*common, "--awp-gamma", "0.01")
    assert proc.returncode == 0, proc.stderr
    awp = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert awp["recipe"]["awp_gamma"] == 0.01 and awp["config"]["defend"]["awp_gamma"] == 0.01
    plain_proc = cli(*common)
    assert plain_proc.returncode == 0, plain_proc.stderr
    assert "reusing" not in plain_proc.stderr
    plain = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert "awp_gamma" not in plain["recipe"] and plain["config"]["defend"]["awp_gamma"] == 0.0
    assert plain["model"]["weights_sha256"] != awp["model"]["weights_sha256"]
    off = cli(*common, "--awp-gamma", "0")
    assert off.returncode == 0, off.stderr
    assert "reusing" in off.stderr
    again = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    assert again["model"]["weights_sha256"] == plain["model"]["weights_sha256"]
