"""Patch triggers (BadNets, Gu et al. 2017): a small square stamped onto every image.

A :class:`Trigger` says what the patch looks like and where it goes; :func:`apply_trigger`
stamps it, changing exactly the pixels inside the patch and nothing else.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from redblue.errors import ConfigError

CORNERS = ("top-left", "top-right", "bottom-left", "bottom-right")
PATTERNS = ("solid", "checkerboard")


def _parse_row_col(position: str) -> tuple[int, int] | None:
    """``"ROW,COL"`` -> (row, col); None when ``position`` is not of that form."""
    parts = position.split(",")
    if len(parts) != 2:
        return None
    try:
        return int(parts[0].strip()), int(parts[1].strip())
    except ValueError:
        return None


@dataclass(frozen=True)
class Trigger:
    """A square patch trigger.

    Args:
        size: side of the square in pixels (default 4).
        position: ``bottom-right`` (default), ``bottom-left``, ``top-left``, ``top-right``
            (flush with the image corner), or ``"ROW,COL"``: the patch's top-left pixel.
        pattern: ``solid`` (every patch pixel white, as in the original project) or
            ``checkerboard`` (white where ``(i + j)`` is even inside the patch, black elsewhere).
        blend: blend weight in (0, 1]: patch pixels become ``(1 - blend) * x + blend * pattern``;
            1 (default) replaces them.

    Example:
        >>> Trigger().box(28, 28)
        (24, 24, 4)
        >>> Trigger(size=3, position="2,5").box(28, 28)
        (2, 5, 3)
    """

    size: int = 4
    position: str = "bottom-right"
    pattern: str = "solid"
    blend: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.size, bool) or not isinstance(self.size, int) or self.size < 1:
            raise ConfigError(f"--size {self.size!r}: expected a positive integer (pixels)")
        if not isinstance(self.position, str) or (
            self.position not in CORNERS and _parse_row_col(self.position) is None
        ):
            raise ConfigError(
                f"--position {self.position!r}: expected one of {', '.join(CORNERS)} or ROW,COL"
            )
        if self.pattern not in PATTERNS:
            raise ConfigError(f"--pattern {self.pattern!r}: expected one of {', '.join(PATTERNS)}")
        blend = self.blend
        if isinstance(blend, bool) or not isinstance(blend, int | float) or not 0.0 < blend <= 1.0:
            raise ConfigError(f"--blend {blend!r}: must be in (0, 1]")

    def box(self, height: int, width: int) -> tuple[int, int, int]:
        """(row, col, size) of the patch on a ``height`` × ``width`` image; a patch that does
        not fit is a ConfigError naming the option."""
        if self.size > height or self.size > width:
            raise ConfigError(
                f"--size {self.size}: patch larger than the {height}x{width} image"
            )
        if self.position == "top-left":
            return 0, 0, self.size
        if self.position == "top-right":
            return 0, width - self.size, self.size
        if self.position == "bottom-left":
            return height - self.size, 0, self.size
        if self.position == "bottom-right":
            return height - self.size, width - self.size, self.size
        row_col = _parse_row_col(self.position)
        if row_col is None:  # pragma: no cover - excluded by __post_init__
            raise ConfigError(f"--position {self.position!r}: expected a corner or ROW,COL")
        row, col = row_col
        if row < 0 or col < 0 or row + self.size > height or col + self.size > width:
            raise ConfigError(
                f"--position {self.position}: a {self.size}x{self.size} patch there falls outside "
                f"the {height}x{width} image (ROW and COL must be in 0..{height - self.size}, "
                f"0..{width - self.size})"
            )
        return row, col, self.size

    def pattern_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """The patch's pixel values in [0, 1], shape (size, size), float32."""
        if self.pattern == "solid":
            return torch.ones(self.size, self.size, device=device)
        i = torch.arange(self.size, device=device)
        return ((i.view(-1, 1) + i.view(1, -1)) % 2 == 0).to(torch.float32)

    def mask(self, height: int, width: int, device: torch.device | str = "cpu") -> torch.Tensor:
        """Boolean (height, width) mask of the pixels the trigger may change."""
        row, col, size = self.box(height, width)
        out = torch.zeros(height, width, dtype=torch.bool, device=device)
        out[row : row + size, col : col + size] = True
        return out

    def describe(self) -> dict[str, Any]:
        return asdict(self)


def apply_trigger(x: torch.Tensor, trigger: Trigger) -> torch.Tensor:
    """Stamp ``trigger`` onto images ``x``; a new tensor, ``x`` is left unchanged.

    Threat model: the attacker controls a share of the training set (data poisoning) and,
    at test time, can add the patch to any input (a physical sticker, a watermark).

    Args:
        x: images (..., H, W): uint8 in [0, 255] or float in [0, 1], any leading dims
            (N, C, H, W batches, a single (C, H, W) image, ...), on any device.
        trigger: the patch (size, position, pattern, blend).

    Returns:
        Same shape, dtype and device as ``x``. Only the patch pixels differ: they become
        ``(1 - blend) * x + blend * pattern`` (pattern 1 = white), rounded for uint8.

    Example:
        >>> x = torch.zeros(2, 1, 28, 28, dtype=torch.uint8)
        >>> xt = apply_trigger(x, Trigger(size=4))
        >>> int(xt[0, 0, 24:, 24:].min()), int(xt.sum()) // 255
        (255, 32)
    """
    if x.dim() < 2:
        raise ConfigError(f"apply_trigger: expected images (..., H, W), got shape {tuple(x.shape)}")
    height, width = int(x.shape[-2]), int(x.shape[-1])
    row, col, size = trigger.box(height, width)
    pattern = trigger.pattern_tensor(x.device)
    out = x.clone()
    patch = out[..., row : row + size, col : col + size]
    if x.dtype == torch.uint8:
        value = pattern * 255.0
        if trigger.blend < 1.0:
            value = (1.0 - trigger.blend) * patch.to(torch.float32) + trigger.blend * value
        out[..., row : row + size, col : col + size] = value.round().to(torch.uint8).expand_as(patch)
    elif x.is_floating_point():
        value = pattern.to(x.dtype)
        if trigger.blend < 1.0:
            value = (1.0 - trigger.blend) * patch + trigger.blend * value
        out[..., row : row + size, col : col + size] = value.expand_as(patch)
    else:
        raise ConfigError(f"apply_trigger: expected uint8 or float images, got {x.dtype}")
    return out
