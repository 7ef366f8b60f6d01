"""The scenario table (``metrics_summary.json``) and its console rendering, from the stage JSONs.

Rows follow the original project's README (Baseline; Baseline + FGSM; Adv. trained;
Poisoned), extended with the stronger attacks, the robustness gap, C-Acc / ASR / RA and
the backdoor detection results. Every row carries the settings that produced it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from redblue.results import Summary
from redblue.utils import pct

COLUMNS: list[dict[str, Any]] = [
    {"key": "scenario", "label": "Scenario"},
    {"key": "model", "label": "Model"},
    {"key": "clean_accuracy", "label": "Clean acc.", "percent": True},
    {"key": "robust_accuracy", "label": "Adversarial acc.", "percent": True},
    {"key": "asr", "label": "ASR", "percent": True},
    {"key": "ra", "label": "RA", "percent": True},
    {"key": "detail", "label": "Settings / notes"},
]


def _load(out: Path, stem: str) -> dict[str, Any] | None:
    path = out / "metrics" / f"{stem}_metrics.json"
    if not path.is_file():
        return None
    data = json.loads(path.read_text(encoding="utf-8"))
    return data if isinstance(data, dict) else None


def _get(obj: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def _attack_row(scenario: str, result: dict[str, Any], model: str) -> dict[str, Any]:
    m = result.get("metrics", {})
    attacks = m.get("attacks") or {}
    parts = []
    for attack, a in attacks.items():
        s = a.get("settings", {})
        knobs = ", ".join(f"{k} {s[k]}" for k in ("alpha", "steps", "restarts") if s.get(k) is not None)
        parts.append(f"{attack}: {pct(a.get('robust_accuracy'))}" + (f" ({knobs})" if knobs else ""))
    warnings = [w.get("id") or w.get("check") for w in result.get("warnings") or []]
    return {
        "scenario": scenario,
        "model": model,
        "clean_accuracy": m.get("clean_accuracy"),
        "robust_accuracy": m.get("robust_accuracy"),
        "eps": m.get("eps"),
        "norm": m.get("norm"),
        "n_examples": m.get("n_examples"),
        "detail": f"{m.get('norm')} eps {m.get('eps')} on {m.get('n_examples')} test images; "
        + "; ".join(parts)
        + (f"; warnings: {', '.join(str(w) for w in warnings)}" if warnings else ""),
        "warnings": warnings,
        "settings": {"attacks": {k: v.get("settings") for k, v in attacks.items()}},
    }


def build_summary(out: Path, *, quick: bool = False) -> Summary:
    """The scenario table from whatever stage JSONs exist under ``out/metrics``."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    dataset = None
    baseline = _load(out, "baseline")
    if baseline:
        dataset = baseline.get("dataset")
        train = _get(baseline, "config", "train") or {}
        rows.append(
            {
                "scenario": "Baseline",
                "model": "baseline",
                "clean_accuracy": _get(baseline, "metrics", "clean_accuracy"),
                "n_test": _get(baseline, "metrics", "n_test"),
                "detail": f"{train.get('model_name')}, {train.get('epochs')} epochs, batch {train.get('batch_size')}, "
                f"seed {train.get('seed')}",
                "settings": {"train": train},
            }
        )
    for stem, scenario in (
        ("fgsm", "Baseline + FGSM"),
        ("pgd", "Baseline + PGD"),
        ("standard", "Baseline + standard suite (APGD-CE + APGD-T)"),
    ):
        result = _load(out, stem)
        if result:
            rows.append(_attack_row(scenario, result, "baseline"))
    adv = _load(out, "advtrain")
    if adv:
        m = adv.get("metrics", {})
        recipe = adv.get("recipe") or {}
        warnings = [w.get("id") or w.get("check") for w in adv.get("warnings") or []]
        gap = None
        if isinstance(m.get("fgsm_accuracy"), float) and isinstance(m.get("robust_accuracy"), float):
            gap = m["fgsm_accuracy"] - m["robust_accuracy"]
        rows.append(
            {
                "scenario": f"Adv. trained ({recipe.get('recipe', '?')})",
                "model": "advtrain",
                "clean_accuracy": m.get("clean_accuracy"),
                "n_test": m.get("n_test"),
                "robust_accuracy": m.get("robust_accuracy"),
                "n_examples": m.get("n_examples"),
                "fgsm_accuracy": m.get("fgsm_accuracy"),
                "pgd_accuracy": m.get("pgd_accuracy"),
                "standard_accuracy": m.get("standard_accuracy"),
                "square_accuracy": m.get("square_accuracy"),
                "robustness_gap": gap,
                "detail": f"eps {recipe.get('eps')}: FGSM {pct(m.get('fgsm_accuracy'))}, PGD {pct(m.get('pgd_accuracy'))}, "
                f"standard {pct(m.get('standard_accuracy'))}, Square {pct(m.get('square_accuracy'))} "
                f"on {m.get('n_examples')} test images; robustness gap "
                f"{pct(gap)}" + (f"; warnings: {', '.join(str(w) for w in warnings)}" if warnings else ""),
                "warnings": warnings,
                "settings": {"recipe": recipe, "train": _get(adv, "config", "train")},
            }
        )
    poison = _load(out, "poison")
    if poison:
        m = poison.get("metrics", {})
        p = poison.get("poison") or {}
        trigger = poison.get("trigger") or {}
        rows.append(
            {
                "scenario": "Poisoned (BadNets)",
                "model": _get(poison, "model", "name"),
                "clean_accuracy": m.get("clean_accuracy"),
                "n_test": m.get("n_test"),
                "asr": m.get("asr"),
                "ra": m.get("ra"),
                "detail": f"rate {p.get('rate')}, target {p.get('target')}, {trigger.get('size')}x{trigger.get('size')} "
                f"{trigger.get('pattern')} patch {trigger.get('position')}",
                "settings": {"poison": p, "trigger": trigger},
            }
        )
    poisoned_sha = _get(poison, "model", "weights_sha256")
    for method in ("ac", "spectral"):
        result = _load(out, f"backdoor_defense_{method}")
        if not result or _get(result, "poisoned_model", "weights_sha256") != poisoned_sha:
            continue
        det = result.get("detection") or {}
        after = result.get("after") or {}
        rows.append(
            {
                "scenario": f"Backdoor removed ({method})",
                "model": _get(result, "retrained_model", "name") or f"retrained ({method})",
                "clean_accuracy": after.get("clean_accuracy"),
                "asr": after.get("asr"),
                "ra": after.get("ra"),
                "precision": det.get("precision"),
                "recall": det.get("recall"),
                "detail": f"flagged {det.get('n_flagged')} of {det.get('n')}: precision {pct(det.get('precision'))}, "
                f"recall {pct(det.get('recall'))}; "
                + ("retrained without them" if result.get("after") else "not retrained (--no-retrain)"),
                "settings": {"defense": _get(result, "config")},
            }
        )
    if quick:
        notes.append("--quick run: data subset, one epoch per model, few test images; not comparable to full runs")
    if dataset and dataset.get("name") != "mnist":
        notes.append(f"dataset {dataset.get('name')} ({dataset.get('n_train')} train / {dataset.get('n_test')} test)")
    return Summary(dataset=dataset, quick=quick, columns=COLUMNS, rows=rows, notes=notes)


def console_table(summary: Summary | dict[str, Any], timings: dict[str, float] | None = None) -> str:
    """A plain-text table of the scenario rows for the end of ``redblue run``."""
    headers = [c["label"] for c in COLUMNS[:-1]]
    lines = []
    for row in summary.get("rows", []):
        cells = []
        for col in COLUMNS[:-1]:
            value = row.get(col["key"])
            cells.append(pct(value, missing="—") if col.get("percent") else ("—" if value is None else str(value)))
        lines.append(cells)
    widths = [max(len(h), *(len(r[i]) for r in lines)) if lines else len(h) for i, h in enumerate(headers)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*headers), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*r) for r in lines]
    if timings:
        out.append(
            "time per stage: "
            + ", ".join(f"{k} {v:.1f} s" for k, v in timings.items())
            + f" (total {sum(timings.values()):.1f} s)"
        )
    out.extend(f"note: {n}" for n in summary.get("notes", []))
    return "\n".join(out)
