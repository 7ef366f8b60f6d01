"""The defend stage: train (or reuse) an adversarially trained model, save it, measure how
robust it is (white-box and black-box, per-example worst case, sanity checks).

Writes ``models/<name>.safetensors`` + ``.json`` (recipe and settings in the record) and
``metrics/<name>_metrics.json``. The robustness evaluation is cached by the weights'
SHA-256, the evaluation settings and the data, so a rerun attacks nothing.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from redblue.artifacts import LoadedModel, model_paths, read_record, read_verified_tensors
from redblue.attacks import DEFAULTS
from redblue.config import DataConfig, DefendConfig, TrainConfig
from redblue.data import Dataset, to_float
from redblue.defenses.adversarial import train_defended
from redblue.errors import ConfigError
from redblue.evaluation import DEFAULT_SWEEP, eps_sweep, evaluate_robustness, is_standard_autoattack, run_checks
from redblue.evaluation.robustness import per_class_accuracy
from redblue.results import DefendResult
from redblue.stages.baseline import clean_metrics
from redblue.stages.common import (
    Trained,
    cached_result,
    config_json,
    derived_record,
    model_json,
    save_derived,
    stage_cache,
    train_or_reuse,
    training_cache_key,
    write_result,
)
from redblue.utils import atomic_write_json, library_versions, resolve_device, sha256_json
from redblue.validate import check_name


def defense_cache_key(name: str, train_cfg: TrainConfig, defend_cfg: DefendConfig, data: Dataset) -> str:
    """What determines a defended model: stage name, training config, data, and every
    defence setting but the evaluation-only ones. The eps in the key is the training
    attack's, so eps 0.3 with a margin of 0.05 trains the same model as eps 0.35."""
    settings = dataclasses.asdict(defend_cfg)
    settings.pop("n_examples", None)
    settings.pop("preset", None)  # a label: the same settings train the same model
    settings.pop("train_eps_margin", None)
    if not settings.get("awp_gamma"):
        settings.pop("awp_gamma", None)  # off: the key of every model trained before AWP existed
    settings.update(eps=defend_cfg.training_eps, alpha=defend_cfg.step_size, guard=defend_cfg.guarded)
    return training_cache_key(name, train_cfg, data, extra={"defend": settings})


