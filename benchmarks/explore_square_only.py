"""Issue 17: what are the images that only Square breaks?

On every robust model of ``docs/adversarial-training.md`` the black-box Square attack breaks
0.6–2.8% of the images that AutoAttack's white-box attacks (APGD-CE, APGD-T, FAB-T) leave,
and the sanity check ``square-stronger-than-white-box`` reads that as "gradient masking
suspected". This script looks at those images on one saved model:

1. AutoAttack's standard cascade, exactly as ``redblue defend`` runs it (seed 0), on the
   first ``--n-examples`` test images; the *Square-only* images are those still robust after
   FAB-T that Square breaks, the *survivors* those no attack breaks.
2. For both groups: the clean margin ``z_y - max_{j != y} z_j``, the L1 norm of the
   cross-entropy's input gradient at the clean image (masked gradients are small or zero),
   and the margin at Square's final point.
3. The white-box attacks again with more budget: APGD-CE with ``--restarts`` random starts on
   the Square-only images and on the survivors (does more white-box search find Square's
   images, and does it break images that the whole cascade left?).
4. APGD-CE through a surrogate gradient that lets ``slope`` of the gradient pass through the
   ReLUs where they are off (the forward pass unchanged), on the images robust after FAB-T:
   if dead ReLUs hid the way to Square's images, this gradient would find them.

Writes ``results/NAME.json`` (default ``square_only``). Not part of ``make bench``.

    REDBLUE_DATA_DIR=../shared/datasets .venv/bin/python -m benchmarks.explore_square_only \\
        --model OUT/models/robust.json --n-examples 1000
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Any

import torch
from torch import nn

from benchmarks.common import data_dir, write
from redblue.artifacts import load_model
from redblue.attacks.apgd import apgd_ce
from redblue.attacks.projection import input_gradient
from redblue.attacks.square import margin_loss
from redblue.data import load_dataset, to_float
from redblue.evaluation import evaluate_robustness
from redblue.utils import seed_everything

SLOPES = (0.1, 0.5)


class _LeakyBackward(torch.autograd.Function):
    """ReLU forward; backward passes ``slope`` of the gradient where the input is <= 0."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, slope: float) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.slope = slope
        return x.clamp_min(0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (x,) = ctx.saved_tensors
        return grad * torch.where(x > 0, 1.0, ctx.slope).to(grad.dtype), None


class LeakyBackwardReLU(nn.Module):
    def __init__(self, slope: float) -> None:
        super().__init__()
        self.slope = slope

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _LeakyBackward.apply(x, self.slope)


def with_surrogate_gradient(model: nn.Module, slope: float) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` replaced by :class:`LeakyBackwardReLU`."""
    surrogate = copy.deepcopy(model)
    for parent in list(surrogate.modules()):
        for name, child in parent.named_children():
            if isinstance(child, nn.ReLU):
                setattr(parent, name, LeakyBackwardReLU(slope))
    return surrogate.eval()


def margins(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return margin_loss(model(x), y)


def gradient_l1(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    grad, _, _ = input_gradient(model, x, y)
    return grad.flatten(1).abs().sum(1)


def median(values: torch.Tensor) -> float | None:
    return round(statistics.median(values.tolist()), 4) if values.numel() else None


def still_correct(model: nn.Module, x_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return margins(model, x_adv, y) > 0


def apgd_breaks(model: nn.Module, scorer: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                restarts: int, seed: int) -> torch.Tensor:
    """Which of ``x`` APGD-CE on ``model``'s gradient breaks, scored by ``scorer``."""
    if x.shape[0] == 0:
        return torch.zeros(0, dtype=torch.bool)
    seed_everything(seed)
    x_adv = apgd_ce(model, x, y, eps=eps, restarts=restarts)
    return ~still_correct(scorer, x_adv, y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a saved model's JSON (OUT/models/NAME.json)")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--restarts", type=int, default=20, help="APGD-CE's random starts in step 3")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="square_only", help="results/NAME.json")
    args = parser.parse_args()
    if args.restarts < 1 or args.n_examples < 1:
        parser.error("--restarts and --n-examples: expected counts >= 1")

    loaded = load_model(args.model)
    model = loaded.model.float().eval()
    data = load_dataset("mnist", data_dir(), download=False)
    x, y = to_float(data.x_test[: args.n_examples]), data.y_test[: args.n_examples]
    start = time.perf_counter()
    result = evaluate_robustness(model, x, y, attacks="autoattack", eps=args.eps, seed=args.seed, checks=False,
                                 keep_adversarial=True, progress=True)  # fmt: skip
    cascade_s = time.perf_counter() - start
    before_square = result.robust["fab-t"]
    square_only = before_square & ~result.robust["square"]
    survivors = result.robust["square"]
    assert result.adversarial is not None
    groups = {"square_only": square_only, "survivors": survivors}
    clean_margin, grad_l1 = margins(model, x, y), gradient_l1(model, x, y)
    square_margin = margins(model, result.adversarial, y)
    stats: dict[str, Any] = {}
    for group, mask in groups.items():
        stats[group] = {
            "n": int(mask.sum()),
            "indices": mask.nonzero().squeeze(1).tolist() if group == "square_only" else None,
            "clean_margin_median": median(clean_margin[mask]),
            "gradient_l1_median": median(grad_l1[mask]),
            "square_margin_median": median(square_margin[mask]),
            "square_margin_below_0_5": int((square_margin[mask] < 0.5).sum()) if group == "survivors" else None,
        }
    restart_s = time.perf_counter()
    for group, mask in groups.items():
        broken = apgd_breaks(model, model, x[mask], y[mask], eps=args.eps, restarts=args.restarts, seed=args.seed)
        stats[group][f"apgd_ce_x{args.restarts}_breaks"] = int(broken.sum())
        print(f"APGD-CE x{args.restarts} breaks {int(broken.sum())} of {int(mask.sum())} {group} images", flush=True)
    restart_s = time.perf_counter() - restart_s
    surrogate: dict[str, Any] = {}
    for slope in SLOPES:
        leaky = with_surrogate_gradient(model, slope)
        broken = apgd_breaks(leaky, model, x[before_square], y[before_square], eps=args.eps, restarts=1,
                             seed=args.seed)  # fmt: skip
        among = square_only[before_square]
        surrogate[str(slope)] = {"breaks": int(broken.sum()), "of_them_square_only": int((broken & among).sum())}
        print(f"surrogate slope {slope}: APGD-CE breaks {int(broken.sum())} of {int(before_square.sum())}", flush=True)
    write(args.name, {
        "settings": {"model": args.model, "model_name": loaded.record.get("model_name"),
                     "weights_sha256": loaded.record.get("weights_sha256"), "n_examples": args.n_examples,
                     "eps": args.eps, "restarts": args.restarts, "seed": args.seed},
        "cascade": {a.attack: a.robust_accuracy for a in result.attacks},
        "clean_accuracy": result.clean_accuracy,
        "autoattack_accuracy": result.robust_accuracy,
        "groups": stats,
        "surrogate_gradient_apgd_ce": surrogate,
        "seconds": {"cascade": round(cascade_s, 1), "restarts": round(restart_s, 1),
                    "total": round(time.perf_counter() - start, 1)},
    })  # fmt: skip


if __name__ == "__main__":
    main()
