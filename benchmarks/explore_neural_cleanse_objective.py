"""Neural Cleanse's objective for every class: the paper's L1 norm, or L1 plus the masks' total
variation (``--smoothness``), from one or more starts per class (``--restarts``). For each model:
the mask norms, anomaly indices, the classes flagged, and on a redblue poisoned model the share
of the target's mask on the true patch and within 2 pixels of it.

This is the exploration behind ``docs/backdoor.md`` ("What else was tried"): with the total
variation on every class the clean classes' norms bunch up and the paper's rule flags clean
models more often, so ``audit-backdoor`` judges with the L1 norm and restores only the flagged
classes with the total variation.

Run:

    REDBLUE_DATA_DIR=../shared/datasets python -m benchmarks.explore_neural_cleanse_objective \\
        --model nc/models/poisoned.json --model nc/models/baseline.json --smoothness 1 [--restarts 2 --batch-size 8]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

from benchmarks.common import data_dir, timed, write
from redblue.artifacts import load_model
from redblue.config import BackdoorAuditConfig
from redblue.data import load_dataset, to_float
from redblue.stages.backdoor_audit import cleanse, patch_shares
from redblue.stages.poison import poison_config_from_record


def explore(path: str, x: torch.Tensor, y: torch.Tensor, args: argparse.Namespace) -> dict[str, Any]:
    loaded = load_model(path)
    cfg = BackdoorAuditConfig()
    result, seconds = timed(cleanse, loaded.model.eval(), x, y, cfg, batch_size=args.batch_size, seed=args.seed,
                            smoothness=args.smoothness, restarts=args.restarts)  # fmt: skip
    row: dict[str, Any] = {"model": path, "seconds": seconds, "epochs_run": result.epochs,
                           "l1": [round(v, 2) for v in result.l1],
                           "anomaly_index": [round(v, 3) for v in result.anomaly_index], "flagged": result.flagged}  # fmt: skip
    if isinstance(loaded.record.get("poison"), dict):
        poison = poison_config_from_record(loaded.record)
        box = poison.trigger().box(int(x.shape[-2]), int(x.shape[-1]))
        on, near = patch_shares(result.masks[poison.target], box)
        row.update(target=poison.target, target_mask_on_patch=on, target_mask_near_patch=near)
    print(row)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="A redblue model's JSON (repeatable).")
    parser.add_argument("--smoothness", type=float, default=0.0, help="Weight of the total variation (0: the paper's).")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=16, help="Images per class (per start) per step.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--name", default="neural_cleanse_objective")
    args = parser.parse_args()
    data = load_dataset("mnist", data_dir(), download=False)
    n = BackdoorAuditConfig().n_images
    x, y = to_float(data.x_test[:n]), data.y_test[:n]
    rows = [explore(path, x, y, args) for path in args.model]
    write(args.name, {"settings": {"smoothness": args.smoothness, "restarts": args.restarts,
                                   "batch_size": args.batch_size, "seed": args.seed}, "models": rows})  # fmt: skip


if __name__ == "__main__":
    main()
