"""Robustness evaluation: run attacks, enforce the threat model, score the worst case, check it.

- :mod:`~redblue.evaluation.runner`: one attack over a set of images, the threat model
  enforced on every batch (:func:`run_attack`), the result types.
- :mod:`~redblue.evaluation.checks`: the sanity checks, warnings with a documented meaning.
- :mod:`~redblue.evaluation.robustness`: :func:`evaluate_robustness` (per-example worst case
  over attacks) and :func:`eps_sweep`.
"""

from redblue.evaluation.checks import CHECKS, SQUARE_QUERIES, run_checks
from redblue.evaluation.robustness import (
    DEFAULT_SWEEP,
    SWEEP_CAP,
    eps_sweep,
    evaluate_robustness,
    is_standard_autoattack,
)
from redblue.evaluation.runner import (
    N_SAMPLES,
    AttackResult,
    RobustnessResult,
    run_attack,
    sample_predictions,
    save_samples,
)

__all__ = [
    "CHECKS",
    "DEFAULT_SWEEP",
    "N_SAMPLES",
    "SQUARE_QUERIES",
    "SWEEP_CAP",
    "AttackResult",
    "RobustnessResult",
    "eps_sweep",
    "evaluate_robustness",
    "is_standard_autoattack",
    "run_attack",
    "run_checks",
    "sample_predictions",
    "save_samples",
]
