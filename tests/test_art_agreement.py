"""Agreement with the Adversarial Robustness Toolbox on the full-MNIST baseline (1,000 test images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from redblue.artifacts import LoadedModel
from redblue.attacks import fgsm, pgd
from redblue.data import Dataset, to_float
from redblue.evaluation import evaluate_robustness

pytestmark = pytest.mark.slow
art = pytest.importorskip("art")


@pytest.fixture(scope="module")
def setup(baseline: LoadedModel, mnist: Dataset) -> tuple[torch.nn.Module, torch.Tensor, torch.Tensor, object]:
    from art.estimators.classification import PyTorchClassifier

    model = baseline.model.eval()
    x, y = to_float(mnist.x_test[:1000]), mnist.y_test[:1000]
    classifier = PyTorchClassifier(
        model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
        clip_values=(0.0, 1.0), device_type="cpu",
    )  # fmt: skip
    return model, x, y, classifier


def art_accuracy(model: torch.nn.Module, x_adv: np.ndarray, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(torch.from_numpy(x_adv)).argmax(1) == y).float().mean())


def test_fgsm_images_equal_arts(setup: tuple) -> None:  # type: ignore[type-arg]
    from art.attacks.evasion import FastGradientMethod

    model, x, y, classifier = setup
    reference = FastGradientMethod(classifier, eps=0.25, batch_size=500).generate(x.numpy(), y=y.numpy())
    ours = torch.cat([fgsm(model, x[i : i + 500], y[i : i + 500], eps=0.25) for i in range(0, 1000, 500)])
    assert float(np.abs(ours.numpy() - reference).max()) <= 1e-5
    # and FGSM is one PGD step with alpha = eps and no random start
    one_step = pgd(model, x, y, eps=0.25, alpha=0.25, steps=1, random_start=False)
    assert torch.equal(one_step, fgsm(model, x, y, eps=0.25))


def test_pgd_robust_accuracy_within_half_a_point_of_arts(setup: tuple) -> None:  # type: ignore[type-arg]
    from art.attacks.evasion import ProjectedGradientDescent

    model, x, y, classifier = setup
    reference = ProjectedGradientDescent(
        classifier, eps=0.1, eps_step=0.01, max_iter=20, num_random_init=0, batch_size=500, verbose=False
    ).generate(x.numpy(), y=y.numpy())
    ours = evaluate_robustness(
        model, x, y, attacks="pgd", eps=0.1, alpha=0.01, steps=20, random_start=False, checks=False
    )
    art_acc = art_accuracy(model, reference, y)
    assert 0.2 < art_acc < 0.9  # an eps where the comparison means something
    assert abs(ours.accuracy("pgd") - art_acc) <= 0.005


def test_apgd_robust_accuracy_within_one_point_of_arts(setup: tuple) -> None:  # type: ignore[type-arg]
    from art.attacks.evasion import AutoProjectedGradientDescent

    model, x, y, classifier = setup
    torch.manual_seed(0)
    np.random.seed(0)
    reference = AutoProjectedGradientDescent(
        classifier, eps=0.1, eps_step=0.2, max_iter=50, nb_random_init=1, batch_size=500,
        loss_type="cross_entropy", verbose=False,
    ).generate(x.numpy(), y=y.numpy())  # fmt: skip
    ours = evaluate_robustness(model, x, y, attacks="apgd-ce", eps=0.1, steps=50, checks=False)
    art_acc = art_accuracy(model, reference, y)
    assert 0.2 < art_acc < 0.9
    assert abs(ours.accuracy("apgd-ce") - art_acc) <= 0.01
