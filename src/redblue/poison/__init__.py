"""Backdoor poisoning (BadNets): three pure pieces, a trigger, the all-to-one label map and
the poison indices, plus the poisoned dataset built from them.

The training/evaluation stage lives in :mod:`redblue.stages.poison`.
"""

from redblue.poison.dataset import poison_arrays, poison_dataset, remove_examples
from redblue.poison.selection import poison_count, select_poison_indices
from redblue.poison.trigger import CORNERS, PATTERNS, Trigger, apply_trigger

__all__ = [
    "CORNERS",
    "PATTERNS",
    "Trigger",
    "apply_trigger",
    "poison_arrays",
    "poison_count",
    "poison_dataset",
    "remove_examples",
    "select_poison_indices",
]
