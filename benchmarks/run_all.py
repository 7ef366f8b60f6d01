"""Run every benchmark in turn (full MNIST from $REDBLUE_DATA_DIR); each writes results/<name>.json."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
SCRIPTS = ["bench_train", "bench_attacks", "bench_advtrain", "bench_poison", "bench_neural_cleanse", "bench_workflow", "bench_run", "bench_sweep"]
EXTRA_ARGS = {"bench_workflow": ["--full-run"]}


def main() -> int:
    if not os.environ.get("REDBLUE_DATA_DIR"):
        print("set REDBLUE_DATA_DIR to the folder holding full MNIST", file=sys.stderr)
        return 2
    failed = []
    for name in SCRIPTS:
        print(f"== {name}", flush=True)
        extra = ["--data-dir", os.environ["REDBLUE_DATA_DIR"]] if name == "bench_attacks" else []
        extra += EXTRA_ARGS.get(name, [])
        code = subprocess.call([sys.executable, "-m", f"benchmarks.{name}", *extra], cwd=HERE.parent)
        if code:
            failed.append(name)
    print("failed: " + ", ".join(failed) if failed else "all benchmarks done")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
