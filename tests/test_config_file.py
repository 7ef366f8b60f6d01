"""Strict configuration files: an unknown section or key, a wrong type or a bad value in a
TOML file is one line naming the file, the section and the key, and what is accepted;
exit 2; nothing written. Every command is run as a user runs it, in a subprocess."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest

from redblue.config import DefendConfig, TrainConfig, build, load_toml
from redblue.errors import ConfigError

Cli = Callable[..., CompletedProcess[str]]


def _refused(proc: CompletedProcess[str], out: Path, *needles: str) -> str:
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert not out.exists() or not any(out.rglob("*")), sorted(out.rglob("*"))  # nothing written
    return lines[0]


@pytest.mark.parametrize(
    ("command", "text", "needles"),
    [
        (("train",), "[trian]\nepochs = 1\n", ("unknown section [trian]", "[train]", "[data]")),
        (("run",), "[backdoor_defense]\nmethod = 'ac'\n", ("unknown section [backdoor_defense]", "[backdoor]")),
        (("defend",), "[poison]\nrate = 0.1\n", ("unknown section [poison]", "[defend]")),
        (("poison",), "[train]\nepoch = 1\n", ("[train] epoch: unknown setting", "epochs")),
        (("run",), "[run]\neps = 0.3\nquik = true\n", ("[run] quik: unknown setting", "quick")),
        (("train",), "[train]\nepochs = 'one'\n", ("[train] epochs = 'one': expected an integer",)),
        (("train",), "[train]\ndevice = 3\n", ("[train] device = 3: expected a string",)),
        (("train",), "[data]\ndata_dir = 7\n", ("[data] data_dir = 7: expected a string",)),
        (("run",), "[run]\nstages = 'baseline'\n", ("[run] stages = 'baseline': expected a list",)),
        (("train",), "[train]\nepochs = 0\n", ("[train] epochs = 0: must be at least 1",)),
        (("defend",), "[defend]\neps = 2.0\n", ("[defend] eps = 2.0: must be in (0, 1]",)),
        (("train",), "train = 3\n", ("train = 3 is not a section",)),
        (("train",), "[train\nepochs = 1\n", ("not valid TOML",)),
    ],
)
def test_a_bad_config_file_is_one_line_naming_file_section_and_key(
    cli: Cli, tmp_path: Path, command: tuple[str, ...], text: str, needles: tuple[str, ...]
) -> None:
    config = tmp_path / "settings.toml"
    config.write_text(text, encoding="utf-8")
    out = tmp_path / "out"
    proc = cli(*command, "--config", str(config), "--dataset", "mnist-mini", "--out", str(out))
    line = _refused(proc, out, *needles)
    assert str(config) in line


def test_a_config_file_that_is_not_utf8_is_refused(cli: Cli, tmp_path: Path) -> None:
    config = tmp_path / "latin1.toml"
    config.write_bytes("[train]\n# é\nepochs = 1\n".encode("latin-1"))
    out = tmp_path / "out"
    _refused(cli("train", "--config", str(config), "--out", str(out)), out, str(config), "not UTF-8")


def test_the_cli_option_overrides_the_file_and_is_named_as_an_option(tmp_path: Path) -> None:
    """A bad value given on the command line is named as the option, not as the file."""
    config = tmp_path / "c.toml"
    config.write_text("[train]\nepochs = 0\n", encoding="utf-8")
    file = load_toml(config, ("train",))
    assert build(TrainConfig, file, {"epochs": 3}, "train").epochs == 3  # the option wins
    with pytest.raises(ConfigError, match=r"^--epochs 0: must be at least 1$"):
        build(TrainConfig, load_toml(None), {"epochs": 0}, "train")
    with pytest.raises(ConfigError, match=r"c\.toml: \[train\] epochs = 0: must be at least 1"):
        build(TrainConfig, file, {}, "train")


def test_a_good_file_sets_every_kind_of_value(tmp_path: Path) -> None:
    config = tmp_path / "c.toml"
    config.write_text(
        "[defend]\nrecipe = 'pgd'\neps = 0.3\nalpha = 0.05\nguard = false\nn_examples = 50\nguard-size = 20\n",
        encoding="utf-8",
    )
    cfg = build(DefendConfig, load_toml(config, ("defend",)), {"steps": 7}, "defend")
    assert (cfg.recipe, cfg.eps, cfg.alpha, cfg.guard, cfg.n_examples, cfg.guard_size, cfg.steps) == (
        "pgd", 0.3, 0.05, False, 50, 20, 7,
    )  # fmt: skip


def test_choice_options_list_their_choices(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli("defend", "--recipe", "free", "--out", str(out))
    line = _refused(proc, out, "--recipe", "'free'")
    for choice in ("fgsm", "fgsm-rs", "pgd", "trades", "mart"):
        assert choice in line
    helped = cli("defend", "--help")
    assert "[fgsm|fgsm-rs|pgd|trades|mart]" in helped.stdout


def test_run_gives_the_blue_team_the_red_team_eps_unless_defend_says_otherwise(cli: Cli, tmp_path: Path) -> None:
    """``--eps`` / ``[run] eps`` set the blue team's eps too; ``[defend] eps`` or ``--defend-eps`` win.
    The runs share one output folder: the baseline they train is the same, so the later runs
    reuse it, and each writes its own ``run_config.json``."""
    fast = ("--stages", "baseline", "--dataset", "mnist-mini", "--epochs", "1", "--device", "cpu", "--quick")
    cases = [
        ((), "", (0.25, 200)),
        (("--eps", "0.3"), "", (0.3, 200)),
        ((), "[run]\neps = 0.2\nn_examples = 50\n", (0.2, 50)),
        (("--eps", "0.3"), "[defend]\neps = 0.1\n", (0.1, 200)),
        (("--eps", "0.3", "--defend-eps", "0.15"), "[defend]\neps = 0.1\n", (0.15, 200)),
    ]
    for i, (args, text, (eps, n_examples)) in enumerate(cases):
        config = tmp_path / f"c{i}.toml"
        config.write_text(text, encoding="utf-8")
        out = tmp_path / "out"
        proc = cli("run", *fast, *args, "--config", str(config), "--out", str(out))
        assert proc.returncode == 0, proc.stderr
        reused = any(line.startswith(f"reusing {out / 'models' / 'baseline.json'}") for line in proc.stderr.splitlines())
        assert reused == (i > 0), proc.stderr
        defend = json.loads((out / "metrics" / "run_config.json").read_text())["defend"]
        assert (defend["eps"], defend["n_examples"]) == (eps, min(n_examples, 200)), (args, text)
