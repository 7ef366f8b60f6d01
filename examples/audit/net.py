"""A small CNN for scikit-learn's 8x8 digits: the "your own model" of the audit example.

redblue imports this file only because the command line names it
(``--model net.py:build``): importing a Python file runs it.
"""

from torch import nn


def build() -> nn.Module:
    """1x8x8 pixels in [0, 1] -> 10 logits (no normalisation layer: pass --mean/--std if yours has one outside)."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


def build_rgb() -> nn.Module:
    """3x32x32 pixels (normalised outside: redblue adds --mean/--std as the first layer) -> 3 logits."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(4),
        nn.Flatten(),
        nn.Linear(8 * 8 * 8, 3),
    )
