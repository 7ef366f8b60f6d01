"""Robustness evaluation: run attacks, enforce the threat model, score the worst case.

:func:`evaluate_robustness` runs one or more attacks (or suites) on a set of test images
and returns a :class:`RobustnessResult`. For every batch an attack returns, whoever wrote
the attack, the evaluator checks ``‖x_adv − x‖ ≤ eps + 1e-6`` and ``0 ≤ x_adv ≤ 1`` and
raises :class:`~redblue.errors.ThreatModelError` otherwise, then scores the images with its
own forward pass. An example counts as robust only if it is classified correctly on the
clean image and no attack fooled it (boolean masks, ANDed across attacks; each attack
already keeps the per-example worst case across its restarts). Clean predictions come
from the attack's own first forward pass when it saw the clean images.

:func:`attack_stage` wraps it for the CLI and the pipeline: it loads the model, writes
``metrics/<name>_metrics.json`` (with the config, the weights hash and the dataset
hashes), a few example images as safetensors, and the plots rendered from those files.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save as st_save
from torch import nn
from tqdm.auto import tqdm

from redblue.artifacts import LoadedModel, load_model
from redblue.attacks import DEFAULTS, RUNNERS, SETTINGS, expand, resolve_settings
from redblue.attacks.projection import check_settings, per_example_norm, threat_model_violation
from redblue.config import AttackConfig, DataConfig
from redblue.data import Dataset
from redblue.errors import ConfigError, ThreatModelError
from redblue.train import channels_last, prepare_model
from redblue.utils import (
    atomic_write_bytes,
    atomic_write_json,
    eval_mode,
    library_versions,
    resolve_device,
    seed_everything,
    sha256_bytes,
)

DEFAULT_SWEEP = {
    "linf": [round(0.05 * i, 2) for i in range(9)],
    "l2": [round(0.5 * i, 1) for i in range(9)],
}
"""Default eps grids: 0, 0.05, ..., 0.4 (L∞) and 0, 0.5, ..., 4 (L2)."""
SWEEP_CAP = {"linf": 1.0, "l2": 10.0}
"""The sweep continues past its grid (same spacing) until accuracy is 0, up to this eps."""
N_SAMPLES = 8
"""Examples kept (clean and adversarial) for the image grid."""


@dataclass
class AttackResult:
    """One attack's scores on the evaluated images."""

    attack: str
    settings: dict[str, Any]
    robust_accuracy: float
    attack_success_rate: float
    n_fooled: int
    perturbation: dict[str, float]
    seconds: float
    images_per_s: float


@dataclass
class RobustnessResult:
    """Clean and robust accuracy at one eps, per attack and as the worst case over attacks."""

    eps: float
    norm: str
    n: int
    clean_accuracy: float
    robust_accuracy: float
    attack_success_rate: float
    attacks: list[AttackResult]
    seconds: float
    images_per_s: float
    device: str
    seed: int
    sweep: dict[str, list[dict[str, float]]] | None = None
    warnings: list[dict[str, str]] = field(default_factory=list)
    # Per-example masks and sample images: used by the checks and the plots, not serialised.
    clean_correct: torch.Tensor | None = field(default=None, repr=False)
    robust: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def accuracy(self, attack: str) -> float:
        """Robust accuracy of one evaluated attack."""
        for result in self.attacks:
            if result.attack == attack:
                return result.robust_accuracy
        raise KeyError(attack)

    def to_json(self) -> dict[str, Any]:
        """The result as JSON-ready data (floats stay numbers)."""
        return {
            "eps": self.eps,
            "norm": self.norm,
            "n": self.n,
            "seed": self.seed,
            "device": self.device,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "attacks": {a.attack: dataclasses.asdict(a) for a in self.attacks},
            "sweep": self.sweep,
            "warnings": self.warnings,
        }


def _as_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div(255.0) if x.dtype == torch.uint8 else x.float()


def _check_settings(settings: dict[str, Any]) -> None:
    unknown = sorted(set(settings) - set(SETTINGS))
    if unknown:
        raise ConfigError(f"attack setting {unknown[0]!r}: unknown, expected one of {', '.join(SETTINGS)}")


