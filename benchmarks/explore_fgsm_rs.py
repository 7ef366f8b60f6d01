"""FGSM-RS at eps 0.3 on full MNIST: one training setting per call, screened fast.

The exploration behind ``docs/adversarial-training.md``: trains with the ``fgsm-rs``
recipe's step (or, with ``--start clamped``, the variant whose random start is clamped to
[0, 1]), prints the guard slice's clean / FGSM / PGD-10 accuracy per epoch, then clean
accuracy on all 10,000 test images and PGD-50 (step 0.01), APGD-CE and APGD-T on the first
``--n`` test images, and the worst case over the three. Appends one JSON line to
``--results``. The product's own evaluation (``redblue defend``) is stronger (PGD-40 with
3 restarts as well) and is what the docs quote as final figures.

    python -m benchmarks.explore_fgsm_rs --model-name cnn-wide --epochs 15 --eps-ramp 4 \\
        --lr 3e-3 --lr-schedule one-cycle --batch-size 100
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from benchmarks.common import data_dir
from redblue.attacks import apgd_ce, apgd_t, pgd
from redblue.config import DefendConfig, TrainConfig
from redblue.data import load_dataset, to_float
from redblue.defenses.adversarial import (
    EpsSchedule,
    OverfitGuard,
    fgsm_rs_perturb,
    pgd_perturb,
    split_guard_slice,
)
from redblue.models import MODELS, build_model
from redblue.train import evaluate, fit


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--model-name", default="cnn-wide", choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-schedule", default="one-cycle")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--alpha", type=float, default=None, help="default 1.25·eps")
    parser.add_argument("--eps-ramp", type=float, default=4.0, help="epochs (may be fractional)")
    parser.add_argument("--start", choices=("unclamped", "clamped"), default="unclamped")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights per step (0: off)")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--results", default="fgsm_rs_exploration.jsonl")
    args = parser.parse_args()
    alpha = args.alpha if args.alpha is not None else 1.25 * args.eps

    data = load_dataset("mnist", args.data_dir or data_dir(), download=False)
    guard_size = DefendConfig().guard_size
    train, x_slice, y_slice = split_guard_slice(data, guard_size, args.seed)
    steps_per_epoch = math.ceil(train.x_train.shape[0] / args.batch_size)
    schedule = EpsSchedule(args.eps, ramp_steps=int(args.eps_ramp * steps_per_epoch))
    perturb = fgsm_rs_perturb(schedule, alpha) if args.start == "unclamped" else pgd_perturb(schedule, alpha, steps=1)
    guard = OverfitGuard(x_slice, y_slice, eps=args.eps, enabled=False)
    model = build_model(args.model_name, seed=args.seed)
    averaged = None
    if args.ema > 0:
        averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(args.ema))
        step_perturb = perturb

        def perturb(m: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            averaged.update_parameters(m)  # after the previous optimizer step
            return step_perturb(m, x, y)

    def epoch_end(epoch: int, model: torch.nn.Module) -> dict[str, object]:
        entry = guard(epoch, averaged.module if averaged is not None else model)
        print(epoch, {k: round(float(v), 3) for k, v in entry.items()}, flush=True)
        return entry

    cfg = TrainConfig(
        model_name=args.model_name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
        lr_schedule=args.lr_schedule, seed=args.seed,
    )
    start = time.perf_counter()
    fit(model, train, cfg, perturb=perturb, epoch_end=epoch_end, progress=False)
    train_s = time.perf_counter() - start
    x, y = to_float(data.x_test[: args.n]), data.y_test[: args.n]
    # With --ema both the last weights and their average are scored (same training run).
    variants = {"last": model} if averaged is None else {"last": model, "ema": averaged.module.eval()}
    for variant, scored in variants.items():
        result = {
            **vars(args), "alpha": alpha, "train_s": round(train_s, 1), "weights": variant,
            **robust_accuracies(scored, x, y, args.eps),
            "clean": evaluate(scored, data.x_test, data.y_test).accuracy,
        }
        print(json.dumps(result), flush=True)
        with Path(args.results).open("a") as handle:
            handle.write(json.dumps(result) + "\n")


def robust_accuracies(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, float]:
    """PGD-50 (step 0.01), APGD-CE and APGD-T accuracy on (x, y), and the worst case over them."""
    attacks = {
        "pgd50": pgd(model, x, y, eps=eps, alpha=0.01, steps=50),
        "apgd_ce": apgd_ce(model, x, y, eps=eps),
        "apgd_t": apgd_t(model, x, y, eps=eps),
    }
    with torch.no_grad():
        worst = model(x).argmax(1) == y
        accuracy = {}
        for name, x_adv in attacks.items():
            ok = model(x_adv).argmax(1) == y
            accuracy[name] = float(ok.float().mean())
            worst &= ok
    return {**accuracy, "worst": float(worst.float().mean())}

if __name__ == "__main__":
    main()
