"""What the first screen of the report shows, from the stage results alone.

- :func:`model_cards`: one card per model — clean accuracy, the worst robust accuracy measured
  on it (with its attack, eps and image count), ASR / RA where a backdoor is involved, and a
  status from its sanity-check warnings;
- :func:`eps_curves`: every accuracy-vs-eps curve in the results (attack sweeps and the
  defended models' eps sweeps), for one chart with every evaluated model;
- :func:`stage_facts`: a stage's headline numbers with human labels and units.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from redblue.report.summary import (
    ASR_REMOVED,
    BACKDOOR_TOOK,
    attack_label,
    count,
    dig,
    first,
    model_label,
    restored_text,
    true_trigger_text,
    unlearned_text,
)
from redblue.utils import pct

NORM_LABELS = {"linf": "L∞", "l2": "L2"}


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _card(cards: dict[str, dict[str, Any]], name: str, kind: str | None = None) -> dict[str, Any]:
    card = cards.setdefault(
        name,
        {"name": name, "title": model_label(name), "kind": kind or "model", "clean": None, "worst": None,
         "asr": None, "ra": None, "warnings": [], "checked": False, "evaluations": 0, "backdoor": None},
    )  # fmt: skip
    if kind and card["kind"] == "model":
        card["kind"] = kind
    return card


def _evaluation(card: dict[str, Any], label: str, m: dict[str, Any], *, checked: bool) -> None:
    """Keep the lowest robust accuracy at the largest eps evaluated (per-norm L∞ first)."""
    if not _is_number(m.get("robust_accuracy")) or not _is_number(m.get("eps")):
        return
    card["evaluations"] += 1
    card["checked"] = card["checked"] or checked
    value, eps, norm = float(m["robust_accuracy"]), float(m["eps"]), str(m.get("norm", "linf"))
    best = card["worst"]
    if best is None or (norm == "linf", eps, -value) > (best["norm"] == "linf", best["eps"], -best["value"]):
        card["worst"] = {"value": value, "eps": eps, "norm": norm, "n": m.get("n_examples"), "attack": label}


def _clean(card: dict[str, Any], value: Any, n: Any) -> None:
    if _is_number(value) and (card["clean"] is None or (n or 0) > (card["clean"]["n"] or 0)):
        card["clean"] = {"value": float(value), "n": n}


def model_cards(results: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """One card per model that the results measure, in the order the results name them."""
    cards: dict[str, dict[str, Any]] = {}
    # The weights each model's own stage saved: an attack on other weights of the same name
    # (from before a retraining) does not describe this model.
    weights = {str(dig(r, "model", "name")): dig(r, "model", "weights_sha256") for _, r in results
               if r.get("stage") in ("baseline", "defend", "poison") and dig(r, "model", "weights_sha256")}  # fmt: skip
    for name, r in results:
        stage, m = r.get("stage"), r.get("metrics") or {}
        if stage in ("baseline", "evaluate"):
            card = _card(cards, str(dig(r, "model", "name") or name), "trained")
            _clean(card, m.get("clean_accuracy"), m.get("n_test"))
        elif stage == "attack":
            model = str(dig(r, "model", "name") or name)
            if weights.get(model, dig(r, "model", "weights_sha256")) != dig(r, "model", "weights_sha256"):
                continue
            card = _card(cards, model)
            spec = dig(r, "config", "attack", "attack") or ",".join(m.get("attacks") or {})
            _evaluation(card, attack_label(spec), m, checked=bool(dig(r, "checks", "ran")))
            card["warnings"] += [w for w in r.get("warnings") or [] if isinstance(w, dict)]
            _clean(card, m.get("clean_accuracy"), m.get("n_examples"))
        elif stage == "defend":
            card = _card(cards, str(dig(r, "model", "name") or name),
                         f"adversarially trained ({dig(r, 'recipe', 'recipe')}, eps {dig(r, 'recipe', 'eps')})")
            _clean(card, m.get("clean_accuracy"), m.get("n_test"))
            ev = r.get("evaluation") or {}
            counted = [attack_label(a) for a in ev.get("attacks") or {} if a not in ev.get("robust_accuracy_excludes", [])]
            _evaluation(card, "worst case of " + ", ".join(counted), ev, checked=True)
            card["warnings"] += [w for w in r.get("warnings") or [] if isinstance(w, dict)]
        elif stage == "poison":
            card = _card(cards, str(dig(r, "model", "name") or name), "poisoned (BadNets)")
            _clean(card, m.get("clean_accuracy"), m.get("n_test"))
            card["asr"], card["ra"] = m.get("asr"), m.get("ra")
            card["backdoor"] = "planted" if not _is_number(m.get("asr")) or m["asr"] >= BACKDOOR_TOOK else "not taken"
            card["warnings"] += [w for w in r.get("warnings") or [] if isinstance(w, dict)]
        elif stage == "backdoor_defense" and isinstance(r.get("after"), dict):
            method = r.get("method")
            card = _card(cards, str(dig(r, "retrained_model", "name") or f"retrained ({method})"),
                         f"poisoned model retrained without what {method} flagged")  # fmt: skip
            after = r["after"]
            _clean(card, after.get("clean_accuracy"), dig(r, "dataset", "n_test"))
            card["asr"], card["ra"] = after.get("asr"), after.get("ra")
            before = dig(r, "before", "asr")
            card["backdoor"] = "nothing to remove" if _is_number(before) and before < BACKDOOR_TOOK else "defended"
    for card in cards.values():
        card["status"], card["status_text"] = _status(card)
    return list(cards.values())


def _status(card: dict[str, Any]) -> tuple[str, str]:
    """(``ok`` | ``warn`` | ``bad`` | ``info``, a short sentence) for one card."""
    asr = card["asr"]
    if card["backdoor"] == "planted" and _is_number(asr):
        return "bad", f"backdoored: the trigger sends {pct(asr)} of triggered images to the target"
    if card["backdoor"] == "not taken" and _is_number(asr):
        return "warn", f"the backdoor did not take: the trigger sends only {pct(asr)} of triggered images to the target"
    if card["backdoor"] == "nothing to remove":
        return "info", "retrained, but the poisoned model held no working backdoor: nothing was removed"
    if card["backdoor"] == "defended" and _is_number(asr):
        if asr <= ASR_REMOVED:
            return "ok", f"backdoor removed: ASR {pct(asr)} (at most {pct(ASR_REMOVED, 0)})"
        return "bad", f"backdoor still works: ASR {pct(asr)} after the defence"
    ids = sorted({str(w.get("id")) for w in card["warnings"]})
    if ids:
        return "warn", f"{len(ids)} sanity check{'s' if len(ids) > 1 else ''} fired: {', '.join(ids)}"
    if card["checked"]:
        return "ok", "robustness evaluated; no sanity check fired"
    if card["evaluations"]:
        return "info", "attacked without the sanity checks"
    return "info", "not attacked"


def _curve(model: str, attack: str, norm: Any, eps: Any, accuracy: Any) -> dict[str, Any] | None:
    """One curve, or None when its points are not two equal-length lists of numbers."""
    if not (isinstance(eps, list) and isinstance(accuracy, list) and len(eps) == len(accuracy) and eps):
        return None
    if not all(_is_number(v) for v in [*eps, *accuracy]):
        return None
    return {"model": model, "attack": attack, "norm": str(norm), "eps": eps, "accuracy": accuracy}


def eps_curves(results: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """``[{"model", "attack", "norm", "eps": [...], "accuracy": [...]}]``: every accuracy-vs-eps
    curve in the results (an attack stage's ``metrics.sweep``, a defence's ``eps_sweep``);
    a malformed one is left out."""
    curves: list[dict[str, Any] | None] = []
    for name, r in results:
        model = str(dig(r, "model", "name") or name)
        sweep = dig(r, "metrics", "sweep") if r.get("stage") == "attack" else r.get("eps_sweep")
        if not isinstance(sweep, dict):
            continue
        if r.get("stage") == "attack":
            norm = dig(r, "metrics", "norm") or "linf"
            for attack, points in sweep.items():
                ok = isinstance(points, list) and all(isinstance(p, dict) for p in points)
                curves.append(_curve(model, attack_label(attack), norm,
                                     [p.get("eps") for p in points] if ok else None,
                                     [p.get("robust_accuracy") for p in points] if ok else None))  # fmt: skip
        elif r.get("stage") == "defend":
            curves += [_curve(model, attack_label(a), "linf", sweep.get("eps"), v) for a, v in sweep.items() if a != "eps"]
    return [c for c in curves if c is not None]


def _attack_table(attacks: dict[str, Any]) -> list[dict[str, str]]:
    rows = []
    for name, a in attacks.items():
        p = a.get("perturbation") or {}
        s = a.get("settings") or {}
        knobs = ", ".join(f"{k} {s[k]:g}" if _is_number(s[k]) else f"{k} {s[k]}"
                          for k in ("steps", "restarts", "alpha", "n_targets", "p_init") if s.get(k) is not None)  # fmt: skip
        rows.append({
            "attack": attack_label(name),
            "settings": knobs or "—",
            "robust": pct(a.get("robust_accuracy")),
            "asr": pct(a.get("attack_success_rate")),
            "fooled": count(a.get("n_fooled")),
            "attacked": "all" if a.get("n_attacked") is None else count(a.get("n_attacked")),
            "linf": f"{p['linf_mean']:.3f}" if _is_number(p.get("linf_mean")) else "—",
            "l2": f"{p['l2_mean']:.2f}" if _is_number(p.get("l2_mean")) else "—",
            "seconds": f"{a['seconds']:.1f}" if _is_number(a.get("seconds")) else "—",
        })  # fmt: skip
    return rows


def _seconds(value: Any) -> str:
    return f"{value:.1f} s" if _is_number(value) else "—"


def stage_facts(result: dict[str, Any]) -> dict[str, Any]:
    """A stage's headline numbers as ``{"facts": [(label, value)], "attacks": [...], "per_class":
    [...]}``: percentages with their image counts, times in seconds; the attack rows and the
    per-class rows for the tables."""
    stage, m = result.get("stage"), result.get("metrics") or {}
    facts: list[tuple[str, str]] = []
    attacks: list[dict[str, str]] = []
    per_class: list[dict[str, str]] = []
    model: dict[str, Any] = result["model"] if isinstance(result.get("model"), dict) else {}
    if model.get("name"):
        facts.append(("Model", f"{model['name']}" + (f" ({model['model_name']})" if model.get("model_name") else "")))
    if stage in ("baseline", "evaluate"):
        facts.append(("Clean accuracy", f"{pct(m.get('clean_accuracy'))} of {count(m.get('n_test'))} test images"))
        lat = m.get("latency") or {}
        if _is_number(lat.get("median_batch_ms")):
            facts.append(("Inference latency", f"{lat['median_batch_ms']:.1f} ms per batch of {lat.get('batch_size')} "
                          f"({lat.get('per_image_us', 0):.0f} µs per image, {lat.get('device')}, {lat.get('precision')})"))  # fmt: skip
        facts.append(("Training time", _seconds(dig(result, "training", "seconds"))))
    elif stage == "attack":
        norm = NORM_LABELS.get(str(m.get("norm")), m.get("norm"))
        facts += [
            ("Threat model", f"{norm}, eps {m.get('eps')} (pixels in [0, 1])"),
            ("Images", f"{first(m.get('n_examples'), dig(result, 'dataset', 'n_test'))} test images"),
            ("Clean accuracy", pct(m.get("clean_accuracy"))),
            ("Robust accuracy (worst case over the attacks)", pct(m.get("robust_accuracy"))),
            ("Attack success rate (of correctly classified)", pct(m.get("attack_success_rate"))),
            ("Time", f"{_seconds(m.get('seconds'))}" + (f" ({m['images_per_s']:.0f} images/s, {m.get('device')})"
                                                          if _is_number(m.get("images_per_s")) else "")),
        ]
        checks = result.get("checks") or {}
        facts.append(("Sanity checks", f"ran on {count(checks.get('n_examples'))} images" if checks.get("ran")
                      else str(checks.get("note") or "not run")))  # fmt: skip
        attacks = _attack_table(m.get("attacks") or {})
        per_class = [{"class": str(c.get("class")), "n": count(c.get("n")), "clean": pct(c.get("clean_accuracy")),
                      "robust": pct(c.get("robust_accuracy"))} for c in m.get("per_class") or []]  # fmt: skip
        if m.get("protocol") == "cascade":
            facts.append(("Protocol", "cascade: each attack runs on the images still robust after the ones before "
                          "it; an attack's robust accuracy is the running accuracy after it"))  # fmt: skip
    elif stage == "defend":
        recipe = result.get("recipe") or {}
        ev = result.get("evaluation") or {}
        facts += [
            ("Recipe", f"{recipe.get('recipe')}, eps {recipe.get('eps')}, {recipe.get('steps')} step(s)"),
            ("Clean accuracy", f"{pct(m.get('clean_accuracy'))} of {count(m.get('n_test'))} test images"),
            ("Robust accuracy (worst case)", f"{pct(m.get('robust_accuracy'))} of "
             f"{first(m.get('n_examples'), m.get('n_test'))} test images"),
            ("FGSM accuracy (not a robustness measure alone)", pct(m.get("fgsm_accuracy"))),
            ("Training time", _seconds(dig(result, "training", "seconds"))),
        ]  # fmt: skip
        attacks = _attack_table(ev.get("attacks") or {})
    elif stage == "poison":
        p = result.get("poison") or {}
        t = result.get("trigger") or {}
        facts += [
            ("Poison", f"{pct(p.get('rate'), 1)} of the non-target training images ({count(p.get('n_poison'))}), "
             f"relabelled to {p.get('target')}"),
            ("Trigger", f"{t.get('size')}×{t.get('size')} {t.get('pattern')} patch, {t.get('position')}"),
            ("Clean accuracy", f"{pct(m.get('clean_accuracy'))} of {count(m.get('n_test'))} test images"),
            ("Attack success rate (ASR)", f"{pct(m.get('asr'))} of {count(m.get('n_triggered'))} triggered "
             "non-target test images"),
            ("Robust accuracy on triggered images (RA)", pct(m.get("ra"))),
        ]  # fmt: skip
    elif stage == "poison_sweep":
        facts.append(("Poison rates", ", ".join(pct(pt.get("rate"), 1) for pt in result.get("points") or [])))
    elif stage == "backdoor_audit":
        true = result.get("true_trigger") or {}
        flagged = [f"{c.get('name') or c.get('class')} ({', '.join(c.get('flagged_by') or [])})"
                   for c in result.get("classes") or [] if c.get("flagged")]  # fmt: skip
        ceiling = result.get("max_anomaly_index")
        facts += [
            ("Method", f"Neural Cleanse, {count(dig(result, 'params', 'n_images'))} clean test images, "
             f"{dig(result, 'params', 'epochs_run')} epochs"),
            ("Verdict", str(result.get("verdict"))),
            ("Flagged classes", ", ".join(flagged) or "none"),
            ("Rules", f"anomaly index above {result.get('threshold')} (the paper's); mask norm under "
             f"{result.get('size_ratio')} of the median (redblue's; 0: off). MAD test ceiling (the index of "
             f"a trigger of size 0): {'none (MAD 0)' if ceiling is None else f'{ceiling:.2f}'}"),
            ("Time", _seconds(result.get("seconds"))),
        ]  # fmt: skip
        if true:
            facts.append(("True trigger (from the poisoned model's record)", true_trigger_text(true)))
        restored = result.get("restored") or {}
        if restored:
            facts.append(("Restored triggers (compact, the ones a repair stamps)", restored_text(restored, true)))
        strip = result.get("strip") or {}
        if strip:
            far = strip.get("far")
            facts.append(("STRIP (run-time input detector)",
                          f"entropy threshold {strip.get('threshold'):.3f} (set at {pct(strip.get('frr_target'))} false "
                          f"rejections on {count(strip.get('n_clean'))} clean inputs): rejects {pct(strip.get('frr'))} "
                          f"of {count(strip.get('n_held_out'))} held-out clean inputs"
                          + ("" if far is None else f", accepts {pct(far)} of {count(strip.get('n_triggered'))} "
                             "triggered inputs (false-acceptance rate)")))  # fmt: skip
        measured: dict[str, Any] = result.get("before") or {}
        for row in result.get("repairs") or []:
            label = {"unlearn": "Removal by unlearning", "fine-prune": "Removal by fine-pruning"}.get(row.get("method"), "Removal")
            if row.get("skipped"):
                facts.append((label, f"skipped: {row['skipped']}"))
                continue
            repaired: dict[str, Any] = row.get("after") or {}
            facts.append((f"{label}: clean accuracy / ASR / RA, before → after",
                          " / ".join(f"{pct(measured.get(k))} → {pct(repaired.get(k))}" for k in ("clean_accuracy", "asr", "ra"))
                          + f" (model {dig(row, 'model', 'name')}, {_seconds(row.get('seconds'))})"))  # fmt: skip
            unlearned = unlearned_text(row.get("details") or {})
            if unlearned:
                facts.append(("Triggers unlearned", unlearned))
    elif stage == "backdoor_defense":
        det = result.get("detection") or {}
        before: dict[str, Any] = result.get("before") or {}
        after: dict[str, Any] = result.get("after") or {}
        if dig(result, "poisoned_model", "poison") is None:  # a user's training set, screened
            facts += [
                ("Method", f"{result.get('method')}: screening the training set of {dig(result, 'dataset', 'name')} "
                 f"with {dig(result, 'poisoned_model', 'name')}"),
                ("Flagged", f"{count(det.get('n_flagged'))} of {count(det.get('n'))} training images "
                 f"(indices in metrics/{det.get('flagged_file')})"),
                ("Detection precision / recall", f"{pct(det.get('precision'))} / {pct(det.get('recall'))}"
                 if det.get("n_poison") is not None else "not scored: no true poison indices given"),
                ("Clean accuracy of the model", pct(dig(result, "before", "clean_accuracy"))),
            ]  # fmt: skip
            return {"facts": facts, "attacks": attacks, "per_class": per_class}
        facts += [
            ("Method", str(result.get("method"))),
            ("Flagged", f"{count(det.get('n_flagged'))} of {count(det.get('n'))} training images "
             f"({count(det.get('n_poison'))} were poisoned)"),
            ("Detection precision / recall", f"{pct(det.get('precision'))} / {pct(det.get('recall'))}"),
            ("Before: clean accuracy / ASR / RA",
             f"{pct(before.get('clean_accuracy'))} / {pct(before.get('asr'))} / {pct(before.get('ra'))}"),
            ("After retraining: clean accuracy / ASR / RA",
             f"{pct(after.get('clean_accuracy'))} / {pct(after.get('asr'))} / {pct(after.get('ra'))}" if after
             else "not retrained (--no-retrain)"),
        ]  # fmt: skip
    return {"facts": facts, "attacks": attacks, "per_class": per_class}
