"""Robustness evaluation: clean, per-attack and worst-case robust accuracy; eps sweeps.

:func:`evaluate_robustness` runs one or more attacks (or suites) through
:func:`~redblue.evaluation.runner.run_attack`, which enforces the threat model on every
batch, and scores the per-example worst case: an example counts as robust only if it is
classified correctly on the clean image and no attack fooled it (boolean masks, ANDed
across attacks; each attack already keeps the worst case across its restarts). With
``checks=True`` the sanity checks of :mod:`redblue.evaluation.checks` run on the result.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from redblue.attacks import CASCADES, DEFAULTS, expand, is_cascade, resolve_settings
from redblue.attacks.projection import check_settings, pixels
from redblue.errors import ConfigError
from redblue.evaluation.checks import run_checks
from redblue.evaluation.runner import (
    N_SAMPLES,
    AttackResult,
    RobustnessResult,
    _as_float,
    _check_settings,
    run_attack,
)
from redblue.train import prepare_model
from redblue.utils import seed_everything

DEFAULT_SWEEP = {
    "linf": [round(0.05 * i, 2) for i in range(9)],
    "l2": [round(0.5 * i, 1) for i in range(9)],
}
"""Default eps grids: 0, 0.05, ..., 0.4 (L∞) and 0, 0.5, ..., 4 (L2)."""
SWEEP_CAP = {"linf": 1.0, "l2": 10.0}
"""The sweep continues past its grid (same spacing) until accuracy is 0, up to this eps."""


def is_standard_autoattack(attacks: Mapping[str, Mapping[str, Any]]) -> bool:
    """Whether an evaluation ran AutoAttack's standard protocol: every attack of the
    ``autoattack`` cascade present with the paper's settings (:data:`redblue.attacks.DEFAULTS`),
    not a reduced one such as ``--quick``'s (fewer targets and queries). ``attacks`` is a result
    JSON's ``evaluation.attacks``: attack name to an entry with its ``settings``."""
    return all(
        name in attacks and all(attacks[name]["settings"].get(key) == value for key, value in DEFAULTS[name].items())
        for name in CASCADES["autoattack"]
    )


