"""``redblue poison`` (BadNets training, clean accuracy / ASR / RA, rate sweep) and
``redblue defend-backdoor`` (activation clustering / spectral signatures, retraining; or
screening a user's training set) and ``redblue audit-backdoor`` (Neural Cleanse, STRIP, repairs)."""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch

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
    split_list,
    train_options,
)
from redblue.config import (
    BackdoorAuditConfig,
    BackdoorDefenseConfig,
    ConfigFile,
    DataConfig,
    PoisonConfig,
    TrainConfig,
    build,
    load_toml,
)
from redblue.errors import ConfigError
from redblue.model_sources import ModelOptions, is_record, parse_ints
from redblue.poison.trigger import PATTERNS
from redblue.report.stage_plots import render_stage_plots
from redblue.report.summary import restored_text, true_trigger_text, unlearned_text
from redblue.stages import (
    audit_backdoor_stage,
    defend_backdoor_stage,
    detect_training_set_stage,
    load_data,
    poison_stage,
    poison_sweep_stage,
)
from redblue.utils import output_lock, pct, read_input_file, resolve_device, sha256_bytes
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


DEFEND_BACKDOOR_MODEL = (
    "The model: a poisoned model saved by 'redblue poison' (its poisoned training set is rebuilt from the "
    "record), or any model (a redblue record, FILE.py:FUNCTION with --weights, TorchScript, ONNX) whose training "
    "set --dataset holds, to screen it (no retraining)."
)


def _defend_backdoor_model(func: Any) -> Any:
    return model_options(func, model_help=DEFEND_BACKDOOR_MODEL)


@click.command(name="defend-backdoor")
@_defend_backdoor_model
@click.option("--poison-indices", default=None,
              help="Screening a user's training set: the true poison indices (.npy of integers, or a text file of "
                   "integers), to score precision and recall. [default: not scored]")
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

    Any other model (a redblue record without poison settings, FILE.py:FUNCTION --weights,
    TorchScript, ONNX) screens the training split of --dataset, the set it was trained on:
    the flagged indices go to metrics/MODEL_backdoor_defense_METHOD_flagged.safetensors;
    precision and recall only with --poison-indices; spectral needs --expected-share; no
    retraining (redblue does not know how that model was trained).
    """
    model_opts = pop_model_options(options)
    poison_file = options.pop("poison_indices")
    file = load_toml(config_file, ("data", "train", "backdoor"))
    if not is_record(model_path) or not isinstance(read_record(Path(model_path)).get("poison"), dict):
        _screen_training_set(model_path, model_opts, poison_file, file, out, options)
        return
    if poison_file is not None:
        raise ConfigError("--poison-indices: a redblue poisoned model's true poison indices are in its record already")
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


def _screen_training_set(model_path: str, model_opts: ModelOptions, poison_file: str | None, file: ConfigFile,
                         out: str, options: dict[str, Any]) -> None:  # fmt: skip
    """``defend-backdoor`` on any model and the user's training set (detection only)."""
    if options.get("retrain"):
        raise ConfigError("--retrain: redblue retrains only its own poisoned models; on this model the flagged "
                          "indices are written for you to retrain without them (drop --retrain)")  # fmt: skip
    data_cfg = build(DataConfig, file, options, "data")
    defense_cfg = dataclasses.replace(build(BackdoorDefenseConfig, file, options, "backdoor"), retrain=False)
    device = resolve_device(options.get("device") or "auto")
    out_dir = check_output_dir(out)
    indices, indices_sha256 = (None, None) if poison_file is None else read_indices(Path(poison_file))
    loaded, data = load_model_and_data(
        model_path, model_opts, lambda: load_data(data_cfg, device=str(device), builtin=False), device
    )
    with output_lock(out_dir):
        result = detect_training_set_stage(out_dir, loaded, data, defense_cfg, poison_indices=indices,
                                           poison_indices_sha256=indices_sha256, data_cfg=data_cfg)  # fmt: skip
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, result["name"], {"data": data_cfg, "backdoor": defense_cfg})
    det = result["detection"]
    scored = (f": precision {pct(det['precision'])}, recall {pct(det['recall'])} against {det['n_poison']} true poison indices"
              if det["n_poison"] is not None else " (no --poison-indices: not scored)")  # fmt: skip
    click.echo(f"{defense_cfg.method}: flagged {det['n_flagged']} of {det['n']} training images of {data.name}{scored}")
    click.echo(f"flagged indices: {out_dir / 'metrics' / det['flagged_file']}")


