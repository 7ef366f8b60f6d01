"""The poisoned training set: the clean set with the chosen examples triggered and relabelled."""

from __future__ import annotations

import torch

from redblue.data import Dataset
from redblue.poison.trigger import Trigger, apply_trigger


def poison_arrays(
    x: torch.Tensor,
    y: torch.Tensor,
    indices: torch.Tensor,
    trigger: Trigger,
    target: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) with ``x[indices]`` triggered and ``y[indices] = target``; new tensors.

    One gather, one stamp and one scatter: no per-image Python loop.

    Example:
        >>> x = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
        >>> y = torch.tensor([0, 1, 2, 3])
        >>> xp, yp = poison_arrays(x, y, torch.tensor([1, 3]), Trigger(), target=7)
        >>> yp.tolist(), [int(v) for v in xp.flatten(1).sum(1) // 255]
        ([0, 7, 2, 7], [0, 16, 0, 16])
    """
    idx = indices.to(device=x.device, dtype=torch.int64)
    x_out = x.clone()
    y_out = y.clone()
    x_out[idx] = apply_trigger(x[idx], trigger)
    y_out[idx.to(y.device)] = int(target)
    return x_out, y_out


def poison_dataset(data: Dataset, indices: torch.Tensor, trigger: Trigger, target: int) -> Dataset:
    """``data`` with its training set poisoned at ``indices``; the test set stays clean."""
    x_train, y_train = poison_arrays(data.x_train, data.y_train, indices, trigger, target)
    return data.replace(x_train=x_train, y_train=y_train)


def remove_examples(data: Dataset, indices: torch.Tensor) -> Dataset:
    """``data`` without the training examples at ``indices`` (e.g. those a defence flagged)."""
    keep = torch.ones(data.x_train.shape[0], dtype=torch.bool, device=data.x_train.device)
    keep[indices.to(device=keep.device, dtype=torch.int64)] = False
    return data.replace(x_train=data.x_train[keep], y_train=data.y_train[keep.to(data.y_train.device)])
