"""A 12-cell evaluation grid on local Ray against the same cells one after another in one process.

The grid: ``attack`` on one baseline model, attack in {fgsm, pgd, apgd-ce} x eps in
{0.05, 0.1, 0.2, 0.3}, 20 steps, the first 5,000 test images. Ray runs cells side by side
(one CPU and one torch thread each); the sequential side runs them in this process with
every core's threads. Ray's time counts everything a user waits for: starting the local
instance, the workers' imports, putting the data in the object store, shutting down. The
two sides alternate (``--repeats`` each), every run in a fresh output folder, so nothing is
reused; medians and spread are reported with the CPU.

    python -m benchmarks.bench_sweep                              # full MNIST from $REDBLUE_DATA_DIR
    python -m benchmarks.bench_sweep --dataset mnist-mini        # offline
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import write
from redblue.config import DataConfig, TrainConfig
from redblue.stages import load_data, train_baseline
from redblue.sweep import load_grid, run_sequentially, run_sweep

GRID = """[sweep]
stage = "attack"
name = "bench"
model = "{model}"

[data]
dataset = "{dataset}"
{data_dir}
[attack]
steps = 20
n_examples = {n_examples}
device = "cpu"
checks = false

[axes]
attack = ["fgsm", "pgd", "apgd-ce"]
eps = [0.05, 0.1, 0.2, 0.3]
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default=None, help="default: mnist with $REDBLUE_DATA_DIR, else mnist-mini")
    parser.add_argument("--n-examples", type=int, default=5000)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    data_dir = os.environ.get("REDBLUE_DATA_DIR")
    dataset = args.dataset or ("mnist" if data_dir else "mnist-mini")
    work = Path(tempfile.mkdtemp(prefix="bench-sweep-"))
    data_cfg = DataConfig(dataset=dataset, data_dir=data_dir if dataset == "mnist" else None)
    data = load_data(data_cfg)
    train_baseline(work / "model", data, TrainConfig(epochs=1, device="cpu"), data_cfg=data_cfg, progress=False)
    grid_file = work / "grid.toml"
    grid_file.write_text(GRID.format(
        model=work / "model" / "models" / "baseline.json", dataset=dataset, n_examples=args.n_examples,
        data_dir=f'data_dir = "{data_dir}"' if dataset == "mnist" else "",
    ))  # fmt: skip
    grid = load_grid(grid_file, data)
    threads = torch.get_num_threads()
    times: dict[str, list[float]] = {"ray": [], "sequential": []}
    cell_seconds: dict[str, list[float]] = {"ray": [], "sequential": []}
    engine = {}
    for repeat in range(args.repeats):
        for side in ("ray", "sequential"):
            out = work / f"{side}-{repeat}"
            torch.set_num_threads(threads)
            start = time.perf_counter()
            summary = run_sweep(grid, out, data, progress=False, runner=None if side == "ray" else run_sequentially)
            times[side].append(time.perf_counter() - start)
            if summary.counts["done"] != len(grid.cells):
                raise SystemExit(f"{side}: {summary.counts}")
            cell_seconds[side].extend(c["seconds"] for c in summary.cells)
            if side == "ray":
                engine = summary.engine
            print(f"{side} {repeat + 1}: {times[side][-1]:.1f} s", flush=True)
            shutil.rmtree(out)
    torch.set_num_threads(threads)
    ray_s, seq_s = statistics.median(times["ray"]), statistics.median(times["sequential"])
    overhead = ray_s / seq_s - 1
    print(f"ray {ray_s:.1f} s, sequential {seq_s:.1f} s: Ray's overhead {100 * overhead:+.1f}% (target <= +10%)")
    write(
        "sweep_ray",
        {
            "command": "python -m benchmarks.bench_sweep",
            "dataset": dataset,
            "cells": len(grid.cells),
            "grid": {k: v for k, v in grid.axes.items()},
            "n_examples": args.n_examples,
            "repeats": args.repeats,
            "ray_seconds": times["ray"],
            "sequential_seconds": times["sequential"],
            "ray_median_s": round(ray_s, 2),
            "sequential_median_s": round(seq_s, 2),
            "overhead": round(overhead, 4),
            "target": "overhead <= 0.10",
            "met": overhead <= 0.10,
            "cell_median_s": {k: round(statistics.median(v), 2) for k, v in cell_seconds.items()},
            "sequential_torch_threads": threads,
            "ray_engine": engine,
        },
    )
    shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
