"""Attack benchmark: full evaluation (clean + adversarial accuracy) on the 10,000 MNIST test
images, same model and batch size, by redblue, ART and torchattacks.

    python benchmarks/bench_attacks.py [--model PATH] [--data-dir DIR] [--device cpu|cuda]

FGSM (eps 0.25) and PGD-40 (eps 0.3, step 0.01, no random start: the same work for all
three). Each (library, attack) runs in its own subprocess so its peak RSS is its own.
``--repeats N`` (3) runs the libraries interleaved (redblue, ART, torchattacks, redblue, ...)
per attack; images/s comes from the median time, with min, max and spread, and each speed-up
is the ratio of the medians with the range of the per-repeat ratios.
Writes benchmarks/results/bench_attacks.json and prints a Markdown table. Without
--model, a baseline is trained first (about 30 s) into a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script: import benchmarks.common

from benchmarks.common import interleaved, machine, paired, spread

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "bench_attacks.json"
ATTACKS = {
    "fgsm": {"eps": 0.25},
    "pgd-40": {"eps": 0.3, "alpha": 0.01, "steps": 40},
}
LIBRARIES = ("redblue", "art", "torchattacks")
BATCH_SIZE = 500


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def worker(
    library: str, attack: str, model_path: str, data_dir: str | None, device: str, n_examples: int
) -> dict[str, Any]:
    import torch

    from redblue.artifacts import load_model
    from redblue.data import load_dataset, to_float

    settings = ATTACKS[attack]
    loaded = load_model(model_path, device=device)
    model = loaded.model.eval()
    data = load_dataset("mnist", data_dir, device=device)
    x_u8, y = data.x_test[:n_examples], data.y_test[:n_examples]
    n = int(y.shape[0])
    eps = settings["eps"]

    if library == "redblue":
        from redblue.evaluation import evaluate_robustness

        name = "fgsm" if attack == "fgsm" else "pgd"
        extra = (
            {} if attack == "fgsm" else {"alpha": settings["alpha"], "steps": settings["steps"], "random_start": False}
        )
        evaluate_robustness(model, x_u8[:BATCH_SIZE], y[:BATCH_SIZE], attacks=name, eps=eps, checks=False, **extra)
        _sync(device)
        start = time.perf_counter()
        result = evaluate_robustness(
            model, x_u8, y, attacks=name, eps=eps, batch_size=BATCH_SIZE, checks=False, **extra
        )
        _sync(device)
        seconds = time.perf_counter() - start
        clean, robust = result.clean_accuracy, result.robust_accuracy
    elif library == "art":
        import numpy as np
        from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
        from art.estimators.classification import PyTorchClassifier

        x = to_float(x_u8).cpu().numpy()
        labels = y.cpu().numpy()
        classifier = PyTorchClassifier(
            model=model, loss=torch.nn.CrossEntropyLoss(), input_shape=(1, 28, 28), nb_classes=10,
            clip_values=(0.0, 1.0), device_type="gpu" if device.startswith("cuda") else "cpu",
        )  # fmt: skip
        if attack == "fgsm":
            art_attack: Any = FastGradientMethod(classifier, eps=eps, batch_size=BATCH_SIZE)
        else:
            art_attack = ProjectedGradientDescent(
                classifier, eps=eps, eps_step=settings["alpha"], max_iter=settings["steps"],
                num_random_init=0, batch_size=BATCH_SIZE, verbose=False,
            )  # fmt: skip
        classifier.predict(x[:BATCH_SIZE], batch_size=BATCH_SIZE)
        start = time.perf_counter()
        clean_pred = classifier.predict(x, batch_size=BATCH_SIZE).argmax(1)
        x_adv = art_attack.generate(x, y=labels)
        adv_pred = classifier.predict(x_adv, batch_size=BATCH_SIZE).argmax(1)
        seconds = time.perf_counter() - start
        clean = float(np.mean(clean_pred == labels))
        robust = float(np.mean((adv_pred == labels) & (clean_pred == labels)))
    else:
        import torchattacks

        if attack == "fgsm":
            ta_attack: Any = torchattacks.FGSM(model, eps=eps)
        else:
            ta_attack = torchattacks.PGD(
                model, eps=eps, alpha=settings["alpha"], steps=settings["steps"], random_start=False
            )
        ta_attack(to_float(x_u8[:BATCH_SIZE]), y[:BATCH_SIZE])
        _sync(device)
        start = time.perf_counter()
        n_clean = n_robust = 0
        for i in range(0, n, BATCH_SIZE):
            xb, yb = to_float(x_u8[i : i + BATCH_SIZE]), y[i : i + BATCH_SIZE]
            with torch.no_grad():
                ok = model(xb).argmax(1) == yb
            x_adv = ta_attack(xb, yb)
            with torch.no_grad():
                ok_adv = model(x_adv).argmax(1) == yb
            n_clean += int(ok.sum())
            n_robust += int((ok & ok_adv).sum())
        _sync(device)
        seconds = time.perf_counter() - start
        clean, robust = n_clean / n, n_robust / n
    return {
        "library": library,
        "attack": attack,
        "settings": settings,
        "n": n,
        "batch_size": BATCH_SIZE,
        "seconds": seconds,
        "images_per_s": n / seconds,
        "clean_accuracy": clean,
        "robust_accuracy": robust,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="baseline .json (default: train one, ~30 s)")
    parser.add_argument("--data-dir", default=os.environ.get("REDBLUE_DATA_DIR"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--n-examples", type=int, default=10_000, help="test images (default: all 10,000)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per library and attack (default: 3)")
    parser.add_argument("--worker", nargs=2, metavar=("LIBRARY", "ATTACK"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(
            json.dumps(worker(args.worker[0], args.worker[1], args.model, args.data_dir, args.device, args.n_examples))
        )
        return
    model = args.model
    if model is None:
        out = Path(tempfile.mkdtemp(prefix="bench_attacks_"))
        cmd = [
            sys.executable,
            "-m",
            "redblue",
            "train",
            "--out",
            str(out),
            "--device",
            args.device,
            "--dataset",
            "mnist",
        ]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        subprocess.run(cmd, check=True)
        model = str(out / "models" / "baseline.json")
    def run(library: str, attack: str) -> dict[str, Any]:
        cmd = [sys.executable, __file__, "--worker", library, attack, "--model", model, "--device", args.device]
        cmd += ["--n-examples", str(args.n_examples)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            print(f"{library} {attack}: failed: {proc.stderr.strip()[-300:]}", file=sys.stderr)
            return {"library": library, "attack": attack, "error": proc.stderr.strip().splitlines()[-1:]}
        row: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{library:13s} {attack:7s} {row['images_per_s']:9.0f} img/s", file=sys.stderr, flush=True)
        return row

    runs: list[dict[str, Any]] = []
    for attack in ATTACKS:
        runs += interleaved(LIBRARIES, args.repeats, lambda library, _repeat, attack=attack: run(library, attack))
    rows = []
    for attack in ATTACKS:
        for library in LIBRARIES:
            mine = [r for r in runs if r["library"] == library and r["attack"] == attack]
            done = [r for r in mine if "seconds" in r]
            if not done:
                rows.append({"library": library, "attack": attack, "error": mine[0].get("error") if mine else None})
                continue
            seconds = spread([r["seconds"] for r in done])
            first = done[0]
            rows.append({
                "library": library, "attack": attack, "settings": first["settings"], "n": first["n"],
                "batch_size": first["batch_size"], "repeats": len(done), "seconds": seconds["median"],
                "seconds_spread": seconds, "images_per_s": first["n"] / seconds["median"],
                "clean_accuracy": first["clean_accuracy"], "robust_accuracy": first["robust_accuracy"],
                "accuracy_identical_across_repeats": all(
                    (r["clean_accuracy"], r["robust_accuracy"]) == (first["clean_accuracy"], first["robust_accuracy"])
                    for r in done
                ),
                "peak_rss_mb": max(r["peak_rss_mb"] for r in done),
            })  # fmt: skip
    for r in rows:
        if r["library"] == "redblue" and "seconds" in r:
            mine = [{**x, "side": x["library"]} for x in runs if x["attack"] == r["attack"]]  # one interleaved run
            for other in ("art", "torchattacks"):
                ratio = paired(mine, other, "redblue", lambda x: x["seconds"])
                if ratio["median_ratio"]:
                    r[f"speedup_vs_{other}"] = ratio["median_ratio"]
                    r[f"speedup_vs_{other}_pairs"] = [ratio["pair_min"], ratio["pair_max"]]
    import torch

    result = {
        "benchmark": "bench_attacks",
        "machine": machine(),
        "device": args.device,
        "n_examples": args.n_examples,
        "repeats": args.repeats,
        "order": [f"{r['attack']}:{r['library']}#{r['repeat'] + 1}" for r in runs],
        "cpu_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "rows": rows,
        "runs": runs,
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print("| attack | library | images/s (median) | time s, median (min–max) | clean acc | robust acc | peak RSS (MB) | redblue speed-up (medians; per-repeat range) |")
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        if "images_per_s" not in r:
            print(f"| {r['attack']} | {r['library']} | failed | | | | | |")
            continue
        up = ""
        if r["library"] == "redblue":
            up = ", ".join(
                f"{r[f'speedup_vs_{o}']:.2f}x vs {o} ({r[f'speedup_vs_{o}_pairs'][0]:.2f}–{r[f'speedup_vs_{o}_pairs'][1]:.2f})"
                for o in ("art", "torchattacks") if r.get(f"speedup_vs_{o}")
            )
        t = r["seconds_spread"]
        print(
            f"| {r['attack']} | {r['library']} | {r['images_per_s']:.0f} | {t['median']:.1f} ({t['min']:.1f}–{t['max']:.1f}) | "
            f"{100 * r['clean_accuracy']:.2f}% | {100 * r['robust_accuracy']:.2f}% | {r['peak_rss_mb']:.0f} | {up} |"
        )

if __name__ == "__main__":
    main()
