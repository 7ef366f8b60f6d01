"""Projected Gradient Descent (PGD), L∞ and L2, with restarts and early stopping."""

from __future__ import annotations

import torch
from torch import nn

from redblue.attacks.projection import (
    AttackOutput,
    LossFn,
    ce_loss,
    check_inputs,
    check_settings,
    input_gradient,
    misclassified,
    pixels,
    project,
    random_start,
    steepest_ascent,
)
from redblue.utils import eval_mode


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    early_stop: bool = False,
) -> torch.Tensor:
    """Projected Gradient Descent (Madry et al., ICLR 2018).

    ``steps`` steps of size ``alpha`` along the sign (L∞) or normalised (L2) gradient of the
    cross-entropy loss, each followed by projection onto the eps-ball and [0, 1], from a
    uniformly random start in the ball (or from ``x``). With ``restarts > 1`` each example
    keeps its worst case: the first restart that fools the model, else the highest loss;
    later restarts only attack the examples not fooled yet.

    Threat model: white-box, ``norm`` ball of radius ``eps``, pixels in [0, 1]; untargeted or
    targeted (``y`` are then the target labels).

    Args:
        model: maps pixels in [0, 1] to logits; eval mode during the attack, mode restored.
        x: clean images, float in [0, 1], shape (N, C, H, W).
        y: int64 labels (N,): true labels, or target labels when ``targeted``.
        eps: radius in pixel units (e.g. 0.3 for L∞ on MNIST).
        alpha: step size in pixel units (e.g. 0.01).
        steps: iterations per restart (≥ 1).
        norm: ``"linf"`` (default) or ``"l2"``.
        restarts: independent runs (≥ 1); per-example worst case is kept.
        random_start: start from a uniform point of the ball (default) or from ``x``.
        targeted: descend the loss of target ``y`` instead of ascending that of true ``y``.
        early_stop: freeze each example at the first iterate that fools the model (the
            evaluator's setting: same worst case, fewer gradient computations). Training
            leaves it off.

    Works inside ``torch.autocast``: the input gradient and the projection stay fp32.

    Returns:
        Adversarial images (N, C, H, W), fp32, inside the eps-ball and [0, 1], on ``x.device``.

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = pgd(model, x, y, eps=0.3, alpha=0.01, steps=5)
        >>> bool((x_adv - x).abs().amax() <= 0.3 + 1e-6)
        True
    """
    return pgd_run(
        model,
        x,
        y,
        eps=eps,
        alpha=alpha,
        steps=steps,
        norm=norm,
        restarts=restarts,
        random_start=random_start,
        targeted=targeted,
        early_stop=early_stop,
    ).x_adv


def pgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    restarts: int = 1,
    random_start: bool = True,
    targeted: bool = False,
    early_stop: bool = False,
    loss_fn: LossFn = ce_loss,
) -> AttackOutput:
    """:func:`pgd`, also returning the clean logits when its first forward pass saw ``x``."""
    check_settings(eps=eps, norm=norm, alpha=alpha, steps=steps, restarts=restarts, dim=pixels(x))
    check_inputs(x, y)
    x = x.detach().float()
    n = x.shape[0]
    best = x.clone()
    best_loss = torch.full((n,), -torch.inf, device=x.device)
    done = torch.zeros(n, dtype=torch.bool, device=x.device)
    clean_logits: torch.Tensor | None = None
    sign = -1.0 if targeted else 1.0
    start = random_start
    with eval_mode(model):
        for restart in range(restarts):
            todo = (~done).nonzero().squeeze(1)
            if todo.numel() == 0:
                break
            x_r, y_r = x[todo], y[todo]
            x_cur = _start(x_r, eps, norm) if start else x_r.clone()
            live = torch.arange(x_r.shape[0], device=x.device)  # rows of x_r still iterating
            for step in range(steps):
                x_live = x_cur[live]
                grad, _, logits = input_gradient(model, x_live, y_r[live], loss_fn)
                if restart == 0 and step == 0 and not start:
                    clean_logits = logits
                if early_stop:
                    going = ~misclassified(logits, y_r[live], targeted)
                    live, x_live, grad = live[going], x_live[going], grad[going]
                    if live.numel() == 0:
                        break
                stepped = x_live + (sign * alpha) * steepest_ascent(grad, norm)
                x_cur[live] = project(stepped, x_r[live], eps, norm)
            if restarts == 1:
                best[todo] = x_cur
                break
            with torch.no_grad():
                logits = model(x_cur).float()
            fooled = misclassified(logits, y_r, targeted)
            loss = loss_fn(logits, y_r)
            if targeted:
                loss = -loss
            better = fooled | (loss > best_loss[todo])
            best[todo[better]] = x_cur[better]
            best_loss[todo] = torch.maximum(best_loss[todo], loss)
            done[todo[fooled]] = True
    return AttackOutput(x_adv=best, clean_logits=clean_logits)


def _start(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    return random_start(x, eps, norm)
