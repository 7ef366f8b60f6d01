"""The one place values are checked: ``check_int``, ``check_float``, ``check_choice``.

Each raises :class:`~redblue.errors.ConfigError` with one line naming the option (as its
CLI flag), the value and what is accepted. Used by the configs, the attacks and the stages.
"""

from __future__ import annotations

import re
from typing import TypeGuard

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


NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
"""A name that becomes part of a file name under ``--out``: letters, digits, ``.``, ``_``,
``+``, ``-``; starts with a letter or digit; at most 128 characters; no ``..``."""
FILE_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,254}")
"""A file name a record may point to (a name plus a suffix such as ``.safetensors``)."""


def is_safe_name(value: object, pattern: re.Pattern[str] = NAME_PATTERN) -> TypeGuard[str]:
    """True when ``value`` is a string that matches ``pattern`` and holds no ``..``: a plain
    file name (part) that cannot point anywhere but its own folder."""
    return isinstance(value, str) and pattern.fullmatch(value) is not None and ".." not in value


def check_name(name: str, value: object, *, error: type[Exception] = ConfigError) -> str:
    """``value`` when it is a safe file-name part (:data:`NAME_PATTERN`), so that nothing
    derived from it can land outside the output folder; ``error`` (one line) otherwise."""
    if not is_safe_name(value):
        raise error(
            f"{opt(name)} {value!r}: expected a name of letters, digits, '.', '_', '+' or '-' "
            "(no path separator, no '..', at most 128 characters)"
        )
    return value
