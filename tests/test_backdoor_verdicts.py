"""Honest backdoor verdicts: a backdoor that did not take is said so (backdoor-not-implanted),
and no report row or card claims a removal that did not happen."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from redblue.config import PoisonConfig, TrainConfig
from redblue.data import Dataset
from redblue.evaluation.checks import CHECKS, check_backdoor_implanted
from redblue.report.overview import model_cards
from redblue.report.render import check_docs
from redblue.report.summary import backdoor_outcome, build_summary
from redblue.stages import poison_stage


def test_check_fires_below_half() -> None:
    fired = check_backdoor_implanted(0.057, 8972)
    assert fired is not None and fired["id"] == "backdoor-not-implanted"
    assert "5.7% of 8,972" in fired["message"] and fired["doc"].endswith("#backdoor-not-implanted")
    assert check_backdoor_implanted(0.5, 8972) is None
    assert check_backdoor_implanted(0.9997, 8972) is None
    assert "backdoor-not-implanted" in CHECKS
    assert "backdoor-not-implanted" in {doc["id"] for doc in check_docs()}


def _defence(method: str, before: float, after: float | None) -> dict[str, Any]:
    return {
        "stage": "backdoor_defense", "method": method, "dataset": {"name": "mnist", "n_test": 10000},
        "detection": {"n": 60000, "n_flagged": 10, "precision": 0.1, "recall": 0.1},
        "before": {"clean_accuracy": 0.99, "asr": before, "ra": 0.0},
        "after": None if after is None else {"clean_accuracy": 0.98, "asr": after, "ra": 0.9},
        "retrained_model": {"name": f"poisoned_{method}_retrained"} if after is not None else None,
    }  # fmt: skip


def test_outcome_words_follow_the_numbers() -> None:
    assert backdoor_outcome(_defence("ac", 0.9997, 0.0017)) == "removed"
    assert backdoor_outcome(_defence("spectral", 0.9997, 0.9997)) == "not removed"
    assert backdoor_outcome(_defence("ac", 0.057, 0.02)) == "nothing to remove"  # issue 13's mnist-mini case
    assert backdoor_outcome(_defence("ac", 0.99, None)) == "detection only"


def test_cards_never_claim_a_removal_that_did_not_happen() -> None:
    poisoned = {"stage": "poison", "model": {"name": "poisoned", "weights_sha256": "a" * 64},
                "metrics": {"clean_accuracy": 0.92, "n_test": 1000, "asr": 0.086, "ra": 0.9},
                "warnings": [check_backdoor_implanted(0.086, 900)]}  # fmt: skip
    cards = {c["name"]: c for c in model_cards([("poison", poisoned), ("d", _defence("ac", 0.086, 0.01))])}
    assert cards["poisoned"]["status"] == "warn" and "did not take" in cards["poisoned"]["status_text"]
    retrained = cards["poisoned_ac_retrained"]
    assert retrained["status"] == "info" and "nothing was removed" in retrained["status_text"]
    cards = {c["name"]: c for c in model_cards([("d", _defence("spectral", 0.9997, 0.9997))])}
    assert cards["poisoned_spectral_retrained"]["status"] == "bad"


def test_a_poison_that_did_not_take_is_warned_and_not_called_removed(mini: Dataset, tmp_path: Path) -> None:
    """4 poisoned images in 4,000 and one epoch: no backdoor. The poison stage says so."""
    data = mini.subset(n_train=4000, n_test=500)
    result = poison_stage(tmp_path, data, TrainConfig(epochs=1, seed=0, device="cpu"),
                          PoisonConfig(rate=0.001), progress=False)  # fmt: skip
    asr = result["metrics"]["asr"]
    assert asr < 0.5
    assert [w["id"] for w in result["warnings"]] == ["backdoor-not-implanted"]
    rows = build_summary(tmp_path).rows
    assert [r["scenario"] for r in rows] == ["Poisoned (BadNets)"]
