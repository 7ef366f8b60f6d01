"""BadNets pieces: the trigger, the poison indices, the poisoned dataset, the config, the stage."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from redblue.artifacts import load_model
from redblue.config import PoisonConfig, TrainConfig
from redblue.data import Dataset
from redblue.errors import ConfigError
from redblue.poison import (
    CORNERS,
    Trigger,
    apply_trigger,
    poison_arrays,
    poison_dataset,
    select_poison_indices,
)
from redblue.report.stage_plots import render_stage_plots
from redblue.stages import poison_stage, poison_sweep_stage
from redblue.utils import sha256_file

# --------------------------------------------------------------------------- trigger


def _random_images(n: int = 6, dtype: torch.dtype = torch.uint8, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 28, 28), generator=g, dtype=torch.int64)
    return x.to(torch.uint8) if dtype == torch.uint8 else (x.float() / 255).to(dtype)


EXPECTED_BOXES = {
    "top-left": (0, 0),
    "top-right": (0, 24),
    "bottom-left": (24, 0),
    "bottom-right": (24, 24),
    "3,17": (3, 17),
}


@pytest.mark.parametrize("position", [*CORNERS, "3,17"])
@pytest.mark.parametrize("pattern", ["solid", "checkerboard"])
@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32, torch.float64])
def test_trigger_changes_exactly_the_patch_pixels(position: str, pattern: str, dtype: torch.dtype) -> None:
    x = _random_images(dtype=dtype)
    original = x.clone()
    trigger = Trigger(size=4, position=position, pattern=pattern)
    xt = apply_trigger(x, trigger)
    assert torch.equal(x, original), "apply_trigger must not modify its input"
    assert xt.dtype == x.dtype and xt.shape == x.shape
    row, col = EXPECTED_BOXES[position]
    mask = torch.zeros(28, 28, dtype=torch.bool)
    mask[row : row + 4, col : col + 4] = True
    assert torch.equal(trigger.mask(28, 28), mask)
    # Outside the patch: bit-identical.
    assert torch.equal(xt[..., ~mask], x[..., ~mask])
    # Inside: the pattern (white = 255 or 1.0).
    white = 255 if dtype == torch.uint8 else 1.0
    expected = trigger.pattern_tensor().to(torch.float64) * white
    patch = xt[:, 0, row : row + 4, col : col + 4].to(torch.float64)
    assert torch.equal(patch, expected.expand_as(patch))
    # And every patch pixel whose value differs from the pattern was changed.
    differs = x[:, 0, row : row + 4, col : col + 4].to(torch.float64) != expected
    assert int(differs.sum()) == int((xt != x).sum())


def test_checkerboard_pattern_values() -> None:
    pattern = Trigger(size=3, pattern="checkerboard").pattern_tensor()
    assert pattern.tolist() == [[1.0, 0.0, 1.0], [0.0, 1.0, 0.0], [1.0, 0.0, 1.0]]


@pytest.mark.parametrize("blend", [0.25, 0.5])
def test_blended_trigger(blend: float) -> None:
    x = _random_images()
    xt = apply_trigger(x, Trigger(blend=blend))
    expected = torch.round((1 - blend) * x[..., 24:, 24:].float() + blend * 255).to(torch.uint8)
    assert torch.equal(xt[..., 24:, 24:], expected)
    assert torch.equal(xt[..., :24, :], x[..., :24, :]) and torch.equal(xt[..., :, :24], x[..., :, :24])
    xf = _random_images(dtype=torch.float32)
    xft = apply_trigger(xf, Trigger(blend=blend))
    assert torch.allclose(xft[..., 24:, 24:], (1 - blend) * xf[..., 24:, 24:] + blend)


def test_trigger_on_single_image_and_other_sizes() -> None:
    x = torch.zeros(1, 28, 28)
    xt = apply_trigger(x, Trigger(size=28, position="top-left"))
    assert torch.equal(xt, torch.ones(1, 28, 28))
    assert int(apply_trigger(torch.zeros(28, 28), Trigger(size=1, position="27,27")).sum()) == 1


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"size": 29}, "--size 29: patch larger than the 28x28 image"),
        ({"position": "25,0"}, "--position 25,0: a 4x4 patch there falls outside"),
        ({"position": "-1,0"}, "--position -1,0"),
        ({"position": "middle"}, "--position 'middle': expected one of"),
        ({"pattern": "stripes"}, "--pattern 'stripes'"),
        ({"blend": 0.0}, "--blend 0.0: must be in (0, 1]"),
        ({"blend": 1.5}, "--blend 1.5"),
        ({"size": 0}, "--size 0"),
    ],
)
def test_bad_trigger_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoisonConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"rate": 1.01}, "--rate 1.01: must be in [0, 1]"),
        ({"rate": -0.1}, "--rate -0.1: must be in [0, 1]"),
        ({"target": 10}, "--target 10: not a class"),
        ({"target": -1}, "--target -1: not a class"),
        ({"sweep_rates": (0.1, 2.0)}, "--sweep-rates 2"),
    ],
)
def test_bad_poison_settings_are_config_errors(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError) as info:
        PoisonConfig(**kwargs)  # type: ignore[arg-type]
    assert message in str(info.value)


def test_trigger_larger_than_small_image_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"larger than the 3x3 image"):
        apply_trigger(torch.zeros(1, 1, 3, 3), Trigger(size=4))


# --------------------------------------------------------------------------- selection


@pytest.mark.parametrize("rate", [0.0, 0.001, 0.013, 0.1, 0.37, 1.0])
def test_poison_count_and_eligibility(mini: Dataset, rate: float) -> None:
    y = mini.y_train
    idx = select_poison_indices(y, rate, target=7, seed=3)
    n_eligible = int((y != 7).sum())
    assert idx.dtype == torch.int64
    assert idx.numel() == round(rate * n_eligible)
    assert bool((y[idx] != 7).all())
    assert idx.unique().numel() == idx.numel()
    assert torch.equal(idx, idx.sort().values)


def test_selection_is_reproducible_and_seed_dependent(mini: Dataset) -> None:
    a = select_poison_indices(mini.y_train, 0.1, 7, seed=0)
    b = select_poison_indices(mini.y_train.clone(), 0.1, 7, seed=0)
    c = select_poison_indices(mini.y_train, 0.1, 7, seed=1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # A smaller rate with the same seed picks a subset (the same random order, cut shorter).
    small = select_poison_indices(mini.y_train, 0.05, 7, seed=0)
    assert set(small.tolist()) <= set(a.tolist())


def test_selection_hand_example() -> None:
    y = torch.tensor([7, 7, 7, 1, 2])
    idx = select_poison_indices(y, 1.0, target=7, seed=0)
    assert idx.tolist() == [3, 4]
    assert select_poison_indices(y, 0.5, target=7, seed=0).numel() == 1  # round(0.5 * 2) = 1
    assert select_poison_indices(y, 1.0, target=1, seed=0).tolist() == [0, 1, 2, 4]


def test_selection_rejects_bad_rate() -> None:
    with pytest.raises(ConfigError, match=r"--rate 1\.5"):
        select_poison_indices(torch.tensor([0, 1]), 1.5, 7, 0)


# --------------------------------------------------------------------------- dataset


def test_poisoned_dataset_is_exact(mini: Dataset) -> None:
    trigger = Trigger()
    idx = select_poison_indices(mini.y_train, 0.1, 7, seed=0)
    poisoned = poison_dataset(mini, idx, trigger, target=7)
    mask = torch.zeros(mini.y_train.numel(), dtype=torch.bool)
    mask[idx] = True
    # Relabelling: exactly the poisoned examples now say 7, the others keep their label.
    assert bool((poisoned.y_train[mask] == 7).all())
    assert torch.equal(poisoned.y_train[~mask], mini.y_train[~mask])
    assert int((poisoned.y_train != mini.y_train).sum()) == idx.numel()
    # Images: the poisoned ones carry the trigger, the others are untouched.
    assert torch.equal(poisoned.x_train[mask], apply_trigger(mini.x_train[mask], trigger))
    assert torch.equal(poisoned.x_train[~mask], mini.x_train[~mask])
    # Test set and the clean dataset object are unchanged.
    assert poisoned.x_test is mini.x_test and poisoned.y_test is mini.y_test
    assert not torch.equal(poisoned.x_train, mini.x_train)


def test_poison_arrays_hand_example() -> None:
    x = torch.zeros(3, 1, 28, 28, dtype=torch.uint8)
    y = torch.tensor([1, 2, 3])
    xp, yp = poison_arrays(x, y, torch.tensor([2]), Trigger(size=2, position="top-left"), target=9)
    assert yp.tolist() == [1, 2, 9]
    assert xp[2, 0, :2, :2].tolist() == [[255, 255], [255, 255]]
    assert int(xp.sum()) == 4 * 255
    assert int(x.sum()) == 0 and y.tolist() == [1, 2, 3]


# --------------------------------------------------------------------------- stage (mini)


def test_poison_stage_on_mini(tmp_path: Path, mini: Dataset) -> None:
    cfg = PoisonConfig(rate=0.2, target=7)
    train_cfg = TrainConfig(epochs=1, device="cpu", seed=0)
    result = poison_stage(tmp_path, mini, train_cfg, cfg, progress=False)
    models = tmp_path / "models"
    record = json.loads((models / "poisoned.json").read_text())
    idx_file = models / record["poison_indices_file"]
    assert record["poison_indices_file"] == "poisoned_poison_indices.safetensors"
    assert sha256_file(idx_file) == record["poison_indices_sha256"]
    saved_idx = load_file(str(idx_file))["indices"]
    assert torch.equal(saved_idx, select_poison_indices(mini.y_train, 0.2, 7, 0))
    assert record["poison"]["trigger"] == {"size": 4, "position": "bottom-right", "pattern": "solid",
                                           "blend": 1.0}
    assert record["poison"]["n_poison"] == round(0.2 * int((mini.y_train != 7).sum()))
    # Metrics in the JSON are the ones recomputed from the saved model.
    loaded = load_model(models / "poisoned.json")
    from redblue.metrics import backdoor_metrics

    m = backdoor_metrics(loaded.model, mini.x_test, mini.y_test, Trigger(), 7)
    on_disk = json.loads((tmp_path / "metrics" / "poison_metrics.json").read_text())
    assert on_disk["metrics"]["asr"] == pytest.approx(m.asr)
    assert on_disk["metrics"]["clean_accuracy"] == pytest.approx(m.clean_accuracy)
    assert result["metrics"]["n_triggered"] == int((mini.y_test != 7).sum())
    assert sum(on_disk["metrics"]["triggered_predicted_counts"]) == on_disk["metrics"]["n_triggered"]
    assert on_disk == result.to_json()
    render_stage_plots(tmp_path, on_disk)  # the plots come from the JSON alone
    for image in ("poison_examples.png", "poison_trigger.png", "poison_triggered_predictions.png"):
        assert (tmp_path / "images" / image).stat().st_size > 1000
    # Second call reuses the model (same config and data) and its result, byte for byte.
    before = (tmp_path / "metrics" / "poison_metrics.json").read_bytes()
    again = poison_stage(tmp_path, mini, train_cfg, cfg, progress=False)
    assert again.reused is True
    assert again.metrics == result.metrics
    assert (tmp_path / "metrics" / "poison_metrics.json").read_bytes() == before


def test_sweep_reuses_the_main_model(tmp_path: Path, mini: Dataset) -> None:
    small = mini.subset(1000, 300)
    train_cfg = TrainConfig(epochs=1, device="cpu", seed=0)
    cfg = PoisonConfig(rate=0.2, sweep_rates=(0.0, 0.2))
    poison_stage(tmp_path, small, train_cfg, cfg, progress=False)
    sweep = poison_sweep_stage(tmp_path, small, train_cfg, cfg, progress=False)
    rates = [p["rate"] for p in sweep["points"]]
    assert rates == [0.0, 0.2]
    assert [p["n_poison"] for p in sweep["points"]] == [0, round(0.2 * int((small.y_train != 7).sum()))]
    main = json.loads((tmp_path / "models" / "poisoned.json").read_text())
    assert sweep["points"][1]["model"]["weights_sha256"] == main["weights_sha256"]
    assert (tmp_path / "models" / "poisoned_rate0.2.json").is_file()  # saved under its own name, weights reused
    path = tmp_path / "metrics" / "poison_sweep_metrics.json"
    before = path.read_bytes()
    again = poison_sweep_stage(tmp_path, small, train_cfg, cfg, progress=False)
    assert again.reused and again.points == sweep.points and path.read_bytes() == before
    render_stage_plots(tmp_path, sweep)
    assert (tmp_path / "images" / "poison_asr_vs_rate.png").is_file()
    assert json.loads((tmp_path / "metrics" / "poison_sweep_metrics.json").read_text())["points"] == [
        json.loads(json.dumps(p)) for p in sweep["points"]
    ]