def read_indices(path: Path) -> tuple[torch.Tensor, str]:
    """Poison indices from a ``.npy`` of integers (read without pickle) or a text file of
    integers (separated by spaces, commas or new lines), and the file's SHA-256."""
    payload = read_input_file(path, ConfigError, option="--poison-indices")
    if path.suffix == ".npy":
        try:
            array = np.load(io.BytesIO(payload), allow_pickle=False)
        except ValueError as exc:
            raise ConfigError(f"--poison-indices {path}: not a .npy of integers ({exc})") from None
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise ConfigError(f"--poison-indices {path}: expected a 1-D array of integers, got {array.dtype} {array.shape}")
        values = array.astype(np.int64)
    else:
        try:
            values = np.array([int(v) for v in payload.decode("utf-8").replace(",", " ").split()], dtype=np.int64)
        except (UnicodeDecodeError, ValueError):
            raise ConfigError(f"--poison-indices {path}: expected integers separated by spaces, commas or new lines") from None
    if values.size and values.min() < 0:
        raise ConfigError(f"--poison-indices {path}: negative index {int(values.min())}")
    return torch.from_numpy(np.unique(values)), sha256_bytes(payload)


@click.command(name="audit-backdoor")
@model_options
@data_options
@click.option("--n-images", type=int, default=None, help="Clean test images used (the first ones). [default: 1000]")
@click.option("--epochs", type=int, default=None, help="Most optimisation epochs (early-stopped). [default: 70]")
@click.option("--steps-per-epoch", type=int, default=None, help="Steps per epoch. [default: 30]")
@click.option("--early-stop", type=int, default=None,
              help="Stop once every class has a trigger and none of them has shrunk by 1% "
                   "for this many epochs. [default: 6]")
@click.option("--cost-patience", type=int, default=None,
              help="Epochs in a row that reach (or miss) --target-asr before the L1 cost changes. [default: 2]")
@click.option("--batch-size", type=int, default=None, help="Images per class and start per step. [default: 8]")
@click.option("--restarts", type=int, default=None,
              help="Independent starts per class, optimised side by side; each class keeps its smallest "
                   "checked trigger. [default: 2]")
@click.option("--target-asr", type=float, default=None,
              help="Success rate a reversed trigger must reach on all the --n-images of the other classes. [default: 0.99]")
@click.option("--seed", type=int, default=None, help="Seeds the initialisation and the batches. [default: 0]")
@click.option("--strip/--no-strip", default=None,
              help="Also set STRIP's run-time threshold on the clean images. [default: --strip]")
@click.option("--size-ratio", type=float, default=None,
              help="Also flag a class whose mask norm is under this share of the median (0: the paper's rule alone). [default: 0.25]")
@click.option("--restore-smoothness", type=float, default=None,
              help="Restore the flagged classes' triggers with this weight on the masks' total variation "
                   "beside their L1 norm, for a compact trigger to unlearn (0: no restoration). [default: 1.0]")
@click.option("--strip-frr", type=float, default=None, help="STRIP's false-rejection rate on clean inputs. [default: 0.01]")
@click.option("--strip-copies", type=int, default=None, help="Superimposed copies per input in STRIP. [default: 100]")
@click.option("--repair", default=None,
              help="Remove the backdoor: unlearn, fine-prune or unlearn,fine-prune (needs a training split). [default: none]")
@click.option("--unlearn-classes", default=None,
              help="Classes whose reversed triggers are unlearned, e.g. 7 or 3,7. [default: the flagged classes]")
