"""STRIP (Gao et al., "STRIP: A Defence Against Trojan Attacks on Deep Neural Networks",
ACSAC 2019): a run-time detector of triggered inputs.

An input is superimposed on ``n_copies`` random clean images (pixel-wise sum, clipped to
[0, 1], as the paper's ``addWeighted(x, 1, overlay, 1)``) and the entropy of the model's
predictions is averaged over the copies. A clean input's prediction scatters when another
image is laid over it (high entropy); a trigger keeps pulling every copy to the target
class (low entropy). The threshold is the ``frr`` quantile of the entropies of clean inputs,
so that a share ``frr`` of clean inputs is rejected (the false-rejection rate, measured again
on held-out clean inputs); an input at or below it is flagged as triggered. The
false-acceptance rate is the share of triggered inputs above the threshold. (The paper fits a
normal distribution to the clean entropies and takes its quantile; the empirical quantile
assumes nothing about their shape.)

Example:
    >>> import torch
    >>> from torch import nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(16, 3))
    >>> x = torch.rand(10, 1, 4, 4)
    >>> strip_entropy(model, x, x, n_copies=4).shape
    torch.Size([10])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from redblue.errors import ConfigError
from redblue.train import channels_last, check_layout
from redblue.utils import eval_mode
from redblue.validate import check_float, check_int


@torch.no_grad()
def strip_entropy(
    model: nn.Module,
    x: torch.Tensor,
    overlays: torch.Tensor,
    *,
    n_copies: int = 100,
    batch_size: int = 4096,
    seed: int = 0,
    progress: bool = False,
) -> torch.Tensor:
    """Mean prediction entropy (nats) of each input of ``x`` superimposed on ``n_copies``
    images drawn from ``overlays`` (both float in [0, 1], (N, C, H, W), on one device)."""
    check_int("n_copies", n_copies, 1)
    if x.shape[1:] != overlays.shape[1:] or overlays.shape[0] == 0:
        raise ConfigError(f"strip: inputs {tuple(x.shape)} and overlays {tuple(overlays.shape)} must share C, H, W")
    model = check_layout(model, x)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    picks = torch.randint(overlays.shape[0], (x.shape[0], n_copies), generator=generator).to(x.device)
    per_batch = max(1, batch_size // n_copies)
    out = torch.empty(x.shape[0], device=x.device)
    with eval_mode(model):
        for start in tqdm(range(0, x.shape[0], per_batch), desc="strip", disable=not progress, leave=False):
            stop = min(start + per_batch, x.shape[0])
            blended = (x[start:stop, None] + overlays[picks[start:stop]]).clamp_(0.0, 1.0)
            logits = model(channels_last(blended.flatten(0, 1))).float()
            entropy = -(F.softmax(logits, 1) * F.log_softmax(logits, 1)).sum(1)
            out[start:stop] = entropy.view(stop - start, n_copies).mean(1)
    return out


@dataclass
class StripResult:
    """The threshold set on clean inputs and what it rejects and accepts."""

    threshold: float  # entropy at or below which an input is flagged as triggered
    frr_target: float
    frr: float  # held-out clean inputs rejected
    far: float | None  # triggered inputs accepted (None without triggered inputs)
    clean_entropy: list[float]  # per clean input
    triggered_entropy: list[float] | None
    n_copies: int


def strip(
    model: nn.Module,
    clean: torch.Tensor,
    overlays: torch.Tensor,
    *,
    held_out: torch.Tensor | None = None,
    triggered: torch.Tensor | None = None,
    frr: float = 0.01,
    n_copies: int = 100,
    seed: int = 0,
    progress: bool = False,
) -> StripResult:
    """Set STRIP's threshold on ``clean`` inputs at false-rejection rate ``frr``; measure the
    false-rejection rate on ``held_out`` clean inputs (on ``clean`` when None, where it is
    ``frr`` by construction) and, given ``triggered`` inputs, the false-acceptance rate."""
    check_float("frr", frr, 0.0, 1.0, low_open=True, high_open=True)
    clean_h = strip_entropy(model, clean, overlays, n_copies=n_copies, seed=seed, progress=progress)
    threshold = float(torch.quantile(clean_h.double(), frr))
    held_h = clean_h if held_out is None else strip_entropy(
        model, held_out, overlays, n_copies=n_copies, seed=seed + 2, progress=progress)
    trig_h = None if triggered is None else strip_entropy(
        model, triggered, overlays, n_copies=n_copies, seed=seed + 1, progress=progress)
    return StripResult(
        threshold=threshold, frr_target=frr, frr=float((held_h <= threshold).float().mean()),
        far=None if trig_h is None or trig_h.numel() == 0 else float((trig_h > threshold).float().mean()),
        clean_entropy=[float(v) for v in clean_h.cpu()],
        triggered_entropy=None if trig_h is None else [float(v) for v in trig_h.cpu()], n_copies=n_copies,
    )  # fmt: skip
