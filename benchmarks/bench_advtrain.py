"""One epoch of adversarial training on full MNIST: redblue vs ART's AdversarialTrainer.

The original project's recipe (``fgsm``: half of each batch of 128 replaced by FGSM at
eps 0.25) on the original CNN, same in-memory data, same optimiser (Adam 3e-3), in one
process:

- ART 1.20: ``AdversarialTrainer(PyTorchClassifier, FastGradientMethod(eps=0.25), ratio=0.5)``
  (fp32, NCHW: what ART does);
- redblue: ``fit(..., perturb=<fgsm recipe>)`` in fp32 and with ``--precision auto``
  (bf16 autocast where measured at least 10% faster for the model, + channels_last).

After each run, FGSM accuracy (eps 0.25) on the first 2,000 test images checks that the
faster run is not a weaker one. ``--repeats N`` (3) runs the three compared variants (ART,
redblue fp32, redblue auto) interleaved, N times each; their epoch time is the median with
min, max and spread, and the speed-up the ratio of the medians (with the per-repeat range). Also timed: one epoch of ``fgsm-rs`` (eps 0.3) and of
``pgd`` (eps 0.3, 10 steps) with redblue, on the original CNN and on ``cnn-wide`` (the
robust FGSM-RS model of ``docs/adversarial-training.md``). Run:

    REDBLUE_DATA_DIR=../shared/datasets python benchmarks/bench_advtrain.py
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

import numpy as np
import torch
from torch import nn

from benchmarks.common import data_dir, interleaved, paired, peak_rss_mib, spread, write
from redblue.attacks import fgsm
from redblue.config import DefendConfig, TrainConfig
from redblue.data import Dataset, load_dataset, to_float
from redblue.defenses.adversarial import make_recipe
from redblue.models import build_model
from redblue.train import accuracy, fit, prepare_model, training_precision

N_CHECK = 2000


def fgsm_accuracy(model: nn.Module, data: Dataset, eps: float) -> float:
    x, y = to_float(data.x_test[:N_CHECK]), data.y_test[:N_CHECK]
    return accuracy(model, fgsm(model, x, y, eps=eps), y)


def art_epoch(data: Dataset, eps: float, ratio: float, seed: int = 0) -> dict[str, Any]:
    from art.attacks.evasion import FastGradientMethod
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import PyTorchClassifier

    torch.manual_seed(seed)
    np.random.seed(seed)  # ART draws its adversarial subset from the global RNG
    model = build_model("cnn", seed=seed)
    classifier = PyTorchClassifier(
        model=model,
        loss=nn.CrossEntropyLoss(),
        optimizer=torch.optim.Adam(model.parameters(), lr=3e-3),
        input_shape=(1, 28, 28),
        nb_classes=10,
        clip_values=(0.0, 1.0),
        device_type="cpu",
    )
    trainer = AdversarialTrainer(classifier, FastGradientMethod(classifier, eps=eps), ratio=ratio)
    x = data.x_train.float().div(255).numpy()
    y = data.y_train.numpy()
    start = time.perf_counter()
    trainer.fit(x, y, nb_epochs=1, batch_size=128)
    seconds = time.perf_counter() - start
    model.eval()
    return {
        "variant": "ART AdversarialTrainer + FastGradientMethod",
        "precision": "fp32",
        "seconds": round(seconds, 2),
        "images_per_s": round(x.shape[0] / seconds, 1),
        "clean_accuracy": accuracy(model, data.x_test, data.y_test),
        "fgsm_accuracy": fgsm_accuracy(model, data, eps),
    }


def redblue_epoch(data: Dataset, cfg: DefendConfig, precision: str, model_name: str = "cnn") -> dict[str, Any]:
    train_cfg = TrainConfig(model_name=model_name, epochs=1, precision=precision, device="cpu")
    steps = math.ceil(data.x_train.shape[0] / train_cfg.batch_size)
    recipe = make_recipe(cfg, steps_per_epoch=steps)
    model = build_model(model_name, seed=0)
    result = fit(model, data, train_cfg, perturb=recipe.perturb, loss=recipe.loss, progress=False)
    seconds = float(result.history[0]["seconds"])  # the training loop, without fit's test evaluation
    return {
        "variant": f"redblue {cfg.recipe}" + (f" ({cfg.steps} steps)" if cfg.recipe == "pgd" else ""),
        "model": model_name,
        "eps": cfg.eps,
        "precision": result.precision,
        "seconds": round(seconds, 2),
        "images_per_s": round(data.x_train.shape[0] / seconds, 1),
        "clean_accuracy": accuracy(model, data.x_test, data.y_test),
        "fgsm_accuracy": fgsm_accuracy(model, data, cfg.eps),
    }


def _median_row(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Repeated runs of one variant as one row: the median epoch time with its spread; the
    accuracies of the first run (each repeat trains from the same seed)."""
    seconds = spread([r["seconds"] for r in runs])
    first = runs[0]
    return {
        **first,
        "seconds": seconds["median"],
        "images_per_s": round(first["images_per_s"] * first["seconds"] / seconds["median"], 1),
        "seconds_spread": seconds,
        "accuracies_per_repeat": [[r["clean_accuracy"], r["fgsm_accuracy"]] for r in runs],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-art", action="store_true", help="time redblue only")
    parser.add_argument("--skip-large", action="store_true", help="skip the cnn-wide rows")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs of the compared variants [default: 3]")
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (smoke tests)")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False).subset(args.train_subset, None)
    probe = prepare_model(build_model("cnn", seed=0), torch.device("cpu"))
    auto = training_precision("auto", probe, data, 128)
    original = DefendConfig(recipe="fgsm", eps=0.25, ratio=0.5)
    rows: list[dict[str, Any]] = []

    def add(row: dict[str, Any]) -> None:
        rows.append(row)
        print(
            f"{row['variant']:46s} {row.get('model', 'cnn'):9s} {row['precision']:5s} {row['seconds']:8.1f} s "
            f"{row['images_per_s']:8.1f} img/s  clean {100 * row['clean_accuracy']:.2f}%  "
            f"FGSM {100 * row['fgsm_accuracy']:.2f}%",
            flush=True,
        )

    compared = {
        "art": lambda: art_epoch(data, 0.25, 0.5),
        "fp32": lambda: redblue_epoch(data, original, "fp32"),
        "auto": lambda: redblue_epoch(data, original, "auto"),
    }
    variants = [v for v in compared if not (v == "art" and args.skip_art) and not (v == "auto" and auto.precision == "fp32")]
    runs = interleaved(variants, args.repeats, lambda variant, _repeat: compared[variant]())
    for run in runs:
        print(f"  run {run['repeat'] + 1}: {run['variant']} {run['precision']} {run['seconds']:.1f} s", flush=True)
    for variant in variants:
        add({**_median_row([r for r in runs if r["side"] == variant]), "side": variant})
    models = ["cnn"] if args.skip_large else ["cnn", "cnn-wide"]
    for model_name in models:
        add(redblue_epoch(data, DefendConfig(recipe="fgsm-rs", eps=0.3), "auto", model_name))
        add(redblue_epoch(data, DefendConfig(recipe="pgd", eps=0.3, steps=10), "auto", model_name))
    payload: dict[str, Any] = {
        "train_subset": args.train_subset,
        "what": "one epoch of adversarial training, full MNIST train set (60,000), batch 128, Adam 3e-3, CPU; "
        "fgsm = the original recipe (ratio 0.5, eps 0.25); accuracy on the full test set, FGSM accuracy "
        f"on the first {N_CHECK} test images at the training eps; the compared variants run {args.repeats} times "
        "interleaved, their epoch time is the median",
        "auto_precision": auto.summary(),
        "repeats": args.repeats,
        "order": [f"{r['side']}#{r['repeat'] + 1}" for r in runs],
        "rows": rows,
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "target": "redblue fgsm epoch at least 2x faster than ART's, FGSM accuracy not lower",
    }
    if "art" in variants:
        for row in rows:
            if row.get("side") in ("fp32", "auto"):
                ratio = paired(runs, "art", row["side"], lambda r: r["seconds"])
                row["speedup_vs_art"] = ratio["median_ratio"]
                row["speedup_vs_art_pairs"] = [ratio["pair_min"], ratio["pair_max"]]
                payload[f"speedup_vs_art_{row['side']}"] = ratio["median_ratio"]
    write("advtrain", payload)

if __name__ == "__main__":
    main()
