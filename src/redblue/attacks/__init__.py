"""Evasion attacks: functions on tensors returning adversarial images in the eps-ball and [0, 1].

``ATTACKS`` maps each name to its public function ``attack(model, x, y, *, eps, ...) ->
x_adv``; ``RUNNERS`` to the variant the evaluator uses (it also returns the clean logits of
the attack's own first forward pass); ``DEFAULTS`` to each attack's settings and their
defaults; ``SUITES`` to the attacks of a suite, whose robust accuracy is the per-example
worst case over its members.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from redblue.attacks.apgd import apgd_ce, apgd_run, apgd_t
from redblue.attacks.fab import fab_run, fab_t
from redblue.attacks.fgsm import fgsm, fgsm_run
from redblue.attacks.pgd import pgd, pgd_run
from redblue.attacks.projection import AttackOutput, per_example_norm, project, random_start
from redblue.attacks.square import square, square_run
from redblue.errors import ConfigError

ATTACKS: dict[str, Callable[..., torch.Tensor]] = {
    "fgsm": fgsm,
    "pgd": pgd,
    "apgd-ce": apgd_ce,
    "apgd-t": apgd_t,
    "fab-t": fab_t,
    "square": square,
}


def _apgd_ce_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> AttackOutput:
    return apgd_run(model, x, y, loss="ce", **kw)


def _apgd_t_run(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, **kw: Any) -> AttackOutput:
    return apgd_run(model, x, y, loss="dlr-targeted", **kw)


RUNNERS: dict[str, Callable[..., AttackOutput]] = {
    "fgsm": fgsm_run,
    "pgd": pgd_run,
    "apgd-ce": _apgd_ce_run,
    "apgd-t": _apgd_t_run,
    "fab-t": fab_run,
    "square": square_run,
}

DEFAULTS: dict[str, dict[str, Any]] = {
    "fgsm": {},
    # alpha None means 2.5 * eps / steps (Madry et al. 2018).
    "pgd": {"alpha": None, "steps": 40, "restarts": 1, "random_start": True},
    "apgd-ce": {"steps": 100, "restarts": 1},
    "apgd-t": {"steps": 100, "restarts": 1, "n_targets": 9},
    "fab-t": {"steps": 100, "restarts": 1, "n_targets": 9},
    "square": {"steps": 5000, "restarts": 1, "p_init": 0.8},
}
"""Settings each attack accepts besides ``eps`` and ``norm``, with their defaults."""

SUITES: dict[str, list[str]] = {
    "quick": ["fgsm", "pgd"],
    "standard": ["apgd-ce", "apgd-t"],
}

CASCADES: dict[str, list[str]] = {
    "autoattack": ["apgd-ce", "apgd-t", "fab-t", "square"],
}
"""Protocols run as a cascade: each attack only on the images still robust after the ones
before it, scored as the per-example worst case. ``autoattack`` is AutoAttack's standard
version (Croce & Hein, ICML 2020): APGD-CE (100 steps), APGD-T (9 targets, 100 steps), FAB-T
(9 targets, 100 steps), Square (5,000 queries), one restart each — the paper's settings, which
are this module's defaults (torchattacks' ``AutoAttack`` class runs APGD with 10 steps)."""

ATTACK_CHOICES = (*ATTACKS, *SUITES, *CASCADES)
SETTINGS = ("alpha", "steps", "restarts", "random_start", "n_targets", "p_init")


def _parts(spec: str | list[str]) -> list[str]:
    return [p.strip() for p in (spec.split(",") if isinstance(spec, str) else list(spec))]


def is_cascade(spec: str | list[str]) -> bool:
    """Whether ``spec`` names a cascade protocol (then every attack it names runs as one)."""
    return any(part in CASCADES for part in _parts(spec))


def expand(spec: str | list[str]) -> list[str]:
    """Attack names from a name, a suite, a cascade or a comma-separated list of them (order
    kept, duplicates dropped): ``"standard,square"`` -> ``["apgd-ce", "apgd-t", "square"]``."""
    names: list[str] = []
    for part in _parts(spec):
        if part in SUITES or part in CASCADES:
            members = SUITES.get(part) or CASCADES[part]
        elif part in ATTACKS:
            members = [part]
        else:
            raise ConfigError(f"--attack {part!r}: unknown attack, expected one of {', '.join(ATTACK_CHOICES)}")
        names.extend(m for m in members if m not in names)
    if not names:
        raise ConfigError("--attack: no attack given")
    return names


def resolve_settings(name: str, eps: float, settings: dict[str, Any]) -> dict[str, Any]:
    """The settings attack ``name`` runs with: its defaults overridden by the given
    settings it accepts (``None`` means not given)."""
    resolved = dict(DEFAULTS[name])
    resolved.update({k: v for k, v in settings.items() if k in resolved and v is not None})
    if name == "pgd" and resolved["alpha"] is None:
        resolved["alpha"] = 2.5 * eps / resolved["steps"] if eps > 0 else 0.01
    return resolved


__all__ = [
    "ATTACKS",
    "ATTACK_CHOICES",
    "CASCADES",
    "DEFAULTS",
    "RUNNERS",
    "SUITES",
    "AttackOutput",
    "apgd_ce",
    "apgd_t",
    "expand",
    "fab_t",
    "fgsm",
    "is_cascade",
    "per_example_norm",
    "pgd",
    "project",
    "random_start",
    "resolve_settings",
    "square",
]
