"""Backdoor detection: activation clustering (vs ART's ActivationDefence), spectral
signatures, and the full defence stage (slow: full MNIST)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import threadpool_limits
from torch import nn

from redblue.artifacts import LoadedModel, load_model
from redblue.config import BackdoorDefenseConfig, PoisonConfig, TrainConfig
from redblue.data import Dataset, to_float
from redblue.defenses.backdoor import (
    activation_clustering,
    penultimate_activations,
    spectral_signatures,
)
from redblue.metrics import detection_scores
from redblue.stages import defend_backdoor_stage
from redblue.stages.poison import build_poisoned, poison_config_from_record, poison_stage


@pytest.fixture(scope="module")
def poisoned_mini(mini_poisoned: Path, mini: Dataset) -> tuple[LoadedModel, Dataset, torch.Tensor]:
    loaded = load_model(mini_poisoned / "models" / "poisoned.json")
    data, indices = build_poisoned(mini, poison_config_from_record(loaded.record))
    return loaded, data, indices


def _jaccard(a: set[int], b: set[int]) -> float:
    return len(a & b) / max(1, len(a | b))


def test_penultimate_activations_are_the_input_of_the_last_linear(
    poisoned_mini: tuple[LoadedModel, Dataset, torch.Tensor],
) -> None:
    loaded, data, _ = poisoned_mini
    model = loaded.model
    x = data.x_train[:64]
    acts = penultimate_activations(model, x, batch_size=16)
    assert acts.shape == (64, 1600)
    head = model[-1]
    assert isinstance(head, nn.Linear)
    model.train()  # the mode is restored and dropout is off while reading activations
    with torch.no_grad():
        model.eval()
        logits = model(to_float(x))
    assert torch.allclose(head(acts), logits, atol=1e-4)


def test_activation_clustering_finds_the_poison_on_mini(
    poisoned_mini: tuple[LoadedModel, Dataset, torch.Tensor],
) -> None:
    loaded, data, indices = poisoned_mini
    acts = penultimate_activations(loaded.model, data.x_train)
    det = activation_clustering(acts, data.y_train)
    scores = detection_scores(det.flagged, indices, data.y_train.numel())
    assert scores["recall"] >= 0.95 and scores["precision"] >= 0.85, scores
    # Only the target class is suspicious; its smaller cluster is (nearly all) the poison.
    assert [row["class"] for row in det.per_class if row["suspicious"]] == [7]
    assert det.per_class[7]["reclassified_own"] < 0.25
    assert all(row["reclassified_own"] > 0.25 for row in det.per_class if row["class"] != 7)


def test_activation_clustering_agrees_with_art(
    poisoned_mini: tuple[LoadedModel, Dataset, torch.Tensor],
) -> None:
    """Same model, same poisoned data: ART's ActivationDefence (PCA to 10 dims, 2-means,
    "smaller" cluster analysis) against ours with ``analysis="size"`` (the same rule).

    ART is given our penultimate activations (for an nn.Sequential, ART's own "last layer"
    is the logits layer); a second check runs ART end to end on its own (logit)
    activations against ours on the same logits. Measured overlap (Jaccard of the flagged
    sets; the model varies slightly with the torch thread count): penultimate 0.975-0.980
    overall, 1.000 in the target class; logits 0.79-0.98 overall, 0.974-0.979 in the target
    class. The overall figure moves with k-means restarts (ART runs one, we run 10) in the
    clean classes, which have no real two-cluster structure; the poisoned class agrees.
    """
    from art.defences.detector.poison import ActivationDefence
    from art.estimators.classification import PyTorchClassifier

    loaded, data, indices = poisoned_mini
    model = loaded.model.eval()
    x = to_float(data.x_train).numpy()
    y = data.y_train.numpy()
    classifier = PyTorchClassifier(model=model, loss=nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    one_hot = np.eye(10, dtype=np.float32)[y]
    poison = set(indices.tolist())
    target_idx = set(np.flatnonzero(y == 7).tolist())

    # 1. Clustering on the same (penultimate) activations.
    acts = penultimate_activations(model, data.x_train)
    ours = set(activation_clustering(acts, data.y_train, analysis="size").flagged.tolist())
    art = ActivationDefence(classifier, x, one_hot)
    art.activations_by_class = [acts.numpy()[y == c] for c in range(10)]
    np.random.seed(0)  # ART's KMeans takes no seed
    with threadpool_limits(limits=1):  # as ours: sklearn's OpenMP threads fight torch's
        _, is_clean = art.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                        cluster_analysis="smaller")
    art_flagged = set(np.flatnonzero(np.asarray(is_clean) == 0).tolist())
    print("overlap (Jaccard) on penultimate: all", _jaccard(ours, art_flagged), "target class",
          _jaccard(ours & target_idx, art_flagged & target_idx))
    assert _jaccard(ours, art_flagged) >= 0.95
    assert _jaccard(ours & target_idx, art_flagged & target_idx) >= 0.99
    assert len(poison & art_flagged) / len(poison) >= 0.9  # ART's flags cover the poison too

    # 2. ART end to end (its own activation extraction: the logits layer here).
    art2 = ActivationDefence(classifier, x, one_hot)
    np.random.seed(0)
    with threadpool_limits(limits=1):
        _, is_clean2 = art2.detect_poison(nb_clusters=2, nb_dims=10, reduce="PCA",
                                          cluster_analysis="smaller")
    art2_flagged = set(np.flatnonzero(np.asarray(is_clean2) == 0).tolist())
    with torch.no_grad():
        logits = model(to_float(data.x_train))
    ours2 = set(activation_clustering(logits, data.y_train, analysis="size").flagged.tolist())
    print("overlap (Jaccard) on logits: all", _jaccard(ours2, art2_flagged), "target class",
          _jaccard(ours2 & target_idx, art2_flagged & target_idx))
    assert _jaccard(ours2, art2_flagged) >= 0.7
    assert _jaccard(ours2 & target_idx, art2_flagged & target_idx) >= 0.95


def test_spectral_signatures_by_construction() -> None:
    g = torch.Generator().manual_seed(1)
    acts = torch.randn(1000, 32, generator=g)
    labels = torch.arange(1000) % 4
    poison = torch.arange(0, 1000, 4)[:25]  # 25 examples of class 0 shifted along a direction
    direction = torch.randn(32, generator=g)
    acts[poison] += 10.0 * direction / direction.norm()
    det = spectral_signatures(acts, labels, expected_share=0.1, num_classes=4)
    # round(1.5 * 0.1 * 250) = 38 flagged per class.
    assert [row["flagged"] for row in det.per_class] == [38, 38, 38, 38]
    flagged0 = set(det.flagged.tolist()) & set(range(0, 1000, 4))
    assert set(poison.tolist()) <= flagged0
    assert spectral_signatures(acts, labels, expected_share=0.0, num_classes=4).flagged.numel() == 0


def test_spectral_matches_an_explicit_svd() -> None:
    g = torch.Generator().manual_seed(2)
    acts = torch.randn(50, 8, generator=g)
    labels = torch.zeros(50, dtype=torch.long)
    det = spectral_signatures(acts, labels, expected_share=0.2, num_classes=1)
    centred = acts.numpy() - acts.numpy().mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    scores = (centred @ vt[0]) ** 2
    expected = np.sort(np.argsort(-scores)[:15])
    assert det.flagged.tolist() == expected.tolist()


def test_defend_stage_on_mini(tmp_path: Path, mini_poisoned: Path, mini: Dataset) -> None:
    model_path = mini_poisoned / "models" / "poisoned.json"
    cfg = BackdoorDefenseConfig(method="ac")
    result = defend_backdoor_stage(tmp_path, mini, model_path, cfg,
                                   train_cfg=TrainConfig(epochs=1, batch_size=64, device="cpu"),
                                   progress=False)
    det = result["detection"]
    assert det["recall"] >= 0.95 and det["precision"] >= 0.85
    assert result["after"]["n_train"] == mini.y_train.numel() - det["n_flagged"]
    assert result["after"]["asr"] < result["before"]["asr"]
    path = tmp_path / "metrics" / "backdoor_defense_ac_metrics.json"
    on_disk = json.loads(path.read_text())
    assert on_disk == result.to_json() and on_disk["detection"] == det
    assert sum(row["n_poison"] for row in result["per_class"]) == det["n_poison"]
    # the same detection on the same model is reused: nothing detected, trained or written again
    before = path.read_bytes()
    again = defend_backdoor_stage(tmp_path, mini, model_path, cfg,
                                  train_cfg=TrainConfig(epochs=1, batch_size=64, device="cpu"), progress=False)
    assert again.reused and again.detection == det and path.read_bytes() == before


FULL_TRAIN = TrainConfig(epochs=2, seed=0, device="cpu")
"""The full-MNIST poisoned model: 2 epochs to fit the CI budget."""


@pytest.fixture(scope="module")
def full_poisoned(tmp_path_factory: pytest.TempPathFactory, mnist: Dataset) -> tuple[Path, dict]:
    """10% BadNets on full MNIST (the default 4x4 white patch at the bottom right -> 7)."""
    out = tmp_path_factory.mktemp("full_poisoned")
    return out, poison_stage(out, mnist, FULL_TRAIN, PoisonConfig(rate=0.1), progress=False)


@pytest.mark.slow
def test_full_mnist_poison_detect_and_retrain(full_poisoned: tuple[Path, dict], mnist: Dataset) -> None:
    """10% BadNets on full MNIST, then activation clustering and retraining without what it
    flagged.

    Bounds: at 5 epochs the poisoned model scored clean accuracy 99.03-99.04% and ASR
    99.94-99.96%, detection precision 100% and recall 99.87%, on both AMD EPYC (avx512_bf16)
    and Intel Xeon (AMX bf16).
    """
    tmp_path, result = full_poisoned
    train_cfg = FULL_TRAIN
    m = result["metrics"]
    assert m["clean_accuracy"] >= 0.985 and m["asr"] >= 0.99, m
    defended = defend_backdoor_stage(tmp_path, mnist, tmp_path / "models" / "poisoned.json",
                                     BackdoorDefenseConfig(method="ac"), train_cfg=train_cfg,
                                     progress=False)
    det = defended["detection"]
    assert det["recall"] >= 0.95 and det["precision"] >= 0.9, det
    after = defended["after"]
    assert after["asr"] <= 0.01 and after["clean_accuracy"] >= m["clean_accuracy"] - 0.005, after


@pytest.mark.slow
def test_full_mnist_neural_cleanse_flags_and_unlearns(full_poisoned: tuple[Path, dict], mnist: Dataset) -> None:
    """From the model alone (issue 13's flag-and-unlearn path): Neural Cleanse flags 7 and
    only 7 on the full-MNIST poisoned model, and unlearning its reversed trigger removes the
    backdoor (ASR <= 2%) at a cost of at most 1 pp of clean accuracy.

    Measured on this model (AMD EPYC, two starts per class, 2026-12-03): 7's mask 1.2 pixels,
    2% of the median norm, anomaly index 2.39, all of it on the true patch (with one start:
    3.8 pixels just left of the patch, 0% on it); its restored trigger 3.4 pixels, 71% on the
    patch; unlearning that one: ASR 99.93% -> 1.10%, clean accuracy 98.65% -> 98.24% (2026-12-04,
    on the channels_last copy: the same masks, 1.11% and 98.23%; with 7's two further triggers
    stamped too, 3 triggers of 3.4, 3.7 and 7.9 pixels: 0.41% and 98.20%). On the 5-epoch models of
    docs/backdoor.md the MAD test alone mostly could not flag 7 (its ceiling was 1.79 on the
    default backdoor): the size rule did."""
    from safetensors.torch import load_file

    from redblue.config import BackdoorAuditConfig
    from redblue.stages.backdoor_audit import audit_backdoor_stage

    out, _ = full_poisoned
    loaded = load_model(out / "models" / "poisoned.json")
    cfg = BackdoorAuditConfig(strip=False, repair=("unlearn",), device="cpu")
    result = audit_backdoor_stage(out, loaded, mnist, cfg, progress=False)
    assert result["flagged"] == [7], result["classes"]
    assert "size-ratio" in result["classes"][7]["flagged_by"]  # redblue's rule (here the paper's fires too, at 2.46)
    assert result["true_trigger"]["only_target_flagged"]
    l1 = [c["l1"] for c in result["classes"]]
    assert l1[7] == min(l1) and l1[7] < 0.25 * float(np.median(l1))
    masks = load_file(out / "metrics" / result["triggers_file"])["masks"]
    mask = masks[7]
    near = float(mask[22:28, 22:28].sum()) / float(mask.sum())  # the patch (24:28) and 2 pixels around it
    assert result["true_trigger"]["mask_mass_near_patch"] == pytest.approx(near, abs=1e-6)
    assert result["true_trigger"]["mask_mass_on_patch"] == pytest.approx(float(mask[24:28, 24:28].sum()) / float(mask.sum()), abs=1e-6)
    assert near >= 0.5 and result["true_trigger"]["mask_mass_on_patch"] >= 0.5, mask.nonzero().tolist()
    before, (row,) = result["before"], result["repairs"]
    assert row["method"] == "unlearn" and row["details"]["classes"] == [7]
    assert row["details"]["restored_triggers"] == [7] and result["restored"]["classes"] == [7]
    assert row["details"]["stamped_l1"][0] == pytest.approx(result["restored"]["l1"][0], rel=1e-5)  # not the judged one
    (found,) = row["details"]["more_triggers"]  # then 7's next smallest triggers, each a short cut
    limit = 0.25 * float(np.median(l1))
    assert found["l1"] == pytest.approx(row["details"]["stamped_l1"], rel=1e-5) and found["limit"] == pytest.approx(limit)
    assert len(found["l1"]) >= 2 and all(v < limit for v in found["l1"][1:]) and found["stop"]  # 3 here (docs/backdoor.md)
    restored = load_file(out / "metrics" / result["triggers_file"])["restored_masks"][7]
    assert float(restored.sum()) > 0 and result["restored"]["attack_success_rate"][0] >= 0.99
    assert result["true_trigger"]["restored_mask_mass_near_patch"] == pytest.approx(
        float(restored[22:28, 22:28].sum()) / float(restored.sum()), abs=1e-6)  # fmt: skip
    assert before["asr"] >= 0.99 and row["after"]["asr"] <= 0.02, row["after"]
    assert row["after"]["clean_accuracy"] >= before["clean_accuracy"] - 0.01, (before, row["after"])
