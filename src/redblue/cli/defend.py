"""``redblue defend``: adversarial training (fgsm, fgsm-rs, pgd, trades, mart) and its evaluation."""

from __future__ import annotations

from typing import Any

import click

from redblue.cli.common import (
    check_output_dir,
    data_options,
    load_model_for,
    optional_model_options,
    output_options,
    pop_model_options,
    preset_option,
    save_effective_config,
    train_options,
)
from redblue.config import RECIPES, DataConfig, DefendConfig, TrainConfig, build, load_toml, preset_bases
from redblue.errors import ConfigError
from redblue.report.stage_plots import render_stage_plots
from redblue.stages import check_fine_tune, defend_stage, load_data
from redblue.utils import output_lock, resolve_device
from redblue.validate import check_name


@click.command()
@click.option(
    "--recipe",
    type=click.Choice(RECIPES),
    default=None,
    help="fgsm (the original project's: a --ratio share of each batch replaced by FGSM), "
    "fgsm-rs (Wong et al. 2020), pgd (Madry et al. 2018), trades (Zhang et al. 2019) or mart "
    "(Wang et al. 2020). "
    "[default: fgsm-rs]",
)
@click.option(
    "--eps",
    type=float,
    default=None,
    help="L-inf radius in pixel units, in (0, 1]: the model is evaluated at it, and trained at it plus "
    "--train-eps-margin. [default: 0.25]",
)
@click.option(
    "--train-eps-margin",
    type=float,
    default=None,
    help="Train against eps + this margin, evaluate at eps (>= 0, eps + margin <= 1). [default: 0]",
)
@click.option(
    "--alpha",
    type=float,
    default=None,
    help="Attack step size (> 0). [default: 1.25*eps for fgsm-rs, 2.5*eps/steps for pgd, trades and mart]",
)
@click.option("--steps", type=int, default=None, help="Attack steps for pgd, trades and mart (>= 1). [default: 10]")
@click.option("--beta", type=float, default=None, help="TRADES' and MART's weight of the KL term (>= 0). [default: 6]")
@click.option(
    "--ratio",
    type=float,
    default=None,
    help="fgsm recipe: share of each batch replaced by adversarial images, in [0, 1]. [default: 0.5]",
)
@click.option(
    "--eps-ramp",
    type=int,
    default=None,
    help="Epochs over which the training eps ramps up linearly from 0 (0: none). [default: 0]",
)
@click.option(
    "--awp-gamma",
    type=float,
    default=None,
    help="Adversarial weight perturbation (Wu et al. 2020), in [0, 1]: once the eps ramp is done, each "
    "batch's gradient is taken at weights moved this share of each layer's norm up the recipe's loss "
    "(the paper: 0.005 for TRADES, 0.01 for PGD; 0: off). [default: 0]",
)
@click.option(
    "--guard/--no-guard",
    default=None,
    help="Catastrophic-overfitting guard: restore the best epoch when PGD accuracy on a held-out "
    "training slice collapses. [default: on, off for fgsm]",
)
@click.option(
    "--guard-drop",
    type=float,
    default=None,
    help="Collapse threshold: fall of PGD accuracy below its best, as a share. [default: 0.2]",
)
@click.option("--guard-size", type=int, default=None, help="Training images held out for the guard. [default: 1000]")
@click.option(
    "--n-examples",
    type=int,
    default=None,
    help="Test images attacked in the robustness evaluation (clean accuracy uses all). "
    "[default: 1000; 10,000 with --preset mnist-robust]",
)
@preset_option
@data_options
@train_options
@output_options
@click.option("--name", default="advtrain", show_default=True, help="Name of the saved model and its metrics file.")
@optional_model_options(
    "Fine-tune this trained model instead of training --model-name from scratch: a redblue record or "
    "FILE.py:FUNCTION with --weights (saved as its own state dict, models/NAME.safetensors). [default: none]",
)  # fmt: skip
def defend(config_file: str | None, out: str, force_retrain: bool, name: str, model_path: str | None,
           preset: str | None, **options: Any) -> None:  # fmt: skip
    """Adversarially train a model (or reload it when config and data match) and evaluate it.

    Evaluation at --eps (training at --eps plus --train-eps-margin): clean, FGSM, PGD with
    restarts and AutoAttack's standard protocol as a cascade (APGD-CE, APGD-T, FAB-T, then
    the black-box Square attack with 5,000 queries, each on the images still robust), worst
    case per example over all of them but FGSM, and the eps sweep; the robustness-gap
    warning fires when FGSM accuracy is far above the strongest attack's.

    Writes models/NAME.safetensors + models/NAME.json (recipe and settings in the record),
    metrics/NAME_metrics.json and images/NAME_*.png (training curves with clean / FGSM / PGD
    accuracy per epoch).

    \b
    Example (99.3% clean, 84% under AutoAttack on the first 1,000 test images; about 4 minutes
    of training and 9 of evaluation on a 2-core CPU):
    redblue defend --recipe fgsm-rs --eps 0.3 --model-name cnn-wide --epochs 15
      --eps-ramp 4 --lr 3e-3 --lr-schedule one-cycle --batch-size 100

    \b
    The robust MNIST preset (MART on cnn-wide, trained at eps 0.35 and evaluated at 0.3, 8
    epochs, then AutoAttack on all 10,000 test images: 92.8% at 99.1% clean, about 7 minutes
    of training and 1.5 hours of evaluation on a 2-core CPU; docs/adversarial-training.md
    says what was measured):
    redblue defend --preset mnist-robust --name robust

    \b
    Fine-tune your own model on your own training data (see "Audit your own model"):
    redblue defend --model net.py:build --weights net.safetensors --dataset data.npz
      --recipe fgsm-rs --eps 0.1 --epochs 5
    """
    model_opts = pop_model_options(options)
    if model_path is not None and options.get("model_name") is not None:
        raise ConfigError("--model-name: not used with --model (fine-tuning keeps the given model's architecture)")
    file = load_toml(config_file, ("data", "train", "defend"))
    data_cfg = build(DataConfig, file, options, "data")
    chosen, bases = preset_bases(preset, file)  # the preset's settings lie under the file's and the options'
    if chosen is not None and model_path is not None:
        given = f"--preset {chosen.name}" if preset is not None else f"{file.path}: [defend] preset = {chosen.name!r}"
        raise ConfigError(f"{given}: not used with --model (a preset trains its own architecture)")
    train_cfg = build(TrainConfig, file, options, "train", base=bases.get("train"))
    # --preset's label wins over the file's, as its settings do
    defend_cfg = build(DefendConfig, file, {**options, "preset": preset}, "defend", base=bases.get("defend"))
    check_name("name", name)
    device = resolve_device(train_cfg.device)
    out_dir = check_output_dir(out)
    data = load_data(data_cfg, device=str(device), builtin=model_path is None)
    base = load_model_for(model_path, model_opts, data, device) if model_path is not None else None
    if base is None and model_opts.given:
        raise ConfigError("--weights/--input-shape/--num-classes/--mean/--std/--class-names: only used with --model")
    if base is not None:
        check_fine_tune(base, data)
    with output_lock(out_dir):
        result = defend_stage(
            out_dir, data, train_cfg, defend_cfg, data_cfg=data_cfg, force_retrain=force_retrain, name=name,
            base=base,
        )
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, name, {"data": data_cfg, "train": train_cfg, "defend": defend_cfg})
    m = result["metrics"]
    line = (
        f"{name} ({defend_cfg.recipe}, eps {defend_cfg.eps:g}): clean {100 * m['clean_accuracy']:.2f}%, "
        f"FGSM {100 * m['fgsm_accuracy']:.2f}%, worst case {100 * m['robust_accuracy']:.2f}% "
        f"({m['n_examples']} test images); model {out_dir / 'models' / (name + '.safetensors')}"
    )
    click.echo(line)
    guard = result["training"].get("guard") or {}
    if guard.get("triggered"):
        click.echo(f"guard: {guard['message']}", err=True)
    for warning in result.get("warnings", []):
        click.echo(f"warning: {warning['message']}", err=True)


__all__ = ["RECIPES", "defend"]
