"""Square Attack (L∞): score-based, gradient-free random search."""

from __future__ import annotations

import math

import torch
from torch import nn

from redblue.attacks.projection import AttackOutput, check_inputs, check_settings, pixels
from redblue.errors import ConfigError
from redblue.utils import eval_mode
from redblue.validate import check_float


def margin_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``z_y − max_{j≠y} z_j`` per example: negative once the example is misclassified."""
    z = logits.float()
    true = z.gather(1, y[:, None]).squeeze(1)
    other = z.scatter(1, y[:, None], -torch.inf).amax(dim=1)
    return true - other


def p_selection(p_init: float, it: int, steps: int) -> float:
    """Share of pixels a square covers at query ``it`` (the published piecewise schedule,
    written for 10,000 queries and rescaled to ``steps``)."""
    i = int(it / steps * 10000)
    for bound, divisor in ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32),
                           (4000, 64), (6000, 128), (8000, 256), (10000, 512)):  # fmt: skip
        if i <= bound:
            return p_init / divisor
    return p_init / 512


def square(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 5000,
    norm: str = "linf",
    restarts: int = 1,
    p_init: float = 0.8,
) -> torch.Tensor:
    """Square Attack, L∞ (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020).

    Random search over perturbations at the corners of the L∞ ball: start from vertical
    stripes of ±eps, then at each query redraw one random square window (side shrinking
    with the schedule :func:`p_selection`) to ±eps and keep the change if the margin loss
    ``z_y − max_{j≠y} z_j`` decreases. Uses only the model's scores, never its gradients,
    which is why the sanity checks use it to detect gradient masking. Only correctly
    classified examples are attacked, and each stops as soon as it is fooled.

    Threat model: black-box (scores), untargeted, L∞ ball of radius ``eps``, pixels in [0, 1].

    Args:
        model: maps pixels in [0, 1] to logits; eval mode during the attack, mode restored.
        x: clean images, float in [0, 1], shape (N, C, H, W).
        y: true int64 labels (N,).
        eps: L∞ radius in pixel units.
        steps: query budget per example and restart (AutoAttack: 5,000).
        norm: only ``"linf"``.
        restarts: independent runs on the examples not fooled yet.
        p_init: initial share of pixels changed per query (AutoAttack: 0.8).

    Returns:
        Adversarial images (N, C, H, W) in the L∞ ball and [0, 1].

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = square(model, x, y, eps=0.3, steps=20)
        >>> bool((x_adv - x).abs().amax() <= 0.3 + 1e-6)
        True
    """
    return square_run(model, x, y, eps=eps, steps=steps, norm=norm, restarts=restarts, p_init=p_init).x_adv


def square_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 5000,
    norm: str = "linf",
    restarts: int = 1,
    p_init: float = 0.8,
) -> AttackOutput:
    """:func:`square`, also returning the clean logits."""
    check_settings(eps=eps, norm=norm, steps=steps, restarts=restarts, dim=pixels(x))
    if norm != "linf":
        raise ConfigError(f"--norm {norm}: the Square attack is implemented for linf only")
    check_float("p_init", p_init, 0.0, 1.0, low_open=True)
    check_inputs(x, y)
    x = x.detach().float()
    best = x.clone()
    with eval_mode(model), torch.no_grad():
        clean_logits = model(x).float()
        margin_best = margin_loss(clean_logits, y)
        for _ in range(restarts):
            todo = (margin_best > 0).nonzero().squeeze(1)
            if todo.numel() == 0 or eps == 0:
                break
            x_run, margin_run = _square_single(model, x[todo], y[todo], eps, steps, p_init)
            better = margin_run < margin_best[todo]
            best[todo[better]] = x_run[better]
            margin_best[todo[better]] = margin_run[better]
    return AttackOutput(x_adv=best, clean_logits=clean_logits)


def _square_single(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int, p_init: float
) -> tuple[torch.Tensor, torch.Tensor]:
    n, c, h, w = x.shape
    signs = torch.randint(0, 2, (n, c, 1, w), device=x.device).float() * 2.0 - 1.0
    x_best = (x + eps * signs).clamp(0.0, 1.0)
    margin = margin_loss(model(x_best), y)
    rows_h = torch.arange(h, device=x.device).view(1, 1, h, 1)
    cols_w = torch.arange(w, device=x.device).view(1, 1, 1, w)
    for it in range(1, steps):
        idx = (margin > 0).nonzero().squeeze(1)
        if idx.numel() == 0:
            break
        x_cur, x_best_cur, y_cur = x[idx], x_best[idx], y[idx]
        deltas = x_best_cur - x_cur
        p = p_selection(p_init, it, steps)
        side = min(max(round(math.sqrt(p * h * w)), 1), h - 1)
        m = idx.numel()
        top = torch.randint(0, h - side, (m, 1, 1, 1), device=x.device)
        left = torch.randint(0, w - side, (m, 1, 1, 1), device=x.device)
        window = (rows_h >= top) & (rows_h < top + side) & (cols_w >= left) & (cols_w < left + side)
        value = eps * (torch.randint(0, 2, (m, c, 1, 1), device=x.device).float() * 2.0 - 1.0)
        # A window that would leave the image unchanged is redrawn with the other sign.
        candidate = (x_cur + value).clamp(0.0, 1.0)
        changed = (((candidate - x_best_cur).abs() >= 1e-7) & window).flatten(1).any(dim=1)
        value = torch.where(changed.view(-1, 1, 1, 1), value, -value)
        deltas = torch.where(window, value, deltas)
        x_new = (x_cur + deltas).clamp(0.0, 1.0)
        margin_new = margin_loss(model(x_new), y_cur)
        improved = margin_new < margin[idx]
        x_best[idx[improved]] = x_new[improved]
        margin[idx[improved]] = margin_new[improved]
    return x_best, margin
