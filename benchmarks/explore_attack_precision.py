"""Would bf16 make the attacks faster without making them weaker? (issue 14's speed target)

Two measurements on a defended model, CPU, one process:

1. Throughput of the model's forward pass and of an input-gradient step (forward, cross
   entropy, backward to the pixels) in fp32 and under bf16 autocast, NCHW and channels_last,
   in microseconds per image: what each attack's inner loop costs.
2. Each attack of AutoAttack's cascade (default Square, APGD-T, FAB-T) run in fp32 and under
   bf16 autocast on the same clean-correct test images and seeds; both adversarial sets are
   scored by the same fp32 forward pass, so a difference in robust images is a difference in
   the search's strength, not in the scoring.

Writes ``results/NAME.json`` (default ``attack_precision``). Not part of ``make bench``.

    REDBLUE_DATA_DIR=../shared/datasets .venv/bin/python -m benchmarks.explore_attack_precision \\
        --model OUT/models/advtrain.json --n-examples 300 --eps 0.3
"""

from __future__ import annotations

import argparse
import contextlib
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import data_dir, write
from redblue.artifacts import load_model
from redblue.attacks import RUNNERS, resolve_settings
from redblue.data import load_dataset, to_float


def _context(precision: str) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()


def _per_image_us(step: Callable[[], Any], n: int, rounds: int = 10) -> float:
    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(rounds):
        step()
    return (time.perf_counter() - start) / rounds / n * 1e6


def _forward(model: torch.nn.Module, x: torch.Tensor, precision: str) -> None:
    with torch.inference_mode(), _context(precision):
        model(x)


def _gradient(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> None:
    xr = x.clone().requires_grad_(True)
    with _context(precision):
        loss = F.cross_entropy(model(xr).float(), y)
    torch.autograd.grad(loss, [xr])


def throughput(model: torch.nn.Module, batch: int) -> list[dict[str, Any]]:
    """µs per image of a forward pass and of an input-gradient step, per precision and layout."""
    rows = []
    x, y = torch.rand(batch, 1, 28, 28), torch.randint(0, 10, (batch,))
    for layout, fmt in (("nchw", torch.contiguous_format), ("channels_last", torch.channels_last)):
        model = model.to(memory_format=fmt)  # type: ignore[call-overload]
        xl = x.contiguous(memory_format=fmt)
        for precision in ("fp32", "bf16"):
            rows.append({"layout": layout, "precision": precision, "batch": batch,
                         "forward_us_per_image": _per_image_us(partial(_forward, model, xl, precision), batch),
                         "gradient_us_per_image": _per_image_us(partial(_gradient, model, xl, y, precision), batch)})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def strength(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, attacks: list[str]) -> list[dict[str, Any]]:
    """Each attack in fp32 and in bf16 on the same images: fp32-scored robust images and seconds."""
    rows = []
    for name in attacks:
        settings = resolve_settings(name, eps, {})
        for precision in ("fp32", "bf16"):
            torch.manual_seed(0)
            start = time.perf_counter()
            with _context(precision):
                x_adv = RUNNERS[name](model, x, y, eps=eps, **settings).x_adv
            seconds = time.perf_counter() - start
            assert float((x_adv - x).abs().amax()) <= eps + 1e-6 and 0 <= float(x_adv.min()) <= float(x_adv.max()) <= 1
            with torch.no_grad():
                robust = int((model(x_adv).argmax(1) == y).sum())
            rows.append({"attack": name, "precision": precision, "settings": settings, "n_attacked": int(y.numel()),
                         "robust": robust, "seconds": seconds})  # fmt: skip
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a defended model's .json record")
    parser.add_argument("--n-examples", type=int, default=300)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--attacks", default="square,apgd-t,fab-t")
    parser.add_argument("--batch", type=int, default=500, help="batch of the throughput measurement")
    parser.add_argument("--name", default="attack_precision", help="results/NAME.json")
    args = parser.parse_args()

    data = load_dataset("mnist", Path(data_dir()), download=False)
    loaded = load_model(Path(args.model), device="cpu")
    model = loaded.model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    speed = throughput(model, args.batch)
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    x = to_float(data.x_test[: args.n_examples]).contiguous(memory_format=torch.channels_last)
    y = data.y_test[: args.n_examples]
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    rows = strength(model, x[correct], y[correct], args.eps, [a.strip() for a in args.attacks.split(",")])
    write(args.name, {
        "settings": {"model": str(args.model), "model_name": loaded.record.get("model_name"),
                     "weights_sha256": loaded.record.get("weights_sha256"), "n_examples": args.n_examples,
                     "n_clean_correct": int(correct.sum()), "eps": args.eps},
        "throughput": speed,
        "strength": rows,
    })  # fmt: skip


if __name__ == "__main__":
    main()
