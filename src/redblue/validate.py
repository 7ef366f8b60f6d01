"""The one place values are checked: ``check_int``, ``check_float``, ``check_choice``.

Each raises :class:`~redblue.errors.ConfigError` with one line naming the option (as its
CLI flag), the value and what is accepted. Used by the configs, the attacks and the stages.
"""

from __future__ import annotations

from redblue.errors import ConfigError


def opt(name: str) -> str:
    """``batch_size`` -> ``--batch-size``: how an error names a setting."""
    return "--" + name.replace("_", "-")


def check_choice(name: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{opt(name)} {value!r}: expected one of {', '.join(choices)}")


def check_int(name: str, value: int, low: int | None = None, high: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{opt(name)} {value!r}: expected an integer")
    if low is not None and value < low:
        raise ConfigError(f"{opt(name)} {value}: must be at least {low}")
    if high is not None and value > high:
        raise ConfigError(f"{opt(name)} {value}: must be at most {high}")


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
        raise ConfigError(f"{opt(name)} {value!r}: expected a number")
    if value != value:  # NaN
        raise ConfigError(f"{opt(name)} nan: expected a number")
    lo_bad = low is not None and (value <= low if low_open else value < low)
    hi_bad = high is not None and (value >= high if high_open else value > high)
    if lo_bad or hi_bad:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        interval = f"{'(' if low_open or low is None else '['}{lo}, {hi}{')' if high_open or high is None else ']'}"
        raise ConfigError(f"{opt(name)} {value:g}: must be in {interval}")
