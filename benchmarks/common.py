"""Shared benchmark helpers: machine description, timing, interleaved repeats with medians and
spread, peak memory, JSON output."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """The machine a figure was measured on: CPU model and its bf16/AVX flags, cores, threads,
    versions, GPU."""
    from redblue.precision import cpu_description

    cpu = cpu_description()
    return {
        "cpu": cpu["cpu"],
        "cpu_flags": cpu["flags"],
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far (MiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def data_dir() -> str:
    value = os.environ.get("REDBLUE_DATA_DIR")
    if not value:
        raise SystemExit("set REDBLUE_DATA_DIR to the folder holding full MNIST (e.g. ../shared/datasets)")
    return value


def write(name: str, payload: dict[str, Any]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    payload = {"benchmark": name, "machine": machine(), "date": time.strftime("%Y-%m-%d"), **payload}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"wrote {path}")
    return path


def spread(values: Sequence[float]) -> dict[str, Any]:
    """Median, min, max and the spread ``(max - min) / median`` (percent) of repeated timings.

    >>> spread([2.0, 1.0, 4.0])
    {'median': 2.0, 'min': 1.0, 'max': 4.0, 'spread_pct': 150.0, 'n': 3, 'values': [2.0, 1.0, 4.0]}
    """
    vals = [float(v) for v in values]
    if not vals:
        return {"median": None, "min": None, "max": None, "spread_pct": None, "n": 0, "values": []}
    median = statistics.median(vals)
    pct = round(100 * (max(vals) - min(vals)) / median, 1) if median else None
    return {"median": round(median, 3), "min": round(min(vals), 3), "max": round(max(vals), 3),
            "spread_pct": pct, "n": len(vals), "values": [round(v, 3) for v in vals]}


def interleaved(sides: Sequence[str], repeats: int, run: Callable[[str, int], dict[str, Any]]) -> list[dict[str, Any]]:
    """``run(side, repeat)`` for every side, ``repeats`` times, interleaved: A, B, A, B, ... so a
    machine that slows down or speeds up during the benchmark slows every side alike. Returns
    the results in the order they ran, each tagged with ``side`` and ``repeat``."""
    if repeats < 1:
        raise SystemExit("--repeats: expected at least 1")
    results = []
    for repeat in range(repeats):
        for side in sides:
            results.append({**run(side, repeat), "side": side, "repeat": repeat})
    return results


def ratio_summary(pairs: Sequence[tuple[float | None, float | None]]) -> dict[str, Any]:
    """How many times faster the second of each ``(slow, fast)`` pair is: pairs are the two
    sides' runs of the same repeat (next to each other in one interleaved run); pairs where
    either side failed are dropped. The ratio of the medians (the figure a claim uses) and the
    range of the per-repeat ratios.

    >>> ratio_summary([(30.0, 10.0), (20.0, 10.0), (None, 5.0), (40.0, 10.0)])
    {'median_ratio': 3.0, 'pair_min': 2.0, 'pair_max': 4.0, 'pairs': 3}
    """
    done = [(float(s), float(f)) for s, f in pairs if s and f]
    if not done:
        return {"median_ratio": None, "pair_min": None, "pair_max": None, "pairs": 0}
    ratios = [s / f for s, f in done]
    return {
        "median_ratio": round(statistics.median(s for s, _ in done) / statistics.median(f for _, f in done), 3),
        "pair_min": round(min(ratios), 3),
        "pair_max": round(max(ratios), 3),
        "pairs": len(done),
    }


def by_repeat(runs: Sequence[dict[str, Any]], side: str, value: Callable[[dict[str, Any]], Any]) -> dict[int, Any]:
    """``value(run)`` of ``side``'s runs by repeat index (None where that run failed)."""
    out: dict[int, Any] = {}
    for run in runs:
        if run["side"] == side:
            try:
                out[run["repeat"]] = value(run)
            except (KeyError, TypeError):
                out[run["repeat"]] = None
    return out


def paired(runs: Sequence[dict[str, Any]], slow: str, fast: str, value: Callable[[dict[str, Any]], Any]) -> dict[str, Any]:
    """:func:`ratio_summary` of ``value`` between two sides of one interleaved run, paired by repeat."""
    a, b = by_repeat(runs, slow, value), by_repeat(runs, fast, value)
    return ratio_summary([(a[r], b.get(r)) for r in sorted(a)])
