"""The original project's workflow end to end: redblue's Python API vs the same workflow built on ART.

Four stages, the same network with the same initial weights (``build_model(..., seed=0)``),
same data, batch 128, same epochs (``--epochs``, 5) for every training run, built two ways:

1. baseline: train on the training set, clean accuracy on the test set;
2. red team: FGSM at eps 0.25 on every test image (robust accuracy);
3. blue team: FGSM adversarial training (half of each batch replaced by FGSM at eps 0.25),
   then clean and FGSM accuracy of the defended model;
4. poisoning: a 4x4 white bottom-right patch relabelled to 7 on 10% of the non-7 training
   images, train, then C-Acc and ASR (triggered test images whose true label is not 7).

- redblue: its Python API with its defaults (``device auto``, ``precision auto``: bf16
  autocast where measured at least 10% faster for the model's training step on this machine,
  as ``redblue run`` does): ``fit``, ``evaluate``,
  ``evaluate_robustness(attacks="fgsm")``, the ``fgsm`` recipe (``make_recipe`` + ``fit``,
  ``guard=False``), ``select_poison_indices`` / ``poison_dataset`` / ``backdoor_metrics``.
- ART 1.20: what a user writes with it, on the original CNN as Keras code writes it
  (``cnn-keras``: Conv-ReLU-Pool; ``--art-model cnn`` gives ART redblue's pool-before-ReLU
  order, the same function, to separate the model's share of the speed-up from the
  library's): ``PyTorchClassifier`` (cross-entropy, Adam 3e-3),
  float32 numpy arrays in [0, 1], ``classifier.fit``, ``FastGradientMethod.generate``,
  ``AdversarialTrainer(classifier, FastGradientMethod(eps=0.25), ratio=0.5).fit``,
  ``PoisoningAttackBackdoor(<4x4 white patch>).poison``.

Each side runs in its own subprocess (its own memory and threads), cold: no warm-up, imports
excluded, loading MNIST included (the ``data`` stage). ``--repeats N`` (3) runs the sides
interleaved (redblue, ART, redblue, ART, ...); every figure is the median of the N runs with
its min, max and spread, and the speed-up is the ratio of the medians of that one interleaved
run (with the range of the per-repeat ratios). ``--full-run`` also times the full
default ``redblue run`` (every stage, sanity checks, detection, report) in a subprocess and
reads its per-stage times from ``run_timings.json``. Writes
``benchmarks/results/workflow.json`` (``workflow_art-cnn.json`` with ``--art-model cnn``) and
prints Markdown tables. Run:

    python -m benchmarks.bench_workflow --data-dir ../shared/datasets [--device cpu|cuda] [--full-run]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import data_dir, interleaved, paired, peak_rss_mib, spread, write

HERE = Path(__file__).resolve().parent
SIDES = ("redblue", "art")
STAGES = ("data", "baseline", "redteam", "blueteam", "poison")
BATCH_SIZE = 128
LR = 3e-3
EPS = 0.25
RATIO = 0.5
RATE = 0.1
TARGET = 7
PATCH = 4
SEED = 0
TARGET_TOTAL_S = 150.0
TARGET_SPEEDUP = 3.0  # issue 19's goal (the first target was 2x)


@contextlib.contextmanager
def stage(seconds: dict[str, float], name: str) -> Iterator[None]:
    """Wall time of the block into ``seconds[name]`` (CUDA work finished on both ends)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    yield
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    seconds[name] = round(time.perf_counter() - start, 2)


