"""The backdoor-audit stage: is a model backdoored, by what trigger, and can it be repaired?

Needs only the model (any ``--model`` source) and clean labelled images:

- **Neural Cleanse** on the first ``n_images`` test images: ``metrics/<name>_metrics.json``
  (per class: the reversed mask's L1 norm, its anomaly index, the trigger's success rate,
  flagged or not; the verdict) and ``metrics/<name>_triggers.safetensors`` (the reversed masks
  and patterns, hashed), which the report's trigger grid and anomaly chart are rendered from.
- **Restoration** of the flagged classes' (and ``unlearn_classes``') triggers as compact blobs
  (the masks' total variation beside their L1 norm, two starts per class): ``restored_masks``
  and ``restored_patterns`` in the same file, ``restored`` in the JSON. The judging does not
  use them.
- **STRIP** (unless turned off): its run-time threshold set on the same clean images, and its
  false-acceptance rate on triggered images when the trigger is known.
- **Repair** (``repair``): unlearning with the restored triggers (the judged ones where none
  was restored) and each class's further triggers (:func:`more_triggers`; saved as
  ``unlearn_masks``, ``unlearn_patterns`` and ``unlearn_classes`` in the triggers file) and/or
  fine-pruning, each
  fine-tuned on clean training images held out from the audit and saved as
  ``models/<name>_unlearn`` / ``models/<name>_fine_prune``; clean accuracy (all test images)
  before and after, and ASR / RA when the true trigger is known.

When the model is one of redblue's poisoned models, its record's true trigger is known: it is
compared with the reversed one (is the target flagged, what share of the target's mask lies
on the true patch) and used for STRIP's false-acceptance rate and the ASR before and after
a repair.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Any

import torch

from redblue.artifacts import LoadedModel, write_tensors
from redblue.config import BackdoorAuditConfig, DataConfig, PoisonConfig, TrainConfig
from redblue.data import Dataset, to_float
from redblue.defenses.neural_cleanse import (
    ALGORITHM,
    ANOMALY_THRESHOLD,
    MIN_NORMS,
    SIZE_RATIO,
    CleanseResult,
    assess,
    finite_norms,
    neural_cleanse,
    statistical_median,
)
from redblue.defenses.repair import RepairResult, fine_prune, last_conv, unlearn
from redblue.defenses.strip import strip
from redblue.errors import ConfigError, IntegrityError
from redblue.metrics import backdoor_metrics
from redblue.poison.trigger import apply_trigger
from redblue.results import BackdoorAuditResult
from redblue.stages.common import (
    cached_result,
    config_json,
    file_intact,
    model_intact,
    model_json,
    save_derived,
    stage_cache,
    write_result,
)
from redblue.stages.poison import poison_config_from_record
from redblue.train import accuracy
from redblue.utils import library_versions, resolve_device, sha256_json
from redblue.validate import check_name

TRIGGERS_FORMAT = "redblue.reversed-triggers/1"


NEAR_PATCH = 2
"""Pixels around the true patch that ``mask_mass_near_patch`` also counts."""


def patch_shares(mask: torch.Tensor, box: tuple[int, int, int]) -> tuple[float, float]:
    """The share of ``mask`` (H, W) on the patch ``box`` (row, col, size), and on it or within
    ``NEAR_PATCH`` pixels of it."""
    row, col, size = box
    mask = mask.double()  # float32 sums in another order can put a share over 1
    total = float(mask.sum())
    if total <= 0:
        return 0.0, 0.0
    on_patch = float(mask[row : row + size, col : col + size].sum())
    top, left = max(row - NEAR_PATCH, 0), max(col - NEAR_PATCH, 0)
    near = float(mask[top : row + size + NEAR_PATCH, left : col + size + NEAR_PATCH].sum())
    return min(on_patch / total, 1.0), min(near / total, 1.0)


def _true_trigger(poison_cfg: PoisonConfig | None, masks: torch.Tensor, flagged: list[int],
                  restored: torch.Tensor | None = None) -> dict[str, Any] | None:  # fmt: skip
    """For a redblue poisoned model: its target, patch box, and the share of the target's
    reversed mask that lies on the true patch, and on it or within ``NEAR_PATCH`` pixels of it
    (a convolutional model's patch detector also fires on a blob shifted by a pixel or two;
    ``benchmarks/explore_trigger_shift.py`` measures how far). The same shares of the target's
    restored mask (``restored``, the restored masks of every class, zero where none) when it
    has one, else None."""
    if poison_cfg is None:
        return None
    _, height, width = masks.shape
    box = poison_cfg.trigger().box(height, width)
    on_patch, near = patch_shares(masks[poison_cfg.target], box)
    restored_on: float | None = None
    restored_near: float | None = None
    if restored is not None and float(restored[poison_cfg.target].sum()) > 0:
        restored_on, restored_near = patch_shares(restored[poison_cfg.target], box)
    return {
        "target": poison_cfg.target,
        "box": list(box),
        "mask_mass_on_patch": on_patch,
        "mask_mass_near_patch": near,
        "restored_mask_mass_on_patch": restored_on,
        "restored_mask_mass_near_patch": restored_near,
        "target_flagged": poison_cfg.target in flagged,
        "only_target_flagged": flagged == [poison_cfg.target],
    }


def verdict_text(classes: list[dict[str, Any]], max_index: float | None, size_ratio: float) -> str:
    """The verdict in words, from the per-class rows (``l1``, ``size_ratio``, ``anomaly_index``,
    ``flagged_by``) and the MAD test's ceiling."""
    flagged = [c for c in classes if c["flagged_by"]]
    notes = ""
    missing = [str(c["name"] or c["class"]) for c in classes if c["l1"] is None]
    if missing:
        notes += (f"; no trigger reached the target success rate for class {', '.join(missing)} "
                  "(not judged; more epochs or a lower --target-asr)")  # fmt: skip
    if max_index is None:
        notes += "; the MAD of the mask norms is 0, so the paper's anomaly index cannot flag any class"
    elif max_index <= ANOMALY_THRESHOLD:
        notes += (f"; the MAD test alone could not flag any class here: the classes' trigger sizes are so spread "
                  f"that even a trigger of size 0 would reach an anomaly index of only {max_index:.2f}")  # fmt: skip
    if not flagged:
        rule = "" if size_ratio == 0 else f" and at least {size_ratio:g} of the median size"
        judged = len(classes) - len(missing)
        return (f"no class flagged: every one of the {judged} classes judged needs a trigger of ordinary size "
                f"(anomaly index at most {ANOMALY_THRESHOLD:g}{rule}); no sign of a backdoor{notes}")  # fmt: skip
    parts = []
    for c in flagged:
        label = c["name"] or c["class"]
        why = " and ".join({"anomaly-index": f"anomaly index {c['anomaly_index']:.2f} > {ANOMALY_THRESHOLD:g}",
                            "size-ratio": f"under the {size_ratio:g} size rule"}[r] for r in c["flagged_by"])  # fmt: skip
        if c["flagged_by"] == ["anomaly-index"] and size_ratio > 0:
            why += f"; by the paper's rule only, not under the {size_ratio:g} size rule"  # a clean model's easiest class can be here
        parts.append(f"class {label} (mask L1 {c['l1']:.1f} = {c['size_ratio']:.0%} of the median norm: {why})")
    saved = "its reversed trigger is saved" if len(flagged) == 1 else "their reversed triggers are saved"
    much = " much" if all("size-ratio" in c["flagged_by"] for c in flagged) else ""
    return (f"backdoor suspected: {', '.join(parts)} can be reached with a{much} smaller trigger than the others; "
            f"{saved}{notes}")  # fmt: skip


