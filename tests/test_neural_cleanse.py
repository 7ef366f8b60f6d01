"""Neural Cleanse: the MAD anomaly index by hand, a planted trigger recovered on a tiny model
of real digits, and a clean control's masks all of ordinary size. ``redblue audit-backdoor`` end to end:
tests/test_backdoor_repair.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redblue.defenses.neural_cleanse import (
    anomaly_indices,
    flag_classes,
    flag_reasons,
    max_anomaly_index,
    neural_cleanse,
    size_ratios,
)

from .conftest import stamp_digits


def test_anomaly_index_by_hand() -> None:
    l1 = torch.tensor([10.0, 11.0, 9.0, 10.5, 2.0])
    # median 10, absolute deviations [0, 1, 1, 0.5, 8] -> MAD 1 -> scaled 1.4826
    expected = torch.tensor([0.0, 1.0, 1.0, 0.5, 8.0]) / 1.4826
    assert torch.allclose(anomaly_indices(l1), expected)
    assert flag_classes(l1) == [4]
    # a class far *above* the median is not a backdoor target (its trigger is the hardest)
    assert flag_classes(torch.tensor([10.0, 11.0, 9.5, 10.5, 30.0])) == []
    assert flag_classes(torch.tensor([5.0, 5.0, 5.0])) == []  # MAD 0: nothing stands out
    assert flag_reasons(l1)[4] == ["anomaly-index", "size-ratio"]  # 2 / 10 = 0.2 of the median


def test_mad_ceiling_and_size_ratio_by_hand() -> None:
    """Clean classes spread widely (30 to 70): even a 3-pixel trigger stays under the paper's
    threshold, because the MAD test's ceiling (a trigger of size 0) is about 2; the size rule
    flags it."""
    l1 = torch.tensor([30.0, 40.0, 50.0, 60.0, 70.0, 3.0])
    # median 45; absolute deviations [15, 5, 5, 15, 25, 42] -> MAD 15 -> scaled 22.239
    scale = 1.4826 * 15
    assert max_anomaly_index(l1) == pytest.approx(45 / scale)
    assert float(anomaly_indices(l1)[5]) == pytest.approx(42 / scale) and 42 / scale < 2.0
    assert size_ratios(l1).tolist() == pytest.approx([30 / 45, 40 / 45, 50 / 45, 60 / 45, 70 / 45, 3 / 45])
    assert flag_reasons(l1) == [[], [], [], [], [], ["size-ratio"]]
    assert flag_classes(l1, size_ratio=0.0) == []  # the paper's rule alone cannot flag it
    assert flag_classes(l1, size_ratio=0.05) == []  # 3 / 45 = 0.067 is not under 0.05
    # MAD 0: no anomaly index, but a class 5 times smaller than the rest is still flagged by size
    assert max_anomaly_index(torch.tensor([5.0, 5.0, 5.0, 1.0])) is None
    assert flag_reasons(torch.tensor([5.0, 5.0, 5.0, 1.0])) == [[], [], [], ["size-ratio"]]
    # a class whose trigger never reached the target success rate (inf) is never flagged
    with_inf = torch.tensor([30.0, 40.0, float("inf"), 50.0, 60.0])
    assert flag_classes(with_inf) == [] and float(size_ratios(with_inf)[2]) == float("inf")
    assert float(size_ratios(with_inf)[0]) == pytest.approx(30 / 45)  # median of the finite ones


def test_planted_trigger_is_recovered_and_only_its_target_flagged(digits_backdoor: dict[str, object]) -> None:
    model, x, y = digits_backdoor["poisoned"], digits_backdoor["x_test"], digits_backdoor["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    with torch.no_grad():
        asr = float((model(stamp_digits(x[y != 7])).argmax(1) == 7).float().mean())
    assert asr > 0.9  # the backdoor took
    before = [p.detach().clone() for p in model.parameters()]
    result = neural_cleanse(model, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert result.flagged == [7], (result.l1, result.anomaly_index)
    assert result.anomaly_index[7] > 2.0
    assert result.l1[7] == min(result.l1)
    mask = result.masks[7]
    on_patch = float(mask[6:8, 6:8].sum()) / float(mask.sum())
    assert on_patch >= 0.25, on_patch  # 4 of 64 pixels hold >= 4x their uniform share of the mask
    assert float(result.masks.min()) >= 0.0 and float(result.masks.max()) <= 1.0
    assert float(result.patterns.min()) >= 0.0 and float(result.patterns.max()) <= 1.0
    # the reversed trigger really is a trigger: stamped test images go to 7
    stamped = (1 - mask) * x[y != 7] + mask * result.patterns[7]
    with torch.no_grad():
        assert float((model(stamped).argmax(1) == 7).float().mean()) >= 0.9
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # weights untouched


def test_clean_model_has_no_shortcut_trigger(digits_backdoor: dict[str, object]) -> None:
    """On the clean model no class is flagged and no class has a trigger far smaller than the
    others'; the backdoored model's target has one. Measured over four initial seeds of
    Neural Cleanse: the target's norm is 0.43-0.49 of the median, a clean model's smallest
    0.86-0.88 of it (0.65 separates the two); the clean model's highest anomaly index is
    1.50-1.73 (with the first defaults, cost patience 1 and early stop 4, it reached 2.11)."""
    model, x, y = digits_backdoor["clean"], digits_backdoor["x_test"], digits_backdoor["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    result = neural_cleanse(model, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert result.flagged == [], (result.l1, result.anomaly_index)
    assert min(result.l1) >= 0.65 * float(np.median(result.l1)), result.l1
    poisoned = digits_backdoor["poisoned"]
    assert isinstance(poisoned, torch.nn.Module)
    backdoored = neural_cleanse(poisoned, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert backdoored.l1[7] < 0.65 * float(np.median(backdoored.l1)), backdoored.l1
