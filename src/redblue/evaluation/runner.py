"""Run one attack over a set of images and enforce the threat model on every batch.

:func:`run_attack` is the evaluator's inner loop: whoever wrote the attack, each batch it
returns is checked (``‖x_adv − x‖ ≤ eps + 1e-6`` and ``0 ≤ x_adv ≤ 1``, else
:class:`~redblue.errors.ThreatModelError`) and scored with the evaluator's own forward
pass. :class:`RobustnessResult` is what :func:`redblue.evaluation.evaluate_robustness`
returns; the sanity checks (:mod:`redblue.evaluation.checks`) read its per-example masks.
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

from redblue.attacks import RUNNERS, SETTINGS, resolve_settings
from redblue.attacks.projection import check_settings, per_example_norm, pixels, threat_model_violation
from redblue.errors import ConfigError, ThreatModelError
from redblue.train import channels_last, prepare_model
from redblue.utils import atomic_write_bytes, eval_mode, progress_line, sha256_bytes

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
    images_per_s: float | None  # None when nothing was timed (a cascade step with no image left)
    # In a cascade: the images this attack ran on (those still robust before it), and the
    # share of them it left robust; ``robust_accuracy`` is then the cascade's running accuracy.
    n_attacked: int | None = None
    own_robust_accuracy: float | None = None


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
    warnings: list[dict[str, Any]] = field(default_factory=list)
    checks_n_examples: int | None = None
    sweep_n_examples: int | None = None
    protocol: str = "independent"  # or "cascade" (each attack on the images still robust)
    per_class: list[dict[str, Any]] = field(default_factory=list)
    # Every image's worst-case adversarial example (evaluate_robustness(keep_adversarial=True)):
    # from the first attack that fooled it, else from the last attack; not serialised.
    adversarial: torch.Tensor | None = field(default=None, repr=False)
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
            "n_examples": self.n,
            "seed": self.seed,
            "device": self.device,
            "clean_accuracy": self.clean_accuracy,
            "robust_accuracy": self.robust_accuracy,
            "attack_success_rate": self.attack_success_rate,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "protocol": self.protocol,
            "per_class": self.per_class,
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
    adversarial: torch.Tensor | None = None,
) -> tuple[AttackResult, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run one attack over (x, y) in batches, checking the threat model on every batch.

    Returns (result, robust mask, clean-correct mask, adversarial images of the first
    :data:`N_SAMPLES` examples). ``clean_correct`` is reused when given; else it comes from
    the attack's own clean forward pass, or a separate one when the attack had none. Every
    adversarial image is also written into ``adversarial`` (float, shaped like ``x``) when given.
    """
    check_settings(eps=eps, norm=norm, dim=pixels(x))
    resolved = resolve_settings(attack, eps, settings or {})
    extra: dict[str, Any] = {"early_stop": True} if attack in ("pgd", "apgd-ce", "apgd-t") else {}
    runner = RUNNERS[attack]
    n = int(x.shape[0])
    robust = torch.zeros(n, dtype=torch.bool, device=x.device)
    correct = torch.zeros(n, dtype=torch.bool, device=x.device) if clean_correct is None else clean_correct
    linf = torch.zeros(n, device=x.device)
    l2 = torch.zeros(n, device=x.device)
    samples = []
    model = prepare_model(model, x.device, x[:2])
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
        if adversarial is not None:
            adversarial[start:stop] = x_adv.detach()
        if start < N_SAMPLES:
            samples.append(x_adv[: N_SAMPLES - start].detach())
        bar.update(xb.shape[0])
    bar.close()
    seconds = time.perf_counter() - start_time
    n_correct = int(correct.sum())
    n_robust = int(robust.sum())
    progress_line(progress, f"{attack} eps={eps:g}: {n_robust} of {n} images robust, {seconds:.0f} s")
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
        images_per_s=n / seconds if seconds > 0 else None,
    )
    sample = torch.cat(samples) if samples else x[:0].float()
    return result, robust, correct, sample


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
