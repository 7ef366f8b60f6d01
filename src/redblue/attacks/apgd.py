"""Auto-PGD (APGD-CE and APGD-T): the white-box part of AutoAttack, written on tensors."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from redblue.attacks.projection import (
    AttackOutput,
    LossFn,
    ce_loss,
    check_inputs,
    check_settings,
    input_gradient,
    per_example_norm,
    pixels,
    project,
    steepest_ascent,
)
from redblue.errors import ConfigError
from redblue.utils import eval_mode
from redblue.validate import check_int

RHO = 0.75
"""Oscillation threshold: halve the step when the loss rose in at most rho·k of the last k steps."""

RowLoss = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
"""``loss(logits, rows)``: per-example loss of the sub-batch ``rows`` (None: all rows)."""


def dlr_targeted_loss(logits: torch.Tensor, y: torch.Tensor, y_target: torch.Tensor) -> torch.Tensor:
    """Targeted Difference of Logits Ratio (Croce & Hein 2020), per example; attacks ascend it.

    ``-(z_y - z_t) / (z_π1 - (z_π3 + z_π4) / 2)`` with ``z_πi`` the i-th largest logit.
    """
    z = logits.float()
    z_sorted = z.sort(dim=1).values
    rows = torch.arange(z.shape[0], device=z.device)
    scale = z_sorted[:, -1] - 0.5 * (z_sorted[:, -3] + z_sorted[:, -4]) + 1e-12
    return -(z[rows, y] - z[rows, y_target]) / scale


def apgd_ce(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    restarts: int = 1,
    early_stop: bool = True,
) -> torch.Tensor:
    """APGD-CE: Auto-PGD on the cross-entropy loss (Croce & Hein, ICML 2020).

    PGD with momentum (0.75) and a step size that starts at ``2·eps`` and is halved, per
    example, at checkpoints ``p_j·steps`` (``p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j −
    p_{j−1} − 0.03, 0.06)``) whenever the loss rose in fewer than 75% of the steps since the
    last checkpoint, or when the previous checkpoint did not halve it and the best loss has
    not improved since; the iterate then restarts from the best point so far. Only
    examples the model classifies correctly are attacked; later restarts only attack
    examples not fooled yet.

    Threat model: white-box, untargeted, ``norm`` ball of radius ``eps``, pixels in [0, 1].

    Args:
        model: maps pixels in [0, 1] to logits; eval mode during the attack, mode restored.
        x: clean images, float in [0, 1], shape (N, C, H, W).
        y: true int64 labels (N,).
        eps: radius in pixel units.
        steps: iterations per restart (AutoAttack: 100).
        norm: ``"linf"`` (default) or ``"l2"``.
        restarts: random restarts (≥ 1).
        early_stop: stop iterating on an example as soon as it is fooled (same robust
            accuracy, less work).

    Returns:
        Adversarial images (N, C, H, W) in the eps-ball and [0, 1]: for each example a point
        that fools the model when one was found, else the highest-loss point.

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = apgd_ce(model, x, y, eps=0.3, steps=10)
        >>> bool((x_adv - x).abs().amax() <= 0.3 + 1e-6)
        True
    """
    return apgd_run(model, x, y, eps=eps, steps=steps, norm=norm, restarts=restarts, early_stop=early_stop).x_adv


def apgd_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    restarts: int = 1,
    n_targets: int = 9,
    early_stop: bool = True,
) -> torch.Tensor:
    """APGD-T: Auto-PGD on the targeted DLR loss (Croce & Hein, ICML 2020).

    Runs APGD (see :func:`apgd_ce`) once per target class, targeting in turn the classes
    with the 2nd, 3rd, ... ``(n_targets + 1)``-th largest clean logit, each time only on the
    examples not fooled yet. Success means any misclassification.

    Threat model: white-box, untargeted success through targeted losses, ``norm`` ball of
    radius ``eps``, pixels in [0, 1].

    Args:
        model, x, y, eps, steps, norm, restarts, early_stop: as in :func:`apgd_ce`.
        n_targets: how many target classes to try (AutoAttack: 9, all other MNIST classes).

    Returns:
        Adversarial images (N, C, H, W) in the eps-ball and [0, 1].

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = apgd_t(model, x, y, eps=0.3, steps=5, n_targets=2)
        >>> bool((x_adv - x).abs().amax() <= 0.3 + 1e-6)
        True
    """
    return apgd_run(
        model,
        x,
        y,
        eps=eps,
        steps=steps,
        norm=norm,
        restarts=restarts,
        loss="dlr-targeted",
        n_targets=n_targets,
        early_stop=early_stop,
    ).x_adv


def apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    norm: str = "linf",
    restarts: int = 1,
    loss: str = "ce",
    n_targets: int = 9,
    early_stop: bool = True,
) -> AttackOutput:
    """APGD-CE (``loss="ce"``) or APGD-T (``loss="dlr-targeted"``), with the clean logits."""
    check_settings(eps=eps, norm=norm, steps=steps, restarts=restarts, dim=pixels(x))
    check_inputs(x, y)
    if loss not in ("ce", "dlr-targeted"):
        raise ValueError(f"apgd loss {loss!r}: expected 'ce' or 'dlr-targeted'")
    x = x.detach().float()
    with eval_mode(model), torch.no_grad():
        clean_logits = model(x).float()
    num_classes = clean_logits.shape[1]
    targets = 1
    if loss == "dlr-targeted":
        check_int("n_targets", n_targets, 1)
        if num_classes < 4:
            raise ConfigError(
                f"--attack apgd-t: its targeted DLR loss needs at least 4 classes, the model has {num_classes}; "
                "use apgd-ce, pgd, fab-t or square"
            )
        targets = min(n_targets, num_classes - 1)  # "up to n_targets": every other class when there are fewer
    best = x.clone()
    best_loss = torch.full((x.shape[0],), -torch.inf, device=x.device)
    robust = clean_logits.argmax(1) == y
    order = clean_logits.sort(dim=1).indices
    with eval_mode(model):
        for target_rank in range(2, targets + 2):
            for _ in range(restarts):
                todo = robust.nonzero().squeeze(1)
                if todo.numel() == 0:
                    break
                y_target = order[todo, -target_rank] if loss == "dlr-targeted" else None
                loss_fn = _row_loss(y[todo], y_target)
                x_best_adv, fooled, x_best, loss_best = _apgd_single(
                    model, x[todo], y[todo], eps=eps, steps=steps, norm=norm,
                    loss_fn=loss_fn, early_stop=early_stop,
                )  # fmt: skip
                best[todo[fooled]] = x_best_adv[fooled]
                better = ~fooled & (loss_best > best_loss[todo])
                best[todo[better]] = x_best[better]
                best_loss[todo[better]] = loss_best[better]
                robust[todo[fooled]] = False
    return AttackOutput(x_adv=best, clean_logits=clean_logits)


def _row_loss(y: torch.Tensor, y_target: torch.Tensor | None) -> RowLoss:
    """Cross-entropy (``y_target`` None) or targeted DLR towards ``y_target``, by rows."""

    def loss_of(logits: torch.Tensor, rows: torch.Tensor | None) -> torch.Tensor:
        labels = y if rows is None else y[rows]
        if y_target is None:
            return ce_loss(logits, labels)
        return dlr_targeted_loss(logits, labels, y_target if rows is None else y_target[rows])

    return loss_of


def _bind(loss_fn: RowLoss, rows: torch.Tensor | None) -> LossFn:
    return lambda logits, _labels: loss_fn(logits, rows)


def _random_init(x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """AutoAttack's start: a random direction scaled to the sphere of radius ``eps``."""
    t = 2.0 * torch.rand_like(x) - 1.0 if norm == "linf" else torch.randn_like(x)
    length = per_example_norm(t, norm).clamp_min(1e-12).view(-1, 1, 1, 1)
    return (x + eps * t / length).clamp(0.0, 1.0)