NC_FIELDS = {"epochs": "epochs", "steps_per_epoch": "steps_per_epoch", "batch_size": "batch_size",
             "restarts": "restarts", "lr": "lr", "init_cost": "init_cost", "target_asr": "target_asr",
             "cost_patience": "patience", "early_stop": "early_stop", "seed": "seed"}  # fmt: skip
"""The fields of :class:`BackdoorAuditConfig` that :func:`cleanse` passes to
:func:`neural_cleanse`, and the argument each becomes; with ``n_images`` they are what a
cached judging depends on."""


def cleanse(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BackdoorAuditConfig, *,
            progress: bool = False, **options: Any) -> CleanseResult:  # fmt: skip
    """:func:`neural_cleanse` with the audit's settings ``cfg`` (``options`` add to them or
    override them, e.g. :func:`restore_options`). The stage and the benchmarks call this, so
    the judging they run is the same."""
    settings = {argument: getattr(cfg, field) for field, argument in NC_FIELDS.items()}
    return neural_cleanse(net, x, y, **{**settings, **options}, progress=progress)


def restore_options(cfg: BackdoorAuditConfig, classes: list[int]) -> dict[str, Any]:
    """The options of :func:`cleanse` that restore ``classes``' triggers as compact blobs: the
    masks' total variation in the regulariser, ``cfg.restore_restarts`` starts per class."""
    return {"smoothness": cfg.restore_smoothness, "restarts": cfg.restore_restarts, "reverse": classes}


