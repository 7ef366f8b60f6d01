"""``redblue attack``: evaluate a saved model against evasion attacks."""

from __future__ import annotations

from typing import Any

import click

from redblue.attacks import expand
from redblue.attacks.projection import check_settings, pixels
from redblue.cli.common import (
    check_gate,
    check_output_dir,
    data_options,
    gate_failures,
    gate_options,
    load_model_and_data,
    model_options,
    pop_model_options,
    save_effective_config,
)
from redblue.config import AttackConfig, DataConfig, build, load_toml
from redblue.errors import ConfigError
from redblue.report.stage_plots import render_stage_plots
from redblue.stages import attack_stage, load_data
from redblue.utils import output_lock, resolve_device
from redblue.validate import check_name


@click.command()
@model_options
@click.option(
    "--attack",
    default=None,
    help="fgsm, pgd, apgd-ce, apgd-t, fab-t, square, quick (fgsm+pgd), standard (apgd-ce+apgd-t), "
    "autoattack (AutoAttack's standard version as a cascade: apgd-ce, apgd-t, fab-t, square 5,000 queries), "
    "or a comma-separated list such as standard,square. [default: fgsm]",
)
@click.option("--eps", type=float, default=None, help="Perturbation radius in pixel units [0, 1]. [default: 0.25]")
@click.option("--norm", type=click.Choice(["linf", "l2"]), default=None, help="Square: linf only. [default: linf]")
@click.option("--alpha", type=float, default=None, help="PGD step size. [default: 2.5*eps/steps]")
@click.option(
    "--steps", type=int, default=None, help="Iterations (Square: queries). [default: pgd 40, apgd 100, square 5000]"
)
@click.option("--restarts", type=int, default=None, help="Random restarts (worst case kept). [default: 1]")
@click.option("--random-start/--no-random-start", default=None, help="PGD random start. [default: on]")
@click.option("--n-targets", type=int, default=None, help="APGD-T target classes. [default: 9]")
@click.option("--sweep", is_flag=True, default=None, help="Also sweep eps (0, 0.05, ... until accuracy is 0).")
@click.option("--checks/--no-checks", default=None, help="Run the sanity checks (redblue/evaluation/checks.md). [default: on]")
@click.option("--n-examples", type=int, default=None, help="Evaluate the first N test images. [default: all]")
@click.option(
    "--save-adversarial/--no-save-adversarial", default=None,
    help="Write every image's worst-case adversarial example (metrics/NAME_adversarial.safetensors, hashed) "
    "and a per-class grid (images/NAME_adversarial_by_class.png). [default: off]",
)
@click.option("--batch-size", type=int, default=None, help="Images per attack batch. [default: 500]")
@click.option("--seed", type=int, default=None, help="Seeds random starts. [default: 0]")
@click.option("--device", default=None, help="auto, cpu or cuda. [default: auto]")
@data_options
@click.option("--out", default="secure_ai_outputs", show_default=True, help="Output folder.")
@click.option("--config", "config_file", default=None, help="TOML config file ([attack], [data]); options override it.")
@click.option("--name", default=None, help="Name of the results. [default: <model name>_<attack>]")
@gate_options
def attack(
    model_path: str, out: str, config_file: str | None, name: str | None, fail_under: float | None,
    fail_on_warning: bool, **options: Any,
) -> None:
    """Attack a saved model and measure clean and robust accuracy.

    Writes metrics/NAME_metrics.json (clean and robust accuracy per attack and worst case,
    attack success rate, perturbation norms, speed, settings, sanity-check warnings, the
    weights hash and dataset hashes), metrics/NAME_examples.safetensors, and
    images/NAME_examples.png, images/NAME_perturbation.png (and with --sweep
    images/NAME_accuracy_vs_eps.png).

    --model takes any model (see "Audit your own model" in the README). Exit codes: 0 done
    (and the gate passed), 1 the gate failed (--fail-under, --fail-on-warning; the results
    are written), 2 bad input (nothing written).
    """
    check_gate(fail_under)
    model_opts = pop_model_options(options)
    file = load_toml(config_file, ("attack", "data"))
    attack_cfg = build(AttackConfig, file, options, "attack")
    data_cfg = build(DataConfig, file, options, "data")
    if name is not None:
        check_name("name", name)
    device = resolve_device(attack_cfg.device)
    out_dir = check_output_dir(out)
    loaded, data = load_model_and_data(
        model_path, model_opts, lambda: load_data(data_cfg, device=str(device), builtin=False), device
    )
    # what the attacks would refuse half-way, refused before anything is written
    check_settings(eps=attack_cfg.eps, norm=attack_cfg.norm, dim=pixels(data.x_test))
    classes = int(loaded.record.get("num_classes") or 10)
    if "apgd-t" in expand(attack_cfg.attack) and classes < 4:
        raise ConfigError(
            f"--attack {attack_cfg.attack}: APGD-T's targeted DLR loss needs at least 4 classes, the model has "
            f"{classes}; use apgd-ce, pgd, fab-t or square"
        )
    with output_lock(out_dir):
        result = attack_stage(out_dir, loaded, data, attack_cfg, name=name, data_cfg=data_cfg)
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, result["name"], {"attack": attack_cfg, "data": data_cfg})
    metrics = result["metrics"]
    parts = ", ".join(f"{a} {100 * v['robust_accuracy']:.2f}%" for a, v in metrics["attacks"].items())
    click.echo(
        f"{result['name']}: clean {100 * metrics['clean_accuracy']:.2f}%, {parts}, worst case "
        f"{100 * metrics['robust_accuracy']:.2f}% (eps {metrics['eps']:g} {metrics['norm']}, "
        f"{metrics['n_examples']} images, {metrics['seconds']:.1f} s)"
    )
    for warning in result["warnings"]:
        click.echo(f"warning [{warning['id']}]: {warning['message']} (see {warning['doc']})", err=True)
    failures = gate_failures(fail_under, fail_on_warning, metrics["robust_accuracy"], result["warnings"], result["name"])
    for failure in failures:
        click.echo(f"gate failed: {failure}", err=True)
    if failures:
        raise click.exceptions.Exit(1)
