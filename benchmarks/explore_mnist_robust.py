"""Issue 17's exploration: one adversarial-training setting per call, trained and evaluated
by the product's own defend stage, one line appended to ``results/mnist_robust.jsonl``.

Each call trains ``cnn-wide`` (or ``--model-name``) on full MNIST with the given recipe and
schedule through :func:`redblue.stages.defend_stage`, exactly as ``redblue defend`` does,
then evaluates it on the first ``--n-examples`` test images with the stage's full protocol
(FGSM, PGD-40 with 3 restarts, AutoAttack's standard cascade: APGD-CE, APGD-T, FAB-T,
Square 5,000). The line records the settings, the training and evaluation times, clean
accuracy on all 10,000 test images, FGSM, PGD, each cascade attack's running accuracy,
AutoAttack's and the worst-case robust accuracy, the sanity checks' warnings and the machine
(CPU, threads). ``docs/adversarial-training.md`` quotes these lines. Rerun on the same
``--out`` reuses the trained model and its cached evaluation (the line then says
``reused``; ``train_s`` is the recorded training time).

    python -m benchmarks.explore_mnist_robust --epochs 30 --eps-ramp 8 --out /tmp/robust30
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from benchmarks.common import RESULTS, data_dir, machine
from redblue.config import DefendConfig, TrainConfig
from redblue.data import load_dataset
from redblue.models import MODELS
from redblue.stages import defend_stage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output folder (models/, metrics/; reused when it matches)")
    parser.add_argument("--model-name", default="cnn-wide", choices=list(MODELS))
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--lr-schedule", default="one-cycle")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="Adam's L2 penalty")
    parser.add_argument("--recipe", default="trades")
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--beta", type=float, default=6.0)
    parser.add_argument("--eps-ramp", type=int, default=4)
    parser.add_argument("--train-eps-margin", type=float, default=0.0, help="train at eps + this, evaluate at eps")
    parser.add_argument("--awp-gamma", type=float, default=0.0, help="adversarial weight perturbation (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--results", default=str(RESULTS / "mnist_robust.jsonl"))
    args = parser.parse_args()

    data = load_dataset("mnist", data_dir(), download=False)
    train_cfg = TrainConfig(model_name=args.model_name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, seed=args.seed,
                            device="cpu")  # fmt: skip
    defend_cfg = DefendConfig(recipe=args.recipe, eps=args.eps, steps=args.steps, beta=args.beta,
                              eps_ramp=args.eps_ramp, train_eps_margin=args.train_eps_margin, awp_gamma=args.awp_gamma,
                              n_examples=args.n_examples)  # fmt: skip
    start = time.perf_counter()
    result = defend_stage(Path(args.out), data, train_cfg, defend_cfg, name="robust", progress=True)
    total_s = time.perf_counter() - start
    m, training = result.metrics, result.training
    line = {
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "results")},
        "recipe": training["recipe"],
        "train_s": round(training["seconds"], 1),
        "stage_s": round(total_s, 1),
        "reused": result.reused,
        "precision": training.get("precision"),
        "clean_accuracy": m["clean_accuracy"],
        "n_examples": m["n_examples"],
        "fgsm_accuracy": m["fgsm_accuracy"],
        "pgd_accuracy": m["pgd_accuracy"],
        "standard_accuracy": m["standard_accuracy"],
        "autoattack_accuracy": m["autoattack_accuracy"],
        "cascade": {name: {"running_accuracy": a["robust_accuracy"], "n_attacked": a["n_attacked"],
                           "seconds": round(a["seconds"], 1)}
                    for name, a in result.evaluation["attacks"].items() if a.get("n_attacked") is not None},
        "evaluation_s": round(result.evaluation["seconds"], 1),
        "robust_accuracy": m["robust_accuracy"],
        "warnings": [w["id"] for w in result.warnings],
        "guard_triggered": bool((training.get("guard") or {}).get("triggered")),
        "machine": machine(),
    }  # fmt: skip
    print(json.dumps(line), flush=True)
    with Path(args.results).open("a", encoding="utf-8") as handle:
        handle.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
