"""Attack properties on a tiny model: eps-ball, [0, 1], eps = 0, references, targeted, modes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from redblue.artifacts import load_model
from redblue.attacks import ATTACKS, SUITES, expand, fgsm, pgd
from redblue.attacks.apgd import apgd_ce, apgd_t, checkpoints, dlr_targeted_loss
from redblue.attacks.projection import per_example_norm, project, random_start
from redblue.attacks.square import margin_loss, p_selection, square
from redblue.data import Dataset, to_float
from redblue.errors import ConfigError

N = 32


@pytest.fixture(scope="module")
def model(tiny_model_dir: Path) -> nn.Module:
    return load_model(tiny_model_dir / "models" / "baseline.json").model


@pytest.fixture(scope="module")
def batch(mini: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
    return to_float(mini.x_test[:N]), mini.y_test[:N]


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model.eval()(x).argmax(1) == y).float().mean())


CASES: list[tuple[str, Callable[..., torch.Tensor], dict[str, Any]]] = [
    ("fgsm-linf", fgsm, {"norm": "linf"}),
    ("fgsm-l2", fgsm, {"norm": "l2"}),
    ("pgd-linf", pgd, {"alpha": 0.05, "steps": 5, "norm": "linf"}),
    ("pgd-l2", pgd, {"alpha": 0.5, "steps": 5, "norm": "l2", "restarts": 2}),
    ("apgd-ce-linf", apgd_ce, {"steps": 10, "norm": "linf"}),
    ("apgd-ce-l2", apgd_ce, {"steps": 10, "norm": "l2"}),
    ("apgd-t-linf", apgd_t, {"steps": 5, "n_targets": 2}),
    ("square-linf", square, {"steps": 30}),
]


@pytest.mark.parametrize(("label", "attack", "kw"), CASES, ids=[c[0] for c in CASES])
def test_adversarial_images_stay_in_the_eps_ball_and_the_pixel_range(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    label: str,
    attack: Callable[..., torch.Tensor],
    kw: dict[str, Any],
) -> None:
    x, y = batch
    norm = kw.get("norm", "linf")
    eps = 0.3 if norm == "linf" else 2.0
    torch.manual_seed(0)
    x_adv = attack(model, x, y, eps=eps, **kw)
    assert x_adv.shape == x.shape and x_adv.dtype == torch.float32 and x_adv.device == x.device
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0
    assert float(per_example_norm(x_adv - x, norm).max()) <= eps + 1e-6
    assert accuracy(model, x_adv, y) < accuracy(model, x, y)


@pytest.mark.parametrize(("label", "attack", "kw"), CASES, ids=[c[0] for c in CASES])
def test_eps_zero_is_the_identity(
    model: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    label: str,
    attack: Callable[..., torch.Tensor],
    kw: dict[str, Any],
) -> None:
    x, y = batch
    x_adv = attack(model, x, y, eps=0.0, **kw)
    assert torch.equal(x_adv, x)


def test_fgsm_equals_one_pgd_step_with_alpha_eps_and_no_random_start(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    for norm, eps in (("linf", 0.25), ("l2", 1.5)):
        one_step = pgd(model, x, y, eps=eps, alpha=eps, steps=1, norm=norm, random_start=False)
        assert torch.equal(fgsm(model, x, y, eps=eps, norm=norm), one_step)


def test_fgsm_linf_moves_every_pixel_by_eps_unless_clipped(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    delta = (fgsm(model, x, y, eps=0.1) - x).abs()[(x >= 0.1) & (x <= 0.9)]
    moved = (delta - 0.1).abs() < 1e-6
    assert bool((moved | (delta == 0)).all())  # sign(grad) is 0 only where the gradient is 0
    assert float(moved.float().mean()) > 0.9


def test_targeted_attacks_raise_the_targets_share(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    target = torch.full_like(y, 3)
    with torch.no_grad():
        before = float((model(x).argmax(1) == 3).float().mean())
        after_fgsm = float((model(fgsm(model, x, target, eps=0.2, targeted=True)).argmax(1) == 3).float().mean())
        x_pgd = pgd(model, x, target, eps=0.3, alpha=0.02, steps=20, targeted=True)
        after_pgd = float((model(x_pgd).argmax(1) == 3).float().mean())
    assert after_fgsm > before
    assert after_pgd > 0.8 > before


def test_accuracy_falls_as_eps_grows(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    torch.manual_seed(0)
    accs = [accuracy(model, pgd(model, x, y, eps=e, alpha=e / 4, steps=10), y) for e in (0.05, 0.15, 0.3)]
    assert accs[0] >= accs[1] >= accs[2]
    assert accs[2] == 0.0


def test_more_restarts_never_raise_pgd_accuracy(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    kw = {"eps": 0.1, "alpha": 0.02, "steps": 5}
    torch.manual_seed(1)
    one = model(pgd(model, x, y, restarts=1, **kw)).argmax(1) == y
    torch.manual_seed(1)
    three = model(pgd(model, x, y, restarts=3, **kw)).argmax(1) == y
    assert bool((three <= one).all())  # every example fooled once stays fooled


def test_early_stop_keeps_the_worst_case(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    x, y = batch
    kw = {"eps": 0.15, "alpha": 0.02, "steps": 15, "random_start": False}
    plain = model(pgd(model, x, y, **kw)).argmax(1) == y
    stopped = model(pgd(model, x, y, early_stop=True, **kw)).argmax(1) == y
    # Early stopping freezes each example at its first fooling iterate: never less fooled.
    assert int(stopped.sum()) <= int(plain.sum())


def test_attacks_restore_the_model_mode_and_leave_weight_gradients_alone(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    model.train()
    try:
        for attack in (lambda: fgsm(model, x, y, eps=0.1), lambda: pgd(model, x, y, eps=0.1, alpha=0.05, steps=2)):
            attack()
            assert model.training
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()


def test_pgd_inside_bf16_autocast_returns_fp32_images_in_the_ball(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]
) -> None:
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x_adv = pgd(model, x, y, eps=0.3, alpha=0.05, steps=3)
        x_fgsm = fgsm(model, x, y, eps=0.3)
    for images in (x_adv, x_fgsm):
        assert images.dtype == torch.float32
        assert float((images - x).abs().max()) <= 0.3 + 1e-6
        assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0


def test_norms_agree_with_torch_linalg() -> None:
    delta = torch.randn(5, 1, 28, 28)
    flat = delta.flatten(1)
    assert torch.allclose(per_example_norm(delta, "l2"), torch.linalg.vector_norm(flat, 2, dim=1))
    assert torch.allclose(per_example_norm(delta, "linf"), torch.linalg.vector_norm(flat, float("inf"), dim=1))


@pytest.mark.parametrize(("norm", "eps"), [("linf", 0.1), ("l2", 1.0)])
def test_projection_lands_in_the_ball_and_is_idempotent(norm: str, eps: float) -> None:
    torch.manual_seed(0)
    x = torch.rand(6, 1, 28, 28)
    far = x + torch.randn_like(x)
    p = project(far, x, eps, norm)
    assert float(per_example_norm(p - x, norm).max()) <= eps + 1e-6
    assert float(p.min()) >= 0.0 and float(p.max()) <= 1.0
    assert torch.allclose(project(p, x, eps, norm), p, atol=1e-6)
    start = random_start(x, eps, norm)
    assert float(per_example_norm(start - x, norm).max()) <= eps + 1e-6


def test_apgd_checkpoints_follow_the_paper() -> None:
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 of 100 iterations (Croce & Hein 2020).
    assert checkpoints(100) == [22, 41, 57, 70, 80, 87, 93, 99]


def test_dlr_and_margin_losses_by_hand() -> None:
    logits = torch.tensor([[5.0, 3.0, 1.0, 0.0, -1.0]])
    y, t = torch.tensor([0]), torch.tensor([1])
    # -(z_y - z_t) / (z_max - (z_3rd + z_4th) / 2) = -(5 - 3) / (5 - 0.5) = -0.444...
    assert torch.allclose(dlr_targeted_loss(logits, y, t), torch.tensor([-2.0 / 4.5]))
    assert torch.allclose(margin_loss(logits, y), torch.tensor([2.0]))
    assert torch.allclose(margin_loss(logits, torch.tensor([2])), torch.tensor([-4.0]))


def test_square_schedule_halves_the_window_share() -> None:
    assert p_selection(0.8, 0, 10000) == 0.8
    assert p_selection(0.8, 30, 10000) == 0.4
    assert p_selection(0.8, 100, 1000) == pytest.approx(0.8 / 16)  # 1,000 queries: rescaled


def test_registry_and_suites() -> None:
    assert set(ATTACKS) == {"fgsm", "pgd", "apgd-ce", "apgd-t", "fab-t", "square"}
    assert SUITES == {"quick": ["fgsm", "pgd"], "standard": ["apgd-ce", "apgd-t"]}
    assert expand("standard,square") == ["apgd-ce", "apgd-t", "square"]
    assert expand("quick,fgsm") == ["fgsm", "pgd"]
    with pytest.raises(ConfigError, match="--attack 'cw'"):
        expand("cw")


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"eps": -0.1}, "--eps"),
        ({"eps": 1.5}, "--eps"),
        ({"steps": 0}, "--steps"),
        ({"alpha": 0.0}, "--alpha"),
        ({"norm": "l1"}, "--norm"),
        ({"restarts": 0}, "--restarts"),
    ],
)
def test_bad_settings_are_config_errors(
    model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor], kw: dict[str, Any], message: str
) -> None:
    x, y = batch
    settings: dict[str, Any] = {"eps": 0.1, "alpha": 0.01, "steps": 2, **kw}
    with pytest.raises(ConfigError, match=message):
        pgd(model, x, y, **settings)
