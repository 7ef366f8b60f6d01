"""``redblue poison`` (BadNets training, clean accuracy / ASR / RA, rate sweep) and
``redblue defend-backdoor`` (activation clustering / spectral signatures, retraining)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from redblue.artifacts import read_record
from redblue.cli.common import (
    check_output_dir,
    data_options,
    load_configs,
    load_model_and_data,
    model_options,
    output_options,
    pop_model_options,
    save_effective_config,
    train_options,
)
from redblue.config import (
    BackdoorAuditConfig,
    BackdoorDefenseConfig,
    DataConfig,
    PoisonConfig,
    TrainConfig,
    build,
    load_toml,
)
from redblue.errors import ConfigError
from redblue.poison.trigger import PATTERNS
from redblue.report.stage_plots import render_stage_plots
from redblue.stages import audit_backdoor_stage, defend_backdoor_stage, load_data, poison_stage, poison_sweep_stage
from redblue.utils import output_lock, pct, resolve_device
from redblue.validate import check_name


def parse_rates(text: str | None) -> tuple[float, ...] | None:
    """``"0.001,0.01,0.1"`` -> (0.001, 0.01, 0.1); a bad list is a ConfigError."""
    if text is None:
        return None
    try:
        rates = tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise ConfigError(f"--sweep-rates {text!r}: expected comma-separated numbers in [0, 1]") from None
    if not rates:
        raise ConfigError(f"--sweep-rates {text!r}: expected at least one rate")
    return rates


@click.command()
@data_options
@train_options
@output_options
@click.option("--rate", type=float, default=None,
              help="Share of the non-target training images to poison, in [0, 1]. [default: 0.1]")
@click.option("--target", type=int, default=None,
              help="Class every triggered image is relabelled to (all-to-one). [default: 7]")
@click.option("--size", type=int, default=None, help="Side of the square patch, pixels. [default: 4]")
@click.option("--position", default=None,
              help="bottom-right, bottom-left, top-left, top-right or ROW,COL of the patch's "
                   "top-left pixel. [default: bottom-right]")
@click.option("--pattern", type=click.Choice(PATTERNS), default=None,
              help="solid (white) or checkerboard. [default: solid]")
@click.option("--blend", type=float, default=None,
              help="Blend weight of the patch in (0, 1]; 1 replaces the pixels. [default: 1]")
@click.option("--poison-seed", type=int, default=None,
              help="Seed of the choice of poisoned images. [default: 0]")
@click.option("--sweep", is_flag=True, help="Also train one poisoned model per --sweep-rates.")
@click.option("--sweep-rates", default=None,
              help="Comma-separated rates for --sweep. [default: 0.001,0.005,0.01,0.05,0.1]")
@click.option("--name", default=None, help="Name of the saved poisoned model. [default: poisoned]")
def poison(config_file: str | None, out: str, force_retrain: bool, sweep: bool,
           sweep_rates: str | None, **options: Any) -> None:
    """Train a BadNets-poisoned model (patch trigger, all-to-one): clean accuracy, ASR, RA.

    Clean accuracy is on the clean test set; ASR the share of triggered test images of other
    classes classified as --target; RA the share of them still classified correctly.
    Writes models/NAME.safetensors + .json (with the trigger and the poison indices' hash),
    models/NAME_poison_indices.safetensors, metrics/poison_metrics.json and images/poison_*.png;
    with --sweep also metrics/poison_sweep_metrics.json and images/poison_asr_vs_rate.png.
    """
    file, data_cfg, train_cfg = load_configs(config_file, options, ("poison",))
    overrides = {**options, "sweep_rates": parse_rates(sweep_rates)}
    poison_cfg = build(PoisonConfig, file, overrides, "poison")
    device = resolve_device(train_cfg.device)
    out_dir = check_output_dir(out)
    data = load_data(data_cfg, device=str(device))
    with output_lock(out_dir):
        result = poison_stage(out_dir, data, train_cfg, poison_cfg, data_cfg=data_cfg,
                              force_retrain=force_retrain)
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, "poison", {"data": data_cfg, "train": train_cfg, "poison": poison_cfg})
        swept = None
        if sweep:
            swept = poison_sweep_stage(out_dir, data, train_cfg, poison_cfg, data_cfg=data_cfg,
                                       force_retrain=force_retrain)
            render_stage_plots(out_dir, swept)
    m = result["metrics"]
    click.echo(
        f"{poison_cfg.name}: {result['poison']['n_poison']} of {result['poison']['n_train']} training "
        f"images poisoned (rate {poison_cfg.rate:g}, target {poison_cfg.target}); "
        f"clean accuracy {pct(m['clean_accuracy'])}, ASR {pct(m['asr'])}, RA {pct(m['ra'])} on {data.name}"
    )
    if result["baseline"] is not None:
        click.echo(f"clean baseline {pct(result['baseline']['clean_accuracy'])} "
                   f"(clean accuracy drop {result['baseline']['clean_accuracy_drop_pp']:.2f} pp)")
    if swept is not None:
        for point in swept["points"]:
            click.echo(f"  rate {point['rate']:<6g} poisoned {point['n_poison']:>5}  "
                       f"clean acc. {pct(point['clean_accuracy'])}  ASR {pct(point['asr'])}  RA {pct(point['ra'])}")
        first = swept["asr_90_first_rate"]
        click.echo("ASR ≥ 90% first at rate " + ("(never)" if first is None else f"{first:g}"))
    for warning in result["warnings"]:
        click.echo(f"warning [{warning['id']}]: {warning['message']} (see {warning['doc']})", err=True)


@click.command(name="defend-backdoor")
@click.option("--model", "model_path", required=True,
              help="The poisoned model's .safetensors or .json (saved by 'redblue poison').")
@data_options
@train_options
@output_options
@click.option("--method", type=click.Choice(["ac", "spectral"]), default=None,
              help="ac (activation clustering) or spectral. [default: ac]")
@click.option("--reduce", type=click.Choice(["pca", "ica"]), default=None, help="AC: pca or ica (FastICA). [default: pca]")
@click.option("--n-components", type=int, default=None, help="AC: dimensions kept. [default: 10]")
@click.option("--analysis", type=click.Choice(["reclassify", "size", "silhouette"]), default=None,
              help="AC: how to decide that a class's smaller cluster is poison: reclassify "
                   "(nearest-centroid exclusionary reclassification), size (always) or "
                   "silhouette. [default: reclassify]")
@click.option("--reclass-threshold", type=float, default=None,
              help="AC reclassify: poison when fewer than this share of the cluster is nearest "
                   "to its own class. [default: 0.25]")
@click.option("--max-share", type=float, default=None,
              help="AC: flag the smaller cluster only when it holds at most this share of its "
                   "class, in (0, 0.5]. [default: 0.5]")
@click.option("--min-silhouette", type=float, default=None,
              help="AC silhouette: poison when the 2-means silhouette is at least this. "
                   "[default: 0.15]")
@click.option("--expected-share", type=float, default=None,
              help="Spectral: expected poisoned share of a class. [default: the model's poison rate]")
@click.option("--spectral-factor", type=float, default=None,
              help="Spectral: flag this many times the expected share per class. [default: 1.5]")
@click.option("--detection-seed", type=int, default=None, help="Seed of PCA/ICA, k-means. [default: 0]")
@click.option("--retrain/--no-retrain", default=None,
              help="Retrain without the flagged examples and measure again. [default: retrain]")
def defend_backdoor(model_path: str, config_file: str | None, out: str, force_retrain: bool,
                    **options: Any) -> None:
    """Find the poisoned training images of a BadNets model, then retrain without them.

    The poisoned training set is rebuilt from the dataset and the model's record (its
    trigger, target, rate and seed; the poison indices must match the recorded SHA-256).
    Reports the detector's precision and recall against the true poison indices, and
    clean accuracy / ASR / RA before and after retraining (training settings: the poisoned
    model's, overridden by the training options). Config file sections: [data], [train],
    [backdoor]. Writes metrics/backdoor_defense_METHOD_metrics.json,
    images/backdoor_defense_METHOD.png and models/NAME_METHOD_retrained.*.
    """
    file = load_toml(config_file, ("data", "train", "backdoor"))
    record = read_record(Path(model_path))
    data_cfg = build(DataConfig, file, options, "data")
    build(TrainConfig, file, {}, "train")  # the file's [train] alone must be valid
    recorded_train = dict((record.get("config") or {}).get("train") or {})
    train_cfg = build(TrainConfig, {**recorded_train, **(file.section("train") or {})}, options, "train")
    defense_cfg = build(BackdoorDefenseConfig, file, options, "backdoor")
    device = resolve_device(train_cfg.device)
    out_dir = check_output_dir(out)
    data = load_data(data_cfg, device=str(device))
    with output_lock(out_dir):
        result = defend_backdoor_stage(out_dir, data, Path(model_path), defense_cfg, train_cfg=train_cfg,
                                       data_cfg=data_cfg, force_retrain=force_retrain)
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, f"defend_backdoor_{defense_cfg.method}",
                              {"data": data_cfg, "train": train_cfg, "backdoor": defense_cfg})
    det = result["detection"]
    click.echo(f"{defense_cfg.method}: flagged {det['n_flagged']} of {det['n']} training images "
               f"({det['n_poison']} poisoned): precision {pct(det['precision'])}, "
               f"recall {pct(det['recall'])}")
    b = result["before"]
    click.echo(f"poisoned model: clean accuracy {pct(b['clean_accuracy'])}, ASR {pct(b['asr'])}, RA {pct(b['ra'])}")
    if result["after"] is not None:
        a = result["after"]
        click.echo(f"retrained without flagged: clean accuracy {pct(a['clean_accuracy'])}, ASR {pct(a['asr'])}, "
                   f"RA {pct(a['ra'])}")


@click.command(name="audit-backdoor")
@model_options
@data_options
@click.option("--n-images", type=int, default=None, help="Clean test images used (the first ones). [default: 1000]")
@click.option("--epochs", type=int, default=None, help="Optimisation epochs (early-stopped). [default: 40]")
@click.option("--steps-per-epoch", type=int, default=None, help="Steps per epoch. [default: 30]")
@click.option("--batch-size", type=int, default=None, help="Images per class per step. [default: 16]")
@click.option("--target-asr", type=float, default=None,
              help="Success rate a reversed trigger must reach. [default: 0.99]")
@click.option("--seed", type=int, default=None, help="Seeds the initialisation and the batches. [default: 0]")
@click.option("--strip/--no-strip", default=None,
              help="Also set STRIP's run-time threshold on the clean images. [default: --strip]")
@click.option("--strip-frr", type=float, default=None, help="STRIP's false-rejection rate on clean inputs. [default: 0.01]")
@click.option("--strip-copies", type=int, default=None, help="Superimposed copies per input in STRIP. [default: 100]")
@click.option("--repair", default=None,
              help="Remove the backdoor: unlearn, fine-prune or unlearn,fine-prune (needs a training split). [default: none]")
@click.option("--unlearn-classes", default=None,
              help="Classes whose reversed triggers are unlearned, e.g. 7 or 3,7. [default: the flagged classes]")
@click.option("--repair-images", type=int, default=None, help="Clean training images a repair fine-tunes on. [default: 6000]")
@click.option("--repair-epochs", type=int, default=None, help="Fine-tuning epochs of a repair. [default: 2]")
@click.option("--repair-lr", type=float, default=None, help="Adam's learning rate in a repair (cosine decay). [default: 0.01]")
@click.option("--prune-max-drop", type=float, default=None,
              help="Fine-pruning stops before clean validation accuracy drops by more than this. [default: 0.04]")
@click.option("--device", default=None, help="auto, cpu or cuda. [default: auto]")
@click.option("--out", default="secure_ai_outputs", show_default=True, help="Output folder.")
@click.option("--config", "config_file", default=None, help="TOML config file ([backdoor_audit], [data]).")
@click.option("--name", default=None, help="Name of the results. [default: <model name>_backdoor_audit]")
def audit_backdoor(model_path: str, out: str, config_file: str | None, name: str | None, **options: Any) -> None:
    """Is this model backdoored, and by what trigger? Neural Cleanse from the model alone.

    For every class, the smallest mask and pattern that send clean images to it are
    reverse-engineered (Wang et al., IEEE S&P 2019); a class whose mask norm is an outlier
    below the others (anomaly index > 2, median absolute deviation) is flagged. Needs only
    the model (any --model source) and clean labelled test images. Writes
    metrics/NAME_metrics.json (per class: mask L1 norm, anomaly index, flagged; the verdict),
    metrics/NAME_triggers.safetensors (the reversed masks and patterns, hashed) and
    images/NAME_anomaly.png, images/NAME_triggers.png.

    STRIP (Gao et al., ACSAC 2019) sets a run-time threshold on the same clean images.
    --repair unlearn,fine-prune removes the backdoor from the model alone (Neural Cleanse's
    unlearning with the reversed triggers; fine-pruning, Liu et al., RAID 2018) on clean
    training images, saves models/NAME_unlearn and models/NAME_fine_prune, and reports clean
    accuracy before and after (and ASR when the model is a redblue poisoned model).
    """
    model_opts = pop_model_options(options)
    options["repair"] = _names(options["repair"])
    classes = _names(options["unlearn_classes"])
    try:
        options["unlearn_classes"] = None if classes is None else tuple(int(c) for c in classes)
    except ValueError:
        raise ConfigError(f"--unlearn-classes {options['unlearn_classes']!r}: expected class numbers, e.g. 7 or 3,7") from None
    file = load_toml(config_file, ("backdoor_audit", "data"))
    audit_cfg = build(BackdoorAuditConfig, file, options, "backdoor_audit")
    data_cfg = build(DataConfig, file, options, "data")
    if name is not None:
        check_name("name", name)
    device = resolve_device(audit_cfg.device)
    out_dir = check_output_dir(out)
    loaded, data = load_model_and_data(
        model_path, model_opts, lambda: load_data(data_cfg, device=str(device), builtin=False), device
    )
    with output_lock(out_dir):
        result = audit_backdoor_stage(out_dir, loaded, data, audit_cfg, name=name, data_cfg=data_cfg)
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, result["name"], {"backdoor_audit": audit_cfg, "data": data_cfg})
    for c in result["classes"]:
        label = c["name"] or c["class"]
        l1 = "none" if c["l1"] is None else f"{c['l1']:.1f}"
        click.echo(f"  class {label!s:<8} mask L1 {l1:>7}  anomaly index {c['anomaly_index']:5.2f}"
                   + ("  FLAGGED" if c["flagged"] else ""))  # fmt: skip
    click.echo(f"{result['name']}: {result['verdict']} ({result['seconds']:.1f} s)")
    true = result["true_trigger"]
    if true is not None:
        click.echo(f"true trigger (from the record): target {true['target']} "
                   f"{'flagged' if true['target_flagged'] else 'not flagged'}, "
                   f"{pct(true['mask_mass_on_patch'])} of its reversed mask on the true patch")  # fmt: skip
    s = result["strip"]
    if s is not None:
        far = "" if s["far"] is None else f", accepts {pct(s['far'])} of {s['n_triggered']} triggered inputs"
        click.echo(f"STRIP: entropy threshold {s['threshold']:.3f} rejects {pct(s['frr'])} of {s['n_clean']} clean inputs{far}")
    for row in result["repairs"]:
        if row["skipped"]:
            click.echo(f"repair {row['method']}: skipped ({row['skipped']})")
            continue
        click.echo(f"repair {row['method']}: {_measured(result['before'])} -> {_measured(row['after'])}; "
                   f"saved as models/{row['model']['name']}.safetensors")  # fmt: skip


def _measured(m: dict[str, Any]) -> str:
    text = f"clean accuracy {pct(m['clean_accuracy'])}"
    return text if m["asr"] is None else f"{text}, ASR {pct(m['asr'])}, RA {pct(m['ra'])}"


def _names(text: str | None) -> tuple[str, ...] | None:
    """``"a,b"`` -> ("a", "b"); None when the option was not given."""
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())
