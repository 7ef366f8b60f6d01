"""The stages of the red/blue workflow, each usable from Python and from the CLI.

A stage takes frozen configs and an output folder, reuses a saved model whose config
and data hashes match (unless forced), and writes its JSON results (and the plots
rendered from them) atomically.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import filelock
from torch import nn

from redblue.artifacts import find_reusable, save_model
from redblue.config import (
    AttackConfig,
    BackdoorDefenseConfig,
    DataConfig,
    DefendConfig,
    PoisonConfig,
    RunConfig,
    TrainConfig,
)
from redblue.data import Dataset, load_dataset
from redblue.errors import RedblueError
from redblue.models import build_model
from redblue.report import plots
from redblue.train import evaluate, fit
from redblue.utils import atomic_write_json, library_versions, resolve_device, seed_everything, sha256_json


def load_data(cfg: DataConfig, device: str = "cpu") -> Dataset:
    return load_dataset(cfg.dataset, cfg.data_dir, cache_dir=cfg.cache_dir, device=device)


def training_cache_key(stage: str, train_cfg: TrainConfig, data: Dataset, extra: dict[str, Any] | None = None) -> str:
    """Hash of what determines a trained model: stage, training config (less the device),
    dataset name and file hashes, and any stage-specific settings."""
    train = asdict(train_cfg)
    train.pop("device", None)
    return sha256_json({"stage": stage, "train": train, "data": data.describe(), "extra": extra or {}})


def train_baseline(
    out: Path,
    data: Dataset,
    train_cfg: TrainConfig,
    *,
    data_cfg: DataConfig | None = None,
    force_retrain: bool = False,
    name: str = "baseline",
    progress: bool = True,
) -> dict[str, Any]:
    """Train (or reload) the clean model and evaluate it; writes ``metrics/<name>_metrics.json``."""
    key = training_cache_key(name, train_cfg, data)
    device = resolve_device(train_cfg.device)
    reused = None if force_retrain else find_reusable(out, name, key)
    model: nn.Module
    if reused is not None:
        model = reused.model.to(device)
        fit_info = reused.record["training"]
        print(f"reusing {reused.json_path} (same config and data; --force-retrain to retrain)", file=sys.stderr)
    else:
        model = build_model(train_cfg.model_name, seed=train_cfg.seed)
        result = fit(model, data, train_cfg, progress=progress, desc=name)
        fit_info = result.summary()
    test = data.to(device)
    ev = evaluate(model, test.x_test, test.y_test)
    metrics = {"accuracy": ev.accuracy, "loss": ev.loss, "n": ev.n, "latency": ev.latency}
    record = {
        "model_name": train_cfg.model_name,
        "stage": name,
        "cache_key": key,
        "config": {"train": asdict(train_cfg), "data": asdict(data_cfg) if data_cfg else None},
        "dataset": data.describe(),
        "training": fit_info,
        "metrics": metrics,
    }
    saved = reused.record if reused is not None else save_model(out, name, model, record)
    result_json = {
        "stage": name,
        "reused": reused is not None,
        "model": {"name": name, "model_name": train_cfg.model_name, "weights_sha256": saved["weights_sha256"]},
        "config": record["config"],
        "dataset": data.describe(),
        "dataset_notice": data.notice,
        "training": fit_info,
        "metrics": {**metrics, "confusion": ev.confusion},
        "versions": library_versions(),
    }
    atomic_write_json(out / "metrics" / f"{name}_metrics.json", result_json)
    render_training_plots(out, name, result_json)
    return result_json


def render_training_plots(out: Path, name: str, result: dict[str, Any]) -> list[Path]:
    """Training curves and confusion matrix PNGs from a stage's JSON result."""
    images = out / "images"
    paths = [
        plots.confusion_matrix(
            result["metrics"]["confusion"],
            f"{name}: confusion matrix (test accuracy {100 * result['metrics']['accuracy']:.2f}%)",
            images / f"{name}_confusion_matrix.png",
        )
    ]
    history = result["training"].get("history") or []
    if history:
        paths.append(plots.training_curves(history, name, images / f"{name}_training_curves.png"))
    return paths


