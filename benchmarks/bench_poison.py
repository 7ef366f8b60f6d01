"""BadNets poisoning and backdoor detection on full MNIST: how long the tensor operations take.

* Poisoning the 60,000-image training set (10%, 4x4 bottom-right patch, target 7):
  ``select_poison_indices`` and ``poison_arrays`` (one gather, stamp, scatter).
* Triggering the 10,000-image test set with ``apply_trigger`` (uint8), beside ART's
  numpy ``add_pattern_bd`` on the same images (float, its own 3x3 pattern: a reference
  point, not the same trigger).
* Detection on a poisoned model (trained here for ``--epochs`` epochs unless ``--model``
  names one): penultimate activations, activation clustering (ours; and ART's
  ActivationDefence clustering on the same activations), spectral signatures.

Medians of ``--repeats`` runs for the tensor operations. Run:

    REDBLUE_DATA_DIR=../shared/datasets python -m benchmarks.bench_poison
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import data_dir, peak_rss_mib, timed, write
from redblue.artifacts import load_model
from redblue.config import PoisonConfig, TrainConfig
from redblue.data import load_dataset, to_float
from redblue.defenses.backdoor import (
    activation_clustering,
    penultimate_activations,
    spectral_signatures,
)
from redblue.metrics import detection_scores
from redblue.models import build_model
from redblue.poison import apply_trigger, poison_arrays, select_poison_indices
from redblue.stages.poison import build_poisoned, poison_config_from_record
from redblue.train import fit
from redblue.utils import seed_everything


def median_ms(fn: Callable[[], Any], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=20, help="runs per tensor operation")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the poisoned model trained here")
    parser.add_argument("--model", type=Path, default=None, help="a poisoned model's .json (skip training)")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False)
    cfg = PoisonConfig(rate=0.1, target=7)
    trigger = cfg.trigger()

    indices = select_poison_indices(data.y_train, cfg.rate, cfg.target, cfg.poison_seed)
    x_test_float = to_float(data.x_test)
    ops = {
        "select_poison_indices_60k_ms": median_ms(
            lambda: select_poison_indices(data.y_train, cfg.rate, cfg.target, cfg.poison_seed),
            args.repeats),
        "poison_arrays_60k_ms": median_ms(
            lambda: poison_arrays(data.x_train, data.y_train, indices, trigger, cfg.target), args.repeats),
        "apply_trigger_test_10k_uint8_ms": median_ms(lambda: apply_trigger(data.x_test, trigger),
                                                     args.repeats),
        "apply_trigger_test_10k_float_ms": median_ms(lambda: apply_trigger(x_test_float, trigger),
                                                     args.repeats),
    }
    from art.attacks.poisoning.perturbations import add_pattern_bd

    x_test_np = x_test_float[:, 0].numpy()  # NHW, ART's layout for grey images
    ops["art_add_pattern_bd_test_10k_float_ms"] = median_ms(lambda: add_pattern_bd(x_test_np),
                                                            max(3, args.repeats // 4))
    ops["n_poison"] = int(indices.numel())

    if args.model is not None:
        loaded = load_model(args.model)
        model = loaded.model
        poisoned, indices = build_poisoned(data, poison_config_from_record(loaded.record))
        train_seconds = None
    else:
        poisoned, indices = build_poisoned(data, cfg)
        seed_everything(0)
        model = build_model("cnn")
        _, train_seconds = timed(fit, model, poisoned, TrainConfig(epochs=args.epochs, device="cpu"),
                                      progress=False)
    acts, act_s = timed(penultimate_activations, model, poisoned.x_train)
    det_ac, ac_s = timed(activation_clustering, acts, poisoned.y_train)
    det_sp, sp_s = timed(spectral_signatures, acts, poisoned.y_train, expected_share=cfg.rate)
    n = int(poisoned.y_train.numel())

    from art.defences.detector.poison import ActivationDefence
    from art.estimators.classification import PyTorchClassifier

    y_np = poisoned.y_train.numpy()
    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")
    art = ActivationDefence(classifier, np.zeros((n, 1, 1, 1), np.float32), np.eye(10)[y_np])
    art.activations_by_class = [acts.numpy()[y_np == c] for c in range(10)]
    np.random.seed(0)
    (_, is_clean), art_s = timed(art.detect_poison, nb_clusters=2, nb_dims=10, reduce="PCA",
                                 cluster_analysis="smaller")
    ours_size, ours_size_s = timed(activation_clustering, acts, poisoned.y_train, analysis="size")
    art_flagged = set(np.flatnonzero(np.asarray(is_clean) == 0).tolist())
    ours_flagged = set(ours_size.flagged.tolist())
    detection = {
        "train_seconds": train_seconds,
        "activations_60k_s": act_s,
        "activation_clustering_s": ac_s,
        "activation_clustering": detection_scores(det_ac.flagged, indices, n),
        "spectral_signatures_s": sp_s,
        "spectral_signatures": detection_scores(det_sp.flagged, indices, n),
        "ours_size_rule_s": ours_size_s,
        "art_activation_defence_smaller_s": art_s,
        "art_vs_ours_size_rule_jaccard": len(art_flagged & ours_flagged) / max(1, len(art_flagged | ours_flagged)),
    }
    write("poison", {"tensor_ops": ops, "detection": detection, "peak_rss_mib": peak_rss_mib(),
                     "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