def redblue_workflow(args: argparse.Namespace) -> dict[str, Any]:
    from redblue.config import DefendConfig, TrainConfig
    from redblue.data import load_dataset
    from redblue.defenses.adversarial import make_recipe
    from redblue.evaluation import evaluate_robustness
    from redblue.metrics import backdoor_metrics
    from redblue.models import build_model
    from redblue.poison import Trigger, poison_dataset, select_poison_indices
    from redblue.train import evaluate, fit
    from redblue.utils import resolve_device

    device = resolve_device(args.device)
    train_cfg = TrainConfig(epochs=args.epochs, batch_size=BATCH_SIZE, lr=LR, seed=SEED, device=args.device)
    seconds: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    start = time.perf_counter()
    with stage(seconds, "data"):
        data = load_dataset("mnist", args.data_dir, device=device, download=False).subset(
            args.train_subset, args.test_subset
        )
    x_test, y_test = data.x_test, data.y_test

    with stage(seconds, "baseline"):
        model = build_model("cnn", seed=SEED)
        fitted = fit(model, data, train_cfg, progress=False)
        accuracy["baseline_clean"] = evaluate(model, x_test, y_test).accuracy

    with stage(seconds, "redteam"):
        red = evaluate_robustness(model, x_test, y_test, attacks="fgsm", eps=EPS, batch_size=BATCH_SIZE, checks=False)
        accuracy["baseline_fgsm"] = red.robust_accuracy

    with stage(seconds, "blueteam"):
        recipe = make_recipe(
            DefendConfig(recipe="fgsm", eps=EPS, ratio=RATIO, guard=False),
            steps_per_epoch=math.ceil(data.x_train.shape[0] / BATCH_SIZE),
        )
        defended = build_model("cnn", seed=SEED)
        fit(defended, data, train_cfg, perturb=recipe.perturb, loss=recipe.loss, progress=False)
        blue = evaluate_robustness(
            defended, x_test, y_test, attacks="fgsm", eps=EPS, batch_size=BATCH_SIZE, checks=False
        )
        accuracy["defended_clean"] = blue.clean_accuracy
        accuracy["defended_fgsm"] = blue.robust_accuracy

    with stage(seconds, "poison"):
        trigger = Trigger(size=PATCH, position="bottom-right", pattern="solid")
        indices = select_poison_indices(data.y_train, RATE, TARGET, SEED)
        poisoned = poison_dataset(data, indices, trigger, TARGET)
        backdoored = build_model("cnn", seed=SEED)
        fit(backdoored, poisoned, train_cfg, progress=False)
        backdoor = backdoor_metrics(backdoored, x_test, y_test, trigger, TARGET)
        accuracy["poisoned_clean_accuracy"] = backdoor.clean_accuracy
        accuracy["poisoned_asr"] = backdoor.asr
    total = time.perf_counter() - start
    return {
        "device": str(device),
        "precision": fitted.precision,
        "precision_choice": fitted.precision_choice,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "n_poison": int(indices.numel()),
        "seconds": seconds,
        "total_s": round(total, 2),
        "accuracy": accuracy,
    }


def white_patch(x: Any) -> Any:
    """ART perturbation: the bottom-right ``PATCH`` x ``PATCH`` pixels of every image set to 1
    (images (..., H, W) in [0, 1]; a copy). ART's ``add_pattern_bd`` is a 4-pixel pattern in a
    3x3 box, not this trigger."""
    out = x.copy()
    out[..., -PATCH:, -PATCH:] = 1.0
    return out


