"""Adversarial training recipes on the one training loop, :func:`redblue.train.fit`.

Five recipes, each a ``perturb`` hook (and for TRADES and MART a ``loss`` hook) for ``fit``:

- ``fgsm``: the original project's recipe (ART ``AdversarialTrainer`` with
  ``FastGradientMethod``): a share ``ratio`` of each batch is replaced by FGSM images.
  It looks robust to FGSM and is the classic case of catastrophic overfitting.
- ``fgsm-rs``: Wong, Rice & Kolter 2020, "Fast is better than free": FGSM from a uniform
  random start in the eps-ball (not clamped to the image domain, as in their code) with
  step ``alpha = 1.25·eps``.
- ``pgd``: Madry et al. 2018: PGD with a random start (``steps`` of ``alpha``).
- ``trades``: Zhang et al. 2019: cross-entropy on clean images plus ``beta`` times the KL
  divergence between clean and adversarial predictions, the inner maximisation being PGD
  on that KL term.
- ``mart``: Wang et al. 2020 (MART): PGD images as for ``pgd``, trained on a boosted
  cross-entropy (cross-entropy plus a margin term against the likeliest wrong class) plus
  ``beta`` times the clean-to-adversarial KL divergence weighted by ``1 - p(y | x)``, so
  images the model gets wrong or barely right weigh more.

Any of them can add adversarial weight perturbation (Wu et al. 2020, AWP:
:func:`awp_perturb_weights`, the ``perturb_weights`` hook): each batch's gradient is taken at
weights pushed a little uphill on the recipe's own loss.

An :class:`OverfitGuard` (the ``epoch_end`` hook) measures clean, FGSM and PGD accuracy on
a fixed slice of the training set held out from training after every epoch; when PGD
accuracy collapses (falls more than ``guard_drop`` below its best), it restores the best
epoch's weights and stops training. :func:`train_defended` builds and trains a model with
a recipe and its guard; the defend stage (:mod:`redblue.stages.defend`) saves and
evaluates it.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from redblue.attacks import fgsm, pgd
from redblue.attacks.projection import input_gradient
from redblue.config import DefendConfig, TrainConfig
from redblue.data import Dataset, to_float
from redblue.models import build_model
from redblue.train import (
    Loss,
    Perturb,
    PerturbWeights,
    channels_last,
    fit,
    prepare_model,
    training_precision,
)
from redblue.utils import autocast, eval_mode, resolve_device


class EpsSchedule:
    """The training eps per batch: a linear ramp from 0 to ``eps`` over ``ramp_steps`` batches.

    Called once per batch (by the recipe's ``perturb``); returns the eps for that batch.
    With ``ramp_steps = 0`` it is the constant ``eps``.

    >>> ramp = EpsSchedule(0.3, ramp_steps=3)
    >>> [round(ramp(), 2) for _ in range(4)]
    [0.1, 0.2, 0.3, 0.3]
    """

    def __init__(self, eps: float, ramp_steps: int = 0) -> None:
        self.eps = eps
        self.ramp_steps = ramp_steps
        self.step = 0

    def __call__(self) -> float:
        self.step += 1
        if self.ramp_steps <= 0:
            return self.eps
        return self.eps * min(1.0, self.step / self.ramp_steps)

    @property
    def ramped(self) -> bool:
        """Whether the last batch's eps was the full ``eps`` (the ramp is done)."""
        return self.step >= self.ramp_steps


@dataclass
class Recipe:
    """The hooks one recipe gives :func:`redblue.train.fit`, and its resolved settings."""

    name: str
    perturb: Perturb
    loss: Loss | None
    settings: dict[str, Any]
    schedule: EpsSchedule = field(repr=False, default_factory=lambda: EpsSchedule(0.0))
    perturb_weights: PerturbWeights | None = None


def fgsm_mix_perturb(schedule: EpsSchedule, ratio: float) -> Perturb:
    """The original project's ``perturb``: the first ``ceil(ratio·n)`` images of each
    (already shuffled) batch replaced by FGSM images at the schedule's eps (as ART's
    ``AdversarialTrainer(ratio=...)`` with ``FastGradientMethod`` does); the rest stay clean.
    """

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = schedule()
        k = math.ceil(ratio * x.shape[0])
        if k == 0:
            return x
        x_adv = fgsm(model, x[:k], y[:k], eps=eps)
        return channels_last(torch.cat([x_adv.to(x.dtype), x[k:]]))

    return perturb


def fgsm_rs_perturb(schedule: EpsSchedule, alpha: float) -> Perturb:
    """FGSM-RS's ``perturb`` exactly as Wong et al. 2020 take the step (their reference code):

    ``delta ~ U(-eps, eps)`` with the start **not** clamped to [0, 1] (the gradient is taken
    at ``x + delta``, which may leave the image domain), then ``delta + alpha·sign(grad)``
    projected to the eps-ball, and only the final image clamped to [0, 1]. Clamping the
    start instead (as an evaluation attack's random start does) puts the start of MNIST's
    many black pixels on 0 half the time, so the step lands on the same corner of the ball
    almost every time: measured on full MNIST at eps 0.3, that variant collapsed into
    catastrophic overfitting in its first epoch (PGD accuracy 1.5%, FGSM 93%), while this one
    trained robustly (``docs/adversarial-training.md``). The gradient is taken in eval mode
    (dropout off); ``alpha`` scales with eps while eps ramps up.
    """

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = schedule()
        step = alpha * eps / schedule.eps
        x = x.detach().float()
        delta = torch.empty_like(x).uniform_(-eps, eps)
        with eval_mode(model):
            grad, _, _ = input_gradient(model, x + delta, y)
        delta = (delta + step * grad.sign()).clamp(-eps, eps)
        return channels_last((x + delta).clamp(0.0, 1.0))

    return perturb


def pgd_perturb(schedule: EpsSchedule, alpha: float, steps: int, restarts: int = 1) -> Perturb:
    """``perturb`` for PGD (Madry et al. 2018): random start in the eps-ball (clamped to
    [0, 1]), then ``steps`` signed-gradient steps of ``alpha`` (scaled with eps while eps
    ramps up); with ``restarts > 1``, each image's worst case over that many random starts
    (:func:`redblue.attacks.pgd.pgd`)."""

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = schedule()
        step = alpha * eps / schedule.eps
        return channels_last(pgd(model, x, y, eps=eps, alpha=step, steps=steps, restarts=restarts,
                                 random_start=True))  # fmt: skip

    return perturb


def trades_perturb(schedule: EpsSchedule, alpha: float, steps: int) -> Perturb:
    """TRADES' inner maximisation (Zhang et al. 2019): PGD on ``KL(p(x) ‖ p(x'))`` from
    ``x + 0.001·N(0, 1)``, L-inf ball of radius eps, clamped to [0, 1], in eval mode."""

    def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        eps = schedule()
        step = alpha * eps / schedule.eps
        with eval_mode(model):
            with torch.no_grad():
                p_clean = F.softmax(model(x).float(), dim=1)
            x_adv = (x + 0.001 * torch.randn_like(x)).clamp(0.0, 1.0)
            for _ in range(steps):
                x_adv.requires_grad_(True)
                kl = F.kl_div(F.log_softmax(model(x_adv).float(), dim=1), p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = x_adv.detach() + step * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
        return channels_last(x_adv.detach())

    return perturb


def clean_and_adversarial_logits(
    model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The float32 logits of the clean and the adversarial images, from one forward pass of
    both (the models here have no batch norm, so this equals two passes and is faster)."""
    n = x_clean.shape[0]
    logits = model(channels_last(torch.cat([x_clean, x_train.to(x_clean.dtype)]))).float()
    return logits[:n], logits[n:]


def trades_loss(beta: float) -> Loss:
    """TRADES' objective: ``CE(f(x), y) + beta · KL(p(x) ‖ p(x'))`` (batch mean), the
    clean logits returned with it (:func:`clean_and_adversarial_logits`)."""

    def loss(
        model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_clean, logits_adv = clean_and_adversarial_logits(model, x_clean, x_train)
        robust = F.kl_div(
            F.log_softmax(logits_adv, dim=1), F.softmax(logits_clean, dim=1), reduction="batchmean"
        )
        return F.cross_entropy(logits_clean, y) + beta * robust, logits_clean

    return loss


def mart_loss(beta: float) -> Loss:
    """MART's objective (Wang et al. 2020, "Improving adversarial robustness requires
    revisiting misclassified examples"), batch means:

    ``CE(f(x'), y) - log(1.0001 - max_{k != y} p_k(x'))``, the boosted cross-entropy on the
    adversarial image, plus ``beta · KL(p(x) ‖ p(x')) · (1 - p_y(x))``, the KL term weighted
    towards images the model gets wrong or barely right on their clean version. The small
    constants are those of the paper's code; the clean logits are returned with it
    (:func:`clean_and_adversarial_logits`).
    """

    def loss(
        model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor, y: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        logits_clean, logits_adv = clean_and_adversarial_logits(model, x_clean, x_train)
        p_adv = F.softmax(logits_adv, dim=1)
        p_clean = F.softmax(logits_clean, dim=1)
        wrong = p_adv.scatter(1, y[:, None], -1.0).amax(dim=1)  # the likeliest wrong class's probability
        boosted = F.cross_entropy(logits_adv, y) - torch.log(1.0001 - wrong + 1e-12).mean()
        kl = F.kl_div(torch.log(p_adv + 1e-12), p_clean, reduction="none").sum(dim=1)
        weight = 1.0000001 - p_clean.gather(1, y[:, None]).squeeze(1)
        return boosted + beta * (kl * weight).mean(), logits_clean

    return loss


def awp_perturb_weights(gamma: float, loss: Loss | None, active: Callable[[], bool]) -> PerturbWeights:
    """Adversarial weight perturbation (Wu et al. 2020, "Adversarial weight perturbation helps
    robust generalization"), as ``fit``'s ``perturb_weights`` hook.

    For each weight matrix or kernel ``w`` (parameters of two or more dimensions named
    ``weight``; biases stay), the perturbation is ``gamma · ‖w‖ · g / ‖g‖`` with ``g`` the
    gradient of the training loss (``loss``, or cross-entropy on the training images) with
    respect to ``w`` on this batch: one step up the loss, of a size relative to each layer's
    norm. That is what the paper's code computes with a copy of the model and one SGD step
    of ascent (its learning rate cancels in the rescaling). The batch's gradient is then
    taken at ``w`` plus the perturbation, and ``restore`` copies ``w`` back before the
    optimizer steps. While ``active()`` is false (the eps ramp), the weights stay.
    """

    def nothing() -> None:
        return None

    def perturb_weights(
        model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor, y: torch.Tensor
    ) -> Callable[[], None]:
        if not active():
            return nothing
        params = [p for name, p in model.named_parameters() if p.requires_grad and p.dim() > 1
                  and name.rsplit(".", 1)[-1] == "weight"]  # fmt: skip
        if loss is not None:
            value, _ = loss(model, x_clean, x_train, y)
        else:
            value = F.cross_entropy(model(x_train).float(), y)
        grads = torch.autograd.grad(value, params)
        saved = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(g * (gamma * p.norm() / (g.norm() + 1e-20)))  # on the device: no sync

        def restore() -> None:
            with torch.no_grad():
                for p, w in zip(params, saved, strict=True):
                    p.copy_(w)

        return restore

    return perturb_weights


def make_recipe(cfg: DefendConfig, *, steps_per_epoch: int = 1) -> Recipe:
    """The ``perturb`` / ``loss`` hooks of ``cfg.recipe`` with its resolved settings.

    Args:
        cfg: recipe, training eps (``eps + train_eps_margin``), alpha (``None``: the recipe
            default), steps, beta, ratio, eps_ramp, awp_gamma.
        steps_per_epoch: batches per epoch, to turn ``eps_ramp`` epochs into batches.

    Example:
        >>> from redblue.config import DefendConfig
        >>> make_recipe(DefendConfig(recipe="fgsm-rs", eps=0.3)).settings["alpha"]
        0.375
    """
    schedule = EpsSchedule(cfg.training_eps, ramp_steps=cfg.eps_ramp * steps_per_epoch)
    alpha = cfg.step_size
    settings: dict[str, Any] = {"recipe": cfg.recipe, "eps": cfg.training_eps, "eps_ramp": cfg.eps_ramp}
    loss: Loss | None = None
    if cfg.recipe == "fgsm":
        perturb = fgsm_mix_perturb(schedule, cfg.ratio)
        settings.update(ratio=cfg.ratio)
    elif cfg.recipe == "fgsm-rs":
        perturb = fgsm_rs_perturb(schedule, alpha)
        settings.update(alpha=alpha, steps=1, random_start="unclamped")
    elif cfg.recipe == "pgd":
        perturb = pgd_perturb(schedule, alpha, cfg.steps)
        settings.update(alpha=alpha, steps=cfg.steps, random_start=True)
    elif cfg.recipe == "mart":
        perturb = pgd_perturb(schedule, alpha, cfg.steps)
        loss = mart_loss(cfg.beta)
        settings.update(alpha=alpha, steps=cfg.steps, random_start=True, beta=cfg.beta)
    else:
        perturb = trades_perturb(schedule, alpha, cfg.steps)
        loss = trades_loss(cfg.beta)
        settings.update(alpha=alpha, steps=cfg.steps, beta=cfg.beta)
    perturb_weights = None
    if cfg.awp_gamma > 0:
        perturb_weights = awp_perturb_weights(cfg.awp_gamma, loss, lambda: schedule.ramped)
        settings.update(awp_gamma=cfg.awp_gamma)
    return Recipe(name=cfg.recipe, perturb=perturb, loss=loss, settings=settings, schedule=schedule,
                  perturb_weights=perturb_weights)  # fmt: skip


@dataclass
class GuardEvent:
    """What the guard did: the epoch where PGD accuracy collapsed and the epoch restored."""

    collapsed_epoch: int
    restored_epoch: int
    best_pgd_accuracy: float
    collapsed_pgd_accuracy: float

    def message(self) -> str:
        return (
            f"catastrophic overfitting at epoch {self.collapsed_epoch}: PGD accuracy on the guard "
            f"slice fell from {100 * self.best_pgd_accuracy:.1f}% to "
            f"{100 * self.collapsed_pgd_accuracy:.1f}%; restored epoch {self.restored_epoch}'s "
            "weights and stopped training"
        )


class OverfitGuard:
    """Catastrophic-overfitting guard (Wong et al. 2020), used as ``fit``'s ``epoch_end``.

    After every epoch it measures clean, FGSM and PGD accuracy on a fixed held-out slice
    (``x``, ``y``) at the target ``eps`` and keeps a copy of the weights of the epoch with
    the best PGD accuracy. When ``enabled`` and PGD accuracy falls more than ``drop`` below
    that best, it loads the best weights back into the model and asks ``fit`` to stop.

    Args:
        x: uint8 or float [0, 1] images, shape (N, C, H, W), on the training device.
        y: int64 labels, shape (N,).
        eps: L-inf radius of the monitoring attacks (the recipe's target eps).
        steps: PGD steps (step ``2.5·eps/steps``, random start).
        drop: a collapse is a fall of more than this (accuracy share, 0.2 = 20 pp).
        enabled: restore and stop on collapse; when False it only measures.
        precision: ``fp32`` or ``bf16`` (autocast for the monitoring attacks).

    Example:
        >>> guard = OverfitGuard(x_slice, y_slice, eps=0.3)  # doctest: +SKIP
        >>> fit(model, data, cfg, perturb=recipe.perturb, epoch_end=guard)  # doctest: +SKIP
    """

    def __init__(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        steps: int = 10,
        drop: float = 0.2,
        enabled: bool = True,
        precision: str = "fp32",
        batch_size: int = 500,
    ) -> None:
        self.x = to_float(x) if x.dtype == torch.uint8 else x
        self.y = y
        self.eps = eps
        self.steps = steps
        self.drop = drop
        self.enabled = enabled
        self.precision = precision
        self.batch_size = batch_size
        self.best_epoch = 0
        self.best_pgd_accuracy = -1.0
        self.best_state: dict[str, torch.Tensor] | None = None
        self.event: GuardEvent | None = None

    def measure(self, model: nn.Module) -> dict[str, float]:
        """Clean, FGSM and PGD accuracy of ``model`` on the slice."""
        correct = {"clean": 0, "fgsm": 0, "pgd": 0}
        device = self.x.device
        for start in range(0, self.x.shape[0], self.batch_size):
            xb = channels_last(self.x[start : start + self.batch_size])
            yb = self.y[start : start + self.batch_size]
            with autocast(device, self.precision):
                x_fgsm = fgsm(model, xb, yb, eps=self.eps)
                x_pgd = pgd(model, xb, yb, eps=self.eps, alpha=2.5 * self.eps / self.steps, steps=self.steps)
                with torch.no_grad(), eval_mode(model):
                    for key, images in (("clean", xb), ("fgsm", x_fgsm), ("pgd", x_pgd)):
                        correct[key] += int((model(images).argmax(1) == yb).sum().item())
        n = int(self.x.shape[0])
        return {key: value / n for key, value in correct.items()}

    def __call__(self, epoch: int, model: nn.Module) -> dict[str, Any]:
        acc = self.measure(model)
        entry: dict[str, Any] = {
            "guard_clean_accuracy": acc["clean"],
            "guard_fgsm_accuracy": acc["fgsm"],
            "guard_pgd_accuracy": acc["pgd"],
        }
        if acc["pgd"] > self.best_pgd_accuracy:
            self.best_pgd_accuracy = acc["pgd"]
            self.best_epoch = epoch
            self.best_state = copy.deepcopy(model.state_dict())
        elif self.enabled and self.best_state is not None and self.best_pgd_accuracy - acc["pgd"] > self.drop:
            model.load_state_dict(self.best_state)
            self.event = GuardEvent(epoch, self.best_epoch, self.best_pgd_accuracy, acc["pgd"])
            print(f"guard: {self.event.message()}", file=sys.stderr)
            entry.update(guard_restored_epoch=self.best_epoch, stop_training=True)
        return entry

    def summary(self) -> dict[str, Any]:
        """JSON-ready account of the guard's settings and what it did."""
        return {
            "enabled": self.enabled,
            "n": int(self.x.shape[0]),
            "eps": self.eps,
            "pgd_steps": self.steps,
            "drop": self.drop,
            "best_epoch": self.best_epoch,
            "best_pgd_accuracy": self.best_pgd_accuracy,
            "triggered": self.event is not None,
            "event": dataclasses.asdict(self.event) if self.event else None,
            "message": self.event.message() if self.event else None,
        }


def split_guard_slice(data: Dataset, size: int, seed: int) -> tuple[Dataset, torch.Tensor, torch.Tensor]:
    """(data without the slice, slice images, slice labels): ``size`` training images
    chosen with ``seed`` and held out from training for the guard."""
    n = int(data.x_train.shape[0])
    size = min(size, n // 2)
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).to(data.x_train.device)
    held, kept = order[:size], order[size:].sort().values
    train = data.replace(x_train=data.x_train[kept], y_train=data.y_train[kept])
    return train, data.x_train[held], data.y_train[held]



def train_defended(
    data: Dataset,
    train_cfg: TrainConfig,
    defend_cfg: DefendConfig,
    *,
    progress: bool = True,
    desc: str = "advtrain",
    init: nn.Module | None = None,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``train_cfg.model_name`` (or fine-tune a copy of ``init``, a trained model) and
    train it with ``defend_cfg``'s recipe and guard.

    Returns the trained model (the guard's restored epoch when it fired) and a JSON-ready
    account of the training: history (with clean / FGSM / PGD accuracy on the guard slice
    per epoch), timing, the recipe's resolved settings and the guard's summary.
    """
    device = resolve_device(train_cfg.device)
    data = data.to(device)
    train_data, x_slice, y_slice = split_guard_slice(data, defend_cfg.guard_size, train_cfg.seed)
    steps_per_epoch = math.ceil(train_data.x_train.shape[0] / train_cfg.batch_size)
    recipe = make_recipe(defend_cfg, steps_per_epoch=steps_per_epoch)
    if init is not None:
        model = copy.deepcopy(init).to(device)
    else:
        model = build_model(train_cfg.model_name, seed=train_cfg.seed)
    net = prepare_model(model, device, train_data.x_train[:2])  # `model` itself is returned
    guard = OverfitGuard(
        x_slice,
        y_slice,
        eps=defend_cfg.training_eps,
        steps=defend_cfg.guard_steps,
        drop=defend_cfg.guard_drop,
        enabled=defend_cfg.guarded,
        precision=training_precision(train_cfg.precision, net, train_data, train_cfg.batch_size).precision,
    )
    result = fit(
        net, train_data, train_cfg, perturb=recipe.perturb, loss=recipe.loss,
        perturb_weights=recipe.perturb_weights, epoch_end=guard,
        progress=progress, desc=desc,
    )
    notes = [guard.event.message()] if guard.event else []
    return model, {
        **result.summary(),
        "n_train": int(train_data.x_train.shape[0]),
        "recipe": recipe.settings,
        "guard": guard.summary(),
        "notes": notes,
    }
