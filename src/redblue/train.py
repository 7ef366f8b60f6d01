"""Training and evaluation on in-memory uint8 tensors (no DataLoader, no numpy in the loop).

``fit`` is the one training loop: plain training, and every adversarial-training recipe
through its ``perturb`` / ``loss`` hooks (and ``perturb_weights``, for adversarial weight
perturbation). ``evaluate`` measures accuracy, loss, the confusion matrix and honest
inference latency.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from redblue.config import TrainConfig
from redblue.data import Dataset, to_float
from redblue.precision import PrecisionChoice, choose_precision
from redblue.utils import autocast, eval_mode, progress_line, resolve_device, seed_everything

Perturb = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]
"""``perturb(model, x, y) -> x_train``: the images to train on for this batch (same shape)."""

Loss = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""``loss(model, x_clean, x_train, y) -> (loss, logits)``: a custom objective (e.g. TRADES)."""

PerturbWeights = Callable[[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor], Callable[[], None]]
"""``perturb_weights(model, x_clean, x_train, y) -> restore``: moves the model's weights for this
batch (e.g. adversarial weight perturbation); the batch's gradient is taken at the moved weights,
and ``restore()`` puts the weights back before the optimizer steps."""

EpochEnd = Callable[[int, nn.Module], dict[str, Any]]
"""Called after each epoch with (epoch, model); returns extra values for that epoch's history.
A true ``"stop_training"`` value ends training after that epoch (early stopping, e.g. a guard
that has restored an earlier epoch's weights)."""


