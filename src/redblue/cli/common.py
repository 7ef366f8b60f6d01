"""Options shared by several subcommands, and the config/output plumbing behind them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click

from redblue.config import LR_SCHEDULES, PRECISIONS, ConfigFile, DataConfig, TrainConfig, build, load_toml
from redblue.data import DATASET_NAMES
from redblue.errors import ConfigError
from redblue.models import MODELS
from redblue.utils import atomic_write_json

F = TypeVar("F", bound=Callable[..., Any])

DEFAULT_OUT = "secure_ai_outputs"


def data_options(func: F) -> F:
    """--dataset, --data-dir, --cache-dir."""
    for option in reversed(
        [
            click.option(
                "--dataset",
                type=click.Choice(DATASET_NAMES),
                default=None,
                help="auto (full MNIST if found or downloadable, else mnist-mini), mnist, "
                "fashion-mnist or mnist-mini. [default: auto]",
            ),
            click.option(
                "--data-dir",
                default=None,
                help="Folder with the four IDX files (gzipped or not; directly or in mnist/ or "
                "fashion-mnist/). [default: $REDBLUE_DATA_DIR]",
            ),
            click.option(
                "--cache-dir",
                default=None,
                help="Download cache. [default: $REDBLUE_CACHE_DIR or ~/.cache/redblue]",
            ),
        ]
    ):
        func = option(func)
    return func


def train_options(func: F) -> F:
    """--epochs, --batch-size, --lr, --lr-schedule, --seed, --device, --precision, --model-name."""
    for option in reversed(
        [
            click.option("--epochs", type=int, default=None, help="Training epochs. [default: 5]"),
            click.option("--batch-size", type=int, default=None, help="Batch size. [default: 128]"),
            click.option(
                "--lr", type=float, default=None, help="Adam learning rate (its peak). [default: 0.003]"
            ),
            click.option(
                "--lr-schedule",
                type=click.Choice(LR_SCHEDULES),
                default=None,
                help="cosine (decay to 0) or one-cycle (up to --lr over 2/5 of the steps, then down to 0). "
                "[default: cosine]",
            ),
            click.option(
                "--seed", type=int, default=None, help="Seeds everything; same seed, same metrics on CPU. [default: 0]"
            ),
            click.option("--device", default=None, help="auto, cpu or cuda. [default: auto]"),
            click.option(
                "--precision",
                type=click.Choice(PRECISIONS),
                default=None,
                help="auto (bf16 autocast where the hardware runs it fast, else fp32), fp32 or bf16. [default: auto]",
            ),
            click.option(
                "--model-name",
                type=click.Choice(list(MODELS)),
                default=None,
                help="Architecture from the model registry: cnn, cnn-keras (the same network in Keras's slower layer order), cnn-small, cnn-wide or cnn-large. [default: cnn]",
            ),
        ]
    ):
        func = option(func)
    return func


def output_options(func: F) -> F:
    """--out, --config, --force-retrain."""
    for option in reversed(
        [
            click.option(
                "--out",
                default=DEFAULT_OUT,
                show_default=True,
                help="Output folder (models/, metrics/, images/ inside).",
            ),
            click.option("--config", "config_file", default=None, help="TOML config file; CLI options override it."),
            click.option("--force-retrain", is_flag=True, help="Retrain even when a matching saved model exists."),
        ]
    ):
        func = option(func)
    return func


def load_configs(
    config_file: str | None, options: dict[str, Any], sections: tuple[str, ...]
) -> tuple[ConfigFile, DataConfig, TrainConfig]:
    """(config file, data config, train config) from the file overridden by CLI options.

    ``sections``: the sections this command reads; any other section in the file is an error.
    """
    file = load_toml(config_file, ("data", "train", *sections))
    data_cfg = build(DataConfig, file, options, "data")
    train_cfg = build(TrainConfig, file, options, "train")
    return file, data_cfg, train_cfg


def check_output_dir(out: str) -> Path:
    """Fail early, before any work, when ``out`` cannot be created or written.

    Creates nothing: it probes the folder (or its nearest existing parent) with a
    temporary file that is removed at once.
    """
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"--out {path}: exists and is not a directory")
    probe_dir = path
    while not probe_dir.exists():
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        raise ConfigError(f"--out {path}: {probe_dir} is not a directory")
    try:
        with tempfile.TemporaryFile(dir=probe_dir):
            pass
    except OSError as exc:
        raise ConfigError(f"--out {path}: not writable ({probe_dir}: {exc.strerror or exc})") from None
    return path


def save_effective_config(out: Path, command: str, configs: dict[str, Any]) -> None:
    """The effective configuration of a command, beside its results."""
    atomic_write_json(
        out / "metrics" / f"{command}_config.json",
        {k: asdict(v) if hasattr(v, "__dataclass_fields__") else v for k, v in configs.items()},
    )
