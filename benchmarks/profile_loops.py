"""Where the time goes in ``fit`` and in the FGSM / PGD loops (issue 19), by torch.profiler.

The original CNN, batch 128, full-MNIST images: ``fit`` for ``--steps`` optimizer steps, and
FGSM and PGD (eps 0.3, 10 steps) on ``--batches`` batches of 128 test images; fp32 and bf16
autocast. For each loop: wall time, the profiled CPU time of the operators grouped
(convolution, linear, pooling and activations, dropout, loss, the Adam step, dtype casts,
layout and copies, allocation and fills, the attacks' own arithmetic, other), the time
outside any operator (Python, dispatch, the profiler), and the top operators by self time. Run:

    REDBLUE_DATA_DIR=../shared/datasets python -m benchmarks.profile_loops
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.common import data_dir, write
from redblue.attacks import fgsm, pgd
from redblue.config import TrainConfig
from redblue.data import Dataset, load_dataset, to_float
from redblue.models import build_model
from redblue.train import fit, prepare_model
from redblue.utils import autocast

GROUPS: dict[str, tuple[str, ...]] = {
    "convolution": ("convolution", "mkldnn_convolution", "convolution_backward", "_convolution", "conv2d"),
    "linear": ("addmm", "mm", "linear", "matmul", "t"),
    "pooling and activations": ("max_pool2d_with_indices", "max_pool2d_with_indices_backward", "relu",
                                "clamp_min", "threshold_backward", "max_pool2d"),
    "dropout RNG and masks": ("bernoulli_", "dropout", "native_dropout", "native_dropout_backward", "div_", "mul"),
    "loss": ("log_softmax", "_log_softmax", "_log_softmax_backward_data", "nll_loss", "nll_loss_forward",
             "nll_loss_backward", "cross_entropy_loss"),
    "optimizer step": ("_foreach_add_", "_foreach_mul_", "_foreach_addcmul_", "_foreach_addcdiv_", "_foreach_sqrt",
                       "_foreach_div_", "_foreach_lerp_", "_foreach_add", "_foreach_sqrt_", "addcdiv_", "lerp_",
                       "sqrt", "add_"),
    "dtype casts": ("_to_copy", "to"),
    "layout and copies": ("contiguous", "clone", "copy_", "as_strided", "view", "reshape", "_reshape_alias",
                          "flatten", "transpose", "permute"),
    "allocation and fills": ("empty", "empty_like", "empty_strided", "zeros", "zeros_like", "ones_like", "full",
                             "fill_", "zero_", "resize_"),
    "attack arithmetic": ("sign", "clamp", "clamp_", "sub", "add", "min", "max", "minimum", "maximum", "where",
                          "uniform_", "rand_like", "sum", "ne", "eq", "argmax"),
}  # fmt: skip
"""Operators by their name after ``aten::`` (exact match); the rest is "other"."""


def group_of(name: str) -> str:
    op = name.split("::", 1)[-1]
    for group, names in GROUPS.items():
        if op in names:
            return group
    return "other"


def profiled(fn: Callable[[], Any]) -> dict[str, Any]:
    """Wall time of ``fn`` under the profiler and the self CPU time per group and top operator."""
    fn()  # warm-up (allocator, oneDNN primitives)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        fn()
        wall = time.perf_counter() - start
    groups: dict[str, float] = {}
    ops = []
    for event in prof.key_averages():
        if not event.key.startswith("aten::"):
            continue  # user annotations (Optimizer.step#Adam.step) would count their children twice
        seconds = event.self_cpu_time_total / 1e6
        groups[group_of(event.key)] = groups.get(group_of(event.key), 0.0) + seconds
        ops.append((event.key, seconds, event.count))
    ops.sort(key=lambda op: -op[1])
    total = sum(groups.values())
    step = next((e.cpu_time_total / 1e6 for e in prof.key_averages() if e.key.startswith("Optimizer.step")), None)
    return {
        "wall_s": wall,
        "operators_self_cpu_s": total,
        "outside_operators_s": max(wall - total, 0.0),  # Python, dispatch, the profiler's own cost
        "groups_s": {k: round(v, 4) for k, v in sorted(groups.items(), key=lambda kv: -kv[1])},
        "optimizer_step_total_s": step,
        "top_ops": [{"op": k, "self_s": round(s, 4), "calls": c} for k, s, c in ops[:12]],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=100, help="optimizer steps of fit profiled")
    parser.add_argument("--batches", type=int, default=5, help="batches of 128 attacked")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False)
    n = 128 * args.steps
    subset = Dataset(name="mnist", x_train=data.x_train[:n], y_train=data.y_train[:n], x_test=data.x_test[:128],
                     y_test=data.y_test[:128], source=data.source)  # fmt: skip
    x = to_float(data.x_test[: 128 * args.batches])
    y = data.y_test[: 128 * args.batches]
    results: dict[str, Any] = {}
    for precision in ("fp32", "bf16"):
        cfg = TrainConfig(epochs=1, batch_size=128, device="cpu", precision=precision, seed=0)
        model = build_model("cnn", seed=0)
        results[f"fit_{precision}"] = profiled(lambda m=model, c=cfg: fit(m, subset, c, progress=False))
        net = prepare_model(build_model("cnn", seed=0), torch.device("cpu")).eval()

        def attack(name: str, net: torch.nn.Module = net, precision: str = precision) -> None:
            with autocast(torch.device("cpu"), precision):
                for i in range(args.batches):
                    xb, yb = x[128 * i : 128 * (i + 1)], y[128 * i : 128 * (i + 1)]
                    if name == "fgsm":
                        fgsm(net, xb, yb, eps=0.3)
                    else:
                        pgd(net, xb, yb, eps=0.3, alpha=0.01, steps=10)

        results[f"fgsm_{precision}"] = profiled(lambda a=attack: a("fgsm"))
        results[f"pgd10_{precision}"] = profiled(lambda a=attack: a("pgd"))
    write("profile_loops", {"steps": args.steps, "batches": args.batches, "results": results,
                            "threads": torch.get_num_threads()})  # fmt: skip


if __name__ == "__main__":
    main()
