"""Metrics on predictions: clean accuracy (C-Acc), attack success rate (ASR), backdoor
robust accuracy (RA), per-class breakdowns, and detection precision/recall.

Every function here works on label tensors, so each can be checked by hand on small arrays;
:func:`backdoor_metrics` runs a model on the clean and triggered test sets and combines them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from redblue.errors import ConfigError
from redblue.poison.trigger import Trigger, apply_trigger
from redblue.train import confusion_matrix, predict


def _check_pair(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape != b.shape or a.dim() != 1:
        raise ConfigError(f"{what}: expected two 1-D label tensors of one shape, got "
                          f"{tuple(a.shape)} and {tuple(b.shape)}")


def clean_accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    """C-Acc: share of clean test images classified as their label (nan on no images).

    Example:
        >>> clean_accuracy(torch.tensor([1, 2, 3, 0]), torch.tensor([1, 2, 0, 0]))
        0.75
    """
    _check_pair(pred, y, "clean_accuracy")
    n = int(y.numel())
    return float("nan") if n == 0 else int((pred == y).sum()) / n


def attack_success_rate(pred_triggered: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """ASR: share of triggered test images whose *true* label is not ``target`` that are
    classified as ``target``. Target-class images are excluded (they count as neither
    success nor failure). nan when no image is eligible.

    Example:
        >>> y = torch.tensor([7, 1, 2, 3, 7])
        >>> attack_success_rate(torch.tensor([7, 7, 2, 7, 0]), y, target=7)
        0.6666666666666666
    """
    _check_pair(pred_triggered, y, "attack_success_rate")
    eligible = y != target
    n = int(eligible.sum())
    return float("nan") if n == 0 else int((pred_triggered[eligible] == target).sum()) / n


def backdoor_robust_accuracy(pred_triggered: torch.Tensor, y: torch.Tensor, target: int) -> float:
    """RA: share of triggered non-target test images still classified as their true label.

    ASR + RA ≤ 1; the rest went to a third class. nan when no image is eligible.

    Example:
        >>> y = torch.tensor([7, 1, 2, 3, 7])
        >>> backdoor_robust_accuracy(torch.tensor([7, 7, 2, 7, 0]), y, target=7)
        0.3333333333333333
    """
    _check_pair(pred_triggered, y, "backdoor_robust_accuracy")
    eligible = y != target
    n = int(eligible.sum())
    return float("nan") if n == 0 else int((pred_triggered[eligible] == y[eligible]).sum()) / n


def predicted_class_counts(pred: torch.Tensor, num_classes: int = 10) -> list[int]:
    """How many images were predicted as each class.

    Example:
        >>> predicted_class_counts(torch.tensor([7, 7, 1]), num_classes=10)
        [0, 1, 0, 0, 0, 0, 0, 2, 0, 0]
    """
    return [int(v) for v in torch.bincount(pred.long().cpu(), minlength=num_classes)[:num_classes]]


def per_class_backdoor(
    pred_clean: torch.Tensor,
    pred_triggered: torch.Tensor,
    y: torch.Tensor,
    target: int,
    num_classes: int = 10,
) -> list[dict[str, Any]]:
    """For each true class: its count, clean accuracy, and on triggered images the share
    sent to ``target`` and the share still correct (for the target class itself, the
    share predicted as ``target`` is its triggered accuracy; its ASR is not defined)."""
    rows = []
    for c in range(num_classes):
        sel = y == c
        n = int(sel.sum())
        to_target = int((pred_triggered[sel] == target).sum())
        kept = int((pred_triggered[sel] == c).sum())
        rows.append(
            {
                "class": c,
                "n": n,
                "clean_accuracy": float("nan") if n == 0 else int((pred_clean[sel] == c).sum()) / n,
                "triggered_to_target": float("nan") if n == 0 else to_target / n,
                "triggered_correct": float("nan") if n == 0 else kept / n,
            }
        )
    return rows


def detection_scores(flagged: torch.Tensor, poison: torch.Tensor, n: int) -> dict[str, Any]:
    """Precision and recall of a detector's ``flagged`` indices against the true ``poison``
    indices among ``n`` training examples (indices, any order; duplicates ignored).

    Precision is nan when nothing is flagged; recall is nan when nothing is poisoned.

    Example:
        >>> s = detection_scores(torch.tensor([1, 2, 3, 9]), torch.tensor([1, 2, 5]), n=10)
        >>> s["true_positives"], s["precision"], round(s["recall"], 4)
        (2, 0.5, 0.6667)
    """
    is_flagged = torch.zeros(n, dtype=torch.bool)
    is_flagged[flagged.long().cpu()] = True
    is_poison = torch.zeros(n, dtype=torch.bool)
    is_poison[poison.long().cpu()] = True
    tp = int((is_flagged & is_poison).sum())
    n_flagged = int(is_flagged.sum())
    n_poison = int(is_poison.sum())
    return {
        "n": n,
        "n_flagged": n_flagged,
        "n_poison": n_poison,
        "true_positives": tp,
        "false_positives": n_flagged - tp,
        "false_negatives": n_poison - tp,
        "precision": float("nan") if n_flagged == 0 else tp / n_flagged,
        "recall": float("nan") if n_poison == 0 else tp / n_poison,
    }


def nan_to_none(obj: Any) -> Any:
    """Replace float nan by None in nested dicts/lists (JSON has no nan)."""
    if isinstance(obj, float) and obj != obj:
        return None
    if isinstance(obj, dict):
        return {k: nan_to_none(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [nan_to_none(v) for v in obj]
    return obj


def json_dict(result: dict[str, Any]) -> dict[str, Any]:
    """A result dict with nan replaced by None (see :func:`nan_to_none`)."""
    cleaned: dict[str, Any] = nan_to_none(result)
    return cleaned


@dataclass
class BackdoorMetrics:
    """C-Acc on the clean test set; ASR and RA on its triggered non-target images; and
    breakdowns of the predictions on triggered images."""

    clean_accuracy: float
    asr: float
    ra: float
    target: int
    n_test: int
    n_triggered: int  # triggered non-target images (the ASR / RA denominator)
    triggered_predicted_counts: list[int]  # predicted classes on triggered non-target images
    per_class: list[dict[str, Any]]
    triggered_confusion: list[list[int]]  # [true][predicted] on all triggered test images
    clean_confusion: list[list[int]]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: undefined rates (nan, no eligible image) become None."""
        return json_dict(asdict(self))

    def rates(self) -> dict[str, Any]:
        """The three headline rates: clean accuracy, ASR, RA."""
        return {"clean_accuracy": self.clean_accuracy, "asr": self.asr, "ra": self.ra}


@torch.no_grad()
def backdoor_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    trigger: Trigger,
    target: int,
    *,
    num_classes: int = 10,
    batch_size: int = 512,
) -> BackdoorMetrics:
    """C-Acc, ASR and RA of ``model`` on test images ``x`` (uint8 or float, (N, C, H, W))
    with labels ``y``, stamping ``trigger`` on every image for ASR / RA."""
    pred_clean = predict(model, x, batch_size=batch_size)
    pred_trig = predict(model, apply_trigger(x, trigger), batch_size=batch_size)
    y = y.to(pred_clean.device)
    eligible = y != target
    return BackdoorMetrics(
        clean_accuracy=clean_accuracy(pred_clean, y),
        asr=attack_success_rate(pred_trig, y, target),
        ra=backdoor_robust_accuracy(pred_trig, y, target),
        target=int(target),
        n_test=int(y.numel()),
        n_triggered=int(eligible.sum()),
        triggered_predicted_counts=predicted_class_counts(pred_trig[eligible], num_classes),
        per_class=per_class_backdoor(pred_clean, pred_trig, y, target, num_classes),
        triggered_confusion=confusion_matrix(y, pred_trig, num_classes),
        clean_confusion=confusion_matrix(y, pred_clean, num_classes),
    )
