"""The whole red/blue workflow (``redblue run``): the stages of :mod:`redblue.stages`
composed in order, then the summary, the plots and the report.

Nothing here trains or attacks by itself: each stage reuses what a previous run computed
with the same inputs, so a rerun of the same workflow only re-reads its results.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from redblue.artifacts import load_model
from redblue.config import (
    AttackConfig,
    BackdoorDefenseConfig,
    DataConfig,
    DefendConfig,
    PoisonConfig,
    RunConfig,
    TrainConfig,
)
from redblue.data import Dataset
from redblue.report.render import render_report
from redblue.report.stage_plots import render_stage_plots
from redblue.report.summary import build_summary
from redblue.results import Result, Summary, validate_result
from redblue.stages import attack_stage, defend_backdoor_stage, defend_stage, load_data, poison_stage, train_baseline
from redblue.utils import atomic_write_json, output_lock, resolve_device, seed_everything

# --------------------------------------------------------------------------- redblue run


QUICK_TRAIN = 12_000
QUICK_TEST = 1_000
QUICK_CHECKS = {"check_examples": 100, "square_examples": 50, "square_queries": 200}
"""--quick: the sanity checks on fewer images, and a shorter Square attack."""
QUICK_DEFENCE = {**QUICK_CHECKS, "autoattack_targets": 3}
"""--quick, blue team: also APGD-T and FAB-T with 3 target classes instead of AutoAttack's 9."""


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
    defend_train: TrainConfig | None = None
    """The blue team's training when it differs from ``train`` (a preset's); None: ``train``."""
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
        defend_train=replace(wf.defend_train, epochs=1) if wf.defend_train is not None else None,
        # One epoch: a ramp longer than that would never reach the eps the model is evaluated at.
        defend=replace(
            wf.defend, n_examples=min(wf.defend.n_examples, 200), guard_size=min(wf.defend.guard_size, 200), eps_ramp=0
        ),
    )


def _done(out: Path, result: Result) -> Result:
    """A stage finished: render its plots from its result."""
    render_stage_plots(out, result)
    return result


def run_workflow(wf: Workflow) -> Summary:
    """Run the selected stages in order (each cached), then write the summary and the report.

    Returns the typed ``metrics_summary.json``. Stage timings (which change from run to run)
    go to ``OUT/run_timings.json``, outside ``metrics/``, so that rerunning the same workflow
    leaves every metrics JSON byte-identical.
    """
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
                _done(wf.out, train_baseline(
                    wf.out, data, wf.train, data_cfg=wf.data, force_retrain=wf.force_retrain, progress=wf.progress
                ))  # fmt: skip
        if "redteam" in stages:
            with _timed(timings, "redteam"):
                red_team(wf, data)
        if "blueteam" in stages:
            with _timed(timings, "blueteam"):
                _done(wf.out, defend_stage(
                    wf.out, data, wf.defend_train or wf.train, wf.defend, data_cfg=wf.data, force_retrain=wf.force_retrain,
                    progress=wf.progress, check_options=QUICK_DEFENCE if wf.run.quick else None,
                ))  # fmt: skip
        if "poison" in stages:
            with _timed(timings, "poison"):
                poisoning(wf, data)
        summary = build_summary(wf.out, quick=wf.run.quick)
        validate_result(summary.to_json(), Summary.SCHEMA)
        atomic_write_json(wf.out / "metrics" / "metrics_summary.json", summary.to_json())
        atomic_write_json(
            wf.out / "metrics" / "run_config.json",
            {
                "run": asdict(wf.run),
                "data": asdict(wf.data),
                "train": asdict(wf.train),
                "defend": asdict(wf.defend),
                **({"defend_train": asdict(wf.defend_train)} if wf.defend_train is not None else {}),
                "poison": asdict(wf.poison),
                "backdoor": asdict(wf.backdoor),
            },
        )
        atomic_write_json(wf.out / "run_timings.json", {"seconds": timings})
        if "report" in stages:
            render_report(wf.out)
    return summary


@contextlib.contextmanager
def _timed(timings: dict[str, float], name: str) -> Iterator[None]:
    start = time.perf_counter()
    yield
    timings[name] = time.perf_counter() - start


def poisoning(wf: Workflow, data: Dataset) -> None:
    """BadNets model, clean accuracy / ASR / RA, then each detection method with clean retraining."""
    _done(wf.out, poison_stage(
        wf.out, data, wf.train, wf.poison, data_cfg=wf.data, force_retrain=wf.force_retrain, progress=wf.progress
    ))  # fmt: skip
    for method in wf.run.detection:
        _done(wf.out, defend_backdoor_stage(
            wf.out, data, wf.out / "models" / f"{wf.poison.name}.json", replace(wf.backdoor, method=method),
            train_cfg=wf.train, data_cfg=wf.data, force_retrain=wf.force_retrain, progress=wf.progress,
        ))  # fmt: skip


CHECKS_NOTE = "run once per model with the standard suite: see standard_metrics.json"


def red_team(wf: Workflow, data: Dataset) -> list[Result]:
    """FGSM at eps on the whole test set, PGD (with the eps sweep) and the standard suite on
    the first ``n_examples`` test images; each cached by the attack stage.

    The sanity checks run once per model, with the standard suite (they run FGSM and PGD
    themselves, so they cover the other two stages too); the FGSM and PGD JSONs say so.
    """
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
        seed_everything(seed)
        result = attack_stage(wf.out, loaded, data, cfg, name=name, data_cfg=wf.data, progress=wf.progress,
                              check_options=check_options, checks_note=CHECKS_NOTE)
        results.append(_done(wf.out, result))
    return results
