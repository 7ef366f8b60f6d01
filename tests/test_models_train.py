"""Model registry, the training loop, evaluation metrics and determinism."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from redblue.config import TrainConfig
from redblue.data import Dataset
from redblue.errors import ConfigError
from redblue.models import MODELS, Normalize, build_model
from redblue.train import LAYOUT, DefaultLayout, channels_last, confusion_matrix, evaluate, fit, predict, prepare_model

from .user_models import ViewNet


def test_cnn_is_the_original_architecture() -> None:
    model = build_model("cnn")
    assert isinstance(model[0], Normalize)
    convs = [m for m in model if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (3, 3)), (64, (3, 3))]
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.5 for m in model)
    assert sum(p.numel() for p in model.parameters()) == 34_826
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_cnn_pools_before_relu_with_keras_outputs_and_gradients(precision: str) -> None:
    """``cnn`` (pool, then ReLU: faster) against ``cnn-keras`` (ReLU, then pool), same seed:
    the same weights, and bit-identical logits and weight gradients, in fp32 and under bf16."""
    ours = build_model("cnn", seed=0).to(memory_format=torch.channels_last)
    keras = build_model("cnn-keras", seed=0).to(memory_format=torch.channels_last)
    assert [type(m) for m in ours][2:4] == [torch.nn.MaxPool2d, torch.nn.ReLU]
    assert [type(m) for m in keras][2:4] == [torch.nn.ReLU, torch.nn.MaxPool2d]
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), keras.state_dict().values(), strict=True))
    assert list(ours.state_dict()) == list(keras.state_dict())
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(0)).contiguous(
        memory_format=torch.channels_last
    )
    y = torch.arange(64) % 10
    grads, logits = [], []
    for model in (ours, keras):
        model.eval()  # dropout off, so both see the same network
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        torch.nn.functional.cross_entropy(out.float(), y).backward()
        logits.append(out.detach())
        grads.append([p.grad for p in model.parameters()])
    assert torch.equal(logits[0], logits[1])
    assert all(torch.equal(a, b) for a, b in zip(*grads, strict=True))


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_registered_model_maps_pixels_to_logits(name: str) -> None:
    out = build_model(name).eval()(torch.rand(3, 1, 28, 28))
    assert out.shape == (3, 10)
    assert not torch.allclose(out.softmax(1).sum(1), out.sum(1))  # logits, not probabilities


def test_the_smooth_wide_model_is_cnn_wide_with_silu() -> None:
    """Same weights from the same seed, every ReLU a SiLU, so a different function."""
    smooth, wide = build_model("cnn-wide-silu", seed=0), build_model("cnn-wide", seed=0)
    a, b = smooth.state_dict(), wide.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)
    kinds = [type(m) for m in smooth.modules()]
    assert nn.ReLU not in kinds and kinds.count(nn.SiLU) == [type(m) for m in wide.modules()].count(nn.ReLU) == 3
    x = torch.rand(2, 1, 28, 28)
    assert not torch.allclose(smooth.eval()(x), wide.eval()(x))


def test_unknown_model_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("resnet")


def test_normalize_is_inside_the_model() -> None:
    layer = Normalize(0.5, 0.25)
    assert torch.allclose(layer(torch.tensor([[[[0.0, 0.5, 1.0]]]])), torch.tensor([[[[-2.0, 0.0, 2.0]]]]))


def test_confusion_matrix_by_hand() -> None:
    y_true = torch.tensor([0, 0, 1, 2, 2, 2])
    y_pred = torch.tensor([0, 1, 1, 2, 0, 2])
    assert confusion_matrix(y_true, y_pred, 3) == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


@pytest.fixture(scope="module")
def small(mini: Dataset) -> Dataset:
    return mini.subset(n_train=1500, n_test=500)


@pytest.mark.parametrize("precision", ["fp32", "auto"])
def test_same_seed_same_metrics(small: Dataset, precision: str) -> None:
    cfg = TrainConfig(epochs=1, seed=3, device="cpu", precision=precision)
    runs = []
    for _ in range(2):
        model = build_model("cnn", seed=3)
        result = fit(model, small, cfg, progress=False)
        runs.append((result.history[0]["loss"], result.history[0]["test_accuracy"], model[1].weight.sum().item()))
    assert runs[0] == runs[1]
    other = fit(
        build_model("cnn", seed=4),
        small,
        TrainConfig(epochs=1, seed=4, device="cpu", precision=precision),
        progress=False,
    )
    assert other.history[0]["loss"] != runs[0][0]


def test_fit_learns_and_keeps_history(small: Dataset) -> None:
    model = build_model("cnn")
    result = fit(model, small, TrainConfig(epochs=2, seed=0, device="cpu"), progress=False)
    assert [h["epoch"] for h in result.history] == [1, 2]
    assert set(result.history[0]) >= {"loss", "train_accuracy", "test_accuracy", "seconds"}
    assert result.history[1]["loss"] < result.history[0]["loss"]
    assert result.history[-1]["test_accuracy"] > 0.8
    assert not model.training and result.precision in ("fp32", "bf16")


def test_evaluate_agrees_with_a_manual_count(small: Dataset) -> None:
    model = build_model("cnn").eval()
    ev = evaluate(model, small.x_test, small.y_test, batch_size=64)
    with torch.no_grad():
        pred = model(small.x_test.float() / 255).argmax(1)
    assert ev.n == 500 and ev.accuracy == (pred == small.y_test).sum().item() / 500
    assert sum(map(sum, ev.confusion)) == 500
    assert sum(ev.confusion[i][i] for i in range(10)) == (pred == small.y_test).sum().item()
    lat = ev.latency
    assert lat["batch_size"] == 128 and lat["repeats"] >= 5 and lat["per_image_us"] > 0
    assert lat["per_image_us"] == pytest.approx(lat["median_batch_ms"] * 1e3 / 128)


def test_perturb_hook_changes_what_is_trained_on(small: Dataset) -> None:
    seen: list[float] = []

    def perturb(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        seen.append(float(x.mean()))
        return torch.zeros_like(x)

    model = build_model("cnn")
    result = fit(
        model,
        small.subset(256, 100),
        TrainConfig(epochs=1, batch_size=128, device="cpu"),
        perturb=perturb,
        progress=False,
    )
    assert len(seen) == 2 and all(v > 0 for v in seen)
    # Trained on blank images only, so the model cannot beat chance by much.
    assert result.history[0]["test_accuracy"] < 0.5


@pytest.mark.parametrize("channels", [1, 3])
def test_a_model_that_fails_in_channels_last_keeps_the_default_layout(channels: int) -> None:
    """prepare_model puts a model in channels_last; a user's module with a ``.view`` after a
    convolution fails there, so on a probe it is found out and kept in the default layout: the
    same module (same state-dict keys), marked, computing its own function on the
    channels_last inputs redblue feeds it; a later call leaves it so. TorchScript, which takes
    no hooks, comes back inside DefaultLayout."""
    torch.manual_seed(0)
    x = torch.rand(6, channels, 8, 8)
    plain = nn.Sequential(nn.Conv2d(channels, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Flatten(), nn.Linear(64, 10))
    assert prepare_model(plain, None, x) is plain and getattr(plain, LAYOUT) == "channels_last"
    assert plain[2].weight.is_contiguous(memory_format=torch.channels_last) and not plain[2].weight.is_contiguous()
    model, reference = ViewNet(channels), ViewNet(channels)
    reference.load_state_dict(model.state_dict())
    with pytest.raises(RuntimeError, match="view"):  # what the conversion alone does to it
        prepare_model(ViewNet(channels), None)(channels_last(x))
    assert prepare_model(model, torch.device("cpu"), x) is model and getattr(model, LAYOUT) == "default"
    assert list(model.state_dict()) == ["conv.weight", "conv.bias", "fc.weight", "fc.bias"]
    with torch.no_grad():
        assert torch.allclose(model(channels_last(x)), reference(x), atol=1e-6)
        assert prepare_model(model, None, x) is model
        assert torch.allclose(model(channels_last(x)), reference(x), atol=1e-6)
        scripted = prepare_model(torch.jit.script(reference), None, x)
        assert isinstance(scripted, DefaultLayout)
        assert torch.allclose(scripted(channels_last(x)), reference(x), atol=1e-6)
    assert len(model._forward_pre_hooks) == 1  # probed once, hooked once
    fresh = ViewNet(channels)
    with torch.no_grad():
        expected = fresh(x).argmax(1)
    assert torch.equal(predict(fresh, x), expected)  # the public helpers check too (channels_last batches)
    wrong, other = torch.rand(2, channels, 5, 5), ViewNet(channels)  # fails in both layouts:
    assert prepare_model(other, None, wrong) is other and not hasattr(other, LAYOUT)  # no verdict kept


def test_fit_and_evaluate_a_model_that_needs_the_default_layout(small: Dataset) -> None:
    """Training and evaluation run a user's ``.view`` module (no RuntimeError on channels_last
    batches); the caller's module is the one trained."""
    model = ViewNet(size=28)
    before = model.fc.weight.detach().clone()
    result = fit(model, small, TrainConfig(epochs=1, batch_size=64, device="cpu"), progress=False)
    assert not torch.equal(model.fc.weight, before) and result.history[0]["test_accuracy"] > 0.5
    ev = evaluate(model, small.x_test, small.y_test)
    assert ev.accuracy == result.history[0]["test_accuracy"]


@pytest.mark.slow
def test_baseline_reaches_99_percent_on_full_mnist(baseline_dir: Path, baseline: object) -> None:
    """A bound: 5 epochs gave 99.11% (AMD EPYC, avx512_bf16) and 99.10% (Intel Xeon, AMX bf16)."""
    from redblue.artifacts import LoadedModel

    assert isinstance(baseline, LoadedModel)
    metrics = json.loads((baseline_dir / "metrics" / "baseline_metrics.json").read_text())["metrics"]
    assert metrics["clean_accuracy"] >= 0.990 and metrics["n_test"] == 10_000
    history = baseline.record["training"]["history"]
    assert len(history) == 5 and history[-1]["test_accuracy"] >= 0.990
