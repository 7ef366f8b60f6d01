"""FAB-T (``redblue.attacks.fab``): the hyperplane projection it rests on is exact, and on
linear models, where the smallest adversarial perturbation is known in closed form, FAB-T
finds a point within eps exactly when one exists; it stays in the eps-ball and [0, 1]."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from redblue.attacks.fab import fab_run, fab_t, project_on_hyperplane
from redblue.attacks.projection import per_example_norm
from redblue.data import Dataset, to_float
from redblue.evaluation import evaluate_robustness
from redblue.models import build_model


def _linear(n_classes: int, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(16, n_classes)).eval()


def _min_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: str) -> torch.Tensor:
    """The smallest ``norm`` perturbation that changes a linear model's decision (box ignored:
    the points sit in the middle of [0, 1] and the distances are small)."""
    layer = model[1]
    w, b = layer.weight.detach(), layer.bias.detach()
    logits = x.flatten(1) @ w.T + b
    best = torch.full((x.shape[0],), float("inf"))
    dual = {"linf": 1, "l2": 2}[norm]  # the dual norm of the threat model's
    for k in range(w.shape[0]):
        diff = w[y] - w[k]  # (N, D): z_y - z_k = diff·x + (b_y - b_k)
        margin = logits.gather(1, y[:, None]).squeeze(1) - logits[:, k]
        dist = margin / torch.linalg.vector_norm(diff, ord=dual, dim=1).clamp_min(1e-12)
        best = torch.where(k != y, torch.minimum(best, dist), best)
    return best


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_projection_lands_on_the_hyperplane_with_the_least_norm(norm: str) -> None:
    torch.manual_seed(0)
    p = 0.25 + 0.5 * torch.rand(64, 30)  # away from the box: the unconstrained optimum applies
    w = torch.randn(64, 30)
    b = (w * p).sum(1) + 0.05 * torch.randn(64)
    d = project_on_hyperplane(p, w, b, norm)
    assert torch.allclose((w * (p + d)).sum(1), b, atol=1e-4)
    dual = 1 if norm == "linf" else 2
    expected = (b - (w * p).sum(1)).abs() / torch.linalg.vector_norm(w, ord=dual, dim=1)
    assert torch.allclose(per_example_norm(d, norm), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_the_projection_respects_the_box_and_gets_closest_when_it_cannot_reach(norm: str) -> None:
    torch.manual_seed(1)
    p = torch.rand(32, 20)
    w = torch.randn(32, 20)
    b = (w * p).sum(1) + 3.0 * torch.randn(32)  # often beyond what the box allows
    d = project_on_hyperplane(p, w, b, norm)
    z = p + d
    assert z.min() >= -1e-6 and z.max() <= 1 + 1e-6
    reach = torch.where(torch.sign(b - (w * p).sum(1))[:, None] * w > 0, 1.0 - p, -p)  # the farthest corner
    best_possible = (w * (p + reach)).sum(1)
    reached = (w * z).sum(1)
    feasible = (b - (w * p).sum(1)).abs() <= (best_possible - (w * p).sum(1)).abs()
    assert torch.allclose(reached[feasible], b[feasible], atol=1e-3)
    assert torch.allclose(reached[~feasible], best_possible[~feasible], atol=1e-3)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fab_t_breaks_a_linear_model_exactly_when_an_adversarial_point_exists(norm: str) -> None:
    model = _linear(3, seed=2)
    torch.manual_seed(3)
    x = (0.4 + 0.2 * torch.rand(40, 1, 4, 4)).float()
    y = model(x).argmax(1)
    distance = _min_distance(model, x, y, norm)
    scale = float(distance.median())
    for factor, expect_broken in ((0.9, False), (1.1, True)):
        eps = factor * scale
        x_adv = fab_t(model, x, y, eps=eps, norm=norm, steps=30, n_targets=2)
        broken = model(x_adv).argmax(1) != y
        exists = distance <= eps
        assert not (broken & ~exists).any()  # never beyond what is possible
        if expect_broken:
            assert broken[distance <= 0.95 * eps].all()  # finds what clearly exists
        assert (per_example_norm(x_adv - x, norm) <= eps * (1 + 1e-5)).all()


def test_fab_t_is_targeted_and_finds_near_minimal_points() -> None:
    model = _linear(4, seed=4)
    torch.manual_seed(5)
    x = (0.45 + 0.1 * torch.rand(30, 1, 4, 4)).float()
    logits = model(x)
    y = logits.argmax(1)
    second = logits.sort(1).indices[:, -2]
    x_adv = fab_t(model, x, y, eps=1.0, norm="l2", steps=50, n_targets=1)
    pred = model(x_adv).argmax(1)
    broken = pred != y
    assert broken.float().mean() > 0.9
    w = model[1].weight.detach()
    to_target = (logits.gather(1, y[:, None]).squeeze(1) - logits.gather(1, second[:, None]).squeeze(1)) / (
        torch.linalg.vector_norm(w[y] - w[second], dim=1)
    )
    found = per_example_norm(x_adv - x, "l2")
    assert (found[broken] <= 1.1 * to_target[broken] + 1e-6).all()  # near the target's boundary
    assert (pred[broken] == second[broken]).float().mean() > 0.9  # across it, into the target


def test_fab_t_on_a_cnn_stays_in_the_ball_and_the_box_and_eps_zero_is_the_identity() -> None:
    model = build_model("cnn").eval()
    torch.manual_seed(6)
    x, y = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,))
    for norm, eps in (("linf", 0.3), ("l2", 2.0)):
        out = fab_run(model, x, y, eps=eps, norm=norm, steps=5, n_targets=2, restarts=2)
        assert (per_example_norm(out.x_adv - x, norm) <= eps + 1e-5).all()
        assert out.x_adv.min() >= 0 and out.x_adv.max() <= 1
        assert out.clean_logits is not None and out.clean_logits.shape == (8, 10)
    assert torch.equal(fab_t(model, x, y, eps=0.0, steps=3, n_targets=1), x)


def test_fab_t_runs_through_the_evaluator_that_enforces_the_threat_model(mini: Dataset) -> None:
    torch.manual_seed(7)
    model = build_model("cnn").eval()
    x = to_float(mini.x_test[:64])
    y = mini.y_test[:64]
    result = evaluate_robustness(model, x, y, eps=0.1, attacks="fab-t", steps=10, n_targets=2, checks=False)
    assert 0.0 <= result.accuracy("fab-t") <= result.clean_accuracy
    (fab,) = result.attacks
    assert fab.settings == {"eps": 0.1, "norm": "linf", "steps": 10, "restarts": 1, "n_targets": 2}
    assert fab.perturbation["linf_max"] <= 0.1 + 1e-6
