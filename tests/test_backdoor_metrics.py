"""C-Acc, ASR, RA, breakdowns and detection scores against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from redblue.metrics import (
    attack_success_rate,
    backdoor_metrics,
    backdoor_robust_accuracy,
    clean_accuracy,
    detection_scores,
    nan_to_none,
    per_class_backdoor,
    predicted_class_counts,
)
from redblue.poison import Trigger

#            true labels y:  7  0  1  2  7  3  3  9
Y = torch.tensor([7, 0, 1, 2, 7, 3, 3, 9])
PRED_CLEAN = torch.tensor([7, 0, 1, 2, 1, 3, 5, 9])  # 6 / 8 correct
PRED_TRIG = torch.tensor([7, 7, 1, 7, 7, 7, 3, 4])  # non-target: 0→7 1→1 2→7 3→7 3→3 9→4


def test_clean_accuracy_by_hand() -> None:
    assert clean_accuracy(PRED_CLEAN, Y) == 6 / 8


def test_asr_excludes_target_class_images() -> None:
    # 6 non-target images; 3 of them (labels 0, 2, 3) go to 7.
    assert attack_success_rate(PRED_TRIG, Y, target=7) == 3 / 6
    # Flipping the predictions on the two target-class images changes nothing.
    flipped = PRED_TRIG.clone()
    flipped[Y == 7] = 0
    assert attack_success_rate(flipped, Y, target=7) == 3 / 6
    # Target 3: the 3 predicted as 3 is a target-class image, so it is no success: 0 / 6.
    assert attack_success_rate(PRED_TRIG, Y, target=3) == 0.0


def test_ra_by_hand() -> None:
    # Non-target images still correct on trigger: 1→1, 3→3  => 2 / 6.
    assert backdoor_robust_accuracy(PRED_TRIG, Y, target=7) == 2 / 6
    assert attack_success_rate(PRED_TRIG, Y, 7) + backdoor_robust_accuracy(PRED_TRIG, Y, 7) <= 1


def test_only_target_images_gives_nan() -> None:
    y = torch.tensor([7, 7])
    assert math.isnan(attack_success_rate(torch.tensor([7, 1]), y, 7))
    assert math.isnan(backdoor_robust_accuracy(torch.tensor([7, 1]), y, 7))
    assert nan_to_none({"a": [float("nan"), 1.0]}) == {"a": [None, 1.0]}


def test_predicted_counts_and_per_class() -> None:
    non_target = Y != 7
    assert predicted_class_counts(PRED_TRIG[non_target]) == [0, 1, 0, 1, 1, 0, 0, 3, 0, 0]
    rows = per_class_backdoor(PRED_CLEAN, PRED_TRIG, Y, target=7)
    assert rows[3] == {"class": 3, "n": 2, "clean_accuracy": 0.5, "triggered_to_target": 0.5,
                       "triggered_correct": 0.5}
    assert rows[7]["n"] == 2 and rows[7]["clean_accuracy"] == 0.5
    assert rows[7]["triggered_to_target"] == 1.0
    assert rows[5]["n"] == 0 and math.isnan(rows[5]["clean_accuracy"])


def test_detection_scores_by_hand() -> None:
    s = detection_scores(torch.tensor([0, 1, 2, 3, 3]), torch.tensor([2, 3, 4, 5]), n=10)
    assert (s["n_flagged"], s["n_poison"], s["true_positives"]) == (4, 4, 2)
    assert (s["false_positives"], s["false_negatives"]) == (2, 2)
    assert s["precision"] == 0.5 and s["recall"] == 0.5
    empty = detection_scores(torch.empty(0, dtype=torch.long), torch.tensor([1]), n=3)
    assert math.isnan(empty["precision"]) and empty["recall"] == 0.0


class _PatchDetector(nn.Module):
    """A hand-made "model": predicts 7 when the bottom-right 4x4 patch is white, else the
    label written in pixel (0, 0) (so the test controls clean predictions exactly)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        white = x[:, 0, 24:, 24:].mean((1, 2)) > 0.99
        label = (x[:, 0, 0, 0] * 255).round().long() % 10
        pred = torch.where(white, torch.full_like(label, 7), label)
        return nn.functional.one_hot(pred, 10).float()


def test_backdoor_metrics_with_a_known_model() -> None:
    y = torch.tensor([0, 1, 2, 7, 7, 5])
    x = torch.zeros(6, 1, 28, 28, dtype=torch.uint8)
    x[:, 0, 0, 0] = torch.tensor([0, 1, 9, 7, 7, 5], dtype=torch.uint8)  # clean preds
    m = backdoor_metrics(_PatchDetector(), x, y, Trigger(), target=7)
    assert m.clean_accuracy == 5 / 6  # only the 2 (predicted 9) is wrong
    assert m.n_triggered == 4 and m.asr == 1.0 and m.ra == 0.0
    assert m.triggered_predicted_counts[7] == 4
    # A trigger elsewhere does not fire the backdoor: ASR 0, RA = clean accuracy on non-target.
    off = backdoor_metrics(_PatchDetector(), x, y, Trigger(position="top-right"), target=7)
    assert off.asr == 0.0 and off.ra == pytest.approx(3 / 4)
    assert off.triggered_confusion[2][9] == 1
