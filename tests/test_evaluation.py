"""The robustness evaluator: threat-model enforcement, worst case, hand-computed metrics."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn

import redblue.attacks as attacks_module
import redblue.evaluation.runner as runner_module
from redblue.artifacts import load_model
from redblue.attacks import AttackOutput
from redblue.data import Dataset
from redblue.errors import ConfigError, ThreatModelError
from redblue.evaluation import eps_sweep, evaluate_robustness


class PixelVote(nn.Module):
    """Logits = 100 × the first 10 pixels of row 0: the brightest of them is the class."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return 100.0 * x[:, 0, 0, :10]


def vote_images(labels: list[int]) -> torch.Tensor:
    x = torch.full((len(labels), 1, 28, 28), 0.4)
    for i, label in enumerate(labels):
        x[i, 0, 0, label] = 0.5
    return x


def flipper(indices: set[int], eps: float = 0.2) -> object:
    """A fake attack that raises class (y+1)'s pixel by eps for the given example indices."""

    def run(model: nn.Module, x: torch.Tensor, y: torch.Tensor, **_: object) -> AttackOutput:
        x_adv = x.clone()
        for i in indices:
            x_adv[i, 0, 0, (int(y[i]) + 1) % 10] += eps
        return AttackOutput(x_adv=x_adv, clean_logits=None)

    return run


@pytest.fixture
def fake_attacks(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    runners = dict(attacks_module.RUNNERS)
    monkeypatch.setattr(attacks_module, "RUNNERS", runners)
    monkeypatch.setattr(runner_module, "RUNNERS", runners)
    return runners


def test_worst_case_is_the_and_of_per_example_masks(fake_attacks: dict[str, object]) -> None:
    # 6 examples; example 5 is misclassified clean (its label says 3, its image says 2).
    labels = [0, 1, 2, 3, 4, 2]
    x, y = vote_images(labels), torch.tensor([0, 1, 2, 3, 4, 3])
    fake_attacks["fgsm"] = flipper({0, 1})
    fake_attacks["pgd"] = flipper({1, 2})
    result = evaluate_robustness(PixelVote(), x, y, attacks="quick", eps=0.2, checks=False)
    # clean: 5/6 correct; fgsm fools {0, 1}; pgd fools {1, 2}; robust under both: {3, 4}.
    assert result.clean_accuracy == pytest.approx(5 / 6)
    assert result.accuracy("fgsm") == pytest.approx(3 / 6)
    assert result.accuracy("pgd") == pytest.approx(3 / 6)
    assert result.robust_accuracy == pytest.approx(2 / 6)
    assert result.attack_success_rate == pytest.approx(3 / 5)
    fgsm_result = result.attacks[0]
    assert fgsm_result.n_fooled == 2 and fgsm_result.attack_success_rate == pytest.approx(2 / 5)
    # perturbation norms: two examples moved by 0.2 in one pixel, four not at all.
    assert fgsm_result.perturbation["linf_max"] == pytest.approx(0.2)
    assert fgsm_result.perturbation["linf_mean"] == pytest.approx(0.4 / 6)
    assert fgsm_result.perturbation["l2_mean"] == pytest.approx(0.4 / 6)
    data = result.to_json()
    assert json.loads(json.dumps(data, allow_nan=False)) == data
    assert data["attacks"]["pgd"]["robust_accuracy"] == pytest.approx(0.5)


def test_a_perturbation_outside_the_ball_is_an_error(fake_attacks: dict[str, object]) -> None:
    x, y = vote_images([0, 1, 2]), torch.tensor([0, 1, 2])
    fake_attacks["fgsm"] = flipper({1}, eps=0.3)
    with pytest.raises(ThreatModelError, match=r"fgsm .*linf perturbation 0\.3 exceeds eps 0\.2"):
        evaluate_robustness(PixelVote(), x, y, attacks="fgsm", eps=0.2, checks=False)


def test_pixels_outside_the_unit_range_are_an_error(fake_attacks: dict[str, object]) -> None:
    x, y = vote_images([0, 1, 2]), torch.tensor([0, 1, 2])

    def brighten(model: nn.Module, xb: torch.Tensor, yb: torch.Tensor, **_: object) -> AttackOutput:
        return AttackOutput(x_adv=xb + 0.7)  # within eps 1.0, but 0.5 + 0.7 > 1

    fake_attacks["fgsm"] = brighten
    with pytest.raises(ThreatModelError, match=r"outside \[0, 1\]"):
        evaluate_robustness(PixelVote(), x, y, attacks="fgsm", eps=1.0, checks=False)


def test_clean_predictions_come_from_the_attacks_own_forward_pass() -> None:
    model = PixelVote()
    x, y = vote_images([0, 1, 2, 3]), torch.tensor([0, 1, 2, 3])
    evaluate_robustness(model, x, y, attacks="fgsm", eps=0.05, batch_size=2, checks=False)
    # per batch: one forward+backward inside FGSM (also gives the clean logits) + one scoring
    # pass; and once, the layout probe on two images (redblue.train.check_layout)
    assert model.calls == 2 * 2 + 1


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path) -> nn.Module:
    return load_model(tiny_model_dir / "models" / "baseline.json").model