def art_workflow(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    from art.attacks.evasion import FastGradientMethod
    from art.attacks.poisoning import PoisoningAttackBackdoor
    from art.defences.trainer import AdversarialTrainer
    from art.estimators.classification import PyTorchClassifier
    from torch import nn

    from redblue.data import load_dataset
    from redblue.models import build_model
    from redblue.utils import resolve_device

    device = resolve_device(args.device)
    device_type = "gpu" if device.type == "cuda" else "cpu"
    np.random.seed(SEED)  # ART's AdversarialTrainer draws its adversarial subsets from the global RNG
    torch.manual_seed(SEED)  # ART's fit shuffles through a torch DataLoader

    def classifier() -> Any:
        model = build_model(args.art_model, seed=SEED)
        return PyTorchClassifier(
            model=model,
            loss=nn.CrossEntropyLoss(),
            optimizer=torch.optim.Adam(model.parameters(), lr=LR),
            input_shape=(1, 28, 28),
            nb_classes=10,
            clip_values=(0.0, 1.0),
            device_type=device_type,
        )

    def predict(estimator: Any, x: Any) -> Any:
        return estimator.predict(x, batch_size=BATCH_SIZE).argmax(1)

    def clean_and_fgsm(estimator: Any) -> tuple[Any, float, float]:
        clean_pred = predict(estimator, x_test)
        x_adv = FastGradientMethod(estimator, eps=EPS, batch_size=BATCH_SIZE).generate(x_test, y=y_test)
        adv_pred = predict(estimator, x_adv)
        clean_ok = clean_pred == y_test
        return clean_pred, float(clean_ok.mean()), float((clean_ok & (adv_pred == y_test)).mean())

    seconds: dict[str, float] = {}
    accuracy: dict[str, float] = {}
    start = time.perf_counter()
    with stage(seconds, "data"):
        data = load_dataset("mnist", args.data_dir, download=False).subset(args.train_subset, args.test_subset)
        x_train = data.x_train.float().div(255).numpy()
        y_train = data.y_train.numpy()
        x_test = data.x_test.float().div(255).numpy()
        y_test = data.y_test.numpy()

    with stage(seconds, "baseline"):
        baseline = classifier()
        baseline.fit(x_train, y_train, batch_size=BATCH_SIZE, nb_epochs=args.epochs)
        clean_pred = predict(baseline, x_test)
        accuracy["baseline_clean"] = float((clean_pred == y_test).mean())

    with stage(seconds, "redteam"):
        # Robust = clean-correct and still correct under FGSM, as redblue counts it (the
        # clean predictions come from the baseline stage).
        x_adv = FastGradientMethod(baseline, eps=EPS, batch_size=BATCH_SIZE).generate(x_test, y=y_test)
        adv_pred = predict(baseline, x_adv)
        accuracy["baseline_fgsm"] = float(((clean_pred == y_test) & (adv_pred == y_test)).mean())

    with stage(seconds, "blueteam"):
        defended = classifier()
        trainer = AdversarialTrainer(
            defended, FastGradientMethod(defended, eps=EPS, batch_size=BATCH_SIZE), ratio=RATIO
        )
        trainer.fit(x_train, y_train, batch_size=BATCH_SIZE, nb_epochs=args.epochs)
        _, accuracy["defended_clean"], accuracy["defended_fgsm"] = clean_and_fgsm(defended)

    with stage(seconds, "poison"):
        attack = PoisoningAttackBackdoor(white_patch)
        rng = np.random.default_rng(SEED)
        eligible = np.flatnonzero(y_train != TARGET)
        indices = rng.choice(eligible, size=round(RATE * eligible.size), replace=False)
        x_poison, y_poison = attack.poison(x_train[indices], y=np.full(indices.size, TARGET))
        x_train_p, y_train_p = x_train.copy(), y_train.copy()
        x_train_p[indices], y_train_p[indices] = x_poison, y_poison
        backdoored = classifier()
        backdoored.fit(x_train_p, y_train_p, batch_size=BATCH_SIZE, nb_epochs=args.epochs)
        accuracy["poisoned_clean_accuracy"] = float((predict(backdoored, x_test) == y_test).mean())
        keep = y_test != TARGET
        x_triggered, _ = attack.poison(x_test[keep], y=np.full(int(keep.sum()), TARGET))
        accuracy["poisoned_asr"] = float((predict(backdoored, x_triggered) == TARGET).mean())
    total = time.perf_counter() - start
    return {
        "device": str(device),
        "precision": "fp32",
        "n_train": int(x_train.shape[0]),
        "n_test": int(x_test.shape[0]),
        "n_poison": int(indices.size),
        "seconds": seconds,
        "total_s": round(total, 2),
        "accuracy": accuracy,
    }


def worker(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker == "redblue":
        import redblue

        result = redblue_workflow(args)
        version = f"redblue {redblue.__version__}"
    else:
        import art

        result = art_workflow(args)
        version = f"adversarial-robustness-toolbox {art.__version__}"
    return {"side": args.worker, "library": version, "threads": torch.get_num_threads(), **result,
            "peak_rss_mib": round(peak_rss_mib(), 1)}


def run_side(side: str, args: argparse.Namespace) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_workflow", "--worker", side, "--data-dir", args.data_dir,
           "--device", args.device, "--epochs", str(args.epochs), "--art-model", args.art_model]
    for option, value in (("--train-subset", args.train_subset), ("--test-subset", args.test_subset),
                          ("--threads", args.threads)):
        if value:
            cmd += [option, str(value)]
    print(f"== {side}: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, check=False)
    if proc.returncode != 0:
        print(f"{side}: failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
        return {"side": side, "error": proc.stderr.strip().splitlines()[-1:]}
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"{side}: total {result['total_s']:.1f} s " + ", ".join(f"{k} {v:.1f} s" for k, v in result["seconds"].items()),
          file=sys.stderr, flush=True)
    return result


def aggregate(side: str, runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One side's repeated runs as one row: every time and accuracy is the median of the runs
    that finished, with each time's spread; the runs themselves are kept in ``runs``."""
    done = [r for r in runs if "total_s" in r]
    if not done:
        return {"side": side, "error": next((r.get("error") for r in runs), None), "runs": runs}
    times = {name: spread([r["seconds"][name] for r in done]) for name in done[0]["seconds"]}
    total = spread([r["total_s"] for r in done])
    accuracy = {key: statistics.median(r["accuracy"][key] for r in done) for key in done[0]["accuracy"]}
    same = all(r["accuracy"] == done[0]["accuracy"] for r in done)
    precisions = sorted({str(r.get("precision")) for r in done})
    keep = ("library", "threads", "device", "n_train", "n_test", "n_poison")
    return {
        **{k: done[0].get(k) for k in keep},
        "precision": precisions[0] if len(precisions) == 1 else "mixed",
        "repeats": len(done),
        "failed": len(runs) - len(done),
        "seconds": {name: t["median"] for name, t in times.items()},
        "total_s": total["median"],
        "spread": {"total_s": total, "seconds": times},
        "accuracy": accuracy,
        "accuracy_identical_across_repeats": same,
        "precisions": precisions,  # one entry: every repeat trained in the same precision
        "peak_rss_mib": max(r.get("peak_rss_mib", 0.0) for r in done),
        "runs": runs,
    }


def full_run(args: argparse.Namespace) -> dict[str, Any]:
    """Wall time of ``python -m redblue run --data-dir DIR --out TMP`` (the full default workflow)
    and its per-stage times (``seconds`` in ``run_timings.json``)."""
    extra = shlex.split(args.full_run_args)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default thread count follows it
    with tempfile.TemporaryDirectory(prefix="bench_workflow_run_") as out:
        cmd = [sys.executable, "-m", "redblue", "run", "--data-dir", args.data_dir, "--out", out, *extra]
        print(f"== full run: {shlex.join(cmd[1:])}", file=sys.stderr, flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parent, env=env, check=False)
        seconds = time.perf_counter() - start
        if proc.returncode != 0:
            print(f"full run: failed (exit {proc.returncode}):\n{proc.stderr.strip()[-2000:]}", file=sys.stderr)
            return {"command": ["redblue", *cmd[3:]], "error": proc.stderr.strip().splitlines()[-1:]}
        summary = json.loads((Path(out) / "run_timings.json").read_text(encoding="utf-8"))
    timings = {name: round(float(value), 2) for name, value in (summary.get("seconds") or {}).items()}
    return {
        "command": ["redblue", "run", "--data-dir", "DIR", "--out", "TMPDIR", *extra],
        "total_s": round(seconds, 2),
        "stage_seconds": timings,
        "outside_stages_s": round(seconds - sum(timings.values()), 2),
        "outside_stages": "interpreter start and imports, loading MNIST, the summary and the HTML/Markdown report",
        "dataset": summary.get("dataset"),
        "quick": summary.get("quick"),
        "rows": [{k: row.get(k) for k in ("scenario", "clean_accuracy", "robust_accuracy", "asr")}
                 for row in summary.get("rows", [])],
    }


def print_tables(rows: dict[str, dict[str, Any]], full: dict[str, Any] | None, speedup: dict[str, float]) -> None:
    ours, art = rows.get("redblue", {}), rows.get("art", {})
    if not rows:
        print_full_run(full)
        return
    def cell(row: dict[str, Any], name: str) -> str:
        t = row.get("spread", {}).get("total_s") if name == "total" else row.get("spread", {}).get("seconds", {}).get(name)
        if not t or t["median"] is None:
            return ""
        return f"{t['median']:.1f}" + (f" ({t['min']:.1f}–{t['max']:.1f})" if t["n"] > 1 else "")

    print("| stage | redblue s, median (min–max) | ART s, median (min–max) | speed-up (medians) |")
    print("|---|---:|---:|---:|")
    for name in (*STAGES, "total"):
        up = f"{speedup[name]:.2f}x" if name in speedup else ""
        label = f"**{name}**" if name == "total" else name
        print(f"| {label} | {cell(ours, name)} | {cell(art, name)} | {up} |")
    print()
    print("| accuracy | redblue | ART |")
    print("|---|---:|---:|")
    for key in ("baseline_clean", "baseline_fgsm", "defended_clean", "defended_fgsm", "poisoned_clean_accuracy", "poisoned_asr"):
        cells = [ours.get("accuracy", {}).get(key), art.get("accuracy", {}).get(key)]
        print(f"| {key} | " + " | ".join("" if v is None else f"{100 * v:.2f}%" for v in cells) + " |")
    print_full_run(full)


def print_full_run(full: dict[str, Any] | None) -> None:
    if full is not None and "total_s" in full:
        print()
        print(f"full `{shlex.join(full['command'])}`: {full['total_s']:.1f} s")
        print("| stage | s |")
        print("|---|---:|")
        for name, value in full["stage_seconds"].items():
            print(f"| {name} | {value:.1f} |")
        print(f"| (outside the stages) | {full['outside_stages_s']:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", default=os.environ.get("REDBLUE_DATA_DIR"),
                        help="folder holding full MNIST [default: $REDBLUE_DATA_DIR]")
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"),
                        help="both sides (ART: device_type gpu for cuda) [default: auto]")
    parser.add_argument("--epochs", type=int, default=5, help="epochs of every training run [default: 5]")
    parser.add_argument("--train-subset", type=int, default=None, help="first N training images (smoke tests)")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images (smoke tests)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per side [default: torch's]")
    parser.add_argument("--repeats", type=int, default=3,
                        help="runs per side, interleaved (redblue, ART, redblue, ...); medians reported [default: 3]")
    parser.add_argument("--skip-art", action="store_true", help="time the redblue side only")
    parser.add_argument("--skip-redblue", action="store_true", help="time the ART side only")
    parser.add_argument("--full-run", action="store_true",
                        help="also time the full default `redblue run --data-dir DIR --out TMPDIR`")
    parser.add_argument("--full-run-args", default="", help="extra options for the full run (e.g. '--quick')")
    parser.add_argument("--art-model", default="cnn-keras", choices=("cnn-keras", "cnn"),
                        help="the ART side's model: cnn-keras (Conv-ReLU-Pool, as a user writes it) or cnn "
                        "(redblue's pool-before-ReLU order, the same function) [default: cnn-keras]")
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.data_dir:
        args.data_dir = data_dir()  # exits with a message when REDBLUE_DATA_DIR is unset
    if args.worker:
        print(json.dumps(worker(args)))
        return

    sides = [s for s in SIDES if not getattr(args, f"skip_{s}")]
    runs = interleaved(sides, args.repeats, lambda side, _repeat: run_side(side, args))
    rows = {side: aggregate(side, [r for r in runs if r["side"] == side]) for side in sides}
    full = full_run(args) if args.full_run else None
    ours, art = rows.get("redblue", {}), rows.get("art", {})
    speedup: dict[str, float] = {}
    total_ratio: dict[str, Any] = {}
    if "total_s" in ours and "total_s" in art:
        # Every ratio from the pairs of runs of the same repeat (one interleaved run).
        for name in STAGES:
            ratio = paired(runs, "art", "redblue", lambda r, name=name: r["seconds"][name])
            if ratio["median_ratio"]:
                speedup[name] = round(ratio["median_ratio"], 2)
        total_ratio = paired(runs, "art", "redblue", lambda r: r["total_s"])
        if total_ratio["median_ratio"]:
            speedup["total"] = round(total_ratio["median_ratio"], 2)
    complete = args.epochs == 5 and args.train_subset is None and args.test_subset is None
    targets: dict[str, Any] = {
        "redblue_total_at_most_s": TARGET_TOTAL_S,
        "speedup_vs_art_at_least": TARGET_SPEEDUP,
        "applies": complete,
    }
    if complete and "total_s" in ours:
        targets["redblue_total_met"] = ours["total_s"] <= TARGET_TOTAL_S
    if complete and "total" in speedup:
        targets["speedup_met"] = speedup["total"] >= TARGET_SPEEDUP
    write(
        "workflow" if args.art_model == "cnn-keras" else f"workflow_art-{args.art_model}",
        {
            "what": "the original project's workflow (baseline, FGSM red team, FGSM adversarial training, "
            "BadNets poisoning), redblue's Python API vs the same workflow built on ART, one subprocess each, "
            "cold (imports excluded, loading MNIST included)",
            "settings": {
                "model": "redblue: build_model('cnn', seed=0); ART: build_model(art_model, seed=0), same weights",
                "art_model": args.art_model,
                "epochs": args.epochs,
                "batch_size": BATCH_SIZE,
                "lr": LR,
                "eps": EPS,
                "ratio": RATIO,
                "poison": {"rate": RATE, "of": "non-target training images", "target": TARGET,
                           "trigger": f"{PATCH}x{PATCH} white, bottom-right"},
                "train_subset": args.train_subset,
                "test_subset": args.test_subset,
                "device": args.device,
                "threads": args.threads,
            },
            "repeats": args.repeats,
            "order": [f"{r['side']}#{r['repeat'] + 1}" for r in runs],
            "sides": rows,
            "speedup_vs_art": speedup,
            "total_speedup_vs_art": total_ratio,
            "targets": targets,
            "full_run": full,
        },
    )
    print_tables(rows, full, speedup)


if __name__ == "__main__":
    main()