def evaluate_robustness(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attacks: list[str] | str,
    eps: float,
    norm: str = "linf",
    batch_size: int = 500,
    seed: int = 0,
    sweep: bool | list[float] = False,
    checks: bool = True,
    check_options: dict[str, int] | None = None,
    progress: bool = False,
    keep_adversarial: bool = False,
    per_attack: dict[str, dict[str, Any]] | None = None,
    **settings: Any,
) -> RobustnessResult:
    """Clean accuracy, per-attack and worst-case robust accuracy of ``model`` at ``eps``.

    Args:
        model: pixels in [0, 1] in, logits out. Moved to channels_last on ``x.device``
            (or kept in the default layout where it needs it: :func:`redblue.train.prepare_model`).
        x: test images, uint8 or float in [0, 1], shape (N, 1, 28, 28), on the device to use.
        y: int64 labels (N,).
        attacks: names, suites or a comma-separated list (``"quick"``, ``"standard,square"``);
            ``"autoattack"`` (AutoAttack's standard version) runs its attacks as a cascade, each
            on the images still robust after the ones before it (see :data:`redblue.attacks.CASCADES`).
        eps: perturbation radius in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        batch_size: images per attack batch.
        seed: seeds every random start, so the same call gives the same numbers on CPU.
        sweep: also sweep eps (True: the default grid; or a list of eps values).
        checks: run the sanity checks (:mod:`redblue.checks`) and store their warnings.
        check_options: ``check_examples``, ``square_examples``, ``square_queries`` for
            :func:`redblue.checks.run_checks` (their cost).
        keep_adversarial: keep every image's worst-case adversarial example in
            ``result.adversarial`` (the first attack's example that fooled it, else the last's).
        per_attack: settings for one attack only, over ``settings`` (``{"square": {"steps":
            1000}}``: Square's query budget, the other attacks' steps unchanged).
        settings: ``alpha``, ``steps``, ``restarts``, ``random_start``, ``n_targets``,
            ``p_init`` — each applied to the attacks that accept it.

    Returns:
        A :class:`RobustnessResult` (``.to_json()`` for the JSON form).
    """
    names = expand(attacks)
    cascade = is_cascade(attacks)
    check_settings(eps=eps, norm=norm, dim=pixels(x))
    _check_settings(settings)
    overrides = per_attack or {}
    for name, extra in overrides.items():
        if name not in names:
            raise ConfigError(f"settings for {name!r}: not one of the attacks run ({', '.join(names)})")
        _check_settings(extra)
    if norm == "l2" and "square" in names:
        raise ConfigError("--attack square: implemented for --norm linf only")
    n = int(x.shape[0])
    if n == 0:
        raise ConfigError("--n-examples: no images to evaluate")
    model = prepare_model(model, x.device, x[:2])
    start_time = time.perf_counter()
    clean_correct: torch.Tensor | None = None
    results: list[AttackResult] = []
    robust: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    worst: torch.Tensor | None = None
    final = _as_float(x).clone() if keep_adversarial else None
    for name in names:
        seed_everything(seed)
        attack_settings = {**settings, **overrides.get(name, {})}
        if cascade and worst is not None:
            result, mask, sample = _cascade_step(model, x, y, name, worst, samples[results[-1].attack], eps=eps,
                                                 norm=norm, batch_size=batch_size, settings=attack_settings,
                                                 progress=progress, adversarial=final)  # fmt: skip
        else:
            buffer = torch.empty_like(final) if final is not None else None
            result, mask, clean_correct, sample = run_attack(
                model, x, y, name, eps=eps, norm=norm, batch_size=batch_size,
                settings=attack_settings, clean_correct=clean_correct, progress=progress, adversarial=buffer,
            )  # fmt: skip
            if final is not None and buffer is not None:
                # The images still robust before this attack take its result; the others keep
                # the example of the attack that fooled them first.
                take = torch.ones_like(mask) if worst is None else worst
                final[take] = buffer[take]
            if cascade:
                result = dataclasses.replace(result, n_attacked=n, own_robust_accuracy=result.robust_accuracy)
        results.append(result)
        robust[name] = mask
        samples[name] = sample
        worst = mask.clone() if worst is None else worst & mask  # run_attack's masks imply clean-correct
    if clean_correct is None or worst is None:  # pragma: no cover - names is never empty
        raise ConfigError("--attack: no attack given")
    n_correct = int(clean_correct.sum())
    seconds = time.perf_counter() - start_time
    samples["clean"] = _as_float(x[:N_SAMPLES])
    samples["y"] = y[:N_SAMPLES]
    outcome = RobustnessResult(
        eps=eps,
        norm=norm,
        n=n,
        clean_accuracy=n_correct / n,
        robust_accuracy=int(worst.sum()) / n,
        attack_success_rate=(n_correct - int(worst.sum())) / n_correct if n_correct else 0.0,
        attacks=results,
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("nan"),
        device=str(x.device),
        seed=seed,
        clean_correct=clean_correct,
        robust=robust,
        samples=samples,
        protocol="cascade" if cascade else "independent",
        per_class=per_class_accuracy(y, clean_correct, worst),
        adversarial=final,
    )
    if sweep is not False:
        grid = None if sweep is True else list(sweep)
        outcome.sweep = {
            name: eps_sweep(model, x, y, attack=name, norm=norm, eps_values=grid,
                            batch_size=batch_size, seed=seed, progress=progress,
                            **{**settings, **overrides.get(name, {})})
            for name in names
        }  # fmt: skip
        outcome.sweep_n_examples = n
    if checks:
        outcome.warnings = run_checks(
            model, x, y, outcome, batch_size=batch_size, seed=seed, progress=progress, **(check_options or {}),
            **settings,
        )
    return outcome


def per_class_accuracy(y: torch.Tensor, clean_correct: torch.Tensor, robust: torch.Tensor) -> list[dict[str, Any]]:
    """``[{"class", "n", "clean_accuracy", "robust_accuracy"}]`` for every class present in ``y``."""
    size = int(y.max()) + 1 if y.numel() else 0
    total = torch.bincount(y, minlength=size)
    clean = torch.bincount(y[clean_correct], minlength=size)
    kept = torch.bincount(y[robust], minlength=size)
    return [
        {"class": c, "n": int(total[c]), "clean_accuracy": int(clean[c]) / int(total[c]),
         "robust_accuracy": int(kept[c]) / int(total[c])}
        for c in range(size) if int(total[c])
    ]  # fmt: skip


