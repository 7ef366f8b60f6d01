"""Removing a backdoor from the model alone, with clean images and no knowledge of the poison.

* :func:`unlearn` — Neural Cleanse's unlearning (Wang et al., IEEE S&P 2019, §6.3):
  fine-tune on clean images of which a share (20% in the paper) is stamped with the reversed
  trigger and *kept at its true label*, so the model learns that the trigger means nothing.
* :func:`fine_prune` — fine-pruning (Liu et al., "Fine-Pruning: Defending Against Backdooring
  Attacks on Deep Neural Networks", RAID 2018): the channels of the last convolution that
  stay dormant on clean images (lowest mean activation) are pruned one by one while the clean
  validation accuracy stays within ``max_drop`` of the start; then the model is fine-tuned
  on clean images with those channels held at zero. Pruning is baked into the weights (the
  channel's filter and bias, and those of a BatchNorm right after it, set to 0), so the saved
  model needs no hook.

Both work on a deep copy; the model given is not changed.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from redblue.config import TrainConfig
from redblue.data import Dataset, to_float
from redblue.defenses.neural_cleanse import stamp
from redblue.errors import ConfigError
from redblue.train import accuracy, fit
from redblue.utils import eval_mode
from redblue.validate import check_float


@dataclass
class RepairResult:
    """A repaired copy of the model and what was done to it."""

    model: nn.Module
    method: str
    details: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0


def _clean_set(x: torch.Tensor, y: torch.Tensor, x_val: torch.Tensor, y_val: torch.Tensor) -> Dataset:
    return Dataset(name="repair", x_train=x, y_train=y, x_test=x_val, y_test=y_val, source="held-out clean images")


def trigger_weights(groups: torch.Tensor | None) -> torch.Tensor | None:
    """Each trigger's weight in the draw of :func:`unlearn`, so that every class (``groups``:
    the class of each trigger) is drawn as often, whatever its number of triggers; None (a
    uniform draw) without groups or with one class.

    Example:
        >>> trigger_weights(torch.tensor([3, 7, 7, 7])).tolist()
        [1.0, 0.3333333333333333, 0.3333333333333333, 0.3333333333333333]
    """
    if groups is None or groups.unique().numel() < 2:
        return None
    return 1.0 / (groups[:, None] == groups[None, :]).sum(1).double().cpu()


def unlearn(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    masks: torch.Tensor,
    patterns: torch.Tensor,
    train_cfg: TrainConfig,
    *,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    share: float = 0.2,
    groups: torch.Tensor | None = None,
    progress: bool = False,
) -> RepairResult:
    """Fine-tune a copy of ``model`` on clean ``x``, ``y`` with a share of every batch stamped
    with one of the reversed triggers (``masks`` (T, H, W), ``patterns`` (T, C, H, W), in
    [0, 1]) and kept at its true label. ``groups`` (T,): the class of each trigger; a stamped
    image gets a class drawn uniformly and then one of its triggers, so a class with many
    triggers does not crowd out one with few (without it, or with one class, a trigger is
    drawn uniformly)."""
    check_float("unlearn_share", share, 0.0, 1.0, low_open=True)
    if masks.shape[0] == 0:
        raise ConfigError("unlearning needs at least one reversed trigger")
    generator = torch.Generator(device="cpu").manual_seed(train_cfg.seed)
    masks, patterns = masks.to(x.device), patterns.to(x.device)
    weights = trigger_weights(groups)

    def perturb(_: nn.Module, xb: torch.Tensor, yb: torch.Tensor) -> torch.Tensor:
        xb = to_float(xb)
        chosen = torch.rand(xb.shape[0], generator=generator).to(xb.device) < share
        which = (torch.randint(masks.shape[0], (xb.shape[0],), generator=generator) if weights is None else
                 torch.multinomial(weights, xb.shape[0], replacement=True, generator=generator)).to(xb.device)  # fmt: skip
        stamped = stamp(xb, masks[which][:, None], patterns[which])
        return torch.where(chosen[:, None, None, None], stamped, xb)

    tuned = copy.deepcopy(model)
    summary = fit(tuned, _clean_set(x, y, x_val, y_val), train_cfg, perturb=perturb, progress=progress, desc="unlearn")
    return RepairResult(tuned, "unlearn", {"share": share, "triggers": int(masks.shape[0]), "epochs": train_cfg.epochs,
                                           "lr": train_cfg.lr, "images": int(x.shape[0])}, summary.seconds)  # fmt: skip


def last_conv(model: nn.Module) -> tuple[nn.Conv2d, nn.BatchNorm2d | None]:
    """The last ``Conv2d`` of ``model`` and the BatchNorm registered right after it, in
    registration order (the order of ``model.modules()``, which is the execution order of a
    plain CNN; in a residual network the skip path would still carry a pruned channel)."""
    modules = list(model.modules())
    convs = [(i, m) for i, m in enumerate(modules) if isinstance(m, nn.Conv2d)]
    if not convs:
        raise ConfigError("fine-pruning needs a model with a convolution (nn.Conv2d); this one has none")
    index, conv = convs[-1]
    after = modules[index + 1] if index + 1 < len(modules) else None
    if isinstance(after, nn.BatchNorm2d) and after.num_features == conv.out_channels:
        return conv, after
    return conv, None


def _channel_mask_hook(keep: torch.Tensor) -> Callable[[nn.Module, Any, torch.Tensor], torch.Tensor]:
    def hook(_: nn.Module, __: Any, output: torch.Tensor) -> torch.Tensor:
        return output * keep.to(output.dtype)[None, :, None, None]

    return hook


@torch.no_grad()
def channel_activations(model: nn.Module, layer: nn.Module, x: torch.Tensor, *, batch_size: int = 512) -> torch.Tensor:
    """Mean ReLU activation per output channel of ``layer`` over clean images ``x``."""
    sums: list[torch.Tensor] = []

    def hook(_: nn.Module, __: Any, output: torch.Tensor) -> None:
        sums.append(output.float().clamp_min(0).sum((0, 2, 3)))

    handle = layer.register_forward_hook(hook)
    try:
        with eval_mode(model):
            for start in range(0, x.shape[0], batch_size):
                model(to_float(x[start : start + batch_size]))
    finally:
        handle.remove()
    if not sums:
        raise ConfigError("fine-pruning: no clean images reached the last convolution (none given, or it is never run)")
    return torch.stack(sums).sum(0) / x.shape[0]


def fine_prune(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    train_cfg: TrainConfig,
    *,
    x_val: torch.Tensor,
    y_val: torch.Tensor,
    max_drop: float = 0.04,
    progress: bool = False,
) -> RepairResult:
    """Prune the dormant channels of the last convolution while the clean accuracy on
    ``x_val`` stays within ``max_drop`` of the start, then fine-tune on ``x``, ``y``."""
    check_float("prune_max_drop", max_drop, 0.0, 1.0)
    tuned = copy.deepcopy(model)
    conv, bn = last_conv(tuned)
    layer: nn.Module = bn if bn is not None else conv
    activation = channel_activations(tuned, layer, x)
    order = torch.argsort(activation)
    keep = torch.ones(conv.out_channels, device=activation.device)
    start_acc = accuracy(tuned, x_val, y_val)
    handle = layer.register_forward_hook(_channel_mask_hook(keep))
    pruned = 0
    try:
        for channel in order[:-1].tolist():  # never every channel
            keep[channel] = 0.0
            if accuracy(tuned, x_val, y_val) < start_acc - max_drop:
                keep[channel] = 1.0
                break
            pruned += 1
        pruned_acc = accuracy(tuned, x_val, y_val)
        summary = fit(tuned, _clean_set(x, y, x_val, y_val), train_cfg, progress=progress, desc="fine-prune")
    finally:
        handle.remove()
    with torch.no_grad():  # conv output 0; a BatchNorm after it maps 0 to 0 (mean and shift zeroed)
        gone = keep == 0
        conv.weight[gone] = 0.0
        if conv.bias is not None:
            conv.bias[gone] = 0.0
        if bn is not None:
            if bn.running_mean is not None:
                bn.running_mean[gone] = 0.0
            if bn.bias is not None:
                bn.bias[gone] = 0.0
    return RepairResult(tuned, "fine-prune", {
        "layer": type(layer).__name__, "channels": int(conv.out_channels), "pruned": pruned,
        "pruned_channels": sorted(int(c) for c in torch.nonzero(gone).flatten()),
        "val_accuracy_start": start_acc, "val_accuracy_pruned": pruned_acc, "max_drop": max_drop,
        "epochs": train_cfg.epochs, "lr": train_cfg.lr, "images": int(x.shape[0]),
    }, summary.seconds)  # fmt: skip
