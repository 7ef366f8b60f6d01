"""How pixel-exact is a poisoned model's trigger? The ASR of its true patch moved up and left.

Neural Cleanse's reversed trigger is the smallest one the *model* accepts. If the model also
fires on the patch moved by a pixel or two, a reversed mask beside the patch is as true a
trigger as one on it, and "share of the mask on the true patch" measures where the optimiser
happened to land, not whether it found the backdoor. This script stamps the record's own
trigger (size, pattern, blend) at every offset ``(-dy, -dx)``, ``0 <= dy, dx <= --max-shift``,
on all the test images not of the target class, and records the share sent to the target.

Run:

    REDBLUE_DATA_DIR=../shared/datasets python -m benchmarks.explore_trigger_shift \\
        --model nc/models/poisoned.json [--model nc13/models/p1pct.json ...]
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

import torch

from benchmarks.common import data_dir, write
from redblue.artifacts import load_model
from redblue.data import load_dataset, to_float
from redblue.poison.trigger import apply_trigger
from redblue.stages.poison import poison_config_from_record


def shifted_asr(path: str, max_shift: int) -> dict[str, Any]:
    loaded = load_model(path)
    if not isinstance(loaded.record.get("poison"), dict):
        raise SystemExit(f"--model {path}: not a redblue poisoned model (its record has no poison settings)")
    poison = poison_config_from_record(loaded.record)
    data = load_dataset(str(loaded.record.get("dataset", {}).get("name", "mnist")), data_dir=data_dir())
    x = to_float(data.x_test[data.y_test != poison.target])
    trigger = poison.trigger()
    row, col, _ = trigger.box(int(x.shape[-2]), int(x.shape[-1]))
    net = loaded.model.eval()
    grid = []
    with torch.no_grad():
        for dy in range(max_shift + 1):
            line = []
            for dx in range(max_shift + 1):
                moved = dataclasses.replace(trigger, position=f"{row - dy},{col - dx}")
                hits = sum(int((net(apply_trigger(part, moved)).argmax(1) == poison.target).sum()) for part in x.split(2048))
                line.append(round(hits / int(x.shape[0]), 4))
            grid.append(line)
    print(path)
    for dy, line in enumerate(grid):
        print(f"  up {dy}: " + " ".join(f"{v:6.1%}" for v in line))
    return {"model": path, "target": poison.target, "box": [row, col, trigger.size], "rate": poison.rate,
            "blend": trigger.blend, "images": int(x.shape[0]), "asr_by_shift_up_then_left": grid}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", action="append", required=True, help="A redblue poisoned model's JSON (repeatable).")
    parser.add_argument("--max-shift", type=int, default=4)
    parser.add_argument("--name", default="trigger_shift")
    args = parser.parse_args()
    write(args.name, {"max_shift": args.max_shift, "models": [shifted_asr(m, args.max_shift) for m in args.model]})


if __name__ == "__main__":
    main()
