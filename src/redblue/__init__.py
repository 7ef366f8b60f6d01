"""redblue: red- and blue-teaming image classifiers.

The building blocks and the stages, importable from the top level (loaded on first use)::

    from redblue import load_dataset, build_model, fit, evaluate, fgsm, pgd, evaluate_robustness
    from redblue import apply_trigger, Trigger, select_poison_indices, backdoor_metrics
    from redblue import train_baseline, attack_stage, defend_stage, poison_stage
    from redblue import defend_backdoor_stage, run_workflow, render_plots, render_report
    from redblue import load_grid, run_sweep
"""

from __future__ import annotations

import importlib
from typing import Any

from redblue._version import __version__

_EXPORTS = {
    # data and models
    "load_dataset": "redblue.data",
    "Dataset": "redblue.data",
    "build_model": "redblue.models",
    "MODELS": "redblue.models",
    # configuration
    "DataConfig": "redblue.config",
    "TrainConfig": "redblue.config",
    "AttackConfig": "redblue.config",
    "DefendConfig": "redblue.config",
    "PoisonConfig": "redblue.config",
    "BackdoorDefenseConfig": "redblue.config",
    "RunConfig": "redblue.config",
    # training and evaluation
    "fit": "redblue.train",
    "evaluate": "redblue.train",
    "accuracy": "redblue.train",
    "predict": "redblue.train",
    # attacks
    "fgsm": "redblue.attacks",
    "pgd": "redblue.attacks",
    "apgd_ce": "redblue.attacks",
    "apgd_t": "redblue.attacks",
    "fab_t": "redblue.attacks",
    "square": "redblue.attacks",
    "ATTACKS": "redblue.attacks",
    "evaluate_robustness": "redblue.evaluation",
    "eps_sweep": "redblue.evaluation",
    "run_checks": "redblue.evaluation",
    # poisoning and metrics
    "Trigger": "redblue.poison.trigger",
    "apply_trigger": "redblue.poison.trigger",
    "select_poison_indices": "redblue.poison.selection",
    "poison_dataset": "redblue.poison.dataset",
    "backdoor_metrics": "redblue.metrics",
    "attack_success_rate": "redblue.metrics",
    # defences
    "make_recipe": "redblue.defenses.adversarial",
    "train_defended": "redblue.defenses.adversarial",
    "activation_clustering": "redblue.defenses.backdoor",
    "spectral_signatures": "redblue.defenses.backdoor",
    # artifacts
    "save_model": "redblue.artifacts",
    "load_model": "redblue.artifacts",
    # stages, each returning a typed result (redblue.results)
    "train_baseline": "redblue.stages",
    "evaluate_stage": "redblue.stages",
    "attack_stage": "redblue.stages",
    "defend_stage": "redblue.stages",
    "poison_stage": "redblue.stages",
    "poison_sweep_stage": "redblue.stages",
    "defend_backdoor_stage": "redblue.stages",
    # the workflow and the report
    "run_workflow": "redblue.pipeline",
    "Workflow": "redblue.pipeline",
    "render_report": "redblue.report.render",
    "render_plots": "redblue.report.stage_plots",
    "build_summary": "redblue.report.summary",
    # sweeps
    "load_grid": "redblue.sweep",
    "run_sweep": "redblue.sweep",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'redblue' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
