"""``redblue run --quick`` from an empty output folder, then the same command again.

The first run is the "one-minute look" (target ≤ 60 s wall on a quiet 2-core machine); the
second must train and attack nothing (target ≤ 10 s) and leave every metrics JSON byte for
byte as it was. Both are timed as a user runs them: ``python -m redblue`` in a subprocess,
``--repeats`` times each (median and spread reported), the CPU named in the JSON.

    python -m benchmarks.bench_run                       # mnist-mini (offline, the quick look)
    python -m benchmarks.bench_run --data-dir ../shared/datasets   # the 12k/1k MNIST subset
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import write


def _run(out: Path, args: list[str]) -> float:
    env = {**os.environ, "REDBLUE_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "redblue", "run", "--quick", "--out", str(out), *args],
        capture_output=True, text=True, env=env, check=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"redblue run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return seconds


def _digests(out: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((out / "metrics").glob("*.json"))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=None, help="full MNIST (default: the mnist-mini quick look)")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    extra = ["--device", "cpu"] + (["--data-dir", args.data_dir] if args.data_dir else ["--dataset", "mnist-mini"])
    first, second, identical = [], [], []
    for _ in range(args.repeats):
        out = Path(tempfile.mkdtemp(prefix="bench-run-")) / "out"
        first.append(_run(out, extra))
        before = _digests(out)
        second.append(_run(out, extra))
        identical.append(_digests(out) == before)
        shutil.rmtree(out.parent)
        print(f"first {first[-1]:.1f} s, second {second[-1]:.1f} s, metrics identical: {identical[-1]}", flush=True)

    def stats(values: list[float]) -> dict[str, float]:
        return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values)}

    write(
        "run_quick" + ("_mnist" if args.data_dir else ""),
        {
            "command": "redblue run --quick " + " ".join(extra),
            "dataset": "mnist (12k/1k subset)" if args.data_dir else "mnist-mini",
            "repeats": args.repeats,
            "first_run": {**stats(first), "runs_s": first, "target_s": 60},
            "second_run": {**stats(second), "runs_s": second, "target_s": 10},
            "second_run_metrics_identical": all(identical),
        },
    )
    return 0 if all(identical) else 1


if __name__ == "__main__":
    sys.exit(main())