def run_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    attack: str,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 500,
    settings: dict[str, Any] | None = None,
    clean_correct: torch.Tensor | None = None,
    progress: bool = False,
) -> tuple[AttackResult, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one attack over (x, y) in batches, checking the threat model on every batch.

    Returns (result, robust mask, clean-correct mask, adversarial images of the first
    :data:`N_SAMPLES` examples). ``clean_correct`` is reused when given; else it comes from
    the attack's own clean forward pass, or a separate one when the attack had none.
    """
    check_settings(eps=eps, norm=norm)
    resolved = resolve_settings(attack, eps, settings or {})
    extra: dict[str, Any] = {"early_stop": True} if attack in ("pgd", "apgd-ce", "apgd-t") else {}
    runner = RUNNERS[attack]
    n = int(x.shape[0])
    robust = torch.zeros(n, dtype=torch.bool, device=x.device)
    correct = torch.zeros(n, dtype=torch.bool, device=x.device) if clean_correct is None else clean_correct
    linf = torch.zeros(n, device=x.device)
    l2 = torch.zeros(n, device=x.device)
    samples = []
    prepare_model(model, x.device)
    start_time = time.perf_counter()
    bar = tqdm(total=n, desc=f"{attack} eps={eps:g}", unit="img", disable=None if progress else True, leave=False)
    for start in range(0, n, batch_size):
        xb = channels_last(_as_float(x[start : start + batch_size]))
        yb = y[start : start + batch_size]
        out = runner(model, xb, yb, eps=eps, norm=norm, **resolved, **extra)
        x_adv = out.x_adv
        problem = threat_model_violation(x_adv, xb, eps, norm)
        if problem is not None:
            raise ThreatModelError(
                f"{attack} (eps {eps:g}, {norm}), images {start}..{start + xb.shape[0] - 1}: {problem}"
            )
        with torch.no_grad(), eval_mode(model):
            adv_pred = model(channels_last(x_adv)).argmax(1)
            if clean_correct is None:
                logits = out.clean_logits if out.clean_logits is not None else model(xb)
                correct[start : start + xb.shape[0]] = logits.argmax(1) == yb
        stop = start + xb.shape[0]
        robust[start:stop] = correct[start:stop] & (adv_pred == yb)
        delta = x_adv - xb
        linf[start:stop] = per_example_norm(delta, "linf")
        l2[start:stop] = per_example_norm(delta, "l2")
        if start < N_SAMPLES:
            samples.append(x_adv[: N_SAMPLES - start].detach())
        bar.update(xb.shape[0])
    bar.close()
    seconds = time.perf_counter() - start_time
    n_correct = int(correct.sum())
    n_robust = int(robust.sum())
    result = AttackResult(
        attack=attack,
        settings={"eps": eps, "norm": norm, **resolved, **extra},
        robust_accuracy=n_robust / n if n else float("nan"),
        attack_success_rate=(n_correct - n_robust) / n_correct if n_correct else 0.0,
        n_fooled=n_correct - n_robust,
        perturbation={
            "linf_mean": float(linf.mean()) if n else 0.0,
            "linf_max": float(linf.max()) if n else 0.0,
            "l2_mean": float(l2.mean()) if n else 0.0,
            "l2_max": float(l2.max()) if n else 0.0,
        },
        seconds=seconds,
        images_per_s=n / seconds if seconds > 0 else float("nan"),
    )
    sample = torch.cat(samples) if samples else x[:0].float()
    return result, robust, correct, sample


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
    **settings: Any,
) -> RobustnessResult:
    """Clean accuracy, per-attack and worst-case robust accuracy of ``model`` at ``eps``.

    Args:
        model: pixels in [0, 1] in, logits out. Moved to channels_last on ``x.device``.
        x: test images, uint8 or float in [0, 1], shape (N, 1, 28, 28), on the device to use.
        y: int64 labels (N,).
        attacks: names, suites or a comma-separated list (``"quick"``, ``"standard,square"``).
        eps: perturbation radius in pixel units.
        norm: ``"linf"`` or ``"l2"``.
        batch_size: images per attack batch.
        seed: seeds every random start, so the same call gives the same numbers on CPU.
        sweep: also sweep eps (True: the default grid; or a list of eps values).
        checks: run the sanity checks (:mod:`redblue.checks`) and store their warnings.
        check_options: ``check_examples``, ``square_examples``, ``square_queries`` for
            :func:`redblue.checks.run_checks` (their cost).
        settings: ``alpha``, ``steps``, ``restarts``, ``random_start``, ``n_targets``,
            ``p_init`` — each applied to the attacks that accept it.

    Returns:
        A :class:`RobustnessResult` (``.to_json()`` for the JSON form).
    """
    names = expand(attacks)
    check_settings(eps=eps, norm=norm)
    _check_settings(settings)
    if norm == "l2" and "square" in names:
        raise ConfigError("--attack square: implemented for --norm linf only")
    n = int(x.shape[0])
    if n == 0:
        raise ConfigError("--n-examples: no images to evaluate")
    start_time = time.perf_counter()
    clean_correct: torch.Tensor | None = None
    results: list[AttackResult] = []
    robust: dict[str, torch.Tensor] = {}
    samples: dict[str, torch.Tensor] = {}
    for name in names:
        seed_everything(seed)
        result, mask, clean_correct, sample = run_attack(
            model, x, y, name, eps=eps, norm=norm, batch_size=batch_size,
            settings=settings, clean_correct=clean_correct, progress=progress,
        )  # fmt: skip
        results.append(result)
        robust[name] = mask
        samples[name] = sample
    if clean_correct is None:  # pragma: no cover - names is never empty
        raise ConfigError("--attack: no attack given")
    worst = clean_correct.clone()
    for mask in robust.values():
        worst &= mask
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
    )
    if sweep is not False:
        grid = None if sweep is True else list(sweep)
        outcome.sweep = {
            name: eps_sweep(model, x, y, attack=name, norm=norm, eps_values=grid,
                            batch_size=batch_size, seed=seed, **settings)
            for name in names
        }  # fmt: skip
    if checks:
        from redblue.checks import run_checks

        outcome.warnings = run_checks(
            model, x, y, outcome, batch_size=batch_size, seed=seed, **(check_options or {}), **settings
        )
    return outcome


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
            settings=settings, clean_correct=clean_correct,
        )  # fmt: skip
        points.append(
            {"eps": eps, "robust_accuracy": result.robust_accuracy, "attack_success_rate": result.attack_success_rate}
        )
        if result.robust_accuracy == 0.0:
            break
        i += 1
    return points


def save_samples(path: Path, samples: dict[str, torch.Tensor], predictions: dict[str, torch.Tensor]) -> str:
    """Write the example images and predictions as safetensors; returns the file's SHA-256."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in samples.items()}
    tensors.update({f"pred_{k}": v.detach().cpu().contiguous() for k, v in predictions.items()})
    payload = st_save(tensors, metadata={"format": "redblue.attack-samples/1"})
    atomic_write_bytes(path, payload)
    return sha256_bytes(payload)


def sample_predictions(model: nn.Module, samples: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Predicted labels of the clean and each attack's sample images."""
    with torch.no_grad(), eval_mode(model):
        return {
            k: model(channels_last(v)).argmax(1) for k, v in samples.items() if k != "y" and v.dim() == 4 and v.shape[0]
        }


def attack_stage(
    out: Path,
    model: str | Path | LoadedModel,
    data: Dataset,
    cfg: AttackConfig,
    *,
    name: str | None = None,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
    plots: bool = True,
    check_options: dict[str, int] | None = None,
) -> dict[str, Any]:
    """Evaluate a saved model against ``cfg``'s attacks and write the results.

    Writes ``metrics/<name>_metrics.json`` (metrics, warnings, config, the model's weights
    hash, the dataset hashes), ``metrics/<name>_examples.safetensors`` (example images and
    predictions) and the plots under ``images/``. ``name`` defaults to
    ``<model name>_<attack>``. Returns the JSON result.
    """
    device = resolve_device(cfg.device)
    loaded = model if isinstance(model, LoadedModel) else load_model(Path(model), device=device)
    net = loaded.model.to(device)
    model_name = str(loaded.record.get("name", loaded.json_path.stem))
    name = name or f"{model_name}_{cfg.attack.replace(',', '+')}"
    test = data.to(device)
    n = int(test.x_test.shape[0]) if cfg.n_examples is None else min(cfg.n_examples, int(test.x_test.shape[0]))
    x, y = test.x_test[:n], test.y_test[:n]
    result = evaluate_robustness(
        net, x, y, attacks=cfg.attack, eps=cfg.eps, norm=cfg.norm, batch_size=cfg.batch_size,
        seed=cfg.seed, sweep=cfg.sweep, checks=cfg.checks, progress=progress,
        alpha=cfg.alpha, steps=cfg.steps, restarts=cfg.restarts, random_start=cfg.random_start,
        n_targets=cfg.n_targets, check_options=check_options,
    )  # fmt: skip
    samples_rel = f"metrics/{name}_examples.safetensors"
    samples_sha = save_samples(out / samples_rel, result.samples, sample_predictions(net, result.samples))
    record = {
        "stage": "attack",
        "name": name,
        "model": {
            "name": model_name,
            "path": str(loaded.weights_path),
            "weights_sha256": loaded.record.get("weights_sha256"),
        },
        "config": {"attack": dataclasses.asdict(cfg), "data": dataclasses.asdict(data_cfg) if data_cfg else None},
        "dataset": data.describe(),
        "dataset_notice": data.notice,
        "metrics": result.to_json(),
        "warnings": result.warnings,
        # X_file / X_sha256 pairs name files relative to the JSON's own folder (redblue verify).
        "samples_file": Path(samples_rel).name,
        "samples_sha256": samples_sha,
        "versions": library_versions(),
    }
    atomic_write_json(out / "metrics" / f"{name}_metrics.json", record)
    if plots:
        from redblue.report.attack_plots import render_attack_plots

        render_attack_plots(out, name, record)
    return record


__all__ = [
    "DEFAULTS",
    "AttackResult",
    "RobustnessResult",
    "attack_stage",
    "eps_sweep",
    "evaluate_robustness",
    "run_attack",
]
