"""Neural Cleanse: the MAD anomaly index by hand, a planted trigger recovered on a tiny model
of real digits, and a clean control's masks all of ordinary size. ``redblue audit-backdoor`` end to end:
tests/test_backdoor_repair.py."""

from __future__ import annotations

import numpy as np
import torch

from redblue.defenses.neural_cleanse import anomaly_indices, flag_classes, neural_cleanse

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
    """On the clean model no class has a trigger far smaller than the others'; the backdoored
    model's target has one. Measured over four initial seeds of both models: the target's
    norm is 0.38-0.52 of the median, a clean model's smallest 0.80-0.93 of it; 0.65 separates
    the two.

    Not asserted: "no class flagged". With this budget the MAD anomaly index of a clean model
    reached 2.11 (class 2 here) and 2.36 on the full-MNIST baseline (docs/backdoor.md): the
    clean classes' masks have not converged to similar sizes, so the paper's threshold gives
    false positives; issue 13 keeps that open."""
    model, x, y = digits_backdoor["clean"], digits_backdoor["x_test"], digits_backdoor["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    result = neural_cleanse(model, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert min(result.l1) >= 0.65 * float(np.median(result.l1)), result.l1
    poisoned = digits_backdoor["poisoned"]
    assert isinstance(poisoned, torch.nn.Module)
    backdoored = neural_cleanse(poisoned, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert backdoored.l1[7] < 0.65 * float(np.median(backdoored.l1)), backdoored.l1
