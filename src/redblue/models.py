"""Models: pixels in [0, 1] in, logits out; normalization is the first layer.

``build_model(name)`` builds an architecture from :data:`MODELS`; add one there.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from redblue.errors import ConfigError

MNIST_MEAN = 0.1307
MNIST_STD = 0.3081


class Normalize(nn.Module):
    """``(x - mean) / std`` as a layer, so every input to the model is pixels in [0, 1]."""

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(
        self, mean: float | Sequence[float] = MNIST_MEAN, std: float | Sequence[float] = MNIST_STD
    ) -> None:
        """``mean``/``std``: one value for every channel, or one per channel."""
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


def original_cnn(*, pool_first: bool = True) -> nn.Sequential:
    """The original project's Keras CNN: Conv32-Pool-Conv64-Pool-Dropout-Linear (34,826 weights).

    With ``pool_first`` (the ``cnn`` model) each max-pooling runs before its ReLU rather than
    after (``cnn-keras``, the order Keras code writes): the two commute
    (``max(relu(a), relu(b)) = relu(max(a, b))``), so outputs and gradients are bit-identical
    (``tests/test_models_train.py``) and the weights and their names are the same, while ReLU
    and its backward pass touch a quarter of the values: ART's whole original workflow ran 6%
    faster on ``cnn`` than on ``cnn-keras`` on this 2-core CPU (``benchmarks/README.md``).
    """

    def block(c_in: int, c_out: int) -> list[nn.Module]:
        conv, pool, relu = nn.Conv2d(c_in, c_out, kernel_size=3), nn.MaxPool2d(2), nn.ReLU()
        return [conv, pool, relu] if pool_first else [conv, relu, pool]

    return nn.Sequential(
        Normalize(),
        *block(1, 32),
        *block(32, 64),
        nn.Flatten(),
        nn.Dropout(0.5),
        nn.Linear(64 * 5 * 5, 10),
    )


def cnn() -> nn.Sequential:
    """The original project's CNN, max-pooling before ReLU (see :func:`original_cnn`)."""
    return original_cnn(pool_first=True)


def cnn_keras() -> nn.Sequential:
    """The original project's CNN in Keras's Conv-ReLU-Pool order: the same function and
    weights as ``cnn``, slower (kept for reference and for peer-library benchmarks)."""
    return original_cnn(pool_first=False)


def strided_cnn(channels: tuple[int, int], hidden: int, activation: type[nn.Module] = nn.ReLU) -> nn.Sequential:
    """Two 4x4 stride-2 convolutions, one hidden layer, no pooling and no dropout: the shape
    of Wong et al.'s MNIST model for fast adversarial training."""
    c1, c2 = channels
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, c1, 4, stride=2, padding=1),
        activation(),
        nn.Conv2d(c1, c2, 4, stride=2, padding=1),
        activation(),
        nn.Flatten(),
        nn.Linear(c2 * 7 * 7, hidden),
        activation(),
        nn.Linear(hidden, 10),
    )


def cnn_small() -> nn.Sequential:
    """Wong, Rice & Kolter's MNIST model for fast adversarial training (about 166k weights):
    Conv16(4x4, stride 2)-Conv32(4x4, stride 2)-FC100-Linear(10). FGSM-RS trains it
    robustly at eps 0.3 (``docs/adversarial-training.md``)."""
    return strided_cnn((16, 32), 100)


def cnn_wide() -> nn.Sequential:
    """:func:`cnn_small` at twice the width (about 839k weights):
    Conv32(4x4, stride 2)-Conv64(4x4, stride 2)-FC256-Linear(10). The best FGSM-RS model at
    eps 0.3 in ``docs/adversarial-training.md``."""
    return strided_cnn((32, 64), 256)


def cnn_wide_silu() -> nn.Sequential:
    """:func:`cnn_wide` with the smooth SiLU (Swish) activation in place of ReLU, which Gowal
    et al. (2020) and Xie et al. (2020, "Smooth adversarial training") found to train more
    robust models: its gradient is informative everywhere, for training and attacks alike.
    The same weights' shapes and names as ``cnn-wide``."""
    return strided_cnn((32, 64), 256, nn.SiLU)


def cnn_large() -> nn.Sequential:
    """A wider all-convolutional CNN for robust training (about 1.9M weights):
    Conv32(3x3)-Conv32(4x4, stride 2)-Conv64(3x3)-Conv64(4x4, stride 2)-FC512-FC512-Linear(10)."""
    return nn.Sequential(
        Normalize(),
        nn.Conv2d(1, 32, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(64, 64, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(64 * 7 * 7, 512),
        nn.ReLU(),
        nn.Linear(512, 512),
        nn.ReLU(),
        nn.Linear(512, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "cnn": cnn,
    "cnn-keras": cnn_keras,
    "cnn-small": cnn_small,
    "cnn-wide": cnn_wide,
    "cnn-wide-silu": cnn_wide_silu,
    "cnn-large": cnn_large,
}


def build_model(name: str = "cnn", *, seed: int | None = None) -> nn.Module:
    """Build a fresh model by registry name (see :data:`MODELS`).

    With ``seed``, the initial weights depend only on it (the global RNG is left untouched).
    """
    try:
        factory = MODELS[name]
    except KeyError:
        raise ConfigError(f"--model-name {name!r}: unknown model, expected one of {', '.join(MODELS)}") from None
    if seed is None:
        return factory()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return factory()
