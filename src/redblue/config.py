"""Configuration: frozen dataclasses, loaded from TOML and overridden by CLI options.

Each stage has its own section in the TOML file (``[data]``, ``[train]``, ...). Field
names are the CLI option names with ``-`` for ``_`` (``batch_size`` <-> ``--batch-size``),
so one vocabulary serves the API, the CLI, the config file and the JSON results.
"""

from __future__ import annotations

import dataclasses
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from redblue.data import DATASET_NAMES
from redblue.errors import ConfigError
from redblue.models import MODELS

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")


def _opt(name: str) -> str:
    return "--" + name.replace("_", "-")


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{_opt(name)} {value!r}: expected one of {', '.join(choices)}")


def check_int(name: str, value: int, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{_opt(name)} {value!r}: expected an integer")
    if low is not None and value < low:
        raise ConfigError(f"{_opt(name)} {value}: must be at least {low}")
    if high is not None and value > high:
        raise ConfigError(f"{_opt(name)} {value}: must be at most {high}")


def check_float(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{_opt(name)} {value!r}: expected a number")
    if value != value:  # NaN
        raise ConfigError(f"{_opt(name)} nan: expected a number")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{_opt(name)} {value:g}: must be in {interval}")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where it comes from."""

    dataset: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        check_choice("dataset", self.dataset, DATASET_NAMES)


@dataclass(frozen=True)
class TrainConfig:
    """Training of one model (the baseline and every other stage that trains)."""

    model_name: str = "cnn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_choice("model_name", self.model_name, list(MODELS))
        check_int("epochs", self.epochs, 1, 1000)
        check_int("batch_size", self.batch_size, 1, 65536)
        check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"--device {self.device!r}: expected auto, cpu or cuda")
        check_choice("precision", self.precision, PRECISIONS)


def load_toml(path: str | Path | None) -> dict[str, Any]:
    """Read a TOML config file; a missing or malformed file is a ConfigError naming it."""
    if path is None:
        return {}
    p = Path(path)
    try:
        with open(p, "rb") as handle:
            data = tomllib.load(handle)
    except FileNotFoundError:
        raise ConfigError(f"--config {p}: file not found") from None
    except OSError as exc:
        raise ConfigError(f"--config {p}: cannot read ({exc.strerror or exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"--config {p}: not valid TOML ({exc})") from None
    return data


def build(cls: type[T], section: dict[str, Any] | None, overrides: dict[str, Any], where: str = "") -> T:
    """``cls`` from a TOML section overridden by CLI options (``None`` means not given)."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = {}
    for key, value in (section or {}).items():
        k = key.replace("-", "_")
        if k not in names:
            raise ConfigError(
                f"config [{where}] {key!r}: unknown setting, expected one of {', '.join(sorted(names))}"
            )
        values[k] = value
    values.update({k: v for k, v in overrides.items() if v is not None and k in names})
    try:
        return cls(**values)
    except TypeError as exc:
        raise ConfigError(f"config [{where}]: {exc}") from None


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)
