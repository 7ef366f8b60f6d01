"""Threat-model geometry shared by every attack: norms, eps-ball projection, random starts.

All functions work per example on image batches of shape (N, C, H, W), on the input's
device, in fp32, and never touch numpy. Pixels live in [0, 1].
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from redblue.errors import ConfigError
from redblue.validate import check_float, check_int

NORMS = ("linf", "l2")
_TINY = 1e-12


def check_norm(norm: str) -> None:
    if norm not in NORMS:
        raise ConfigError(f"--norm {norm!r}: expected one of {', '.join(NORMS)}")


def per_example_norm(delta: torch.Tensor, norm: str) -> torch.Tensor:
    """The ``norm`` (``"linf"`` or ``"l2"``) of each example of ``delta``: shape (N,)."""
    check_norm(norm)
    flat = delta.reshape(delta.shape[0], -1).float()
    if norm == "linf":
        return flat.abs().amax(dim=1) if flat.shape[1] else flat.new_zeros(flat.shape[0])
    l2: torch.Tensor = torch.linalg.vector_norm(flat, ord=2, dim=1)
    return l2


def _view(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.view(-1, *([1] * (like.dim() - 1)))


def project(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float | torch.Tensor, norm: str
) -> torch.Tensor:
    """Project ``x_adv`` onto the ``norm`` ball of radius ``eps`` around ``x``, then into [0, 1].

    ``eps`` may be a number or a per-example tensor of shape (N,).
    """
    check_norm(norm)
    delta = x_adv - x
    if norm == "linf":
        if isinstance(eps, torch.Tensor):
            e = _view(eps.to(delta), delta)
            delta = torch.maximum(torch.minimum(delta, e), -e)
        else:
            delta = delta.clamp(-eps, eps)
    else:
        radius = _view(eps.to(delta), delta) if isinstance(eps, torch.Tensor) else eps
        length = _view(per_example_norm(delta, "l2"), delta)
        delta = delta * torch.clamp(radius / (length + _TINY), max=1.0)
    return (x + delta).clamp_(0.0, 1.0)


def random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A uniformly random point of the ``norm`` eps-ball around ``x``, clamped to [0, 1].

    L∞: each pixel uniform in [-eps, eps] (Madry et al. 2018). L2: uniform in the ball
    (Gaussian direction, radius ``eps * u^(1/d)``).
    """
    check_norm(norm)
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        delta = (2.0 * noise - 1.0) * eps
    else:
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        direction = direction / _view(per_example_norm(direction, "l2") + _TINY, x)
        d = x[0].numel()
        u = torch.rand(x.shape[0], generator=generator, device=x.device, dtype=torch.float32)
        delta = direction * _view(eps * u.pow(1.0 / d), x)
    return (x + delta).clamp_(0.0, 1.0)


def steepest_ascent(grad: torch.Tensor, norm: str) -> torch.Tensor:
    """The unit-norm step that maximises a linear function with gradient ``grad``.

    L∞: ``sign(grad)``; L2: ``grad / ‖grad‖₂`` (zero where the gradient is zero).
    """
    check_norm(norm)
    if norm == "linf":
        return grad.sign()
    return grad / _view(per_example_norm(grad, "l2") + _TINY, grad)


def threat_model_violation(
    x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str, tol: float = 1e-6
) -> str | None:
    """None when every ``x_adv`` is in [0, 1] and within ``eps + tol`` of ``x``; else why not."""
    if x_adv.shape != x.shape:
        return f"adversarial batch of shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}"
    if not torch.isfinite(x_adv).all():
        return "adversarial images contain NaN or infinite pixels"
    low, high = float(x_adv.min()), float(x_adv.max())
    if low < 0.0 or high > 1.0:
        return f"adversarial pixels outside [0, 1] (min {low:.6g}, max {high:.6g})"
    largest = float(per_example_norm(x_adv.float() - x.float(), norm).max()) if x.shape[0] else 0.0
    if largest > eps + tol:
        return f"{norm} perturbation {largest:.6g} exceeds eps {eps:g} (+{tol:g})"
    return None


# --------------------------------------------------------------------------- losses and gradients

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""``loss(logits, y) -> per-example loss`` (shape (N,)); attacks ascend its sum."""


def ce_loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-example cross-entropy, computed in fp32."""
    return F.cross_entropy(logits.float(), y, reduction="none")


def input_gradient(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    loss_fn: LossFn = ce_loss,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(∇ₓ Σ loss, per-example loss, logits) at ``x``; the gradient is fp32.

    Gradients flow only to the input (no weight gradients are accumulated), and the
    forward pass respects an enclosing ``torch.autocast``.
    """
    with torch.enable_grad():
        x_req = x.detach().float().requires_grad_(True)
        logits = model(x_req)
        losses = loss_fn(logits, y)
        (grad,) = torch.autograd.grad(losses.sum(), [x_req])
    grad = grad.float()
    if 0 in grad.stride():  # an expanded gradient (a model that ignores its input): give it storage
        grad = grad.clone()
    return grad, losses.detach(), logits.detach().float()


def misclassified(logits: torch.Tensor, y: torch.Tensor, targeted: bool) -> torch.Tensor:
    """Mask of examples the attack achieved: not ``y`` (untargeted), or ``y`` (targeted)."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


# --------------------------------------------------------------------------- shared plumbing


@dataclass
class AttackOutput:
    """What an attack run gives the evaluator besides the images.

    ``clean_logits`` are the logits of the attack's own first forward pass on the clean
    images (None when the attack never evaluated the clean images, e.g. after a random
    start), so the evaluator need not run a second clean forward pass.
    """

    x_adv: torch.Tensor
    clean_logits: torch.Tensor | None = None


def check_inputs(x: torch.Tensor, y: torch.Tensor) -> None:
    """Images float (N, C, H, W) and int64 labels (N,) on the same device."""
    if x.dim() != 4 or not x.is_floating_point():
        raise ConfigError(
            f"attack input: expected float images (N, C, H, W), got {x.dtype} {tuple(x.shape)}"
        )
    if y.dim() != 1 or y.shape[0] != x.shape[0] or y.dtype != torch.int64:
        raise ConfigError(
            f"attack labels: expected int64 ({x.shape[0]},), got {y.dtype} {tuple(y.shape)}"
        )
    if y.device != x.device:
        raise ConfigError(
            f"attack labels on {y.device}, images on {x.device}: expected one device"
        )


def pixels(x: torch.Tensor) -> int:
    """Values per image (C*H*W) of a batch ``x``, also when it is empty."""
    return math.prod(x.shape[1:])


def check_settings(
    *,
    eps: float,
    norm: str,
    alpha: float | None = None,
    steps: int | None = None,
    restarts: int | None = None,
    dim: int | None = None,
) -> None:
    """ConfigError naming the option when a setting is out of range.

    ``dim``: pixels per image (C*H*W); an L2 eps above ``sqrt(dim)``, the diameter of
    [0, 1]^dim, is out of range (28.0 for MNIST's 784 pixels)."""
    check_float("eps", eps, 0.0, 1.0 if norm == "linf" else (None if dim is None else math.sqrt(dim)))
    check_norm(norm)
    if alpha is not None:
        check_float("alpha", alpha, 0.0, None, low_open=True)
    if steps is not None:
        check_int("steps", steps, 1)
    if restarts is not None:
        check_int("restarts", restarts, 1)