def robustness_metrics(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    restarts: int = 3,
    sweep_n: int = 500,
    seed: int = 0,
    check_options: dict[str, int] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """How robust a defended model is at ``eps`` (L-inf), per example and in the worst case.

    Runs, through :func:`redblue.evaluation.evaluate_robustness` (which enforces the threat
    model on every batch): FGSM, PGD-40 with ``restarts`` random restarts, and AutoAttack's
    standard protocol as a cascade (APGD-CE, APGD-T, FAB-T, then the black-box Square attack
    with ``square_queries`` of ``check_options``, default AutoAttack's 5,000; APGD-T and FAB-T
    with ``autoattack_targets`` target classes when given, default 9), each attack only
    on the images still robust after the ones before it. White-box and black-box together,
    because on MNIST adversarially trained models can mask gradients (measured: a PGD-trained
    ``cnn-wide`` at eps 0.3 fell from 91.5% under the white-box attacks to 90.4% under Square).
    An example is robust only if clean-correct and neither PGD nor the cascade fooled it (FGSM
    only enters the robustness-gap check). Then the eps sweep of FGSM and PGD on the first
    ``sweep_n`` images, and the sanity checks of :mod:`redblue.evaluation.checks` on the
    merged result (the ``robustness-gap`` and ``square-stronger-than-white-box`` warnings
    among them).

    Returns:
        ``{"metrics": {...accuracies...}, "evaluation": <evaluation JSON>, "eps_sweep":
        {"eps": [...], "fgsm": [...], "pgd": [...]}, "warnings": [...]}``.
    """
    options = dict(check_options or {})
    per_attack: dict[str, dict[str, Any]] = {
        "square": {"steps": int(options.get("square_queries", DEFAULTS["square"]["steps"]))}
    }
    if (targets := options.pop("autoattack_targets", None)) is not None:  # --quick: fewer target classes
        per_attack.update({"apgd-t": {"n_targets": int(targets)}, "fab-t": {"n_targets": int(targets)}})
    common: dict[str, Any] = {"eps": eps, "seed": seed, "checks": False, "progress": progress}
    with_pgd = evaluate_robustness(model, x, y, attacks="pgd", restarts=restarts, **common)
    result = evaluate_robustness(model, x, y, attacks="fgsm", **common)
    cascade = evaluate_robustness(model, x, y, attacks="autoattack", per_attack=per_attack, **common)
    result.attacks = [*result.attacks, *with_pgd.attacks, *cascade.attacks]
    result.robust = {**result.robust, "pgd": with_pgd.robust["pgd"], **cascade.robust}
    result.protocol = "cascade"
    worst = result.clean_correct if result.clean_correct is not None else torch.ones_like(y, dtype=torch.bool)
    for name, mask in result.robust.items():
        if name != "fgsm":
            worst = worst & mask
    n = int(y.shape[0])
    result.robust_accuracy = int(worst.sum()) / n
    n_correct = int(result.clean_correct.sum()) if result.clean_correct is not None else n
    result.attack_success_rate = (n_correct - int(worst.sum())) / n_correct if n_correct else 0.0
    if result.clean_correct is not None:
        result.per_class = per_class_accuracy(y, result.clean_correct, worst)
    result.seconds += with_pgd.seconds + cascade.seconds
    m = min(sweep_n, int(x.shape[0]))
    points = {
        name: eps_sweep(model, x[:m], y[:m], attack=name, seed=seed, eps_values=list(DEFAULT_SWEEP["linf"]),
                        progress=progress)
        for name in ("fgsm", "pgd")
    }
    result.sweep, result.sweep_n_examples = points, m
    result.warnings = run_checks(model, x, y, result, seed=seed, progress=progress, **options)
    metrics = {
        "n_examples": n,
        "examples_clean_accuracy": result.clean_accuracy,
        "fgsm_accuracy": result.accuracy("fgsm"),
        "pgd_accuracy": result.accuracy("pgd"),
        # In the cascade an attack's accuracy is the running one: after APGD-T it is the
        # worst case of APGD-CE and APGD-T (redblue's ``standard`` suite), after Square
        # AutoAttack's standard robust accuracy.
        "standard_accuracy": cascade.accuracy("apgd-t"),
        "autoattack_accuracy": cascade.robust_accuracy,
        "robust_accuracy": result.robust_accuracy,
    }
    grid = sorted({p["eps"] for pts in points.values() for p in pts})
    sweep: dict[str, list[float]] = {"eps": grid}
    for name, pts in points.items():
        by_eps = {p["eps"]: p["robust_accuracy"] for p in pts}
        sweep[name] = [by_eps.get(e, 0.0) for e in grid]  # a sweep stops at the first 0
    # The robust-accuracy figure is the worst case over every attack but FGSM (which only
    # enters the gap check); the evaluation JSON keeps each attack's own numbers.
    evaluation = result.to_json()
    evaluation["robust_accuracy_excludes"] = ["fgsm"]
    evaluation["checks_n_examples"] = result.checks_n_examples
    return {"metrics": metrics, "evaluation": evaluation, "eps_sweep": sweep, "warnings": result.warnings}


def base_name(base: LoadedModel) -> str:
    return str(base.record.get("name", base.json_path.stem))


def check_fine_tune(base: LoadedModel, data: Dataset) -> None:
    """ConfigError when ``base`` cannot be fine-tuned on ``data`` (checked before anything is written)."""
    if int(data.x_train.shape[0]) < 2:
        raise ConfigError(
            f"--dataset {data.name}: no training images; fine-tuning --model needs them "
            "(x_train/y_train in the .npz, or a train/ folder beside test/)"
        )
    source = base.record.get("source")
    if source not in (None, "module"):
        raise ConfigError(
            f"--model {base.json_path}: a {source} model cannot be fine-tuned by redblue; give its PyTorch "
            "definition (--model FILE.py:FUNCTION --weights W)"
        )


def _fine_tune(
    out: Path,
    name: str,
    base: LoadedModel,
    data: Dataset,
    train_cfg: TrainConfig,
    defend_cfg: DefendConfig,
    config: dict[str, Any],
    *,
    force_retrain: bool,
    progress: bool,
) -> Trained:
    """Adversarially fine-tune ``base`` on ``data``'s training images (or reuse the result).

    A redblue record's model is saved as a redblue model; a user's module is saved as its own
    state dict (``models/NAME.safetensors``, loadable with ``--model FILE.py:FUNCTION
    --weights``), without the normalisation layer that ``--mean``/``--std`` put before it."""
    check_fine_tune(base, data)
    source = base.record.get("source")
    key = defense_cache_key(name, train_cfg, defend_cfg, data)
    key = sha256_json({"fine_tune": key, "base": base.record.get("weights_sha256")})
    user = source == "module"
    wrapper = base.model
    definition = base.definition if user and base.definition is not None else base.model

    def train() -> tuple[nn.Module, dict[str, Any]]:
        tuned, summary = train_defended(data, train_cfg, defend_cfg, progress=progress, desc=name, init=wrapper)
        return tuned, {**summary, "fine_tuned_from": model_json(base, base_name(base))}

    record: dict[str, Any] = {"stage": name, "config": config, "dataset": data.describe()}
    if not user:
        record.update(derived_record(base))
        return train_or_reuse(out, name, key, train, record, device=train_cfg.device, force_retrain=force_retrain)
    weights_path, json_path = model_paths(out, name)
    device = resolve_device(train_cfg.device)
    if not force_retrain and json_path.is_file():
        saved = read_record(json_path)
        if saved.get("cache_key") == key:
            state = read_verified_tensors(weights_path, saved.get("weights_sha256"), json_path, kind="weights")
            reused = copy.deepcopy(definition)
            reused.load_state_dict(state, strict=True)
            model = reused if wrapper is definition else nn.Sequential(copy.deepcopy(cast(nn.Sequential, wrapper)[0]), reused)
            print(f"reusing {json_path} (same base model, settings and data)", file=sys.stderr)
            return Trained(model.to(device).eval(), saved, True)
    tuned, summary = train()
    saved = save_derived(out, name, base, tuned, {**record, "cache_key": key, "training": summary})
    return Trained(tuned.eval(), saved, False)


def defend_stage(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    defend_cfg: DefendConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    progress: bool = True,
    name: str = "advtrain",
    check_options: dict[str, int] | None = None,
    base: LoadedModel | None = None,
) -> DefendResult:
    """Train (or reuse) a defended model, save it, evaluate it, write its JSON.

    ``base``: fine-tune this trained model (a redblue record, or a user's ``FILE.py:FUNCTION``
    module) instead of training ``train_cfg.model_name`` from scratch; its training images
    are ``data``'s. Reuses ``models/<name>`` when its cache key (training config, defence
    settings, data hashes, the base's weights) matches, unless ``force_retrain``. Evaluation
    runs at ``defend_cfg.eps`` (training at that plus ``train_eps_margin``) on the first
    ``defend_cfg.n_examples`` test images (clean accuracy on all of them) and raises the
    robustness-gap warning when FGSM accuracy is far above the strongest attack's.
    """
    check_name("name", name)
    key = defense_cache_key(name, train_cfg, defend_cfg, data)
    device = resolve_device(train_cfg.device)
    config = config_json(train=train_cfg, defend=defend_cfg, data=data_cfg)
    if base is not None:
        trained = _fine_tune(out, name, base, data, train_cfg, defend_cfg, config,
                             force_retrain=force_retrain, progress=progress)  # fmt: skip
        key = str(trained.record["cache_key"])
        model_entry = {"name": name, "model_name": str(trained.record["model_name"]),
                       "weights_sha256": trained.record["weights_sha256"], "base": model_json(base, base_name(base))}  # fmt: skip
    else:
        trained = train_or_reuse(
            out, name, key,
            lambda: train_defended(data, train_cfg, defend_cfg, progress=progress, desc=name),
            {"model_name": train_cfg.model_name, "stage": name, "config": config, "dataset": data.describe()},
            device=train_cfg.device, force_retrain=force_retrain,
        )  # fmt: skip
        model_entry = {"name": name, "model_name": train_cfg.model_name, "weights_sha256": trained.record["weights_sha256"]}
    weights = trained.record["weights_sha256"]
    test = data.to(device)
    n_eval = min(defend_cfg.n_examples, int(test.x_test.shape[0]))
    evaluation_inputs = {
        "weights": weights, "eps": defend_cfg.eps, "n_examples": n_eval, "seed": train_cfg.seed,
        "checks": check_options, "data": data.identity(), "protocol": "fgsm,pgd,autoattack",
    }  # fmt: skip
    # The preset is a label outside the model's key; the result JSON that names it is keyed by it.
    result_key = sha256_json({"stage": "defend", "model_key": key, **evaluation_inputs, "preset": defend_cfg.preset})
    if (cached := cached_result(out, name, result_key, DefendResult)) is not None:
        record_robustness(out, name, cached)
        return cached

    def evaluate_model() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        robust = robustness_metrics(
            trained.model, to_float(test.x_test[:n_eval]), test.y_test[:n_eval],
            eps=defend_cfg.eps, seed=train_cfg.seed, check_options=check_options, progress=progress,
        )  # fmt: skip
        return {}, robust

    robust = stage_cache(out).get_or_compute("robustness", evaluation_inputs, evaluate_model)[0].metadata
    clean = clean_metrics(trained.model, test)
    confusion = clean.pop("confusion")
    clean.pop("latency")
    training = trained.record["training"]
    result = DefendResult(
        stage="defend",
        name=name,
        cache_key=result_key,
        model=model_entry,
        recipe=training["recipe"],
        config=config,
        dataset=data.describe(),
        training=training,
        metrics={**clean, **robust["metrics"], "confusion": confusion},
        evaluation=robust["evaluation"],
        eps_sweep=robust["eps_sweep"],
        warnings=robust["warnings"],
        versions=library_versions(),
        reused=trained.reused,
    )
    write_result(out, name, result)
    record_robustness(out, name, result)
    return result


def record_robustness(out: Path, name: str, result: DefendResult) -> None:
    """Write what the latest evaluation measured into the model's own JSON
    (``models/<name>.json``, key ``robustness``), so the record handed on with the weights
    says how robust they are, by which protocol, on how many test images; the full account
    stays in ``metrics/<name>_metrics.json``."""
    _, json_path = model_paths(out, name)
    record = read_record(json_path)
    m = result.metrics
    attacks = result.evaluation["attacks"]
    settings = {a: attacks[a]["settings"] for a in ("pgd", "apgd-ce", "apgd-t", "fab-t", "square") if a in attacks}
    robustness = {
        "threat_model": {"norm": "linf", "eps": result.config["defend"]["eps"], "pixels": "[0, 1]"},
        "protocol": "AutoAttack standard" if is_standard_autoattack(attacks) else "AutoAttack reduced (--quick: fewer targets and queries)",
        "attacks": settings,
        "n_examples": m["n_examples"],
        "clean_accuracy": m["clean_accuracy"],
        "autoattack_accuracy": m["autoattack_accuracy"],
        "robust_accuracy": m["robust_accuracy"],
        "warnings": [w["id"] for w in result.warnings],
        "metrics": f"metrics/{name}_metrics.json",  # in the output folder, beside models/
    }
    if record.get("robustness") != robustness:  # a rerun that reuses the evaluation writes nothing
        atomic_write_json(json_path, {**record, "robustness": robustness})
