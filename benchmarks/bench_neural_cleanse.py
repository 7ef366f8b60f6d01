"""Neural Cleanse on full MNIST: how long redblue takes for all 10 classes, and whether ART's
``NeuralCleanse`` can run beside it.

* redblue's ``neural_cleanse`` with ``redblue audit-backdoor``'s defaults (the first 1,000
  test images, at most 70 epochs x 30 steps of 16 images per class, all classes batched,
  early-stopped) on a poisoned model (the default BadNets backdoor: 4x4 white patch at the
  bottom right -> 7, 10%; trained here for ``--epochs`` epochs unless ``--model`` names one)
  and, with ``--clean``, on a clean model: time, epochs run, mask norms, anomaly indices, the
  MAD test's ceiling, size ratios, flagged classes, and the share of the target's mask on the
  true patch; then, as ``audit-backdoor`` does, the flagged classes' triggers restored with
  the total-variation term (its time, and the share of the restored mask on the patch).
* ART's ``NeuralCleanse`` (``art.defences.transformer.poisoning``) is tried on the same
  PyTorch model through ``PyTorchClassifier``; it builds a ``KerasNeuralCleanse``, which needs
  TensorFlow and Keras, so on this PyTorch-only machine it cannot run: the error is recorded.

Run:

    REDBLUE_DATA_DIR=../shared/datasets python -m benchmarks.bench_neural_cleanse \\
        [--model OUT/models/poisoned.json] [--clean OUT/models/baseline.json]
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import data_dir, peak_rss_mib, timed, write
from redblue.artifacts import load_model
from redblue.config import BackdoorAuditConfig, PoisonConfig, TrainConfig
from redblue.data import load_dataset, to_float
from redblue.defenses.neural_cleanse import assess
from redblue.models import build_model
from redblue.stages.backdoor_audit import cleanse, patch_shares, restore_options
from redblue.stages.poison import build_poisoned, poison_config_from_record
from redblue.train import fit
from redblue.utils import seed_everything


def measure(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BackdoorAuditConfig,
            poison: PoisonConfig | None) -> dict[str, Any]:  # fmt: skip
    result, seconds = timed(cleanse, model, x, y, cfg, size_ratio=cfg.size_ratio)
    verdict = assess(torch.tensor(result.l1, dtype=torch.float64), size_ratio=cfg.size_ratio)
    row: dict[str, Any] = {
        "seconds": seconds,
        "epochs_run": result.epochs,
        "l1": [round(v, 2) for v in result.l1],
        "anomaly_index": [round(v, 3) for v in result.anomaly_index],
        "max_anomaly_index": verdict.max_index,
        "size_ratio": [round(float(v), 3) for v in verdict.size_ratio],
        "flagged": result.flagged,
    }
    if poison is not None:
        box = poison.trigger().box(*result.masks.shape[1:])
        row["target"] = poison.target
        row["target_mask_on_patch"] = patch_shares(result.masks[poison.target], box)[0]
    if result.flagged and cfg.restore_smoothness > 0:  # what audit-backdoor does next: restore the flagged triggers
        restored, restore_seconds = timed(cleanse, model, x, y, cfg, **restore_options(cfg, result.flagged))
        row["restore"] = {"classes": result.flagged, "seconds": restore_seconds, "epochs_run": restored.epochs,
                          "l1": [round(restored.l1[k], 2) for k in result.flagged]}  # fmt: skip
        if poison is not None and poison.target in result.flagged:  # None where no trigger was restored
            row["restore"]["target_mask_on_patch"] = (patch_shares(restored.masks[poison.target], box)[0]
                                                      if math.isfinite(restored.l1[poison.target]) else None)  # fmt: skip
    return row


def art_neural_cleanse(model: torch.nn.Module) -> dict[str, Any]:
    """Try ART's NeuralCleanse on the PyTorch model; record why it cannot run."""
    from art.defences.transformer.poisoning import NeuralCleanse
    from art.estimators.classification import PyTorchClassifier

    classifier = PyTorchClassifier(model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28),
                                   nb_classes=10, clip_values=(0.0, 1.0), device_type="cpu")  # fmt: skip
    try:
        defence = NeuralCleanse(classifier)
        defence(classifier, steps=1)
    except Exception as error:  # any failure is the finding recorded
        return {"ran": False, "error": f"{type(error).__name__}: {error}"}
    return {"ran": True, "error": None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", type=Path, default=None, help="a poisoned model's .json (skip training)")
    parser.add_argument("--clean", type=Path, default=None, help="a clean model's .json (the control)")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of the poisoned model trained here")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False)
    cfg = BackdoorAuditConfig()
    x = to_float(data.x_test[: cfg.n_images])
    y = data.y_test[: cfg.n_images]
    if args.model is not None:
        loaded = load_model(args.model)
        model, poison = loaded.model, poison_config_from_record(loaded.record)
    else:
        poison = PoisonConfig(rate=0.1, target=7)
        poisoned, _ = build_poisoned(data, poison)
        seed_everything(0)
        model = build_model("cnn")
        fit(model, poisoned, TrainConfig(epochs=args.epochs, device="cpu"), progress=False)
    model.eval()
    rows = {"poisoned": measure(model, x, y, cfg, poison)}
    if args.clean is not None:
        rows["clean"] = measure(load_model(args.clean).model.eval(), x, y, cfg, None)
    write("neural_cleanse", {
        "settings": {"n_images": cfg.n_images, "epochs": cfg.epochs, "steps_per_epoch": cfg.steps_per_epoch,
                     "batch_size": cfg.batch_size, "cost_patience": cfg.cost_patience, "early_stop": cfg.early_stop,
                     "size_ratio": cfg.size_ratio, "restore_smoothness": cfg.restore_smoothness,
                     "restore_restarts": cfg.restore_restarts},
        "redblue": rows,
        "art": art_neural_cleanse(model),
        "peak_rss_mib": peak_rss_mib(),
        "threads": torch.get_num_threads(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