def test_real_attacks_on_a_tiny_model(tiny: nn.Module, mini: Dataset) -> None:
    x, y = mini.x_test[:64], mini.y_test[:64]
    result = evaluate_robustness(tiny, x, y, attacks="quick", eps=0.2, steps=10, checks=False)
    assert result.n == 64
    assert result.accuracy("pgd") <= result.accuracy("fgsm") <= result.clean_accuracy
    assert result.robust_accuracy <= min(result.accuracy("fgsm"), result.accuracy("pgd"))
    fgsm_result = result.attacks[0]
    assert fgsm_result.perturbation["linf_max"] == pytest.approx(0.2, abs=1e-6)
    assert result.attacks[1].settings["alpha"] == pytest.approx(2.5 * 0.2 / 10)
    assert result.attacks[1].settings["early_stop"] is True


def test_same_seed_same_numbers(tiny: nn.Module, mini: Dataset) -> None:
    x, y = mini.x_test[:32], mini.y_test[:32]
    a = evaluate_robustness(tiny, x, y, attacks="pgd", eps=0.1, steps=5, checks=False, seed=3)
    b = evaluate_robustness(tiny, x, y, attacks="pgd", eps=0.1, steps=5, checks=False, seed=3)
    assert torch.equal(a.robust["pgd"], b.robust["pgd"])


def test_eps_sweep_starts_at_clean_accuracy_and_stops_at_zero(tiny: nn.Module, mini: Dataset) -> None:
    x, y = mini.x_test[:48], mini.y_test[:48]
    points = eps_sweep(tiny, x, y, attack="pgd", steps=10)
    clean = float((tiny(x.float() / 255).argmax(1) == y).float().mean())
    assert points[0]["eps"] == 0.0 and points[0]["robust_accuracy"] == pytest.approx(clean)
    assert points[-1]["robust_accuracy"] == 0.0
    accs = [p["robust_accuracy"] for p in points]
    assert all(b <= a + 1e-9 for a, b in itertools.pairwise(accs))
    assert [p["eps"] for p in points] == [round(0.05 * i, 2) for i in range(len(points))]


def test_unknown_settings_and_empty_input_are_config_errors(tiny: nn.Module, mini: Dataset) -> None:
    x, y = mini.x_test[:8], mini.y_test[:8]
    with pytest.raises(ConfigError, match="'stepz'"):
        evaluate_robustness(tiny, x, y, attacks="pgd", eps=0.1, stepz=3)
    with pytest.raises(ConfigError, match="square"):
        evaluate_robustness(tiny, x, y, attacks="square", eps=1.0, norm="l2")
    with pytest.raises(ConfigError, match="--n-examples"):
        evaluate_robustness(tiny, x[:0], y[:0], attacks="fgsm", eps=0.1)
