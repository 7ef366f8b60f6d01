"""FAB-T: the targeted Fast Adaptive Boundary attack (Croce & Hein, ICML 2020), on tensors.

FAB looks for the smallest perturbation that crosses the decision boundary. Each step
linearises the boundary between the true class and a target class at the current point,
projects both the current point and the original image onto that hyperplane (within the
[0, 1] box, minimising the L∞ or L2 distance: :func:`project_on_hyperplane`), and moves to a
convex combination of the two projections, extrapolated by ``eta`` and biased towards the
original image by at most ``alpha_max``. When the point is misclassified, it is kept if it is
the closest so far and pulled back towards the original image by ``beta``. An example counts
as broken only when its closest misclassified point lies in the eps-ball.

The targeted version used by AutoAttack's standard protocol targets, in turn, the classes
with the 2nd, 3rd, ... ``(n_targets + 1)``-th largest clean logit, each time on the
examples still robust; its defaults are AutoAttack's: 100 steps, ``alpha_max`` 0.1,
``eta`` 1.05, ``beta`` 0.9, one restart (later restarts start at a random point).
"""

from __future__ import annotations

import torch
from torch import nn

from redblue.attacks.projection import AttackOutput, check_inputs, check_settings, per_example_norm, pixels, project
from redblue.errors import ConfigError
from redblue.utils import eval_mode
from redblue.validate import check_float, check_int

_TINY = 1e-12


