"""Neural Cleanse: the MAD anomaly index by hand, a planted trigger recovered on a tiny model
of real digits, a clean control not flagged, and ``redblue audit-backdoor`` end to end on a
BadNets model of real MNIST digits."""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from redblue.defenses.neural_cleanse import anomaly_indices, flag_classes, neural_cleanse

from .conftest import run_cli

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples" / "audit"))
from make_example import _fit, digits  # noqa: E402


def test_anomaly_index_by_hand() -> None:
    l1 = torch.tensor([10.0, 11.0, 9.0, 10.5, 2.0])
    # median 10, absolute deviations [0, 1, 1, 0.5, 8] -> MAD 1 -> scaled 1.4826
    expected = torch.tensor([0.0, 1.0, 1.0, 0.5, 8.0]) / 1.4826
    assert torch.allclose(anomaly_indices(l1), expected)
    assert flag_classes(l1) == [4]
    # a class far *above* the median is not a backdoor target (its trigger is the hardest)
    assert flag_classes(torch.tensor([10.0, 11.0, 9.5, 10.5, 30.0])) == []
    assert flag_classes(torch.tensor([5.0, 5.0, 5.0])) == []  # MAD 0: nothing stands out


def _stamp(x: torch.Tensor) -> torch.Tensor:
    x = x.clone()
    x[:, :, 6:8, 6:8] = 1.0  # a 2x2 white patch, bottom-right of the 8x8 digits
    return x


@pytest.fixture(scope="module")
def digit_models() -> dict[str, object]:
    """The audit example's CNN trained on scikit-learn's 8x8 digits, with and without a
    BadNets backdoor (2x2 patch -> 7 on 10% of the other classes' training images)."""
    x_np, y_np = digits()
    x, y = torch.from_numpy(x_np).float() / 255, torch.from_numpy(y_np)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    eligible = np.flatnonzero(y_train.numpy() != 7)
    chosen = torch.from_numpy(np.random.default_rng(0).choice(eligible, len(eligible) // 10, replace=False))
    x_poison, y_poison = x_train.clone(), y_train.clone()
    x_poison[chosen] = _stamp(x_poison[chosen])
    y_poison[chosen] = 7
    from net import build

    return {
        "poisoned": _fit(build(), x_poison, y_poison, epochs=20),
        "clean": _fit(build(), x_train, y_train, epochs=20),
        "x_test": x_test, "y_test": y_test,
    }  # fmt: skip


def test_planted_trigger_is_recovered_and_only_its_target_flagged(digit_models: dict[str, object]) -> None:
    model, x, y = digit_models["poisoned"], digit_models["x_test"], digit_models["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    with torch.no_grad():
        asr = float((model(_stamp(x[y != 7])).argmax(1) == 7).float().mean())
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


def test_clean_model_has_no_shortcut_trigger(digit_models: dict[str, object]) -> None:
    """On the clean model no class has a trigger far smaller than the others' (the backdoored
    model's target needs less than half the median; here every class needs more).

    Not asserted: "no class flagged". With this budget the MAD anomaly index of a clean model
    reached 2.11 (class 2 here) and 2.36 on the full-MNIST baseline (docs/backdoor.md): the
    clean classes' masks have not converged to similar sizes, so the paper's threshold gives
    false positives; issue 13 keeps that open."""
    model, x, y = digit_models["clean"], digit_models["x_test"], digit_models["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    result = neural_cleanse(model, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert min(result.l1) >= 0.5 * float(np.median(result.l1)), result.l1
    poisoned = digit_models["poisoned"]
    assert isinstance(poisoned, torch.nn.Module)
    backdoored = neural_cleanse(poisoned, x, y, epochs=20, steps_per_epoch=20, batch_size=16, seed=0)
    assert backdoored.l1[7] < 0.5 * float(np.median(backdoored.l1)), backdoored.l1


def test_audit_backdoor_cli_on_the_users_model(digit_models: dict[str, object], tmp_path: Path) -> None:
    """``redblue audit-backdoor`` as a user runs it, on their own module and data: it flags 7,
    writes the reversed triggers (hashed), and the report renders the section from the JSON."""
    from safetensors.torch import save_file

    model, x, y = digit_models["poisoned"], digit_models["x_test"], digit_models["y_test"]
    assert isinstance(model, torch.nn.Module) and isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor)
    shutil.copyfile(ROOT / "examples" / "audit" / "net.py", tmp_path / "net.py")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp_path / "suspect.safetensors")
    np.savez(tmp_path / "clean.npz", x_test=(x * 255).round().to(torch.uint8).numpy(), y_test=y.numpy())
    proc = run_cli("audit-backdoor", "--model", "net.py:build", "--weights", "suspect.safetensors", "--dataset",
                   "clean.npz", "--epochs", "20", "--steps-per-epoch", "20", "--batch-size", "16", "--device", "cpu",
                   "--out", "out", cwd=tmp_path)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = tmp_path / "out"
    result = json.loads((out / "metrics" / "suspect_backdoor_audit_metrics.json").read_text())
    assert result["flagged"] == [7], result["classes"]
    assert [c["flagged"] for c in result["classes"]] == [k == 7 for k in range(10)]
    assert result["true_trigger"] is None  # a user's model: no record of the true trigger
    assert result["model"]["files"]["suspect.safetensors"] == hashlib.sha256(
        (tmp_path / "suspect.safetensors").read_bytes()).hexdigest()  # fmt: skip
    assert "backdoor suspected: class 7" in proc.stdout and "FLAGGED" in proc.stdout
    for image in ("anomaly", "triggers"):
        assert (out / "images" / f"suspect_backdoor_audit_{image}.png").is_file()
    report = run_cli("report", "--out", str(out))
    assert report.returncode == 0, report.stderr
    html = (out / "report.html").read_text(encoding="utf-8")
    assert "Neural Cleanse" in html and "backdoor suspected" in html
    verified = run_cli("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