def batches(
    x: torch.Tensor,
    y: torch.Tensor,
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (float [0, 1] images, labels) batches; shuffled when a generator is given."""
    n = x.shape[0]
    if generator is not None:
        order = torch.randperm(n, generator=generator).to(x.device)
        for start in range(0, n, batch_size):
            idx = order[start : start + batch_size]
            yield to_float(x[idx]), y[idx]
    else:
        for start in range(0, n, batch_size):
            yield to_float(x[start : start + batch_size]), y[start : start + batch_size]


def channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


LAYOUT = "_redblue_layout"
"""Attribute :func:`check_layout` sets on a model it has checked: ``"channels_last"``, or
``"default"`` for one that fails in channels_last and that :func:`prepare_model` keeps in the
default memory layout."""


def prepare_model(model: nn.Module, device: torch.device | None, probe: torch.Tensor | None = None) -> nn.Module:
    """``model`` on ``device`` (None: where it is) in channels_last memory format (measured
    faster here on CPU and GPU), or in the default layout where it needs it (checked on
    ``probe``, a few of its inputs: :func:`check_layout`). Use the module returned."""
    if device is not None:
        model.to(device)
    if probe is not None:
        model = check_layout(model, probe)
    if getattr(model, LAYOUT, None) != "default":
        model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    return model


def check_layout(model: nn.Module, probe: torch.Tensor) -> nn.Module:
    """``model`` as it is when it runs in channels_last on ``probe`` (a few of its inputs).

    One that fails there — a user's ``.view`` after a convolution needs contiguous NCHW
    activations — stays in the default layout, so :func:`prepare_model` leaves it there, and
    the channels_last inputs the rest of redblue feeds it are made contiguous by a forward
    pre-hook: the same module, same weights and state-dict keys. A TorchScript module takes
    no hooks and comes back inside :class:`DefaultLayout`. The verdict is kept on the module
    (:data:`LAYOUT`), so a model is probed once."""
    if getattr(model, LAYOUT, None) is not None:
        return model
    model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    runs = _runs(model, probe, channels_last)
    model.to(memory_format=torch.contiguous_format)  # type: ignore[call-overload]
    if not runs and not _runs(model, probe, torch.Tensor.contiguous):
        return model  # fails in both layouts (a wrong input, out of memory): no verdict; the error comes back on use
    if not runs:
        if isinstance(model, torch.jit.ScriptModule):
            return DefaultLayout(model)
        model.register_forward_pre_hook(_contiguous_inputs)
    setattr(model, LAYOUT, "channels_last" if runs else "default")
    return model


def _runs(model: nn.Module, probe: torch.Tensor, layout: Callable[[torch.Tensor], torch.Tensor]) -> bool:
    xb = probe[:2].to(next(model.parameters(), probe).device)
    try:
        with torch.no_grad(), eval_mode(model):
            model(layout(to_float(xb) if xb.dtype == torch.uint8 else xb))
    except Exception:  # any failure is the answer: check_layout tells a layout's failure from the model's own
        return False
    return True


def _contiguous_inputs(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a.contiguous() if isinstance(a, torch.Tensor) else a for a in args)


class DefaultLayout(nn.Module):
    """``net`` (a TorchScript module) kept in the default (NCHW) memory layout and fed
    contiguous inputs, whatever layout they come in (:func:`prepare_model`)."""

    _redblue_layout = "default"

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.contiguous())  # type: ignore[no-any-return]


@torch.no_grad()
def predict(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 512,
    precision: str = "fp32",
) -> torch.Tensor:
    """Predicted labels for uint8 or float images, in eval mode, on ``x.device``."""
    model = check_layout(model, x)
    preds = []
    with eval_mode(model), autocast(x.device, precision):
        for start in range(0, x.shape[0], batch_size):
            xb = x[start : start + batch_size]
            xb = to_float(xb) if xb.dtype == torch.uint8 else xb
            preds.append(model(channels_last(xb)).argmax(1))
    return torch.cat(preds) if preds else torch.empty(0, dtype=torch.long, device=x.device)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 512) -> float:
    """Share of ``x`` (uint8 or float in [0, 1]) classified as ``y``."""
    if x.shape[0] == 0:
        return float("nan")
    return int((predict(model, x, batch_size=batch_size) == y).sum().item()) / int(x.shape[0])


@dataclass
class FitResult:
    """What one training run did: per-epoch history and how it ran."""

    history: list[dict[str, Any]]
    seconds: float
    images_per_s: float
    device: str
    precision: str
    config: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    precision_choice: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        """The JSON-ready account every stage records as ``training``."""
        return {
            "history": self.history,
            "seconds": self.seconds,
            "images_per_s": self.images_per_s,
            "device": self.device,
            "precision": self.precision,
            "precision_choice": self.precision_choice,
        }


def lr_factor(schedule: str, total_steps: int) -> Callable[[int], float]:
    """The learning-rate multiplier per optimizer step for ``schedule``.

    ``cosine``: from 1 down to 0 along half a cosine. ``one-cycle``: linearly up from 0 to
    1 over the first 2/5 of the steps, then linearly down to 0 (the cyclic schedule of
    Wong et al. 2020, which fast adversarial training relies on).

    >>> f = lr_factor("one-cycle", 10)
    >>> [round(f(s), 2) for s in (0, 3, 6, 9)]
    [0.25, 1.0, 0.5, 0.0]
    """
    total = max(total_steps, 1)
    if schedule == "one-cycle":
        peak = max(1, round(0.4 * total))

        def one_cycle(step: int) -> float:
            step = min(step + 1, total)  # the LR of optimizer step ``step + 1``: never 0 at the start
            return step / peak if step <= peak else (total - step) / (total - peak)

        return one_cycle

    def cosine(step: int) -> float:
        return 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))

    return cosine


def training_precision(precision: str, model: nn.Module, data: Dataset, batch_size: int) -> PrecisionChoice:
    """The precision ``fit`` trains ``model`` in (``--precision auto`` measured on the first
    training batch, as :mod:`redblue.precision` says); ``model`` and ``data`` on one device."""
    n = min(batch_size, int(data.x_train.shape[0]))
    x = channels_last(to_float(data.x_train[:n]))
    return choose_precision(precision, model, x, data.y_train[:n])


def fit(
    model: nn.Module,
    data: Dataset,
    cfg: TrainConfig,
    *,
    perturb: Perturb | None = None,
    loss: Loss | None = None,
    perturb_weights: PerturbWeights | None = None,
    epoch_end: EpochEnd | None = None,
    progress: bool = True,
    desc: str = "train",
) -> FitResult:
    """Train ``model`` in place with Adam and a per-step learning-rate schedule (``cfg.lr_schedule``).

    Args:
        model: pixels in [0, 1] in, logits out. Moved to the config's device.
        data: the dataset (uint8 tensors); moved to the device once, not per batch.
        cfg: epochs, batch size, learning rate, seed, device, precision.
        perturb: optional ``perturb(model, x, y) -> x_train`` (adversarial training).
        loss: optional ``loss(model, x, x_train, y) -> (loss, logits)`` replacing
            cross-entropy on ``x_train``.
        perturb_weights: optional ``perturb_weights(model, x, x_train, y) -> restore``, called
            after ``perturb``: the loss and its gradient are taken at the weights it leaves,
            and ``restore()`` runs between the backward pass and the optimizer step.
        epoch_end: optional hook whose returned values join that epoch's history; a true
            ``"stop_training"`` among them ends training after that epoch.
        progress: show a progress bar with loss and accuracy.

    Returns:
        A :class:`FitResult`; the model is left in eval mode.
    """
    device = resolve_device(cfg.device)
    data = data.to(device)
    model = prepare_model(model, device, data.x_train[:2])
    choice = training_precision(cfg.precision, model, data, cfg.batch_size)
    precision = choice.precision
    seed_everything(cfg.seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = math.ceil(data.x_train.shape[0] / cfg.batch_size)
    total_steps = cfg.epochs * steps_per_epoch
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg.lr_schedule, total_steps))
    generator = torch.Generator().manual_seed(cfg.seed)
    history: list[dict[str, Any]] = []
    start_all = time.perf_counter()
    seen = 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        start = time.perf_counter()
        loss_sum = torch.zeros((), device=device)
        correct = torch.zeros((), device=device, dtype=torch.long)
        count = 0
        bar = tqdm(
            total=data.x_train.shape[0],
            desc=f"{desc} epoch {epoch}/{cfg.epochs}",
            unit="img",
            disable=None if progress else True,
            leave=False,
            dynamic_ncols=True,
        )
        for step, (xb, yb) in enumerate(batches(data.x_train, data.y_train, cfg.batch_size, generator=generator)):
            xb = channels_last(xb)
            with autocast(device, precision):
                x_train = perturb(model, xb, yb) if perturb is not None else xb
                model.train()
                restore = None
                if perturb_weights is not None:
                    restore = perturb_weights(model, xb, x_train, yb)
                    # autocast keeps a bf16 copy of each weight for its whole context: drop the
                    # copies, or the loss below would see the weights as they were before the hook
                    torch.clear_autocast_cache()
                if loss is not None:
                    batch_loss, logits = loss(model, xb, x_train, yb)
                else:
                    logits = model(x_train)
                    batch_loss = F.cross_entropy(logits, yb)
            optimizer.zero_grad(set_to_none=True)
            batch_loss.backward()
            if restore is not None:
                restore()
            optimizer.step()
            scheduler.step()
            loss_sum += batch_loss.detach() * yb.shape[0]
            correct += (logits.detach().argmax(1) == yb).sum()
            count += yb.shape[0]
            bar.update(yb.shape[0])
            if step % 20 == 0:
                bar.set_postfix(loss=f"{loss_sum.item() / count:.4f}", acc=f"{correct.item() / count:.4f}")
        bar.close()
        seconds = time.perf_counter() - start
        seen += count
        model.eval()
        entry: dict[str, Any] = {
            "epoch": epoch,
            "loss": float(loss_sum.item() / count),
            "train_accuracy": float(correct.item() / count),
            "test_accuracy": accuracy(model, data.x_test, data.y_test),
            "seconds": seconds,
        }
        if epoch_end is not None:
            entry.update(epoch_end(epoch, model))
        history.append(entry)
        guard = f", guard PGD accuracy {entry['guard_pgd_accuracy']:.2%}" if "guard_pgd_accuracy" in entry else ""
        progress_line(progress, f"{desc} epoch {epoch}/{cfg.epochs}: loss {entry['loss']:.4f}, training accuracy "
                                f"{entry['train_accuracy']:.2%}, test accuracy {entry['test_accuracy']:.2%}{guard}, "
                                f"{seconds:.0f} s")  # fmt: skip
        if entry.get("stop_training"):
            break
    total = time.perf_counter() - start_all
    model.eval()
    return FitResult(
        history=history,
        seconds=total,
        images_per_s=seen / total if total > 0 else float("nan"),
        device=str(device),
        precision=precision,
        precision_choice=choice.summary(),
    )


@dataclass
class EvalResult:
    """Clean accuracy, loss, confusion matrix (rows: true class) and latency."""

    accuracy: float
    loss: float
    n: int
    confusion: list[list[int]]
    latency: dict[str, Any]


def confusion_matrix(y_true: torch.Tensor, y_pred: torch.Tensor, num_classes: int = 10) -> list[list[int]]:
    """Counts ``[true][predicted]`` as nested lists of ints."""
    flat = torch.bincount(y_true.long() * num_classes + y_pred.long(), minlength=num_classes**2)
    return [[int(v) for v in row] for row in flat.view(num_classes, num_classes).cpu().tolist()]


@torch.no_grad()
def measure_latency(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 128,
    warmup: int = 3,
    repeats: int = 10,
) -> dict[str, Any]:
    """Median wall time of one forward pass on a batch, after warm-up, and per image."""
    xb = channels_last(to_float(x[:batch_size]) if x.dtype == torch.uint8 else x[:batch_size])
    n = int(xb.shape[0])

    def sync() -> None:
        if xb.device.type == "cuda":
            torch.cuda.synchronize(xb.device)

    times = []
    with eval_mode(model):
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(xb)
            sync()
            if i >= warmup:
                times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {
        "batch_size": n,
        "device": str(xb.device),
        "precision": "fp32",
        "warmup": warmup,
        "repeats": repeats,
        "median_batch_ms": median * 1e3,
        "per_image_us": median / n * 1e6,
    }


@torch.no_grad()
def evaluate(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    batch_size: int = 512,
    num_classes: int = 10,
    latency_batch_size: int = 128,
) -> EvalResult:
    """Accuracy, mean cross-entropy and confusion matrix on (x, y), plus inference latency."""
    model = prepare_model(model, x.device, x[:2])
    loss_sum = 0.0
    preds = []
    with eval_mode(model):
        for xb, yb in batches(x, y, batch_size):
            logits = model(channels_last(xb)).float()
            loss_sum += float(F.cross_entropy(logits, yb, reduction="sum").item())
            preds.append(logits.argmax(1))
    pred = torch.cat(preds)
    n = int(y.shape[0])
    return EvalResult(
        accuracy=int((pred == y).sum().item()) / n,
        loss=loss_sum / n,
        n=n,
        confusion=confusion_matrix(y, pred, num_classes),
        latency=measure_latency(model, x, batch_size=latency_batch_size),
    )