def _solve_capped_sum(a: torch.Tensor, r: torch.Tensor, need: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the smallest ``t >= 0`` with ``sum_i a_i * min(t, r_i) = need`` (``a, r >= 0``),
    exactly (the left side is piecewise linear in ``t``; its breakpoints are the sorted ``r``).
    Returns ``(t, feasible)``; where even ``t = max r`` falls short, ``t = max r``."""
    r_sorted, order = r.sort(dim=1)
    a_sorted = a.gather(1, order)
    below = torch.cumsum(a_sorted * r_sorted, dim=1) - a_sorted * r_sorted  # sum over r_i < r_(k)
    tail = torch.flip(torch.cumsum(torch.flip(a_sorted, [1]), dim=1), [1])  # sum of a over r_i >= r_(k)
    at_break = below + r_sorted * tail  # the left side at t = r_(k): non-decreasing in k
    k = torch.searchsorted(at_break.contiguous(), need.unsqueeze(1).contiguous()).squeeze(1)
    feasible = k < r.shape[1]
    k = k.clamp(max=r.shape[1] - 1)
    below_k, tail_k = below.gather(1, k[:, None]).squeeze(1), tail.gather(1, k[:, None]).squeeze(1)
    t = (need - below_k) / tail_k.clamp_min(_TINY)
    low = torch.where(k > 0, r_sorted.gather(1, (k - 1).clamp_min(0)[:, None]).squeeze(1), torch.zeros_like(t))
    t = torch.minimum(t.clamp_min(0.0).maximum(low), r_sorted.gather(1, k[:, None]).squeeze(1))
    t = torch.where(feasible, t, r_sorted[:, -1])
    return t, feasible


def project_on_hyperplane(p: torch.Tensor, w: torch.Tensor, b: torch.Tensor, norm: str) -> torch.Tensor:
    """Per row of ``p`` (N, D): the step ``d`` of least ``norm`` with ``w·(p + d) = b`` and
    ``p + d`` in [0, 1]^D. Where the box makes the hyperplane unreachable, the step that gets
    closest to it (every coordinate pushed to its bound in the useful direction)."""
    scale = w.abs().amax(dim=1, keepdim=True).clamp_min(_TINY)  # the same hyperplane, w scaled to max |w| = 1:
    w, b = w / scale, b / scale.squeeze(1)  # no underflow in w**2 (L2) for tiny gradients
    c = b - (w * p).sum(dim=1)  # the change of w·x that is needed
    s = torch.sign(c)[:, None]
    direction = s * torch.sign(w)  # +1: this pixel should grow, -1: shrink
    room = torch.where(direction > 0, 1.0 - p, p).clamp_min(0.0)
    aw = w.abs()
    if norm == "linf":  # d_i = direction_i * min(t, room_i): the L∞ norm is t
        t, _ = _solve_capped_sum(aw, room, c.abs())
        step = torch.minimum(t[:, None], room)
    else:  # d_i = clip(mu * w_i) to the box (KKT): w_i d_i = min(mu w_i^2, |w_i| room_i)
        cap = torch.where(aw > 0, room / aw.clamp_min(_TINY), torch.zeros_like(room))
        mu, _ = _solve_capped_sum(aw * aw, cap, c.abs())
        step = torch.minimum(mu[:, None] * aw, room)
    return direction * step


def _margin_and_grad(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, target: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z_y - z_target, its gradient w.r.t. x) at ``x``."""
    with torch.enable_grad():
        x_req = x.detach().requires_grad_(True)
        logits = model(x_req).float()
        rows = torch.arange(x.shape[0], device=x.device)
        margin = logits[rows, y] - logits[rows, target]
        (grad,) = torch.autograd.grad(margin.sum(), [x_req])
    return margin.detach(), grad.detach().float()


def _fab_single(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    *,
    eps: float,
    norm: str,
    steps: int,
    alpha_max: float,
    eta: float,
    beta: float,
    start: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One FAB-T run: (closest misclassified point found, or ``x``; its distance, inf if none)."""
    n = x.shape[0]
    flat_x = x.reshape(n, -1)
    current = x.clone() if start is None else start.clone()
    best = x.clone()
    best_dist = torch.full((n,), float("inf"), device=x.device)
    for _ in range(steps):
        margin, grad = _margin_and_grad(model, current, y, target)
        w = grad.reshape(n, -1)
        b = (w * current.reshape(n, -1)).sum(dim=1) - margin  # the linearised boundary: w·z = b
        steps_both = project_on_hyperplane(torch.cat([current.reshape(n, -1), flat_x]), torch.cat([w, w]),
                                           torch.cat([b, b]), norm)  # fmt: skip
        d_current, d_orig = steps_both[:n], steps_both[n:]
        a_current = per_example_norm(d_current, norm).clamp_min(1e-8)
        a_orig = per_example_norm(d_orig, norm).clamp_min(1e-8)
        alpha = (a_current / (a_current + a_orig)).clamp(0.0, alpha_max)[:, None]
        moved = (1 - alpha) * (current.reshape(n, -1) + eta * d_current) + alpha * (flat_x + eta * d_orig)
        current = moved.clamp(0.0, 1.0).reshape(x.shape)
        with torch.no_grad():
            fooled = model(current).argmax(1) != y
        if fooled.any():  # keep the closest misclassified point, then pull back towards x
            dist = per_example_norm(current - x, norm)
            better = fooled & (dist < best_dist)
            best[better] = current[better]
            best_dist = torch.where(better, dist, best_dist)
            current = torch.where(fooled[:, None, None, None], x + beta * (current - x), current)
    return best, best_dist


def fab_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    n_targets: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
) -> AttackOutput:
    """:func:`fab_t`, also returning the clean logits of its first forward pass."""
    check_inputs(x, y)
    check_settings(eps=eps, norm=norm, steps=steps, restarts=restarts, dim=pixels(x))
    check_float("alpha_max", alpha_max, 0.0, 1.0)
    check_float("eta", eta, 1.0, 10.0)
    check_float("beta", beta, 0.0, 1.0)
    x = x.detach().float()
    with eval_mode(model), torch.no_grad():
        clean_logits = model(x).float()
    num_classes = clean_logits.shape[1]
    if num_classes < 2:
        raise ConfigError(f"fab-t: the model has {num_classes} output, expected at least 2 classes")
    check_int("n_targets", n_targets, 1)
    n_targets = min(n_targets, num_classes - 1)  # "up to n_targets": every other class when there are fewer
    generator = torch.Generator(device=x.device).manual_seed(seed)
    x_adv = x.clone()
    robust = clean_logits.argmax(1) == y
    order = clean_logits.sort(dim=1).indices
    with eval_mode(model):
        for rank in range(2, n_targets + 2):
            for restart in range(restarts):
                rows = robust.nonzero().squeeze(1)
                if rows.numel() == 0:
                    break
                xs, ys, targets = x[rows], y[rows], order[rows, -rank]
                start = None
                if restart > 0:  # later restarts start at half the eps-ball's radius (as AutoAttack)
                    if norm == "linf":
                        noise = torch.rand(xs.shape, generator=generator, device=x.device) * 2 - 1
                    else:
                        noise = torch.randn(xs.shape, generator=generator, device=x.device)
                    noise = noise / per_example_norm(noise, norm).clamp_min(_TINY)[:, None, None, None]
                    start = (xs + 0.5 * eps * noise).clamp(0.0, 1.0)
                found, dist = _fab_single(model, xs, ys, targets, eps=eps, norm=norm, steps=steps,
                                          alpha_max=alpha_max, eta=eta, beta=beta, start=start)  # fmt: skip
                broken = dist <= eps * (1 + 1e-6)
                if broken.any():
                    x_adv[rows[broken]] = project(found[broken], xs[broken], eps, norm)
                    robust[rows[broken]] = False
    return AttackOutput(x_adv=x_adv, clean_logits=clean_logits)


def fab_t(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 100,
    restarts: int = 1,
    n_targets: int = 9,
    alpha_max: float = 0.1,
    eta: float = 1.05,
    beta: float = 0.9,
    seed: int = 0,
) -> torch.Tensor:
    """FAB-T (Croce & Hein, ICML 2020), with AutoAttack's settings as defaults.

    Threat model: white-box, untargeted success (any misclassification) reached through
    targeted boundary projections, ``norm`` ("linf" or "l2") ball of radius ``eps``, pixels in
    [0, 1]. An example keeps its clean image unless a misclassified point within ``eps`` was
    found.

    Args:
        model: classifier on [0, 1] images (normalisation inside the model), put in eval mode.
        x, y: float images (N, C, H, W) in [0, 1] and int64 labels (N,).
        eps: radius of the threat model.
        norm: "linf" or "l2".
        steps: iterations per target class and restart (AutoAttack: 100).
        restarts: runs per target class; the first starts at the clean image.
        n_targets: target classes tried, by decreasing clean logit (AutoAttack: 9).
        alpha_max, eta, beta: the step's bias towards the original image, its extrapolation,
            and the pull-back after a success (AutoAttack: 0.1, 1.05, 0.9).
        seed: seeds the random starts of later restarts.

    Returns:
        Adversarial images (N, C, H, W) in the eps-ball and [0, 1].

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = fab_t(model, x, y, eps=0.3, steps=5, n_targets=2)
        >>> bool((x_adv - x).abs().amax() <= 0.3 + 1e-6)
        True
    """
    return fab_run(model, x, y, eps=eps, norm=norm, steps=steps, restarts=restarts, n_targets=n_targets,
                   alpha_max=alpha_max, eta=eta, beta=beta, seed=seed).x_adv  # fmt: skip
