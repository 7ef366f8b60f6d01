"""``redblue run``: the whole red/blue workflow in one command."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from redblue.cli.common import (
    check_gate,
    check_output_dir,
    data_options,
    gate_failures,
    gate_options,
    load_configs,
    output_options,
    preset_option,
    split_list,
    train_options,
)
from redblue.config import (
    RECIPES,
    RUN_STAGES,
    BackdoorDefenseConfig,
    DefendConfig,
    PoisonConfig,
    RunConfig,
    TrainConfig,
    build,
    preset_bases,
)
from redblue.errors import IntegrityError
from redblue.pipeline import Workflow, run_workflow
from redblue.report.summary import console_table
from redblue.utils import read_json

RED_TEAM_RESULTS = ("fgsm", "pgd", "standard")
"""The red team's attack results on the baseline (``metrics/<name>_metrics.json``)."""
DEFEND_RESULT = "advtrain"


@click.command()
@data_options
@train_options
@output_options
@click.option("--stages", default=None, help=f"Comma-separated subset of {','.join(RUN_STAGES)}. [default: all]")
@click.option(
    "--quick",
    is_flag=True,
    default=None,
    help="Shrink everything (data subset, 1 epoch, 200 test images, lighter attacks and checks) for a "
    "one-minute look; its numbers are not comparable to a full run.",
)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="Red-team L-inf budget in pixel units for FGSM, PGD and the standard suite. [default: 0.25]",
)
@click.option(
    "--recipe",
    type=click.Choice(RECIPES),
    default=None,
    help="Blue-team adversarial-training recipe: fgsm (the original's), fgsm-rs, pgd, trades or mart. [default: fgsm-rs]",
)
@click.option(
    "--defend-eps",
    type=float,
    default=None,
    help="The blue team's eps: the defended model is evaluated at it and trained at it plus [defend] "
    "train_eps_margin. [default: the red-team eps when given (--eps, [run] eps), else the preset's, else 0.25]",
)
@preset_option
@click.option(
    "--rate", type=float, default=None, help="Poisoned share of the non-target training images. [default: 0.1]"
)
@click.option("--target", type=int, default=None, help="Backdoor target class. [default: 7]")
@click.option(
    "--n-examples",
    type=int,
    default=None,
    help="Test images attacked by PGD, the standard suite and the blue team's evaluation. "
    "[default: 1000; the blue team's is 10,000 with --preset mnist-robust]",
)
@click.option("--size", type=int, default=None, help="Trigger patch size in pixels. [default: 4]")
@gate_options
def run(
    config_file: str | None,
    out: str,
    force_retrain: bool,
    stages: str | None,
    quick: bool | None,
    eps: float | None,
    recipe: str | None,
    defend_eps: float | None,
    preset: str | None,
    rate: float | None,
    target: int | None,
    size: int | None,
    n_examples: int | None,
    fail_under: float | None,
    fail_on_warning: bool,
    **options: Any,
) -> None:
    """Run the whole workflow: baseline, red team, blue team, poisoning, report.

    Each stage is cached: it is skipped when its config and input hashes match a saved
    result, so an interrupted run picks up where it stopped. Results go to OUT/metrics
    (one JSON per stage and metrics_summary.json), OUT/images, OUT/models and
    OUT/report.html + OUT/report.md. Config file sections: [data], [train], [run],
    [defend], [poison], [backdoor].

    --preset (or preset = "..." in [defend]) gives the blue team the preset's architecture,
    schedule, recipe, eps and evaluation size (recorded as defend_train in
    metrics/run_config.json); the baseline and the other stages keep the usual training.
    Values you give (options, [train], [defend], --eps and --n-examples) win over the preset's.

    CI gate: --fail-under applies to the blue team's defended model (its worst case over the
    whole evaluation), or to the red team's worst case on the baseline when the blue team is
    not among the stages; --fail-on-warning to every warning of those results. Exit 1 when
    the gate fails (the results and the report are written), 2 on bad input.
    """
    check_gate(fail_under)
    file, data_cfg, train_cfg = load_configs(config_file, options, ("run", "defend", "poison", "backdoor"))
    run_cfg = build(RunConfig, file, {"stages": split_list(stages), "quick": quick, "eps": eps, "n_examples": n_examples},
                    "run")
    # The blue team defaults to the red team's eps and image count; [defend] and the options win.
    # A preset's eps and image count win over the red team's defaults, not over values given.
    chosen, bases = preset_bases(preset, file)
    defend_train = build(TrainConfig, file, options, "train", base=bases["train"]) if chosen is not None else None
    in_file = {k.replace("-", "_") for k in file.section("defend") or {}}
    in_run = {k.replace("-", "_") for k in file.section("run") or {}}
    stated = {"eps": eps is not None or "eps" in in_run, "n_examples": n_examples is not None or "n_examples" in in_run}
    defaults = {
        k: v for k, v in (("eps", run_cfg.eps), ("n_examples", run_cfg.n_examples))
        if k not in in_file and (chosen is None or k not in chosen.defend or stated[k])
    }  # fmt: skip
    given = {k: v for k, v in (("recipe", recipe), ("eps", defend_eps), ("preset", preset)) if v is not None}
    defend_cfg = build(DefendConfig, file, {**defaults, **given}, "defend", base=bases.get("defend"))
    poison_cfg = build(PoisonConfig, file, {"rate": rate, "target": target, "size": size}, "poison")
    backdoor_cfg = build(BackdoorDefenseConfig, file, {}, "backdoor")
    out_dir = check_output_dir(out)
    summary = run_workflow(
        Workflow(
            out=Path(out_dir),
            run=run_cfg,
            data=data_cfg,
            train=train_cfg,
            defend=defend_cfg,
            defend_train=defend_train,
            poison=poison_cfg,
            backdoor=backdoor_cfg,
            force_retrain=force_retrain,
        )
    )
    click.echo(console_table(summary))
    if "report" in run_cfg.stages:
        click.echo(f"report: {out_dir / 'report.html'}")
    if fail_under is not None or fail_on_warning:
        failures = _gate(Path(out_dir), run_cfg.stages, fail_under, fail_on_warning)
        for failure in failures:
            click.echo(f"gate failed: {failure}", err=True)
        if failures:
            raise click.exceptions.Exit(1)


def _gate(out: Path, stages: tuple[str, ...], fail_under: float | None, fail_on_warning: bool) -> list[str]:
    """Why the run's gate fails: the defended model's worst case (or the red team's), and the
    warnings of the results this run wrote."""
    if "blueteam" in stages:
        names = [DEFEND_RESULT]
    elif "redteam" in stages:
        names = list(RED_TEAM_RESULTS)
    else:
        raise IntegrityError("--fail-under/--fail-on-warning: the run has no red- or blue-team stage to gate on")
    robust: list[tuple[float, str]] = []
    warnings: list[dict[str, Any]] = []
    for name in names:
        result = read_json(out / "metrics" / f"{name}_metrics.json")
        metrics = result["evaluation"] if result.get("stage") == "defend" else result["metrics"]
        robust.append((float(metrics["robust_accuracy"]), name))
        warnings += list(result.get("warnings") or [])
    worst, worst_name = min(robust)
    failures = gate_failures(fail_under, False, worst, [], worst_name)
    failures += gate_failures(None, fail_on_warning, 1.0, warnings, ", ".join(names))
    return failures
