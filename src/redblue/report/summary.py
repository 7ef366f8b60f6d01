"""The scenario table (``metrics_summary.json``) and its console rendering, from the stage JSONs.

Rows follow the original project's README (Baseline; Baseline + FGSM; Adv. trained;
Poisoned), extended with the stronger attacks, the robustness gap, C-Acc / ASR / RA and
the backdoor detection results. The table is built from whatever stage results exist under
``OUT/metrics`` (``redblue run`` or separate subcommands, any ``--name``): one row per
result, by its stage. Every row carries the number of images behind its figures and the
settings that produced it.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from redblue.errors import IntegrityError
from redblue.results import SCHEMAS, Summary, validate_result
from redblue.utils import pct, read_json

COLUMNS: list[dict[str, Any]] = [
    {"key": "scenario", "label": "Scenario"},
    {"key": "model", "label": "Model"},
    {"key": "images", "label": "Images"},
    {"key": "clean_accuracy", "label": "Clean acc.", "percent": True},
    {"key": "robust_accuracy", "label": "Adversarial acc.", "percent": True},
    {"key": "asr", "label": "ASR", "percent": True},
    {"key": "ra", "label": "RA", "percent": True},
    {"key": "detail", "label": "Settings / notes"},
]

STAGE_ORDER = ["baseline", "evaluate", "attack", "defend", "poison", "poison_sweep", "backdoor_audit", "backdoor_defense"]
"""The order of the stages in the table and the report (each stage's results by name)."""

ATTACK_LABELS = {
    "fgsm": "FGSM",
    "pgd": "PGD",
    "apgd-ce": "APGD-CE",
    "apgd-t": "APGD-T",
    "fab-t": "FAB-T",
    "square": "Square",
    "quick": "quick suite (FGSM + PGD)",
    "standard": "standard suite (APGD-CE + APGD-T)",
    "autoattack": "AutoAttack (APGD-CE, APGD-T, FAB-T, Square)",
}
"""How an attack (or suite) name reads in a table or a legend."""


def attack_label(spec: str) -> str:
    """``"standard,square"`` -> ``"standard suite (APGD-CE + APGD-T) + Square"``."""
    return " + ".join(ATTACK_LABELS.get(part.strip(), part.strip()) for part in str(spec).split(","))


def count(n: Any) -> str:
    """An image count with thousands separators (``1000`` -> ``"1,000"``), ``"?"`` when unknown."""
    return f"{n:,}" if isinstance(n, int) and not isinstance(n, bool) else "?"


def first(n: Any, total: Any) -> str:
    """``"first 1,000"`` of the test images, or ``"all 10,000"`` when that is all of them."""
    return f"all {count(n)}" if n == total and n is not None else f"first {count(n)}"


def dig(obj: Any, *keys: str) -> Any:
    """``obj[k1][k2]...``, or None where a level is missing or not a dict."""
    for key in keys:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(key)
    return obj


def stage_results(out: Path) -> list[tuple[str, dict[str, Any]]]:
    """(name, result) of every valid stage result ``OUT/metrics/*_metrics.json``, in stage
    order then by name; a file that does not read or validate is skipped with a notice."""
    found = []
    for path in sorted((out / "metrics").glob("*_metrics.json")):
        try:
            data = read_json(path)
            tag = data.get("schema") if isinstance(data, dict) else None
            stage = str(tag.get("name", "")).removeprefix("redblue.") if isinstance(tag, dict) else ""
            if stage not in SCHEMAS or stage == "summary":
                raise IntegrityError(f"{path}: no redblue stage result schema tag")
            validate_result(data, stage)
        except IntegrityError as exc:
            print(f"notice: report: {exc}; not shown", file=sys.stderr)
            continue
        found.append((path.name.removesuffix("_metrics.json"), data))
    return sorted(found, key=lambda item: (_rank(item[1]), item[0]))


def _rank(data: dict[str, Any]) -> int:
    stage = str(data.get("stage"))
    return STAGE_ORDER.index(stage) if stage in STAGE_ORDER else len(STAGE_ORDER)


def model_label(name: Any) -> str:
    """``baseline`` -> ``Baseline``; other model names as they are."""
    return "Baseline" if name == "baseline" else str(name)


def _warning_ids(result: dict[str, Any]) -> list[str]:
    return [str(w.get("id") or w.get("check")) for w in result.get("warnings") or [] if isinstance(w, dict)]


def _attack_row(result: dict[str, Any]) -> dict[str, Any]:
    m = result.get("metrics", {})
    attacks = m.get("attacks") or {}
    spec = dig(result, "config", "attack", "attack") or ",".join(attacks)
    parts = []
    for attack, a in attacks.items():
        s = a.get("settings", {})
        knobs = ", ".join(f"{k} {s[k]}" for k in ("alpha", "steps", "restarts") if s.get(k) is not None)
        parts.append(f"{attack}: {pct(a.get('robust_accuracy'))}" + (f" ({knobs})" if knobs else ""))
    warnings = _warning_ids(result)
    model = dig(result, "model", "name")
    return {
        "scenario": f"{model_label(model)} + {attack_label(spec)}",
        "model": model,
        "images": first(m.get("n_examples"), dig(result, "dataset", "n_test")),
        "clean_accuracy": m.get("clean_accuracy"),
        "robust_accuracy": m.get("robust_accuracy"),
        "eps": m.get("eps"),
        "norm": m.get("norm"),
        "n_examples": m.get("n_examples"),
        "detail": f"{m.get('norm')} eps {m.get('eps')} on {m.get('n_examples')} test images; "
        + "; ".join(parts)
        + (f"; warnings: {', '.join(warnings)}" if warnings else ""),
        "warnings": warnings,
        "settings": {"attacks": {k: v.get("settings") for k, v in attacks.items()}},
    }


def _trained_row(name: str, result: dict[str, Any]) -> dict[str, Any]:
    train = dig(result, "config", "train") or {}
    model = dig(result, "model", "name") or name
    evaluated = result.get("stage") == "evaluate"
    return {
        "scenario": ("Evaluated " if evaluated else "") + model_label(model),
        "model": model,
        "images": f"{count(dig(result, 'metrics', 'n_test'))} test",
        "clean_accuracy": dig(result, "metrics", "clean_accuracy"),
        "n_test": dig(result, "metrics", "n_test"),
        "detail": f"{train.get('model_name')}, {train.get('epochs')} epochs, batch {train.get('batch_size')}, "
        f"seed {train.get('seed')}",
        "settings": {"train": train},
    }


def _defend_row(name: str, adv: dict[str, Any]) -> dict[str, Any]:
    m = adv.get("metrics", {})
    recipe = adv.get("recipe") or {}
    evaluated = dig(adv, "evaluation", "eps")
    eps = recipe.get("eps") if evaluated is None else evaluated  # recipe["eps"] is the training attack's
    trained_at = "" if recipe.get("eps") in (None, eps) else f" (trained at {recipe.get('eps')})"
    warnings = _warning_ids(adv)
    gap = None
    if isinstance(m.get("fgsm_accuracy"), float) and isinstance(m.get("robust_accuracy"), float):
        gap = m["fgsm_accuracy"] - m["robust_accuracy"]
    suffix = "" if name == "advtrain" else f", {name}"
    return {
        "scenario": f"Adv. trained ({recipe.get('recipe', '?')}{suffix})",
        "model": dig(adv, "model", "name") or name,
        "images": f"{count(m.get('n_test'))} clean / {first(m.get('n_examples'), m.get('n_test'))} attacked",
        "clean_accuracy": m.get("clean_accuracy"),
        "n_test": m.get("n_test"),
        "robust_accuracy": m.get("robust_accuracy"),
        "n_examples": m.get("n_examples"),
        "fgsm_accuracy": m.get("fgsm_accuracy"),
        "pgd_accuracy": m.get("pgd_accuracy"),
        "standard_accuracy": m.get("standard_accuracy"),
        "autoattack_accuracy": m.get("autoattack_accuracy"),
        "robustness_gap": gap,
        "detail": f"eps {eps}{trained_at}: FGSM {pct(m.get('fgsm_accuracy'))}, PGD {pct(m.get('pgd_accuracy'))}, "
        f"APGD-CE + APGD-T {pct(m.get('standard_accuracy'))}, AutoAttack {pct(m.get('autoattack_accuracy'))} "
        f"on {m.get('n_examples')} test images; robustness gap "
        f"{pct(gap)}" + (f"; warnings: {', '.join(warnings)}" if warnings else ""),
        "warnings": warnings,
        "settings": {"recipe": recipe, "train": dig(adv, "config", "train")},
    }


def _poison_row(poison: dict[str, Any]) -> dict[str, Any]:
    m = poison.get("metrics", {})
    p = poison.get("poison") or {}
    trigger = poison.get("trigger") or {}
    return {
        "scenario": "Poisoned (BadNets)",
        "model": dig(poison, "model", "name"),
        "images": f"{count(m.get('n_test'))} clean / {count(m.get('n_triggered'))} triggered",
        "clean_accuracy": m.get("clean_accuracy"),
        "n_test": m.get("n_test"),
        "asr": m.get("asr"),
        "ra": m.get("ra"),
        "detail": f"rate {p.get('rate')}, target {p.get('target')}, {trigger.get('size')}x{trigger.get('size')} "
        f"{trigger.get('pattern')} patch {trigger.get('position')}",
        "settings": {"poison": p, "trigger": trigger},
    }


BACKDOOR_TOOK = 0.5
"""A poisoned model holds a backdoor when its ASR is at least this (the backdoor-not-implanted check)."""
ASR_REMOVED = 0.10
"""A backdoor counts as removed when the attack success rate after the defence is at most this."""


def backdoor_outcome(result: dict[str, Any]) -> str:
    """What a backdoor defence did, in words that never claim a removal that did not happen:
    ``nothing to remove`` (the backdoor had not taken), ``removed`` (ASR after at most 10%),
    ``not removed``, or ``detection only`` (no retraining)."""
    before = dig(result, "before", "asr")
    after = dig(result, "after", "asr")
    if isinstance(before, int | float) and before < BACKDOOR_TOOK:
        return "nothing to remove"
    if not isinstance(after, int | float):
        return "detection only"
    return "removed" if after <= ASR_REMOVED else "not removed"


def true_trigger_text(true: dict[str, Any]) -> str:
    """A poisoned model's true trigger against the reversed one, in words (CLI and report)."""
    return (f"target {true.get('target')} {'flagged' if true.get('target_flagged') else 'NOT flagged'}; "
            f"{pct(true.get('mask_mass_on_patch'))} of its reversed mask on the true patch, "
            f"{pct(true.get('mask_mass_near_patch'))} on it or within 2 pixels")  # fmt: skip


def unlearned_text(details: dict[str, Any]) -> str | None:
    """The triggers an unlearning repair stamped per class and why it looked for no more, in
    words (CLI and report); None when the repair recorded no such search (``more_triggers``).

    Example:
        >>> unlearned_text({"more_triggers": [{"class": 7, "l1": [1.0, 3.62], "stop": "the next trigger (63.3) is not under 12.6"}]})
        '2 triggers of class 7 (mask L1 1.0, 3.6; no more: the next trigger (63.3) is not under 12.6)'
    """
    parts = [f"{len(found['l1'])} trigger{'s' if len(found['l1']) != 1 else ''} of class {found['class']} "
             f"(mask L1 {', '.join(f'{v:.1f}' for v in found['l1'])}; no more: {found['stop']})"
             for found in details.get("more_triggers") or []]  # fmt: skip
    return "; ".join(parts) or None


def restored_text(restored: dict[str, Any], true: dict[str, Any] | None) -> str:
    """The restored (compact) triggers of a backdoor audit in words (CLI and report): each
    class's mask norm and, for a poisoned model, where the target's lies."""
    sizes = ", ".join(f"{k}: {'none' if v is None else f'{v:.1f}'}"
                      for k, v in zip(restored.get("classes") or [], restored.get("l1") or [], strict=False))  # fmt: skip
    where = ("" if not true or true.get("restored_mask_mass_on_patch") is None else
             f"; the target's: {pct(true.get('restored_mask_mass_on_patch'))} on the true patch, "
             f"{pct(true.get('restored_mask_mass_near_patch'))} on it or within 2 pixels")  # fmt: skip
    return (f"mask L1 per class {sizes} (total-variation weight {restored.get('smoothness')}, "
            f"{restored.get('restarts')} starts per class){where}")


def _backdoor_row(result: dict[str, Any]) -> dict[str, Any]:
    method = result.get("method")
    det = result.get("detection") or {}
    after = result.get("after") or {}
    n_test = dig(result, "dataset", "n_test")
    outcome = backdoor_outcome(result)
    if dig(result, "poisoned_model", "poison") is None:
        scored = (f": precision {pct(det.get('precision'))}, recall {pct(det.get('recall'))}"
                  if det.get("n_poison") is not None else " (true poison indices not given)")  # fmt: skip
        return {
            "scenario": f"Training-set screening ({method})",
            "model": dig(result, "poisoned_model", "name"),
            "images": f"{count(det.get('n'))} train screened",
            "clean_accuracy": dig(result, "before", "clean_accuracy"),
            "asr": None, "ra": None,
            "precision": det.get("precision"), "recall": det.get("recall"),
            "detail": f"flagged {det.get('n_flagged')} of {det.get('n')}{scored}; indices in {det.get('flagged_file')}",
            "settings": {"defense": dig(result, "config")},
        }  # fmt: skip
    scenario = {
        "nothing to remove": f"Backdoor defence ({method}): no backdoor had taken (ASR before "
                             f"{pct(dig(result, 'before', 'asr'))}), nothing to remove",
        "removed": f"Backdoor removed ({method})",
        "not removed": f"Backdoor defence ({method}): not removed",
        "detection only": f"Backdoor detection ({method})",
    }[outcome]  # fmt: skip
    return {
        "scenario": scenario,
        "model": dig(result, "retrained_model", "name") or f"retrained ({method})",
        "images": f"{count(n_test)} test; {count(det.get('n'))} train screened",
        "clean_accuracy": after.get("clean_accuracy"),
        "asr": after.get("asr"),
        "ra": after.get("ra"),
        "precision": det.get("precision"),
        "recall": det.get("recall"),
        "detail": f"flagged {det.get('n_flagged')} of {det.get('n')}: precision {pct(det.get('precision'))}, "
        f"recall {pct(det.get('recall'))}; "
        + ("retrained without them" if result.get("after") else "not retrained (--no-retrain)"),
        "settings": {"defense": dig(result, "config")},
    }


def build_summary(
    out: Path, *, quick: bool = False, results: list[tuple[str, dict[str, Any]]] | None = None
) -> Summary:
    """The scenario table from whatever stage JSONs exist under ``out/metrics`` (or from
    ``results``, as :func:`stage_results` returns them, when the caller has read them)."""
    rows: list[dict[str, Any]] = []
    notes: list[str] = []
    dataset = None
    results = stage_results(out) if results is None else results
    poisoned = {dig(r, "model", "weights_sha256") for _, r in results if r.get("stage") == "poison"}
    for name, result in results:
        stage = result.get("stage")
        if dataset is None and isinstance(result.get("dataset"), dict):
            dataset = result["dataset"]
        if stage in ("baseline", "evaluate"):
            rows.append(_trained_row(name, result))
        elif stage == "attack":
            rows.append(_attack_row(result))
        elif stage == "defend":
            rows.append(_defend_row(name, result))
        elif stage == "poison":
            rows.append(_poison_row(result))
        elif stage == "backdoor_defense":
            # A defence of a poisoned model that a later poison run replaced is stale.
            screened = dig(result, "poisoned_model", "poison") is None  # a user's training set, not a poison run's
            if not screened and poisoned and dig(result, "poisoned_model", "weights_sha256") not in poisoned:
                notes.append(f"{name}: defends a poisoned model that is no longer in this folder; not shown")
                continue
            rows.append(_backdoor_row(result))
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
