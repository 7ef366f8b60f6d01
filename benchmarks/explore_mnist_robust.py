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

Three variants aimed at the images that Square breaks and the gradient attacks miss exist
only here, not in the product (they replace the recipe's hooks in
:mod:`redblue.defenses.adversarial` for this process): ``--inner-start vertex|stripes``
starts the PGD / MART inner attack from a random vertex of the eps-ball, or from Square's
initial vertical stripes, instead of a uniform point; ``--inner-restarts R`` runs it from
``R`` uniform starts, keeping each image's worst case; ``--llr W`` adds to MART's objective
``W`` times a local-linearity penalty (after Qin et al. 2019, "Adversarial robustness
through local linearization"), the batch mean of ``|l(x') - l(x) - (x' - x)·∇l(x)|`` at the
inner attack's point ``x'`` (``l`` the per-image cross-entropy; trained through ``∇l(x)``,
so one double backward more per batch). The stage's model cache does not know these
variants: give each its own ``--out``, or a rerun reuses a model trained without them.

    python -m benchmarks.explore_mnist_robust --epochs 30 --eps-ramp 8 --out /tmp/robust30
"""

from __future__ import annotations

import argparse
import functools
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from benchmarks.common import RESULTS, data_dir, machine
from redblue.attacks.projection import input_gradient, project
from redblue.config import PRECISIONS, DefendConfig, TrainConfig
from redblue.data import load_dataset
from redblue.defenses import adversarial
from redblue.models import MODELS
from redblue.stages import defend_stage
from redblue.train import Loss, Perturb, channels_last
from redblue.utils import eval_mode


def start_from(start: str) -> Callable[[adversarial.EpsSchedule, float, int], Perturb]:
    """A stand-in for ``adversarial.pgd_perturb`` whose inner attack starts from a random
    vertex of the eps-ball (``vertex``) or Square's vertical stripes (``stripes``: each
    column of each image shifted by +eps or -eps), clamped to [0, 1]."""

    def pgd_perturb(schedule: adversarial.EpsSchedule, alpha: float, steps: int) -> Perturb:
        def perturb(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            eps = schedule()
            step = alpha * eps / schedule.eps
            with eval_mode(model):
                if start == "vertex":
                    delta = eps * torch.sign(torch.rand_like(x) * 2 - 1)
                else:
                    n, c, _, w = x.shape
                    delta = eps * torch.sign(torch.rand(n, c, 1, w, device=x.device) * 2 - 1).expand_as(x)
                x_adv = (x + delta).clamp(0.0, 1.0)
                for _ in range(steps):
                    grad, _, _ = input_gradient(model, x_adv, y)
                    x_adv = project(x_adv + step * grad.sign(), x, eps, "linf").detach()
            return channels_last(x_adv)

        return perturb

    return pgd_perturb


def add_linearity_penalty(weight: float) -> None:
    """Make ``adversarial.mart_loss`` add ``weight`` times the local-linearity penalty (the
    module docstring): the logits hook computes it from the labels the loss hands over."""
    original_logits, original_mart = adversarial.clean_and_adversarial_logits, adversarial.mart_loss
    batch: dict[str, torch.Tensor] = {}

    def logits(model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_clean = x_clean.detach().requires_grad_(True)
        logits_clean, logits_adv = original_logits(model, x_clean, x_train)
        y = batch["y"]
        loss_clean = F.cross_entropy(logits_clean, y, reduction="none")
        (grad,) = torch.autograd.grad(loss_clean.sum(), x_clean, create_graph=True)
        loss_adv = F.cross_entropy(logits_adv, y, reduction="none")
        delta = (x_train.float() - x_clean.float()).detach()
        taylor_error = loss_adv - loss_clean - (delta * grad.float()).flatten(1).sum(1)
        batch["penalty"] = weight * taylor_error.abs().mean()
        return logits_clean, logits_adv

    def mart_loss(beta: float) -> Loss:
        base = original_mart(beta)

        def loss(
            model: nn.Module, x_clean: torch.Tensor, x_train: torch.Tensor, y: torch.Tensor
        ) -> tuple[torch.Tensor, torch.Tensor]:
            batch["y"] = y
            value, logits_clean = base(model, x_clean, x_train, y)
            return value + batch.pop("penalty"), logits_clean.detach()

        return loss

    adversarial.clean_and_adversarial_logits = logits
    adversarial.mart_loss = mart_loss


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
    parser.add_argument("--precision", default="auto", choices=PRECISIONS, help="training precision")
    parser.add_argument("--inner-start", default="uniform", choices=("uniform", "vertex", "stripes"),
                        help="pgd/mart: the inner attack's start (uniform: the product's)")  # fmt: skip
    parser.add_argument("--inner-restarts", type=int, default=1, help="pgd/mart: the inner attack's random starts")
    parser.add_argument("--llr", type=float, default=0.0, help="mart: local-linearity penalty's weight (0: off)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--results", default=str(RESULTS / "mnist_robust.jsonl"))
    args = parser.parse_args()
    if args.inner_start != "uniform":
        if args.recipe not in ("pgd", "mart"):
            parser.error("--inner-start applies to --recipe pgd or mart")
        adversarial.pgd_perturb = start_from(args.inner_start)
    if args.inner_restarts != 1:
        if args.recipe not in ("pgd", "mart") or args.inner_start != "uniform" or args.inner_restarts < 1:
            parser.error("--inner-restarts: a count >= 1, with --recipe pgd or mart and the uniform start")
        adversarial.pgd_perturb = functools.partial(adversarial.pgd_perturb, restarts=args.inner_restarts)
    if args.llr < 0:
        parser.error(f"--llr {args.llr:g}: expected a weight >= 0")
    if args.llr > 0:
        if args.recipe != "mart":
            parser.error("--llr applies to --recipe mart")
        add_linearity_penalty(args.llr)

    data = load_dataset("mnist", data_dir(), download=False)
    train_cfg = TrainConfig(model_name=args.model_name, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                            lr_schedule=args.lr_schedule, weight_decay=args.weight_decay, seed=args.seed,
                            device="cpu", precision=args.precision)  # fmt: skip
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
