"""AutoAttack (standard version): redblue's cascade against the reference assembled from torchattacks.

Same defended model, same first N MNIST test images, same eps, one process, one after the
other. The reference is torchattacks 3.5.1's ``MultiAttack`` of ``APGD(loss="ce", steps=100)``,
``APGDT(steps=100, n_classes=10)``, ``FAB(multi_targeted=True, steps=100, n_classes=10)`` and
``Square(n_queries=5000)`` — the paper's settings (torchattacks' own ``AutoAttack`` class builds
APGD and APGD-T with 10 steps). ``MultiAttack`` is a cascade too: each attack only gets the
images still classified correctly. Both adversarial sets are checked against the threat model
(eps-ball, [0, 1]) and scored by the same forward pass.

    REDBLUE_DATA_DIR=../shared/datasets .venv/bin/python -m benchmarks.bench_autoattack \\
        --model secure_ai_outputs/models/advtrain.json [--n-examples 1000] [--eps 0.3]

With ``--redblue-metrics secure_ai_outputs/metrics/advtrain_metrics.json`` (a ``defend`` run's
evaluation of the same model on the same first N images) only the reference runs, and its
robust accuracy is compared with the figure ``defend`` wrote (issue 17's agreement check).

Writes ``benchmarks/results/autoattack.json`` (``--name`` to change it): both robust
accuracies, both times, redblue's per-attack running accuracy, the machine. Target (issue
"AutoAttack-grade evaluation"): redblue ≥ 3× faster, robust accuracy not higher by more than
0.5 pp, on a defended ``cnn-wide`` and 1,000 images at eps 0.3.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import data_dir, peak_rss_mib, write
from redblue.artifacts import load_model
from redblue.data import load_dataset, to_float
from redblue.evaluation import evaluate_robustness, is_standard_autoattack


def reference_autoattack(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float,
                         batch_size: int) -> torch.Tensor:  # fmt: skip
    """torchattacks' standard AutoAttack as the paper defines it, in batches; the adversarial images."""
    import torchattacks  # a benchmark-only dependency (make bench installs it)

    attack = torchattacks.MultiAttack([
        torchattacks.APGD(model, norm="Linf", eps=eps, steps=100, n_restarts=1, loss="ce", seed=0),
        torchattacks.APGDT(model, norm="Linf", eps=eps, steps=100, n_restarts=1, n_classes=10, seed=0),
        torchattacks.FAB(model, norm="Linf", eps=eps, steps=100, n_restarts=1, multi_targeted=True, n_classes=10,
                         seed=0),
        torchattacks.Square(model, norm="Linf", eps=eps, n_queries=5000, n_restarts=1, seed=0),
    ])  # fmt: skip
    batches = [attack(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(x), batch_size)]
    return torch.cat(batches).detach()


def _score(model: torch.nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, eps: float) -> dict[str, Any]:
    assert float((x_adv - x).abs().max()) <= eps + 1e-5, "reference left the eps-ball"
    assert float(x_adv.min()) >= 0.0 and float(x_adv.max()) <= 1.0, "reference left [0, 1]"
    with torch.no_grad():
        clean = torch.cat([model(x[i : i + 500]).argmax(1) for i in range(0, len(x), 500)]) == y
        adv = torch.cat([model(x_adv[i : i + 500]).argmax(1) for i in range(0, len(x), 500)]) == y
    return {"clean_accuracy": float(clean.float().mean()), "robust_accuracy": float((clean & adv).float().mean())}


