"""Options shared by several subcommands, and the config/output plumbing behind them."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

import click
import torch

from redblue.artifacts import LoadedModel
from redblue.config import (
    LR_SCHEDULES,
    PRECISIONS,
    PRESETS,
    ConfigFile,
    DataConfig,
    TrainConfig,
    build,
    load_toml,
)
from redblue.data import Dataset, to_float
from redblue.errors import ConfigError
from redblue.model_sources import (
    PROBE_IMAGES,
    ModelOptions,
    is_record,
    load_any_model,
    parse_floats,
    parse_ints,
    parse_names,
)
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
                default=None,
                help="auto (full MNIST if found or downloadable, else mnist-mini), mnist, "
                "fashion-mnist, mnist-mini, an .npz file (x_test, y_test, optionally x_train, y_train) "
                "or an image folder (one sub-folder per class; or train/ and test/ holding them). [default: auto]",
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
                help="auto (bf16 autocast where a short measurement of this model's training step on this machine finds it at least 10%% faster, else fp32; kept in the user cache), fp32 or bf16. [default: auto]",
            ),
            click.option(
                "--model-name",
                type=click.Choice(list(MODELS)),
                default=None,
                help="Architecture from the model registry: cnn, cnn-keras (the same network in Keras's slower layer order), cnn-small, cnn-wide, cnn-wide-silu (cnn-wide with SiLU activations) or cnn-large. [default: cnn]",
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


def preset_option(func: F) -> F:
    """--preset: a named adversarial-training recipe (``redblue.config.PRESETS``)."""
    names = "; ".join(f"{p.name}: {p.summary}" for p in PRESETS.values())
    return click.option(
        "--preset",
        type=click.Choice(list(PRESETS)),
        default=None,
        help=f"A named adversarial-training recipe ({names}; what it reaches and what was measured: "
        "docs/adversarial-training.md). Options and config-file settings given with it override its settings. "
        "[default: none]",
    )(func)


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


MODEL_HELP = ("A redblue record (.json/.safetensors, hash-verified), FILE.py:FUNCTION (with --weights), "
              "a TorchScript archive (scanned first) or an .onnx file.")  # fmt: skip


def model_options(func: F, *, model_help: str = MODEL_HELP, required: bool = True) -> F:
    """--model and what a model redblue did not train needs: --weights, --input-shape,
    --num-classes, --mean, --std, --class-names."""
    for option in reversed(
        [
            click.option("--model", "model_path", required=required, default=None, help=model_help),
            click.option(
                "--weights", default=None,
                help="Weights of --model FILE.py:FUNCTION: a .safetensors state dict, or a torch.save state dict "
                "that `redblue scan` finds clean (read with weights_only=True).",
            ),
            click.option("--input-shape", default=None, help="C,H,W the model expects. [default: the data's]"),
            click.option("--num-classes", type=int, default=None, help="Classes the model outputs (checked at load)."),
            click.option("--mean", default=None, help="Per-channel mean, prepended to the model as its first layer "
                         "(so eps stays in pixel units of [0, 1]), e.g. 0.485,0.456,0.406."),
            click.option("--std", default=None, help="Per-channel std, with --mean."),
            click.option("--class-names", default=None, help="Comma-separated class names, in label order."),
        ]
    ):  # fmt: skip
        func = option(func)
    return func


def optional_model_options(model_help: str) -> Callable[[F], F]:
    """:func:`model_options` with an optional ``--model`` described by ``model_help``."""

    def decorate(func: F) -> F:
        return model_options(func, model_help=model_help, required=False)

    return decorate


def gate_options(func: F) -> F:
    """--fail-under, --fail-on-warning: a CI gate (exit 1 when breached)."""
    for option in reversed(
        [
            click.option(
                "--fail-under", type=float, default=None,
                help="Exit 1 when the worst-case robust accuracy is below this (a fraction in [0, 1], or a "
                "percentage above 1, e.g. 0.8 or 80).",
            ),
            click.option("--fail-on-warning", is_flag=True, default=False,
                         help="Exit 1 when a sanity check raises a warning."),
        ]
    ):  # fmt: skip
        func = option(func)
    return func


def split_list(text: str | None) -> tuple[str, ...] | None:
    """``"a, b"`` -> ("a", "b") (empty parts dropped); None when the option was not given."""
    return None if text is None else tuple(part.strip() for part in text.split(",") if part.strip())


def pop_model_options(options: dict[str, Any]) -> ModelOptions:
    """The :class:`ModelOptions` of a command's options (removed from ``options``)."""
    return ModelOptions(
        weights=options.pop("weights", None),
        input_shape=parse_ints("--input-shape", options.pop("input_shape", None)),  # type: ignore[arg-type]
        num_classes=options.pop("num_classes", None),
        mean=parse_floats("--mean", options.pop("mean", None)),
        std=parse_floats("--std", options.pop("std", None)),
        class_names=parse_names("--class-names", options.pop("class_names", None)),
    )