def _apgd_single(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    norm: str,
    loss_fn: RowLoss,
    early_stop: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run: (best adversarial, fooled mask, highest-loss point, its loss)."""
    n = x.shape[0]
    n_iter_2 = max(int(0.22 * steps), 1)
    n_iter_min = max(int(0.06 * steps), 1)
    size_decr = max(int(0.03 * steps), 1)

    x_adv = _random_init(x, eps, norm)
    grad, loss_now, logits = input_gradient(model, x_adv, y, _bind(loss_fn, None))
    fooled = logits.argmax(1) != y
    x_best_adv = x_adv.clone()
    x_best = x_adv.clone()
    grad_best = grad.clone()
    loss_best = loss_now.clone()
    loss_steps = torch.zeros(steps, n, device=x.device)
    step_size = torch.full((n,), 2.0 * eps, device=x.device)
    x_adv_old = x_adv.clone()
    k = n_iter_2
    counter = 0
    loss_best_last_check = loss_best.clone()
    reduced_last_check = torch.ones(n, dtype=torch.bool, device=x.device)
    view = (-1, 1, 1, 1)

    for i in range(steps):
        rows = (~fooled).nonzero().squeeze(1) if early_stop else None
        if rows is not None and rows.numel() == 0:
            break
        sel = slice(None) if rows is None else rows
        xa, xo, xc = x_adv[sel], x_adv_old[sel], x[sel]
        momentum = 0.75 if i > 0 else 1.0
        direction = steepest_ascent(grad[sel], norm)
        z = project(xa + step_size[sel].view(view) * direction, xc, eps, norm)
        z = project(xa + (z - xa) * momentum + (xa - xo) * (1.0 - momentum), xc, eps, norm)
        x_adv_old[sel] = xa
        x_adv[sel] = z
        g, loss_z, logits_z = input_gradient(model, z, y[sel], _bind(loss_fn, rows))
        grad[sel] = g
        hit = logits_z.argmax(1) != y[sel]
        if rows is None:
            x_best_adv[hit] = z[hit]
            fooled |= hit
            loss_steps[i] = loss_z
        else:
            x_best_adv[rows[hit]] = z[hit]
            fooled[rows[hit]] = True
            loss_steps[i] = loss_steps[i - 1] if i > 0 else loss_best
            loss_steps[i, rows] = loss_z
        improved_rows = (loss_z > loss_best[sel]).nonzero().squeeze(1)
        idx = improved_rows if rows is None else rows[improved_rows]
        x_best[idx] = z[improved_rows]
        grad_best[idx] = g[improved_rows]
        loss_best[idx] = loss_z[improved_rows]

        counter += 1
        if counter == k:
            rises = torch.zeros(n, device=x.device)
            for back in range(k):
                rises += (loss_steps[i - back] > loss_steps[i - back - 1]).float()
            oscillating = rises <= k * RHO
            stalled = ~reduced_last_check & (loss_best_last_check >= loss_best)
            reduce = oscillating | stalled
            reduced_last_check = reduce
            loss_best_last_check = loss_best.clone()
            if reduce.any():
                step_size[reduce] /= 2.0
                x_adv[reduce] = x_best[reduce]
                grad[reduce] = grad_best[reduce]
            k = max(k - size_decr, n_iter_min)
            counter = 0
    return x_best_adv, fooled, x_best, loss_best


def checkpoints(steps: int) -> list[int]:
    """The iterations at which APGD may halve its step (for the documentation and tests)."""
    n_iter_2 = max(int(0.22 * steps), 1)
    n_iter_min = max(int(0.06 * steps), 1)
    size_decr = max(int(0.03 * steps), 1)
    points, k, at = [], n_iter_2, 0
    while at + k <= steps:
        at += k
        points.append(at)
        k = max(k - size_decr, n_iter_min)
    return points