def _redblue(args: argparse.Namespace, loaded: Any, model: torch.nn.Module, x_u8: torch.Tensor,
             y: torch.Tensor) -> dict[str, Any]:  # fmt: skip
    """redblue's AutoAttack on the images: run now and timed, or read from ``--redblue-metrics``
    (after checking that it evaluated these weights at this eps on this many images)."""
    if args.redblue_metrics:
        saved = json.loads(Path(args.redblue_metrics).read_text(encoding="utf-8"))
        m = saved["metrics"]
        attacks = saved["evaluation"]["attacks"]
        same = (saved["model"]["weights_sha256"] == loaded.record["weights_sha256"]
                and saved["config"]["defend"]["eps"] == args.eps and m["n_examples"] == args.n_examples
                and saved["dataset"]["name"] == "mnist")  # fmt: skip
        if not same:
            raise SystemExit(f"{args.redblue_metrics}: another model, eps, image count or dataset than "
                             "--model/--eps/--n-examples on MNIST")  # fmt: skip
        if not is_standard_autoattack(attacks):
            raise SystemExit(f"{args.redblue_metrics}: a reduced AutoAttack (--quick), not the standard protocol")
        print(f"redblue autoattack (from {args.redblue_metrics}): robust {100 * m['autoattack_accuracy']:.2f}%")
        return {"from": str(args.redblue_metrics), "seconds": None, "clean_accuracy": m["examples_clean_accuracy"],
                "robust_accuracy": m["autoattack_accuracy"]}  # fmt: skip
    start = time.perf_counter()
    ours = evaluate_robustness(model, x_u8, y, attacks="autoattack", eps=args.eps, batch_size=args.batch_size,
                               checks=False)  # fmt: skip
    redblue_s = time.perf_counter() - start
    print(f"redblue autoattack: robust {100 * ours.robust_accuracy:.2f}% in {redblue_s:.1f} s")
    return {
        "seconds": redblue_s,
        "clean_accuracy": ours.clean_accuracy,
        "robust_accuracy": ours.robust_accuracy,
        "running": {a.attack: {"robust_accuracy": a.robust_accuracy, "n_attacked": a.n_attacked,
                               "n_fooled": a.n_fooled, "seconds": a.seconds} for a in ours.attacks},
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a defended model's .json record")
    parser.add_argument("--n-examples", type=int, default=1000)
    parser.add_argument("--eps", type=float, default=0.3)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--skip-reference", action="store_true")
    parser.add_argument(
        "--redblue-metrics",
        default=None,
        help="take redblue's AutoAttack figure from this defend metrics JSON (the same model, eps and first "
        "--n-examples images) instead of running the cascade again: the reference alone runs",
    )
    parser.add_argument("--name", default=None, help="results/NAME.json [default: autoattack, or autoattack_agreement "
                        "with --redblue-metrics]")  # fmt: skip
    parser.add_argument("--note", default="", help="a remark stored with the results (e.g. 'smoke run')")
    args = parser.parse_args()
    args.name = args.name or ("autoattack_agreement" if args.redblue_metrics else "autoattack")

    data = load_dataset("mnist", Path(data_dir()), download=False)
    loaded = load_model(Path(args.model), device="cpu")
    model = loaded.model.eval()
    x_u8, y = data.x_test[: args.n_examples], data.y_test[: args.n_examples]
    x = to_float(x_u8.clone())

    rows: dict[str, Any] = {"redblue": _redblue(args, loaded, model, x_u8, y)}
    redblue_robust, redblue_s = rows["redblue"]["robust_accuracy"], rows["redblue"]["seconds"]
    if not args.skip_reference:
        # A fresh copy: evaluate_robustness left ours in channels_last, the reference gets it as loaded.
        reference = load_model(Path(args.model), device="cpu").model.eval()
        torch.manual_seed(0)
        start = time.perf_counter()
        x_adv = reference_autoattack(reference, x, y, args.eps, args.batch_size)
        reference_s = time.perf_counter() - start
        rows["torchattacks"] = {"seconds": reference_s, **_score(model, x, x_adv, y, args.eps)}
        gap = 100 * (redblue_robust - rows["torchattacks"]["robust_accuracy"])
        rows["speedup"] = reference_s / redblue_s if redblue_s else None
        rows["robust_gap_pp"] = gap
        speed = f"redblue {rows['speedup']:.2f}x faster, " if rows["speedup"] else "redblue "
        print(f"torchattacks reference: robust {100 * rows['torchattacks']['robust_accuracy']:.2f}% in "
              f"{reference_s:.1f} s; {speed}{gap:+.2f} pp")  # fmt: skip
    write(args.name, {
        "settings": {"model": str(args.model), "model_name": loaded.record.get("model_name"),
                     "weights_sha256": loaded.record.get("weights_sha256"), "n_examples": args.n_examples,
                     "eps": args.eps, "norm": "linf", "batch_size": args.batch_size, "device": "cpu",
                     "reference": "torchattacks 3.5.1 MultiAttack(APGD ce 100, APGDT 100, FAB multi-targeted 100, "
                                  "Square 5000)"},
        "note": args.note,
        "results": rows,
        "peak_rss_mib": peak_rss_mib(),
    })  # fmt: skip


if __name__ == "__main__":
    main()