def _restore(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BackdoorAuditConfig, classes: list[int],
             progress: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """The compact triggers of ``classes`` (:func:`restore_options`). Masks and patterns of
    every class (zero where none was restored) and, per restored class, its mask norm (None
    where none was found) and checked success rate."""
    result = cleanse(net, x, y, cfg, progress=progress, **restore_options(cfg, classes))
    meta = {"classes": classes, "smoothness": cfg.restore_smoothness, "restarts": cfg.restore_restarts,
            "l1": [result.l1[k] if math.isfinite(result.l1[k]) else None for k in classes],
            "attack_success_rate": [result.attack_success_rate[k] for k in classes],
            "epochs": result.epochs, "seconds": result.seconds}  # fmt: skip
    return {"masks": result.masks, "patterns": result.patterns}, meta


PIXEL_USED = 0.05
"""A trigger's pixel with more mask than this is held out when the class's next trigger is sought."""


MORE_TRIGGERS = "more-triggers/1"
"""Part of the cache key of :func:`more_triggers`' results: a revision of the search that
changes them makes the results cached by an earlier one miss."""


def unlearn_limit(l1: torch.Tensor, cfg: BackdoorAuditConfig) -> tuple[float, str] | None:
    """The mask norm under which a class's further trigger is a short cut worth unlearning:
    ``size_ratio`` (0.25 when that rule is off) of the median of the judged norms ``l1``, and
    that rule in words. None with fewer than ``MIN_NORMS`` finite norms (no median to judge by,
    as :func:`assess`).

    Example:
        >>> unlearn_limit(torch.tensor([40.0, 60.0, 1.0, float("inf")]), BackdoorAuditConfig(size_ratio=0))
        (10.0, '0.25 of the median judged norm 40.0')
    """
    finite = finite_norms(l1)
    if finite.numel() < MIN_NORMS:
        return None
    share, median = cfg.size_ratio or SIZE_RATIO, float(statistical_median(finite))
    return share * median, f"{share:g} of the median judged norm {median:.1f}"


def more_triggers(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BackdoorAuditConfig, target: int,
                  mask: torch.Tensor, pattern: torch.Tensor, limit: float, rule: str = "",
                  progress: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:  # fmt: skip
    """Class ``target``'s trigger ``(mask, pattern)`` and its next smallest triggers, up to
    ``cfg.unlearn_triggers`` in all: each is restored (:func:`restore_options`) with the pixels
    of the triggers before it held out (mask above ``PIXEL_USED``), and kept while its L1 norm
    stays under ``limit`` (a short cut, not a trigger of ordinary size; ``rule`` says where the
    limit comes from).

    A backdoor's smallest trigger can be a part of it: on the default MNIST backdoor it is one
    pixel of the 4 x 4 patch, and unlearning that pixel alone left 1.35-2.33% of the patch's
    attack success (five fine-tuning seeds); its next triggers are the neighbouring pixels
    of the patch and a blob a few pixels away, which the model also takes for the trigger
    (docs/backdoor.md)."""
    masks, patterns = [mask.to(x.device)], [pattern.to(x.device)]
    l1 = [float(mask.sum())]
    stop = f"the most asked for ({cfg.unlearn_triggers})"
    exclude = torch.zeros(mask.shape, dtype=torch.bool, device=x.device)
    while len(masks) < cfg.unlearn_triggers:
        exclude |= masks[-1] > PIXEL_USED
        found = cleanse(net, x, y, cfg, progress=progress, exclude=exclude, **restore_options(cfg, [target]))
        size = found.l1[target]
        if not math.isfinite(size):
            stop = f"no further trigger reached the target success rate {cfg.target_asr:g}"
            break
        if size >= limit:
            stop = f"the next trigger ({size:.1f}) is not under {limit:.1f}" + (f", {rule}" if rule else "")
            break
        masks.append(found.masks[target].to(x.device))
        patterns.append(found.patterns[target].to(x.device))
        l1.append(size)
    return ({"masks": torch.stack(masks).cpu(), "patterns": torch.stack(patterns).cpu()},
            {"class": target, "l1": l1, "limit": limit, "stop": stop})  # fmt: skip


Triggers = dict[int, tuple[dict[str, torch.Tensor], dict[str, Any]]]
"""Per class to unlearn: its triggers (``masks`` (n, H, W), ``patterns`` (n, C, H, W)) and
what :func:`more_triggers` recorded."""


def _unlearn_triggers(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, cfg: BackdoorAuditConfig,
                      classes: list[int], masks: torch.Tensor, patterns: torch.Tensor, l1: torch.Tensor,
                      cache: Any, nc_inputs: dict[str, Any], progress: bool) -> Triggers:  # fmt: skip
    """:func:`more_triggers` of each of ``classes`` that has a trigger in ``masks`` (cached);
    with no median to judge by, each class keeps its one trigger and the reason is recorded."""
    limit = unlearn_limit(l1, cfg)
    found: Triggers = {}
    for k in classes:
        if float(masks[k].sum()) <= 0:
            continue  # no trigger to start from
        if limit is None:
            found[k] = ({"masks": masks[k : k + 1].cpu(), "patterns": patterns[k : k + 1].cpu()},
                        {"class": k, "l1": [float(masks[k].sum())], "limit": None,
                         "stop": f"fewer than {MIN_NORMS} classes judged: no median norm to measure further triggers by"})  # fmt: skip
            continue
        inputs = {**nc_inputs, "more_triggers": {
            "version": MORE_TRIGGERS, "class": k, "most": cfg.unlearn_triggers, "limit": limit[0], "pixel_used": PIXEL_USED,
            "smoothness": cfg.restore_smoothness, "restarts": cfg.restore_restarts,
            "first": sha256_json([masks[k].flatten().tolist(), patterns[k].flatten().tolist()])}}  # fmt: skip
        find = functools.partial(more_triggers, net, x, y, cfg, k, masks[k], patterns[k], limit[0], limit[1], progress)
        entry, _ = cache.get_or_compute("neural_cleanse_more_triggers", inputs, find)
        found[k] = (entry.tensors, entry.metadata)
    return found


def _stamps(classes: list[int], masks: torch.Tensor, patterns: torch.Tensor,
            found: Triggers) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The triggers unlearning stamps for ``classes``: each class's of ``found``, else its one
    in ``masks``/``patterns``; and the class of each."""
    pairs = [(found[k][0]["masks"], found[k][0]["patterns"]) if k in found else (masks[k : k + 1], patterns[k : k + 1])
             for k in classes]  # fmt: skip
    groups = torch.tensor([k for k, (m, _) in zip(classes, pairs, strict=True) for _ in range(m.shape[0])])
    return (torch.cat([m.to(masks.device) for m, _ in pairs]), torch.cat([p.to(masks.device) for _, p in pairs]), groups)


def _poison(loaded: LoadedModel) -> PoisonConfig | None:
    return poison_config_from_record(loaded.record) if isinstance(loaded.record.get("poison"), dict) else None


def repair_split(data: Dataset, cfg: BackdoorAuditConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The clean images a repair fine-tunes on and validates with: the first ``repair_images``
    training images and the next ``repair_val`` (a training split too small for both is
    split 90/10). Refused in one line when the data has (almost) no training split."""
    n = int(data.x_train.shape[0])
    if n < 10:
        raise ConfigError(f"--repair {','.join(cfg.repair)}: needs clean training images to fine-tune on, and "
                          f"dataset {data.name!r} has {n}; give a dataset with a training split (x_train/y_train or train/)")  # fmt: skip
    n_fit = cfg.repair_images if cfg.repair_images + cfg.repair_val <= n else int(0.9 * n)
    n_val = min(cfg.repair_val, n - n_fit)
    return (data.x_train[:n_fit], data.y_train[:n_fit],
            data.x_train[n_fit : n_fit + n_val], data.y_train[n_fit : n_fit + n_val])  # fmt: skip


def _measure(model: torch.nn.Module, data: Dataset, poison: PoisonConfig | None) -> dict[str, Any]:
    """Clean accuracy on every test image; ASR and RA on the triggered non-target ones when
    the true trigger is known (None otherwise)."""
    if poison is None:
        return {"clean_accuracy": accuracy(model, data.x_test, data.y_test), "asr": None, "ra": None}
    return backdoor_metrics(model, data.x_test, data.y_test, poison.trigger(), poison.target,
                            num_classes=data.num_classes).rates()  # fmt: skip


STRIP_OVERLAYS = 5000
"""Training images STRIP lays over its inputs (the test images when there is no training split)."""


def _strip(net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, overlays: torch.Tensor, poison: PoisonConfig | None,
           cfg: BackdoorAuditConfig, progress: bool) -> dict[str, Any]:  # fmt: skip
    """The threshold from the first half of the clean images, the false-rejection rate measured
    on the other half, the false-acceptance rate on the triggered non-target images."""
    half = x.shape[0] // 2
    triggered = None if poison is None else apply_trigger(x[y != poison.target], poison.trigger())
    r = strip(net, x[:half], overlays, held_out=x[half:], triggered=triggered, frr=cfg.strip_frr,
              n_copies=cfg.strip_copies, seed=cfg.seed, progress=progress)  # fmt: skip
    clean = torch.tensor(r.clean_entropy)
    quantiles = [0.01, 0.5, 0.99]
    return {
        "threshold": r.threshold, "frr_target": r.frr_target, "frr": r.frr, "far": r.far,
        "n_clean": len(r.clean_entropy), "n_held_out": x.shape[0] - half, "n_triggered": None if r.triggered_entropy is None else len(r.triggered_entropy),
        "n_copies": r.n_copies,
        "clean_entropy_quantiles": [float(torch.quantile(clean, q)) for q in quantiles],
        "triggered_entropy_quantiles": None if not r.triggered_entropy
        else [float(torch.quantile(torch.tensor(r.triggered_entropy), q)) for q in quantiles],
    }  # fmt: skip


def _repair(
    out: Path,
    name: str,
    loaded: LoadedModel,
    data: Dataset,
    cfg: BackdoorAuditConfig,
    flagged: list[int],
    masks: torch.Tensor,
    patterns: torch.Tensor,
    poison: PoisonConfig | None,
    progress: bool,
    restored_classes: list[int] | None = None,
    more: Triggers | None = None,
) -> list[dict[str, Any]]:
    """Every repair of ``cfg.repair`` (all computed before any is saved), saved, and measured;
    unlearning stamps ``masks`` and ``patterns`` (of the classes ``restored_classes``: their
    restored triggers), or a class's triggers of :func:`more_triggers` where ``more`` has them."""
    x, y, x_val, y_val = repair_split(data, cfg)
    train_cfg = TrainConfig(epochs=cfg.repair_epochs, lr=cfg.repair_lr, seed=cfg.seed, device=cfg.device)
    net = loaded.model
    done: list[tuple[str, RepairResult | str]] = []
    for method in cfg.repair:
        if method == "fine-prune":
            done.append((method, fine_prune(net, x, y, train_cfg, x_val=x_val, y_val=y_val, max_drop=cfg.prune_max_drop,
                                            progress=progress)))  # fmt: skip
            continue
        asked = list(cfg.unlearn_classes) or flagged
        classes = [k for k in asked if float(masks[k].sum()) > 0]  # a class never reached: no trigger to stamp
        if not classes:
            done.append((method, "no class flagged and no --unlearn-classes: no trigger to unlearn" if not asked else
                         f"no reversed trigger reached the target success rate for class {','.join(map(str, asked))}"))  # fmt: skip
            continue
        found = more or {}
        stamp_m, stamp_p, groups = _stamps(classes, masks, patterns, found)
        result = unlearn(net, x, y, stamp_m, stamp_p, train_cfg, x_val=x_val, y_val=y_val,
                         share=cfg.unlearn_share, groups=groups, progress=progress)  # fmt: skip
        result.details.update(classes=classes, classes_without_trigger=[k for k in asked if k not in classes],
                              restored_triggers=[k for k in classes if k in (restored_classes or [])],
                              stamped_l1=[float(m.sum()) for m in stamp_m],
                              triggers_per_class=[int(found[k][0]["masks"].shape[0]) if k in found else 1 for k in classes],
                              more_triggers=[found[k][1] for k in classes if k in found])  # fmt: skip
        done.append((method, result))
    rows: list[dict[str, Any]] = []
    for method, outcome in done:
        if isinstance(outcome, str):
            rows.append({"method": method, "model": None, "after": None, "details": {}, "seconds": 0.0, "skipped": outcome})
            continue
        model_name = repair_name(name, method)
        record = save_derived(out, model_name, loaded, outcome.model, {
            "stage": "backdoor_repair", "repair": {"method": method, **outcome.details},
            "repaired_from": model_json(loaded, str(loaded.record.get("name", loaded.json_path.stem))),
            "dataset": data.describe(), "training": {"seconds": outcome.seconds},
            **({"poison": loaded.record["poison"]} if poison is not None else {}),
        })  # fmt: skip
        model = {"name": model_name, "weights_file": f"../models/{model_name}.safetensors",
                 "weights_sha256": record["weights_sha256"]}  # fmt: skip
        rows.append({"method": method, "model": model, "after": _measure(outcome.model, data, poison),
                     "details": outcome.details, "seconds": outcome.seconds, "skipped": None})  # fmt: skip
    return rows


def repair_name(name: str, method: str) -> str:
    """The saved name of a repaired model (a valid name, checked before any work)."""
    return check_name("name", f"{name}_{method.replace('-', '_')}")


def check_repairs(loaded: LoadedModel, data: Dataset, cfg: BackdoorAuditConfig, name: str) -> None:
    """ConfigError, before any work, when a repair asked for cannot run on this model and data."""
    if cfg.unlearn_classes and "unlearn" not in cfg.repair:
        raise ConfigError("--unlearn-classes: only used with --repair unlearn")
    bad = [k for k in cfg.unlearn_classes if k >= data.num_classes]
    if bad:
        raise ConfigError(f"--unlearn-classes {','.join(map(str, bad))}: the model has classes 0 to {data.num_classes - 1}")
    if not cfg.repair:
        return
    repair_split(data, cfg)
    source = loaded.record.get("source")
    if source not in (None, "module"):
        raise ConfigError(f"--repair {','.join(cfg.repair)}: a {source} model cannot be fine-tuned by redblue; give "
                          "its PyTorch definition (--model FILE.py:FUNCTION --weights W)")  # fmt: skip
    if "fine-prune" in cfg.repair:
        last_conv(loaded.model)
    for method in cfg.repair:
        repair_name(name, method)


def _repairs_on_disk(out: Path, result: BackdoorAuditResult) -> bool:
    """A cached result may be reused only while the repaired models it names are there, unchanged."""
    return all(model_intact(out, str(row["model"]["name"]), row["model"]["weights_sha256"])
               for row in result.repairs if row.get("model"))  # fmt: skip


def audit_backdoor_stage(
    out: Path,
    loaded: LoadedModel,
    data: Dataset,
    cfg: BackdoorAuditConfig,
    *,
    name: str | None = None,
    data_cfg: DataConfig | None = None,
    progress: bool = True,
) -> BackdoorAuditResult:
    """Audit ``loaded`` with ``data``: Neural Cleanse on the first ``cfg.n_images`` test
    images, then STRIP and the repairs that ``cfg`` asks for."""
    model_name = check_name("name", str(loaded.record.get("name", loaded.json_path.stem)), error=IntegrityError)
    name = check_name("name", name or f"{model_name}_backdoor_audit")
    check_repairs(loaded, data, cfg, name)  # refuse before any work
    weights = str(loaded.record.get("weights_sha256"))
    settings = dataclasses.asdict(cfg)
    settings.pop("device")
    nc_settings = {k: settings[k] for k in ("n_images", *NC_FIELDS)}
    key = sha256_json({"stage": "backdoor_audit", "algorithm": ALGORITHM, "more_triggers": MORE_TRIGGERS, "settings": settings,
                       "weights": weights, "data": data.identity()})  # fmt: skip
    cached = cached_result(out, name, key, BackdoorAuditResult)
    if cached is not None and file_intact(out / "metrics" / cached.triggers_file, cached.triggers_sha256) and (
        _repairs_on_disk(out, cached)
    ):
        return cached
    device = resolve_device(cfg.device)
    n = min(cfg.n_images, int(data.x_test.shape[0]))
    x = to_float(data.x_test[:n].to(device))
    y = data.y_test[:n].to(device)
    net = loaded.model.to(device)
    poison = _poison(loaded)

    def compute() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        result = cleanse(net, x, y, cfg, progress=progress)
        meta = {"l1": [v if math.isfinite(v) else None for v in result.l1], "asr": result.attack_success_rate,
                "epochs": result.epochs, "seconds": result.seconds, "params": result.params}  # fmt: skip
        return {"masks": result.masks, "patterns": result.patterns}, meta

    cache = stage_cache(out)
    nc_inputs = {"algorithm": ALGORITHM, "settings": nc_settings, "weights": weights, "data": data.identity()}
    entry, _ = cache.get_or_compute("neural_cleanse", nc_inputs, compute)
    meta = entry.metadata
    masks, patterns = entry.tensors["masks"], entry.tensors["patterns"]
    triggers_file = f"{name}_triggers.safetensors"
    names = loaded.record.get("class_names") or (list(data.class_names) if data.class_names else None)
    # the verdict is computed here from the cached norms, so a change of --size-ratio needs no new optimisation
    l1 = torch.tensor([math.inf if v is None else float(v) for v in meta["l1"]], dtype=torch.float64)
    verdict = assess(l1, ANOMALY_THRESHOLD, cfg.size_ratio)
    flagged = verdict.flagged
    ratios = [float(v) for v in verdict.size_ratio]
    classes = [
        {"class": k, "name": names[k] if names and k < len(names) else None,
         "l1": meta["l1"][k], "size_ratio": ratios[k] if math.isfinite(ratios[k]) else None,
         "anomaly_index": float(verdict.anomaly_index[k]), "attack_success_rate": meta["asr"][k],
         "flagged": bool(verdict.flagged_by[k]), "flagged_by": verdict.flagged_by[k]}
        for k in range(len(meta["l1"]))
    ]  # fmt: skip
    max_index = verdict.max_index
    restored = None
    restore_for = sorted({*flagged, *cfg.unlearn_classes}) if cfg.restore_smoothness > 0 else []
    if restore_for:
        restore_inputs = {**nc_inputs, "restore": {"classes": restore_for, "smoothness": cfg.restore_smoothness,
                                                   "restarts": cfg.restore_restarts}}  # fmt: skip
        entry_r, _ = cache.get_or_compute("neural_cleanse_restore", restore_inputs,
                                          lambda: _restore(net, x, y, cfg, restore_for, progress))  # fmt: skip
        restored = entry_r.metadata
        masks_r, patterns_r = entry_r.tensors["masks"], entry_r.tensors["patterns"]
    strip_result = None
    if cfg.strip:
        strip_inputs = {"settings": {k: settings[k] for k in ("n_images", "strip_copies", "strip_frr", "seed")},
                        "overlays": STRIP_OVERLAYS, "split": "half",
                        "weights": weights, "data": data.identity(), "poison": loaded.record.get("poison")}  # fmt: skip
        overlays = to_float(data.x_train[:STRIP_OVERLAYS].to(device)) if data.x_train.shape[0] else x
        strip_result = cache.get_or_compute(
            "strip", strip_inputs, lambda: ({}, _strip(net, x, y, overlays, poison, cfg, progress)))[0].metadata
    saved = {"masks": masks, "patterns": patterns}
    if restored is not None:
        saved.update(restored_masks=masks_r, restored_patterns=patterns_r)
    stamp_masks, stamp_patterns, restored_classes = masks, patterns, []
    if restored is not None:  # a class's restored trigger where it has one, else the one judged
        have = masks_r.flatten(1).sum(1) > 0
        stamp_masks = torch.where(have[:, None, None], masks_r, masks)
        stamp_patterns = torch.where(have[:, None, None, None], patterns_r, patterns)
        restored_classes = torch.nonzero(have).flatten().tolist()
    more: Triggers = {}
    if "unlearn" in cfg.repair and cfg.unlearn_triggers > 1:
        more = _unlearn_triggers(net, x, y, cfg, list(cfg.unlearn_classes) or flagged, stamp_masks, stamp_patterns, l1,
                                 cache, nc_inputs, progress)  # fmt: skip
        if more:
            stamped_m, stamped_p, groups = _stamps(list(more), stamp_masks.cpu(), stamp_patterns.cpu(), more)
            saved.update(unlearn_masks=stamped_m, unlearn_patterns=stamped_p, unlearn_classes=groups)
    triggers_sha256 = write_tensors(out / "metrics" / triggers_file, saved, TRIGGERS_FORMAT)
    before, repairs = None, []
    if cfg.repair:
        test = data.to(device)
        before = _measure(net, test, poison)
        repairs = _repair(out, name, loaded, test, cfg, flagged, stamp_masks.to(device), stamp_patterns.to(device),
                          poison, progress, restored_classes, more)  # fmt: skip
    result = BackdoorAuditResult(
        stage="backdoor_audit",
        name=name,
        cache_key=key,
        model=model_json(loaded, model_name),
        config=config_json(backdoor_audit=cfg, data=data_cfg),
        dataset=data.describe(),
        params={**meta["params"], "epochs_run": meta["epochs"], "method": "neural-cleanse"},
        classes=classes,
        flagged=flagged,
        threshold=ANOMALY_THRESHOLD,
        size_ratio=cfg.size_ratio,
        max_anomaly_index=max_index,
        verdict=verdict_text(classes, max_index, cfg.size_ratio),
        true_trigger=_true_trigger(poison, masks, flagged, masks_r if restored is not None else None),
        restored=restored,
        triggers_file=triggers_file,
        triggers_sha256=triggers_sha256,
        strip=strip_result,
        before=before,
        repairs=repairs,
        seconds=float(meta["seconds"]),
        versions=library_versions(),
    )
    write_result(out, name, result)
    return result
