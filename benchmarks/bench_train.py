"""One training epoch on full MNIST: redblue.train.fit vs a bare PyTorch loop.

Same model (the original CNN), same in-memory uint8 tensors, same batch size (128),
same optimiser, in one process; fp32 and bf16 autocast side by side. Run:

    REDBLUE_DATA_DIR=../shared/datasets python benchmarks/bench_train.py
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import data_dir, timed, write
from redblue.config import TrainConfig
from redblue.data import load_dataset
from redblue.models import build_model
from redblue.train import fit


def bare_epoch(x: torch.Tensor, y: torch.Tensor, precision: str, channels_last: bool, seed: int = 0) -> float:
    """The loop a user would write by hand: shuffle, scale a batch, forward, backward, step."""
    model = build_model("cnn", seed=seed)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(x.shape[0], generator=generator)
    model.train()
    start = time.perf_counter()
    for i in range(0, x.shape[0], 128):
        idx = order[i : i + 128]
        xb = x[idx].float().div_(255)
        if channels_last:
            xb = xb.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = F.cross_entropy(model(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return x.shape[0] / (time.perf_counter() - start)


def redblue_epoch(data: Any, precision: str) -> float:
    model = build_model("cnn", seed=0)
    result, _ = timed(fit, model, data, TrainConfig(epochs=1, precision=precision, device="cpu"), progress=False)
    return float(data.x_train.shape[0] / result.history[0]["seconds"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=2, help="epochs timed per variant (best kept)")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False)
    rows = []
    for precision in ("fp32", "bf16"):
        variants = {
            "redblue fit": lambda p=precision: redblue_epoch(data, p),
            "bare loop (NCHW)": lambda p=precision: bare_epoch(data.x_train, data.y_train, p, False),
            "bare loop (channels_last)": lambda p=precision: bare_epoch(data.x_train, data.y_train, p, True),
        }
        for name, run in variants.items():
            best = max(run() for _ in range(args.repeats))
            rows.append({"variant": name, "precision": precision, "images_per_s": round(best, 1)})
            print(f"{precision:5s} {name:28s} {best:9.1f} img/s")
    for precision in ("fp32", "bf16"):
        ours = next(r for r in rows if r["precision"] == precision and r["variant"] == "redblue fit")
        for r in rows:
            if r["precision"] == precision:
                r["redblue_vs_this"] = round(ours["images_per_s"] / r["images_per_s"], 3)
    write(
        "train",
        {
            "what": "one epoch, full MNIST train set (60,000), batch 128, Adam, original CNN, CPU",
            "repeats": args.repeats,
            "rows": rows,
            "note": "redblue's figure is the epoch's training-loop time from fit's history (its per-epoch test "
            "evaluation is excluded, as the bare loops have none); fit also runs a cosine LR schedule and "
            "keeps running loss/accuracy on device",
            "target": "redblue within 10% of the bare loop at the same precision",
            "speedup_bf16_over_fp32_redblue": round(
                next(r for r in rows if r["variant"] == "redblue fit" and r["precision"] == "bf16")["images_per_s"]
                / next(r for r in rows if r["variant"] == "redblue fit" and r["precision"] == "fp32")["images_per_s"],
                3,
            ),
        },
    )


if __name__ == "__main__":
    main()
