"""A user's model that redblue's channels_last layout breaks, for the tests.

It flattens with ``.view`` after a convolution, which needs contiguous NCHW activations: on
channels_last ones PyTorch refuses ("view size is not compatible with input tensor's size and
stride"). Users write this; ``redblue.train.prepare_model`` must keep such a model in the
default layout. The file is also handed to ``--model FILE.py:build`` as it is.
"""

from __future__ import annotations

import torch
from torch import nn


class ViewNet(nn.Module):
    def __init__(self, channels: int = 1, size: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3)
        self.fc = nn.Linear(4 * (size - 2) ** 2, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv(x))
        return self.fc(h.view(h.shape[0], -1))  # type: ignore[no-any-return]


def build() -> nn.Module:
    return ViewNet()
