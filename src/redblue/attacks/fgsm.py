"""Fast Gradient Sign Method (FGSM)."""

from __future__ import annotations

import torch
from torch import nn

from redblue.attacks.projection import (
    AttackOutput,
    check_inputs,
    check_settings,
    input_gradient,
    pixels,
    project,
    steepest_ascent,
)
from redblue.utils import eval_mode


def fgsm(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
) -> torch.Tensor:
    """Fast Gradient Sign Method (Goodfellow, Shlens & Szegedy, ICLR 2015).

    One step of size ``eps`` along the sign (L∞) or the normalised direction (L2) of the
    gradient of the cross-entropy loss with respect to the input.

    Threat model: white-box, ``norm`` ball of radius ``eps`` around ``x``, pixels in [0, 1];
    untargeted (raise the loss of ``y``) or targeted (lower the loss of target ``y``).

    Args:
        model: maps pixels in [0, 1] to logits. Put in eval mode during the attack; its mode
            is restored afterwards.
        x: clean images, float in [0, 1], shape (N, C, H, W), on the model's device.
        y: int64 labels, shape (N,): the true labels, or the target labels when ``targeted``.
        eps: radius of the perturbation in pixel units (default in the CLI: 0.25).
        norm: ``"linf"`` (default) or ``"l2"``.
        targeted: step towards ``y`` instead of away from it.

    Returns:
        Adversarial images (N, C, H, W), fp32, inside the eps-ball and [0, 1], on ``x.device``.

    Example:
        >>> import torch
        >>> from redblue.models import build_model
        >>> model = build_model("cnn")
        >>> x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 3])
        >>> x_adv = fgsm(model, x, y, eps=0.25)
        >>> bool((x_adv - x).abs().amax() <= 0.25 + 1e-6 and 0 <= x_adv.min() <= x_adv.max() <= 1)
        True
    """
    return fgsm_run(model, x, y, eps=eps, norm=norm, targeted=targeted).x_adv


def fgsm_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    targeted: bool = False,
) -> AttackOutput:
    """:func:`fgsm`, also returning the logits of its forward pass on the clean images."""
    check_settings(eps=eps, norm=norm, dim=pixels(x))
    check_inputs(x, y)
    x = x.detach().float()
    with eval_mode(model):
        grad, _, logits = input_gradient(model, x, y)
    direction = steepest_ascent(grad, norm)
    step = -eps * direction if targeted else eps * direction
    return AttackOutput(x_adv=project(x + step, x, eps, norm), clean_logits=logits)