def _cascade_step(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    name: str,
    still_robust: torch.Tensor,
    previous_samples: torch.Tensor,
    *,
    eps: float,
    norm: str,
    batch_size: int,
    settings: dict[str, Any],
    progress: bool,
    adversarial: torch.Tensor | None = None,
) -> tuple[AttackResult, torch.Tensor, torch.Tensor]:
    """One attack of a cascade, run only on the images ``still_robust`` after the ones before it.

    Returns its result (``robust_accuracy``: the share of all images still robust after it, the
    cascade's running accuracy; ``own_robust_accuracy`` and ``attack_success_rate``: on the
    ``n_attacked`` images it was given), its robust mask over all images (False where it did
    not run: those were broken already) and the cascade's sample images so far; writes its
    adversarial examples into ``adversarial`` (all images) at the images it attacked.
    """
    n = int(x.shape[0])
    index = still_robust.nonzero().squeeze(1)
    mask = torch.zeros(n, dtype=torch.bool, device=x.device)
    sample = previous_samples.clone()
    if index.numel() == 0:
        resolved = resolve_settings(name, eps, settings)
        result = AttackResult(attack=name, settings={"eps": eps, "norm": norm, **resolved}, robust_accuracy=0.0,
                              attack_success_rate=0.0, n_fooled=0, perturbation={}, seconds=0.0,
                              images_per_s=None, n_attacked=0, own_robust_accuracy=None)  # fmt: skip
        return result, mask, sample
    ones = torch.ones(int(index.numel()), dtype=torch.bool, device=x.device)
    buffer = adversarial[index] if adversarial is not None else None
    sub, sub_mask, _, sub_sample = run_attack(model, x[index], y[index], name, eps=eps, norm=norm,
                                              batch_size=batch_size, settings=settings, clean_correct=ones,
                                              progress=progress, adversarial=buffer)  # fmt: skip
    mask[index] = sub_mask
    if adversarial is not None and buffer is not None:
        adversarial[index] = buffer
    for j, i in enumerate(index[: sub_sample.shape[0]].tolist()):
        if i < sample.shape[0]:
            sample[i] = sub_sample[j]
    n_attacked = int(index.numel())
    result = dataclasses.replace(
        sub,
        robust_accuracy=int(mask.sum()) / n,
        n_attacked=n_attacked,
        own_robust_accuracy=sub.robust_accuracy,
    )
    return result, mask, sample


def eps_sweep(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    norm: str = "linf",
    eps_values: list[float] | None = None,
    batch_size: int = 500,
    seed: int = 0,
    cap: float | None = None,
    progress: bool = False,
    **settings: Any,
) -> list[dict[str, float]]:
    """Robust accuracy of one attack against eps, for the accuracy-vs-eps curve.

    Runs the grid (default :data:`DEFAULT_SWEEP`), then continues with the same spacing
    until accuracy reaches 0 or eps reaches ``cap`` (default :data:`SWEEP_CAP`); stops at
    the first eps where accuracy is 0. FGSM is not continued past the grid: its one step
    of size eps overshoots, so its accuracy need not reach 0 at any eps. Returns ``[{"eps", "robust_accuracy",
    "attack_success_rate"}, ...]`` in increasing eps.
    """
    _check_settings(settings)
    grid = sorted(DEFAULT_SWEEP[norm] if eps_values is None else eps_values)
    limit = SWEEP_CAP[norm] if cap is None else cap
    spacing = grid[-1] - grid[-2] if len(grid) > 1 else 0.0
    points: list[dict[str, float]] = []
    clean_correct: torch.Tensor | None = None
    i = 0
    while True:
        if i < len(grid):
            eps = grid[i]
        else:
            eps = round(grid[-1] + spacing * (i - len(grid) + 1), 6)
            if spacing <= 0 or eps > limit + 1e-9 or attack == "fgsm":
                break
        seed_everything(seed)
        result, _, clean_correct, _ = run_attack(
            model, x, y, attack, eps=eps, norm=norm, batch_size=batch_size,
            settings=settings, clean_correct=clean_correct, progress=progress,
        )  # fmt: skip
        points.append(
            {"eps": eps, "robust_accuracy": result.robust_accuracy, "attack_success_rate": result.attack_success_rate}
        )
        if result.robust_accuracy == 0.0:
            break
        i += 1
    return points
