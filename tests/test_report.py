"""The report's first screen and stage sections, from whatever results a folder holds.

Cards and the scenario table are built from the stage results themselves (not from
``redblue run``'s summary file), so a folder filled by separate subcommands, with their own
names, gets them too; the numbers on a card are the ones in the JSON it came from.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

from redblue.evaluation.checks import CHECKS
from redblue.report.overview import ASR_REMOVED, eps_curves, model_cards, stage_facts
from redblue.report.render import check_docs

Cli = Callable[..., CompletedProcess[str]]


def _attack(model: str, spec: str, eps: float, robust: float, n: int, *, checked: bool = True,
            warnings: list[dict[str, Any]] | None = None) -> dict[str, Any]:  # fmt: skip
    return {
        "stage": "attack",
        "model": {"name": model},
        "config": {"attack": {"attack": spec}},
        "metrics": {"eps": eps, "norm": "linf", "n_examples": n, "clean_accuracy": 0.99, "robust_accuracy": robust,
                    "attacks": {}, "sweep": {"pgd": [{"eps": 0.0, "robust_accuracy": 0.99},
                                                     {"eps": eps, "robust_accuracy": robust}]}},
        "checks": {"ran": checked},
        "warnings": warnings or [],
    }  # fmt: skip


def test_card_keeps_the_lowest_accuracy_at_the_largest_eps() -> None:
    results = [
        ("baseline", {"stage": "baseline", "model": {"name": "baseline"},
                      "metrics": {"clean_accuracy": 0.991, "n_test": 10_000}}),
        ("a", _attack("baseline", "fgsm", 0.25, 0.16, 10_000, checked=False)),
        ("b", _attack("baseline", "pgd", 0.25, 0.02, 1_000, checked=False)),
        ("c", _attack("baseline", "pgd", 0.1, 0.0, 1_000, checked=False)),  # smaller eps: not the headline
        ("d", _attack("baseline", "standard", 0.25, 0.05, 1_000)),
    ]  # fmt: skip
    (card,) = model_cards(results)
    assert card["clean"] == {"value": 0.991, "n": 10_000}
    assert card["worst"] == {"value": 0.02, "eps": 0.25, "norm": "linf", "n": 1_000, "attack": "PGD"}
    assert card["status"] == "ok" and card["evaluations"] == 4
    assert len(eps_curves(results)) == 4


def test_card_status_follows_warnings_and_backdoor_outcome() -> None:
    warned = _attack("m", "pgd", 0.3, 0.8, 100, warnings=[{"id": "robustness-gap", "message": "x"}])
    unchecked = _attack("u", "fgsm", 0.3, 0.8, 100, checked=False)
    poisoned = {"stage": "poison", "model": {"name": "p"},
                "metrics": {"clean_accuracy": 0.99, "n_test": 10_000, "asr": 0.999, "ra": 0.001}}
    removed = {"stage": "backdoor_defense", "method": "ac", "retrained_model": {"name": "r1"},
               "dataset": {"n_test": 10_000}, "after": {"clean_accuracy": 0.99, "asr": ASR_REMOVED, "ra": 0.98}}
    kept = {**removed, "retrained_model": {"name": "r2"}, "after": {"clean_accuracy": 0.99, "asr": 0.9, "ra": 0.1}}
    cards = {c["name"]: c for c in model_cards([("w", warned), ("u", unchecked), ("p", poisoned),
                                                ("r1", removed), ("r2", kept)])}  # fmt: skip
    assert cards["m"]["status"] == "warn" and "robustness-gap" in cards["m"]["status_text"]
    assert cards["u"]["status"] == "info"
    assert cards["p"]["status"] == "bad" and cards["p"]["asr"] == 0.999
    assert cards["r1"]["status"] == "ok" and cards["r2"]["status"] == "bad"


def test_stage_facts_give_units_and_image_counts() -> None:
    facts = dict(stage_facts({"stage": "baseline", "model": {"name": "b", "model_name": "cnn"},
                              "metrics": {"clean_accuracy": 0.9912, "n_test": 10_000},
                              "training": {"seconds": 27.25}})["facts"])  # fmt: skip
    assert facts["Clean accuracy"] == "99.12% of 10,000 test images"
    assert facts["Training time"] == "27.2 s" and facts["Model"] == "b (cnn)"


def test_every_check_is_explained_in_the_packaged_docs() -> None:
    docs = {d["id"]: d for d in check_docs()}
    assert set(docs) == set(CHECKS)
    for doc in docs.values():
        text = " ".join(str(p) for p in doc["paragraphs"])
        assert "Fires when" in text and "Means:" in text and "Do:" in text, doc["id"]
        assert "original project" not in text


def test_report_from_subcommands_alone_has_cards_and_table(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    common = ("--out", str(out), "--dataset", "mnist-mini")
    train = cli("train", *common, "--epochs", "1", "--device", "cpu")
    assert train.returncode == 0, train.stderr
    for attack in ("fgsm", "pgd"):
        result = cli("attack", *common, "--model", str(out / "models" / "baseline.json"), "--attack", attack,
                     "--n-examples", "100", "--eps", "0.2", "--no-checks", "--sweep", "--device", "cpu")  # fmt: skip
        assert result.returncode == 0, result.stderr
    result = cli("report", "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert not (out / "metrics" / "metrics_summary.json").exists()
    html = (out / "report.html").read_text(encoding="utf-8")
    assert 'id="model-baseline"' in html and html.count('class="card ') == 1
    fgsm = json.loads((out / "metrics" / "baseline_fgsm_metrics.json").read_text())["metrics"]
    pgd = json.loads((out / "metrics" / "baseline_pgd_metrics.json").read_text())["metrics"]
    worst = min(fgsm["robust_accuracy"], pgd["robust_accuracy"])
    card = html[html.index('id="model-baseline"'):]
    assert f"{100 * worst:.2f}%" in card[: card.index("</div>")]
    for scenario in ("Baseline", "Baseline + FGSM", "Baseline + PGD"):
        assert re.search(rf"<td[^>]*>{re.escape(scenario)}</td>", html), scenario
    assert "first 100" in html  # the image count of the attack rows
    assert 'id="overview-chart"' in html and (out / "images" / "overview_accuracy_vs_eps.png").is_file()
    md = (out / "report.md").read_text(encoding="utf-8")
    assert "## Summary" in md and "**Baseline**" in md
