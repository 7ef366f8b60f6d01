"""``redblue poison`` and ``redblue defend-backdoor`` as a user runs them (subprocesses)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from redblue.cli import main

Cli = Callable[..., subprocess.CompletedProcess[str]]

FAST = ("--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu")


BAD_POISON_SETTINGS = [
    (("--rate", "1.5"), "--rate 1.5: must be in [0, 1]"),
    (("--rate", "-0.01"), "--rate -0.01: must be in [0, 1]"),
    (("--size", "29"), "--size 29: patch larger than the 28x28 image"),
    (("--position", "26,10"), "--position 26,10: a 4x4 patch there falls outside the 28x28 image"),
    (("--position", "center"), "--position 'center': expected one of"),
    (("--target", "10"), "--target 10: not a class"),
    (("--pattern", "dots"), "Invalid value for '--pattern': 'dots' is not one of 'solid', 'checkerboard'."),
    (("--sweep", "--sweep-rates", "0.1,x"), "--sweep-rates '0.1,x'"),
]


@pytest.mark.parametrize(("args", "message"), [BAD_POISON_SETTINGS[0], BAD_POISON_SETTINGS[5]])
def test_bad_poison_settings_exit_2_with_one_line(cli: Cli, tmp_path: Path, args: tuple[str, ...],
                                                  message: str) -> None:
    out = tmp_path / "out"
    proc = cli("poison", *FAST, "--out", str(out), *args)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("redblue: error: ") and message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "models").exists()


@pytest.mark.parametrize(("args", "message"), BAD_POISON_SETTINGS)
def test_bad_poison_settings_in_process(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                        args: tuple[str, ...], message: str) -> None:
    """The same entry point (``redblue.cli.main``) in this process: every bad setting."""
    out = tmp_path / "out"
    assert main(["poison", *FAST, "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("redblue: error: ") and message in err and "\n" not in err
    assert not (out / "models").exists()


def test_poison_then_defend_backdoor(cli: Cli, tmp_path: Path, files_under: Callable[[Path], list[str]]) -> None:
    out = tmp_path / "out"
    proc = cli("poison", *FAST, "--rate", "0.2", "--target", "3", "--size", "3",
               "--position", "1,2", "--pattern", "checkerboard", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "clean accuracy" in proc.stdout and "ASR" in proc.stdout and "RA" in proc.stdout
    written = files_under(out)
    for name in ("models/poisoned.safetensors", "models/poisoned.json",
                 "models/poisoned_poison_indices.safetensors", "metrics/poison_metrics.json",
                 "metrics/poison_config.json", "images/poison_examples.png",
                 "images/poison_trigger.png", "images/poison_triggered_predictions.png"):
        assert name in written
    record = json.loads((out / "models" / "poisoned.json").read_text())
    assert record["poison"]["target"] == 3
    assert record["poison"]["trigger"] == {"size": 3, "position": "1,2", "pattern": "checkerboard",
                                           "blend": 1.0}
    metrics = json.loads((out / "metrics" / "poison_metrics.json").read_text())
    assert f"ASR {100 * metrics['metrics']['asr']:.2f}%" in proc.stdout

    # The defence rebuilds the poisoned set from the record; detection + retraining.
    proc = cli("defend-backdoor", "--model", str(out / "models" / "poisoned.json"),
               "--dataset", "mnist-mini", "--device", "cpu", "--epochs", "1", "--method", "spectral",
               "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "precision" in proc.stdout and "retrained without flagged" in proc.stdout
    spectral = json.loads((out / "metrics" / "backdoor_defense_spectral_metrics.json").read_text())
    assert spectral["schema"] == {"name": "redblue.backdoor_defense", "version": 1}
    assert spectral["params"]["expected_share_used"] == 0.2
    assert spectral["detection"]["n_poison"] == record["poison"]["n_poison"]
    assert spectral["config"]["train"]["epochs"] == 1  # CLI override of the recorded config
    assert (out / "models" / "poisoned_spectral_retrained.safetensors").is_file()
    assert (out / "images" / "backdoor_defense_spectral.png").is_file()

    # A second method gets its own file; --no-retrain skips retraining.
    assert main(["defend-backdoor", "--model", str(out / "models" / "poisoned.safetensors"),
                 "--dataset", "mnist-mini", "--device", "cpu", "--method", "ac", "--no-retrain",
                 "--out", str(out)]) == 0
    ac = json.loads((out / "metrics" / "backdoor_defense_ac_metrics.json").read_text())
    assert ac["method"] == "ac" and ac["after"] is None and ac["retrained_model"] is None
    assert json.loads((out / "metrics" / "backdoor_defense_spectral_metrics.json").read_text()) == spectral



def test_defend_backdoor_refuses_a_tampered_record(cli: Cli, tmp_path: Path, mini_poisoned: Path) -> None:
    record_path = mini_poisoned / "models" / "poisoned.json"
    record = json.loads(record_path.read_text())
    tampered = tmp_path / "models"
    tampered.mkdir()
    for f in (mini_poisoned / "models").iterdir():
        (tampered / f.name).write_bytes(f.read_bytes())
    record["poison"]["poison_seed"] = 1  # claims another choice of poisoned images
    (tampered / "poisoned.json").write_text(json.dumps(record))
    proc = cli("defend-backdoor", "--model", str(tampered / "poisoned.json"), "--dataset",
               "mnist-mini", "--device", "cpu", "--no-retrain", "--out", str(tmp_path / "o"))
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert "poison indices rebuilt from this dataset" in proc.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--method", "magic"), "Invalid value for '--method': 'magic' is not one of 'ac', 'spectral'. "
                                "(see 'redblue defend-backdoor --help')"),
        (("--max-share", "0.7"), "--max-share 0.7: must be in (0, 0.5]"),
        (("--expected-share", "2"), "--expected-share 2: must be in [0, 1]"),
        (("--analysis", "vibes"), "Invalid value for '--analysis': 'vibes' is not one of 'reclassify', 'size', "
                                  "'silhouette'. (see 'redblue defend-backdoor --help')"),
    ],
)
def test_bad_defense_settings_exit_2(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                     mini_poisoned: Path, args: tuple[str, ...], message: str) -> None:
    code = main(["defend-backdoor", "--model", str(mini_poisoned / "models" / "poisoned.json"),
                 "--dataset", "mnist-mini", "--out", str(tmp_path), *args])
    assert code == 2
    assert capsys.readouterr().err.strip() == f"redblue: error: {message}"


def test_defend_backdoor_screens_when_the_record_has_no_poison(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                                                                mini_poisoned: Path) -> None:
    """A redblue model without poison settings: its record cannot rebuild a poisoned set, so
    --dataset's training split is screened instead (detection only, nothing scored); true
    poison indices beside a poisoned record are refused (the record holds them)."""
    models = tmp_path / "models"
    models.mkdir()
    (models / "plain.safetensors").write_bytes((mini_poisoned / "models" / "poisoned.safetensors").read_bytes())
    record = json.loads((mini_poisoned / "models" / "poisoned.json").read_text())
    del record["poison"]
    record["weights_file"] = "plain.safetensors"
    (models / "plain.json").write_text(json.dumps(record))
    code = main(["defend-backdoor", "--model", str(models / "plain.json"), "--dataset", "mnist-mini",
                 "--out", str(tmp_path / "o")])
    assert code == 0, capsys.readouterr().err
    result = json.loads((tmp_path / "o" / "metrics" / f"{record['name']}_backdoor_defense_ac_metrics.json").read_text())
    assert result["poisoned_model"]["poison"] is None and result["detection"]["precision"] is None
    assert result["retrained_model"] is None and "not scored" in capsys.readouterr().out
    (tmp_path / "idx.txt").write_text("1 2 3")
    code = main(["defend-backdoor", "--model", str(mini_poisoned / "models" / "poisoned.json"), "--dataset", "mnist-mini",
                 "--poison-indices", str(tmp_path / "idx.txt"), "--out", str(tmp_path / "p")])
    assert code == 2 and "in its record already" in capsys.readouterr().err
