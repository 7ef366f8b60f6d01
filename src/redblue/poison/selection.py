"""Which training examples get poisoned: an all-to-one choice among non-target examples."""

from __future__ import annotations

import torch

from redblue.errors import ConfigError


def poison_count(n_eligible: int, rate: float) -> int:
    """``round(rate * n_eligible)`` (Python's round: ties go to the even integer)."""
    return round(rate * n_eligible)


def select_poison_indices(y: torch.Tensor, rate: float, target: int, seed: int) -> torch.Tensor:
    """Indices of the training examples to poison, reproducibly.

    All-to-one BadNets: only examples whose label is not ``target`` are eligible; exactly
    ``round(rate * n_eligible)`` of them are drawn uniformly without replacement from a
    generator seeded with ``seed`` (the same ``y``, ``rate``, ``target``, ``seed`` give the
    same indices on every machine and device).

    Args:
        y: integer labels, shape (N,), any device.
        rate: share of the *eligible* examples to poison, in [0, 1].
        target: the class every poisoned example is relabelled to.
        seed: seed of the draw.

    Returns:
        int64 indices into ``y``, sorted ascending, on ``y.device``.

    Example:
        >>> y = torch.tensor([0, 7, 1, 7, 2, 3, 4, 5, 6, 8, 9, 0])
        >>> idx = select_poison_indices(y, 0.5, target=7, seed=0)
        >>> len(idx), bool((y[idx] != 7).all())
        (5, True)
    """
    if y.dim() != 1:
        raise ConfigError(f"select_poison_indices: labels must be 1-D, got shape {tuple(y.shape)}")
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0.0 <= rate <= 1.0:
        raise ConfigError(f"--rate {rate!r}: must be in [0, 1]")
    eligible = torch.nonzero(y.cpu() != target).flatten()
    k = poison_count(int(eligible.numel()), float(rate))
    generator = torch.Generator().manual_seed(int(seed))
    chosen = eligible[torch.randperm(int(eligible.numel()), generator=generator)[:k]]
    return chosen.sort().values.to(device=y.device, dtype=torch.int64)