@click.option("--unlearn-triggers", type=int, default=None,
              help="Most triggers unlearned per class: its restored trigger and the next smallest ones found with "
                   "the pixels of those before held out, while they stay under --size-ratio (0.25 when 0) of the median norm "
                   "(1: the restored trigger alone). [default: 6]")
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
    below the others (anomaly index > 2, median absolute deviation) is flagged, and so is one
    whose mask norm is under --size-ratio of the median (the MAD test cannot reach 2 when the
    classes' norms are spread widely, as on MNIST). Needs only
    the model (any --model source) and clean labelled test images. Writes
    metrics/NAME_metrics.json (per class: mask L1 norm, anomaly index, flagged; the verdict),
    metrics/NAME_triggers.safetensors (the reversed masks and patterns, the restored ones
    of the flagged classes and, with --repair unlearn, every trigger unlearned; hashed) and
    images/NAME_anomaly.png, images/NAME_triggers.png.

    The flagged classes' triggers are then restored as compact blobs (the masks' total
    variation added to their L1 norm, as TABOR does; --restore-smoothness 0 turns it off) and
    saved beside the others. STRIP (Gao et al., ACSAC 2019) sets a run-time threshold on the
    same clean images. --repair unlearn,fine-prune removes the backdoor from the model alone
    (Neural Cleanse's unlearning with the restored triggers; fine-pruning, Liu et al., RAID 2018) on clean
    training images, saves models/NAME_unlearn and models/NAME_fine_prune, and reports clean
    accuracy before and after (and ASR when the model is a redblue poisoned model).
    """
    model_opts = pop_model_options(options)
    options["repair"] = split_list(options["repair"])
    options["unlearn_classes"] = parse_ints("--unlearn-classes", options["unlearn_classes"])
    file = load_toml(config_file, ("backdoor_audit", "data"))
    audit_cfg = build(BackdoorAuditConfig, file, options, "backdoor_audit")
    if options.get("unlearn_triggers") is not None and "unlearn" not in audit_cfg.repair:
        raise ConfigError("--unlearn-triggers: only used with --repair unlearn")
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
        ratio = "" if c["size_ratio"] is None else f"{c['size_ratio']:5.2f}"
        click.echo(f"  class {label!s:<8} mask L1 {l1:>7}  of median {ratio:>5}  anomaly index {c['anomaly_index']:5.2f}"
                   + (f"  FLAGGED ({', '.join(c['flagged_by'])})" if c["flagged"] else ""))  # fmt: skip
    click.echo(f"{result['name']}: {result['verdict']} ({result['seconds']:.1f} s)")
    true = result["true_trigger"]
    if true is not None:
        click.echo(f"true trigger (from the record): {true_trigger_text(true)}")
    if result.get("restored") is not None:
        click.echo(f"restored (compact) trigger, {restored_text(result['restored'], true)}")
    s = result["strip"]
    if s is not None:
        far = "" if s["far"] is None else f", accepts {pct(s['far'])} of {s['n_triggered']} triggered inputs"
        click.echo(f"STRIP: entropy threshold {s['threshold']:.3f} (set at {pct(s['frr_target'])} false rejections on "
                   f"{s['n_clean']} clean inputs) rejects {pct(s['frr'])} of {s['n_held_out']} held-out clean inputs{far}")
    for row in result["repairs"]:
        if row["skipped"]:
            click.echo(f"repair {row['method']}: skipped ({row['skipped']})")
            continue
        click.echo(f"repair {row['method']}: {_measured(result['before'])} -> {_measured(row['after'])}; "
                   f"saved as models/{row['model']['name']}.safetensors")  # fmt: skip
        unlearned = unlearned_text(row["details"])
        if unlearned:
            click.echo(f"  unlearned {unlearned}")


def _measured(m: dict[str, Any]) -> str:
    text = f"clean accuracy {pct(m['clean_accuracy'])}"
    return text if m["asr"] is None else f"{text}, ASR {pct(m['asr'])}, RA {pct(m['ra'])}"