def load_model_and_data(
    model_path: str, model_opts: ModelOptions, load_data: Callable[[], Dataset], device: torch.device
) -> tuple[LoadedModel, Dataset]:
    """The model ``model_path`` names and the data, checked together (:func:`load_model_for`).

    A redblue record is read (and hash-verified) before the data, so a bad record is refused
    at once; any other model is loaded after the data, whose first images probe it."""
    if is_record(model_path):
        loaded = load_any_model(model_path, model_opts, device=device)
        data = load_data()
        return load_model_for(model_path, model_opts, data, device, loaded=loaded), data
    data = load_data()
    return load_model_for(model_path, model_opts, data, device), data


def load_model_for(
    model_path: str, model_opts: ModelOptions, data: Dataset, device: torch.device, *, loaded: LoadedModel | None = None
) -> LoadedModel:
    """The model ``model_path`` names (or ``loaded``), checked on the first test images of
    ``data``: it must accept them, and output a score for every class the labels use."""
    probe = to_float(data.x_test[:PROBE_IMAGES])
    if loaded is None:
        loaded = load_any_model(model_path, model_opts, device=device, probe=probe)
    try:
        with torch.no_grad():
            outputs = loaded.model(probe.to(device))
    except RuntimeError as exc:
        raise ConfigError(
            f"--dataset {data.name}: the model rejects its images of shape {tuple(probe.shape[1:])} "
            f"({str(exc).strip().splitlines()[0][:160]})"
        ) from None
    classes = int(outputs.shape[1]) if outputs.dim() == 2 else 0
    top = max(int(data.y_test.max()), int(data.y_train.max()) if data.y_train.numel() else 0)
    if top >= classes:
        raise ConfigError(
            f"--dataset {data.name}: labels go up to {top}, the model outputs {classes} scores "
            f"(labels out of range; expected 0..{classes - 1})"
        )
    return loaded


def gate_failures(fail_under: float | None, fail_on_warning: bool, robust_accuracy: float,
                  warnings: list[dict[str, Any]], what: str) -> list[str]:  # fmt: skip
    """Why the CI gate fails (empty: it passes)."""
    failures: list[str] = []
    if fail_under is not None:
        threshold = fail_under / 100 if fail_under > 1 else fail_under
        if robust_accuracy < threshold:
            failures.append(
                f"{what}: worst-case robust accuracy {100 * robust_accuracy:.2f}% is below --fail-under {100 * threshold:.2f}%"
            )
    if fail_on_warning and warnings:
        ids = ", ".join(sorted({str(w.get("id")) for w in warnings}))
        failures.append(f"{what}: {len(warnings)} sanity-check warning(s) ({ids}) with --fail-on-warning")
    return failures


def check_gate(fail_under: float | None) -> None:
    if fail_under is not None and not (0.0 <= fail_under <= 100.0):
        raise ConfigError(f"--fail-under {fail_under:g}: must be in [0, 1] (a fraction) or (1, 100] (a percentage)")
