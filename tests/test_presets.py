"""``--preset`` (``defend``, ``run`` and ``[defend] preset`` in the config file): a named
recipe whose settings sit under the config file's and the options' (issue 17)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from redblue import pipeline
from redblue.artifacts import load_model
from redblue.config import (
    PRESETS,
    BackdoorDefenseConfig,
    DataConfig,
    DefendConfig,
    PoisonConfig,
    RunConfig,
    TrainConfig,
    build,
    find_preset,
    load_toml,
    preset_bases,
)
from redblue.data import Dataset
from redblue.errors import ConfigError
from redblue.stages.defend import defense_cache_key
from redblue.sweep import load_grid

Cli = Callable[..., subprocess.CompletedProcess[str]]
ROBUST = PRESETS["mnist-robust"]


def test_the_robust_preset_is_the_documented_recipe() -> None:
    """The settings docs/adversarial-training.md reports for ``--preset mnist-robust``."""
    train = build(TrainConfig, None, {}, base=ROBUST.train)
    defend = build(DefendConfig, None, {"preset": ROBUST.name}, base=ROBUST.defend)
    assert (train.model_name, train.batch_size, train.lr, train.lr_schedule) == ("cnn-wide", 100, 3e-3, "one-cycle")
    assert (defend.recipe, defend.eps, defend.steps, defend.beta) == ("mart", 0.3, 10, 6.0)
    assert (defend.train_eps_margin, defend.training_eps, defend.step_size) == (0.05, 0.35, pytest.approx(0.0875))
    assert (train.epochs, defend.eps_ramp) == (8, 2)
    assert defend.n_examples == 10_000 and defend.guarded and defend.preset == "mnist-robust"
    docs = (Path(__file__).resolve().parents[1] / "docs" / "adversarial-training.md").read_text(encoding="utf-8")
    assert "--preset mnist-robust" in docs and f"--epochs {train.epochs} --eps-ramp {defend.eps_ramp}" in docs
    assert f"--recipe mart --eps 0.3 --train-eps-margin {defend.train_eps_margin:g}" in docs


def test_the_file_and_the_options_override_the_preset(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 3\n[defend]\npreset = 'mnist-robust'\nbeta = 3.0\n", encoding="utf-8")
    file = load_toml(config, ("train", "defend"))
    preset = find_preset(None, file)
    assert preset is ROBUST and find_preset("mnist-robust", load_toml(None)) is ROBUST
    train = build(TrainConfig, file, {"lr": 1e-3}, "train", base=preset.train)
    defend = build(DefendConfig, file, {"steps": 5}, "defend", base=preset.defend)
    assert (train.model_name, train.epochs, train.lr) == ("cnn-wide", 3, 1e-3)  # preset, file, option
    assert (defend.recipe, defend.beta, defend.steps, defend.preset) == ("mart", 3.0, 5, "mnist-robust")
    assert find_preset(None, load_toml(None)) is None


def test_the_preset_bases_cover_training_and_defence_and_carry_the_label(tmp_path: Path) -> None:
    """The one place defend, run and sweep grids read a preset from."""
    assert preset_bases(None, load_toml(None)) == (None, {})
    config = tmp_path / "c.toml"
    config.write_text("[defend]\npreset = 'mnist-robust'\n", encoding="utf-8")
    for name, file in (("mnist-robust", load_toml(None)), (None, load_toml(config, ("defend",)))):
        preset, bases = preset_bases(name, file)
        assert preset is ROBUST and set(bases) == {"train", "defend"}
        assert dict(bases["train"]) == dict(ROBUST.train)
        assert dict(bases["defend"]) == {**ROBUST.defend, "preset": "mnist-robust"}
        assert build(DefendConfig, None, {}, base=bases["defend"]).preset == "mnist-robust"


@pytest.mark.parametrize("text", ["[defend]\npreset = 'mnist-robustest'\n", "[defend]\npreset = 3\n"])
def test_an_unknown_preset_in_the_file_names_the_file(tmp_path: Path, text: str) -> None:
    config = tmp_path / "c.toml"
    config.write_text(text, encoding="utf-8")
    with pytest.raises(ConfigError, match=r"c\.toml: \[defend\] preset = .*: expected one of mnist-robust$"):
        find_preset(None, load_toml(config, ("defend",)))


def test_an_unknown_preset_is_one_line_and_exit_2(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    for command in ("defend", "run"):
        proc = cli(command, "--preset", "mnist-robustest", "--dataset", "mnist-mini", "--out", str(out))
        assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Invalid value for '--preset': 'mnist-robustest' is not 'mnist-robust'" in proc.stderr
    refused = cli("defend", "--preset", "mnist-robust", "--model", "net.py:build", "--out", str(out))
    assert refused.returncode == 2
    assert refused.stderr.strip() == "redblue: error: --preset mnist-robust: not used with --model (a preset trains its own architecture)"
    assert not out.exists()


def test_defend_with_the_preset_trains_and_records_it(cli: Cli, tmp_path: Path) -> None:
    """The preset's recipe and architecture reach the trained model; the options given beside
    it (a short run here) win, and the record names the preset."""
    out = tmp_path / "out"
    proc = cli("defend", "--preset", "mnist-robust", "--dataset", "mnist-mini", "--epochs", "1", "--batch-size", "200",
               "--guard-size", "200", "--n-examples", "20", "--device", "cpu", "--out", str(out), "--name", "robust")  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.startswith("robust (mart, eps 0.3): clean "), proc.stdout
    saved = (out / "models" / "robust.json").read_bytes()
    record = json.loads(saved)
    assert record["model_name"] == "cnn-wide"
    train, defend = record["config"]["train"], record["config"]["defend"]
    assert (train["model_name"], train["lr_schedule"], train["lr"], train["epochs"], train["batch_size"]) == (
        "cnn-wide", "one-cycle", 3e-3, 1, 200,
    )  # fmt: skip
    assert (defend["preset"], defend["recipe"], defend["eps"], defend["beta"], defend["steps"]) == (
        "mnist-robust", "mart", 0.3, 6.0, 10,
    )  # fmt: skip
    assert defend["train_eps_margin"] == 0.05
    assert record["training"]["recipe"] == {"recipe": "mart", "eps": 0.35, "eps_ramp": ROBUST.defend["eps_ramp"],
                                            "alpha": pytest.approx(0.0875), "steps": 10, "random_start": True,
                                            "beta": 6.0}  # fmt: skip
    rerun = cli("defend", "--preset", "mnist-robust", "--dataset", "mnist-mini", "--epochs", "1", "--batch-size", "200",
                "--guard-size", "200", "--n-examples", "20", "--device", "cpu", "--out", str(out), "--name", "robust")  # fmt: skip
    assert rerun.returncode == 0 and "reusing" in rerun.stderr, rerun.stderr[-2000:]
    assert (out / "models" / "robust.json").read_bytes() == saved  # the record's robustness entry is not rewritten
    metrics = json.loads((out / "metrics" / "robust_metrics.json").read_text())["metrics"]
    assert metrics["n_examples"] == 20 and 0.0 <= metrics["autoattack_accuracy"] <= metrics["examples_clean_accuracy"]
    robustness = json.loads((out / "models" / "robust.json").read_text())["robustness"]  # the record says it too
    assert robustness["threat_model"] == {"norm": "linf", "eps": 0.3, "pixels": "[0, 1]"}
    assert robustness["protocol"] == "AutoAttack standard" and robustness["attacks"]["square"]["steps"] == 5000
    assert robustness["attacks"]["apgd-t"]["n_targets"] == robustness["attacks"]["fab-t"]["n_targets"] == 9
    assert robustness["n_examples"] == 20 and robustness["metrics"] == "metrics/robust_metrics.json"
    for key in ("clean_accuracy", "autoattack_accuracy", "robust_accuracy"):
        assert robustness[key] == metrics[key]
    assert load_model(out / "models" / "robust.json").record["robustness"] == robustness  # still loads, hash-verified


def test_run_gives_the_preset_to_the_blue_team_only(cli: Cli, tmp_path: Path) -> None:
    """``run --preset``: the blue team trains with the preset (its own training config in
    ``run_config.json``), the baseline with the usual one; the preset's eps and image count
    win over the red team's defaults, not over values given."""
    fast = ("--stages", "baseline", "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu")
    cases = [
        (("--preset", "mnist-robust"), "", (0.3, 10_000, 6.0)),
        (("--preset", "mnist-robust", "--eps", "0.2", "--n-examples", "50"), "", (0.2, 50, 6.0)),
        ((), "[run]\neps = 0.25\n[defend]\npreset = 'mnist-robust'\nbeta = 3.0\n", (0.25, 10_000, 3.0)),
        (("--preset", "mnist-robust", "--defend-eps", "0.1"), "[defend]\neps = 0.2\n", (0.1, 10_000, 6.0)),
        (("--preset", "mnist-robust"), "[run]\nn_examples = 300\n[defend]\neps = 0.2\n", (0.2, 300, 6.0)),
        (("--preset", "mnist-robust"), "[defend]\npreset = 'mnist-robustest'\n", (0.3, 10_000, 6.0)),  # the option wins
    ]
    for i, (args, text, (eps, n_examples, beta)) in enumerate(cases):
        config = tmp_path / f"c{i}.toml"
        config.write_text(text, encoding="utf-8")
        out = tmp_path / "out"
        proc = cli("run", *fast, *args, "--config", str(config), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        recorded = json.loads((out / "metrics" / "run_config.json").read_text())
        defend, blue, red = recorded["defend"], recorded["defend_train"], recorded["train"]
        assert (defend["preset"], defend["recipe"], defend["eps"], defend["n_examples"], defend["beta"]) == (
            "mnist-robust", "mart", eps, n_examples, beta,
        ), (args, text)  # fmt: skip
        assert defend["train_eps_margin"] == 0.05  # the preset trains 0.05 beyond whatever eps is evaluated
        assert (blue["model_name"], blue["lr_schedule"], blue["epochs"]) == ("cnn-wide", "one-cycle", 1)  # --epochs 1 wins
        assert (red["model_name"], red["lr_schedule"], red["epochs"]) == ("cnn", "cosine", 1)
    plain = cli("run", *fast, "--out", str(tmp_path / "out"))
    assert plain.returncode == 0, plain.stderr
    recorded = json.loads((tmp_path / "out" / "metrics" / "run_config.json").read_text())
    assert "defend_train" not in recorded and recorded["defend"]["preset"] is None


def test_the_preset_is_a_label_outside_the_models_key(mini: Dataset) -> None:
    """The same settings train the same model with or without the preset's name."""
    train = build(TrainConfig, None, {}, base=ROBUST.train)
    plain = build(DefendConfig, None, {}, base=ROBUST.defend)
    labelled = replace(plain, preset="mnist-robust")
    assert defense_cache_key("robust", train, labelled, mini) == defense_cache_key("robust", train, plain, mini)
    assert defense_cache_key("robust", train, replace(plain, beta=3.0), mini) != defense_cache_key("robust", train, plain, mini)


def test_the_models_key_holds_the_training_eps_not_the_evaluated_one(mini: Dataset) -> None:
    """eps 0.3 with a margin of 0.05 trains what eps 0.35 trains (the evaluation's eps is in the
    result's key, not the model's); a different training eps is a different model."""
    train = build(TrainConfig, None, {}, base=ROBUST.train)
    key = partial(defense_cache_key, "robust", train, data=mini)
    wide = DefendConfig(recipe="mart", eps=0.3, train_eps_margin=0.05)
    assert wide.training_eps == 0.35
    assert key(defend_cfg=wide) == key(defend_cfg=DefendConfig(recipe="mart", eps=0.35))
    assert key(defend_cfg=wide) != key(defend_cfg=DefendConfig(recipe="mart", eps=0.3))
    assert DefendConfig(eps=0.3, train_eps_margin=0.04).training_eps == 0.34  # not 0.33999999999999997


def test_the_pipeline_trains_the_blue_team_with_the_presets_config(mini: Dataset, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """``run``'s blue team gets ``defend_train``; ``--quick`` shortens it to one epoch without
    an eps ramp (a 4-epoch ramp in 1 epoch would never reach the eps it is evaluated at)."""
    seen: list[tuple[TrainConfig, DefendConfig]] = []

    class StopError(Exception):
        pass

    def fake_defend(out: Path, data: Dataset, train_cfg: TrainConfig, defend_cfg: DefendConfig, **_: object) -> None:
        seen.append((train_cfg, defend_cfg))
        raise StopError

    monkeypatch.setattr(pipeline, "defend_stage", fake_defend)
    monkeypatch.setattr(pipeline, "load_data", lambda *a, **k: mini)
    blue = build(TrainConfig, None, {}, base=ROBUST.train)
    defend = build(DefendConfig, None, {"preset": ROBUST.name}, base=ROBUST.defend)
    for quick in (False, True):
        wf = pipeline.Workflow(out=tmp_path / str(quick), run=RunConfig(stages=("blueteam",), quick=quick), data=DataConfig(),
                               train=TrainConfig(), defend=defend, poison=PoisonConfig(), backdoor=BackdoorDefenseConfig(),
                               defend_train=blue, progress=False)  # fmt: skip
        with pytest.raises(StopError):
            pipeline.run_workflow(wf)
    (full_train, full_defend), (quick_train, quick_defend) = seen
    assert full_train == blue and full_defend == defend
    assert (quick_train.model_name, quick_train.epochs, quick_defend.eps_ramp, quick_defend.recipe) == ("cnn-wide", 1, 0, "mart")


def test_a_sweep_grid_applies_the_preset_in_every_cell(tmp_path: Path) -> None:
    path = tmp_path / "grid.toml"
    path.write_text('[sweep]\nstage = "defend"\n[defend]\npreset = "mnist-robust"\n[axes]\n"defend.beta" = [3.0, 6.0]\n'
                    '"train.epochs" = [1]\n', encoding="utf-8")  # fmt: skip
    grid = load_grid(path)
    for cell in grid.cells:
        train, defend = cell.configs["train"], cell.configs["defend"]
        assert (train.model_name, train.epochs, train.lr_schedule) == ("cnn-wide", 1, "one-cycle")
        assert (defend.recipe, defend.eps, defend.training_eps, defend.preset) == ("mart", 0.3, 0.35, "mnist-robust")
    assert sorted(c.configs["defend"].beta for c in grid.cells) == [3.0, 6.0]