# --------------------------------------------------------------------------- redblue run


QUICK_TRAIN = 12_000
QUICK_TEST = 1_000
QUICK_CHECKS = {"check_examples": 100, "square_examples": 50, "square_queries": 200}
"""--quick: the sanity checks on fewer images, and a shorter Square attack."""


def cached_result(out: Path, metrics_name: str, key: str) -> dict[str, Any] | None:
    """A stage's saved JSON when its ``cache_key`` matches ``key`` (else None)."""
    path = out / "metrics" / f"{metrics_name}_metrics.json"
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    return saved if isinstance(saved, dict) and saved.get("cache_key") == key else None


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold ``out/.redblue.lock`` for the whole run; a second run on ``out`` is refused.

    The lock is an OS-level ``flock``: it is released when the process ends, even by
    ``kill -9``, so an interrupted run never blocks the next one.
    """
    out.mkdir(parents=True, exist_ok=True)
    lock = filelock.FileLock(str(out / ".redblue.lock"), timeout=0)
    try:
        lock.acquire()
    except filelock.Timeout:
        raise RedblueError(
            f"--out {out}: another redblue run is using this folder (lock {out / '.redblue.lock'}); "
            "wait for it to finish or choose another --out"
        ) from None
    try:
        yield
    finally:
        lock.release()


@dataclass(frozen=True)
class Workflow:
    """Everything ``redblue run`` needs: the output folder and one frozen config per stage."""

    out: Path
    run: RunConfig
    data: DataConfig
    train: TrainConfig
    defend: DefendConfig
    poison: PoisonConfig
    backdoor: BackdoorDefenseConfig
    force_retrain: bool = False
    progress: bool = True


def quick_configs(wf: Workflow) -> Workflow:
    """``--quick``: one epoch per model, fewer test images, a coarse sweep, no poison-rate sweep."""
    if not wf.run.quick:
        return wf
    return replace(
        wf,
        run=replace(
            wf.run,
            n_examples=min(wf.run.n_examples, 200),
            pgd_steps=min(wf.run.pgd_steps, 10),
            pgd_alpha=max(wf.run.pgd_alpha, 2.5 * wf.run.eps / min(wf.run.pgd_steps, 10)),
        ),
        train=replace(wf.train, epochs=1),
        defend=replace(wf.defend, eval_n=min(wf.defend.eval_n, 200), guard_size=min(wf.defend.guard_size, 200)),
    )


def run_workflow(wf: Workflow) -> dict[str, Any]:
    """Run the selected stages in order (each cached), then write the summary and the report.

    Returns the ``metrics_summary.json`` content.
    """
    from redblue.summary import build_summary

    wf = quick_configs(wf)
    device = resolve_device(wf.train.device)
    data = load_data(wf.data, device=str(device))
    if wf.run.quick:
        data = data.subset(QUICK_TRAIN, QUICK_TEST)
    stages = set(wf.run.stages)
    timings: dict[str, float] = {}
    with output_lock(wf.out):
        if "baseline" in stages or "redteam" in stages:
            with _timed(timings, "baseline"):
                train_baseline(
                    wf.out, data, wf.train, data_cfg=wf.data, force_retrain=wf.force_retrain, progress=wf.progress
                )
        if "redteam" in stages:
            with _timed(timings, "redteam"):
                red_team(wf, data)
        if "blueteam" in stages:
            from redblue.defenses.adversarial import defend_stage

            with _timed(timings, "blueteam"):
                defend_stage(
                    wf.out,
                    data,
                    replace(wf.train, model_name=wf.train.model_name),
                    wf.defend,
                    data_cfg=wf.data,
                    force_retrain=wf.force_retrain,
                    progress=wf.progress,
                )
        if "poison" in stages:
            with _timed(timings, "poison"):
                poisoning(wf, data)
        summary = build_summary(wf.out, timings=timings, quick=wf.run.quick)
        atomic_write_json(wf.out / "metrics" / "metrics_summary.json", summary)
        atomic_write_json(
            wf.out / "metrics" / "run_config.json",
            {
                "run": asdict(wf.run),
                "data": asdict(wf.data),
                "train": asdict(wf.train),
                "defend": asdict(wf.defend),
                "poison": asdict(wf.poison),
                "backdoor": asdict(wf.backdoor),
            },
        )
        if "report" in stages:
            from redblue.report.render import render_report

            render_report(wf.out)
    return summary


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def poisoning(wf: Workflow, data: Dataset) -> None:
    """BadNets model, C-Acc/ASR/RA, then each detection method with clean retraining."""
    from redblue.defenses.backdoor import defend_backdoor_stage
    from redblue.poison.stage import poison_stage

    poison_stage(
        wf.out, data, wf.train, wf.poison, data_cfg=wf.data, force_retrain=wf.force_retrain, progress=wf.progress
    )
    for method in wf.run.detection:
        defend_backdoor_stage(
            wf.out,
            data,
            wf.out / "models" / f"{wf.poison.name}.json",
            replace(wf.backdoor, method=method),
            train_cfg=wf.train,
            data_cfg=wf.data,
            force_retrain=wf.force_retrain,
            progress=wf.progress,
        )


def red_team(wf: Workflow, data: Dataset) -> list[dict[str, Any]]:
    """FGSM at eps on the whole test set, PGD (with the eps sweep) and the standard suite on
    the first ``n_examples`` test images; cached per attack.

    The sanity checks run once per model, with the standard suite (they run FGSM and PGD
    themselves, so they cover the other two stages too); the FGSM and PGD JSONs say so.
    """
    from redblue.artifacts import load_model
    from redblue.evaluation import attack_stage

    device = resolve_device(wf.train.device)
    loaded = load_model(wf.out / "models" / "baseline.json", device=device)
    eps, n, seed, dev = wf.run.eps, wf.run.n_examples, wf.train.seed, wf.train.device
    standard = {"steps": 20, "n_targets": 3} if wf.run.quick else {}
    plans = [
        ("fgsm", AttackConfig(attack="fgsm", eps=eps, n_examples=None, checks=False, seed=seed, device=dev)),
        ("pgd", AttackConfig(attack="pgd", eps=eps, alpha=wf.run.pgd_alpha, steps=wf.run.pgd_steps,
                             restarts=wf.run.restarts, n_examples=n, sweep=wf.run.sweep, checks=False,
                             seed=seed, device=dev)),
        ("standard", AttackConfig(attack="standard,square" if wf.run.square else "standard", eps=eps,
                                  n_examples=n, seed=seed, device=dev, **standard)),  # type: ignore[arg-type]
    ]
    check_options = QUICK_CHECKS if wf.run.quick else None
    results = []
    for name, cfg in plans:
        settings = asdict(cfg)
        settings.pop("device")
        key = sha256_json({"attack": settings, "checks": check_options, "weights": loaded.record["weights_sha256"],
                           "data": data.describe()})
        cached = cached_result(wf.out, name, key)
        if cached is not None:
            print(f"reusing metrics/{name}_metrics.json (same attack, model and data)", file=sys.stderr)
            results.append(cached)
            continue
        seed_everything(seed)
        result = attack_stage(wf.out, loaded, data, cfg, name=name, data_cfg=wf.data, progress=wf.progress,
                              check_options=check_options)
        result["cache_key"] = key
        if not cfg.checks:
            result["checks"] = "run once per model with the standard suite: see standard_metrics.json"
        atomic_write_json(wf.out / "metrics" / f"{name}_metrics.json", result)
        results.append(result)
    return results
