"""``redblue train`` and ``redblue evaluate``."""

from __future__ import annotations

from typing import Any

import click

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
from redblue.config import DataConfig, build, load_toml
from redblue.report.stage_plots import render_stage_plots
from redblue.stages import evaluate_stage, load_data, train_baseline
from redblue.utils import output_lock, resolve_device
from redblue.validate import check_name


@click.command()
@data_options
@train_options
@output_options
@click.option("--name", default="baseline", show_default=True, help="Name of the saved model and its metrics file.")
def train(config_file: str | None, out: str, force_retrain: bool, name: str, **options: Any) -> None:
    """Train the baseline CNN (or reload it when config and data match) and evaluate it.

    Writes models/NAME.safetensors + models/NAME.json, metrics/NAME_metrics.json, and
    images/NAME_training_curves.png and images/NAME_confusion_matrix.png.
    """
    _, data_cfg, train_cfg = load_configs(config_file, options, ())
    check_name("name", name)
    device = resolve_device(train_cfg.device)
    data = load_data(data_cfg, device=str(device))
    out_dir = check_output_dir(out)
    with output_lock(out_dir):
        result = train_baseline(out_dir, data, train_cfg, data_cfg=data_cfg, force_retrain=force_retrain, name=name)
        render_stage_plots(out_dir, result)
        save_effective_config(out_dir, name, {"data": data_cfg, "train": train_cfg})
    acc = result.metrics["clean_accuracy"]
    click.echo(
        f"{name}: clean test accuracy {100 * acc:.2f}% on {data.name} ({result.metrics['n_test']} images); "
        f"model {out_dir / 'models' / (name + '.safetensors')}"
    )


@click.command()
@model_options
@data_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda.")
@click.option("--out", default="secure_ai_outputs", show_default=True, help="Output folder.")
@click.option("--config", "config_file", default=None, help="TOML config file ([data]); options override it.")
def evaluate(model_path: str, out: str, device: str, config_file: str | None, **options: Any) -> None:
    """Evaluate a model on the test set: a redblue record (hash-verified before loading) or any
    model --model takes (see "Audit your own model" in the README)."""
    model_opts = pop_model_options(options)
    data_cfg = build(DataConfig, load_toml(config_file, ("data",)), options, "data")
    dev = resolve_device(device)
    out_dir = check_output_dir(out)
    loaded, data = load_model_and_data(
        model_path, model_opts, lambda: load_data(data_cfg, device=str(dev), builtin=False), dev
    )
    with output_lock(out_dir):
        result = evaluate_stage(out_dir, loaded, data)
        render_stage_plots(out_dir, result)
    m = result.metrics
    click.echo(f"{result.name}: clean test accuracy {100 * m['clean_accuracy']:.2f}% on {data.name} ({m['n_test']} images)")
