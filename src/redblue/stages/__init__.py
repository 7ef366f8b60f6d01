"""The stages of the red/blue workflow, one module each: config in, typed result out.

=====================  ===========================================================
``baseline``           train (or reuse) a clean model and measure it; ``evaluate``
``attack``             attacks + sanity checks on a saved model (the red team)
``defend``             adversarial training and its robustness evaluation (blue team)
``poison``             a BadNets model: clean accuracy, ASR, RA; the poison-rate sweep
``backdoor``           detect the poison, retrain without it, measure again
``backdoor_audit``     Neural Cleanse from the model alone: reversed triggers, verdict
=====================  ===========================================================

Each writes its result JSON under ``OUT/metrics/`` (validated against its schema) and
reuses what a previous run computed with the same inputs (:mod:`redblue.stages.common`).
Plots and reports are rendered from those JSON files by :mod:`redblue.report`.
"""

from redblue.stages.attack import attack_stage
from redblue.stages.backdoor import defend_backdoor_stage, detect_training_set_stage
from redblue.stages.backdoor_audit import audit_backdoor_stage
from redblue.stages.baseline import evaluate_stage, train_baseline
from redblue.stages.common import load_data, train_or_reuse, training_cache_key
from redblue.stages.defend import check_fine_tune, defend_stage, robustness_metrics
from redblue.stages.poison import poison_stage, poison_sweep_stage

__all__ = [
    "attack_stage",
    "audit_backdoor_stage",
    "check_fine_tune",
    "defend_backdoor_stage",
    "defend_stage",
    "detect_training_set_stage",
    "evaluate_stage",
    "load_data",
    "poison_stage",
    "poison_sweep_stage",
    "robustness_metrics",
    "train_baseline",
    "train_or_reuse",
    "training_cache_key",
]
