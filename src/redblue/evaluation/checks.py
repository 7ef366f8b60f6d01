"""Sanity checks of a robustness evaluation: warnings with a documented meaning.

Each check returns nothing when it passes and a warning ``{"id", "message", "doc"}`` when
it fails; ``doc`` points to the entry in ``redblue/evaluation/checks.md`` that says what the warning
means and what to do. :func:`run_checks` runs them all on a subset of the evaluated
images (reusing the evaluation's per-example results where it can) and is called by
:func:`redblue.evaluation.evaluate_robustness`. A normally trained model raises none; a
model that masks its gradients trips several.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from redblue.attacks.projection import input_gradient
from redblue.evaluation.runner import RobustnessResult, run_attack
from redblue.train import channels_last, check_layout
from redblue.utils import eval_mode, pct, progress_line, seed_everything

DOC = "redblue/evaluation/checks.md"
TOLERANCE = 0.005
"""0.5 pp: how much accuracy may move between settings before a check fires."""
LARGE_EPS = {"linf": 0.5, "l2": 8.0}
"""A radius at which every MNIST image can be turned into another class."""
LARGE_EPS_MAX_ACCURACY = 0.01
GAP = 0.10
"""robustness-gap: FGSM accuracy more than 10 pp above the strongest attack's."""
ZERO_GRADIENT_SHARE = 0.01
BACKDOOR_MIN_ASR = 0.5
"""backdoor-not-implanted: below this attack success rate, a poisoned model holds no working backdoor."""

CHECKS = {
    "outputs-not-logits": "the model outputs probabilities, not logits",
    "outputs-log-probabilities": "the model outputs log-probabilities (a log_softmax last layer)",
    "zero-gradients": "input gradients are exactly zero for many examples",
    "eps-zero-changes-accuracy": "an attack at eps = 0 changes accuracy",
    "pgd-weaker-than-fgsm": "PGD accuracy is above FGSM accuracy",
    "not-converged": "doubling steps or restarts lowers accuracy by more than 0.5 pp",
    "large-eps-accuracy": "PGD at a very large eps leaves accuracy above 1%",
    "square-stronger-than-white-box": "the black-box Square attack beats the white-box attacks",
    "sweep-not-monotonic": "accuracy rises with eps in the sweep",
    "robustness-gap": "FGSM accuracy is more than 10 pp above the strongest attack's",
    "backdoor-not-implanted": "the poisoned model's attack success rate is below 50%: the backdoor did not take",
}
"""Every check id and a one-line summary (each has an entry in checks.md beside this module)."""


def warning(check_id: str, message: str) -> dict[str, str]:
    """A warning dict for check ``check_id`` with a link to its documentation."""
    if check_id not in CHECKS:
        raise KeyError(check_id)
    return {"id": check_id, "message": message, "doc": f"{DOC}#{check_id}"}


# --------------------------------------------------------------------------- pure checks


def check_logits(outputs: torch.Tensor) -> dict[str, str] | None:
    """Outputs in [0, 1] whose rows sum to 1 are probabilities (a softmax last layer);
    non-positive outputs whose rows' logsumexp is 0 are log-probabilities (a log_softmax)."""
    out = outputs.float()
    in_unit = out.numel() > 0 and bool((out >= 0).all() and (out <= 1).all())
    if in_unit and bool(((out.sum(dim=1) - 1.0).abs() < 1e-3).all()):
        return warning(
            "outputs-not-logits",
            "model outputs are probabilities (non-negative, rows sum to 1): the softmax saturates "
            "and hides gradients; evaluate the logits",
        )
    if out.numel() > 0 and bool((out <= 0).all()) and bool((torch.logsumexp(out, dim=1).abs() < 1e-3).all()):
        return warning(
            "outputs-log-probabilities",
            "model outputs are log-probabilities (non-positive, each row's logsumexp is 0: a log_softmax "
            "last layer); the attacks' losses are unchanged by it, so the numbers stand, but say so when you "
            "compare them",
        )
    return None


def check_backdoor_implanted(asr: float, n_triggered: int) -> dict[str, str] | None:
    """A BadNets model whose trigger moves fewer than half of the triggered images to the target."""
    if asr < BACKDOOR_MIN_ASR:
        return warning(
            "backdoor-not-implanted",
            f"the trigger sends only {pct(asr, 1)} of {n_triggered:,} triggered non-target test images to the target "
            f"(below {pct(BACKDOOR_MIN_ASR, 0)}): the backdoor did not take, so a defence has nothing to remove",
        )
    return None


def check_zero_gradients(grad: torch.Tensor) -> dict[str, str] | None:
    """Share of examples whose input gradient is exactly zero everywhere."""
    zero = (grad.flatten(1) == 0).all(dim=1)
    share = float(zero.float().mean()) if zero.numel() else 0.0
    if share > ZERO_GRADIENT_SHARE:
        return warning(
            "zero-gradients",
            f"the input gradient of the loss is exactly zero for {pct(share, 1)} of the examples: "
            "gradient-based attacks cannot move them (gradient masking suspected)",
        )
    return None


def check_eps_zero(attack: str, clean_accuracy: float, accuracy_at_zero: float) -> dict[str, str] | None:
    if accuracy_at_zero != clean_accuracy:
        return warning(
            "eps-zero-changes-accuracy",
            f"{attack} at eps = 0 gives accuracy {pct(accuracy_at_zero, 1)}, clean accuracy is "
            f"{pct(clean_accuracy, 1)}: the attack changes images it may not change, or the model "
            "is not deterministic in eval mode",
        )
    return None


def check_pgd_vs_fgsm(fgsm_accuracy: float, pgd_accuracy: float) -> dict[str, str] | None:
    if pgd_accuracy > fgsm_accuracy:
        return warning(
            "pgd-weaker-than-fgsm",
            f"PGD accuracy {pct(pgd_accuracy, 1)} is above FGSM accuracy {pct(fgsm_accuracy, 1)}: "
            "PGD is not converging (step size, steps) or the loss surface is masked",
        )
    return None


def check_convergence(what: str, accuracy: float, accuracy_doubled: float) -> dict[str, str] | None:
    if accuracy - accuracy_doubled > TOLERANCE:
        return warning(
            "not-converged",
            f"doubling {what} lowers accuracy from {pct(accuracy, 1)} to {pct(accuracy_doubled, 1)} "
            "(more than 0.5 pp): the attack has not converged; the reported robust accuracy is "
            "an overestimate",
        )
    return None


def check_large_eps(eps: float, norm: str, accuracy: float) -> dict[str, str] | None:
    if accuracy > LARGE_EPS_MAX_ACCURACY:
        return warning(
            "large-eps-accuracy",
            f"PGD at {norm} eps {eps:g} leaves accuracy at {pct(accuracy, 1)} (expected at most 1%): "
            "at this radius any digit can be erased; gradient masking suspected",
        )
    return None


def check_square(square_accuracy: float, white_box_accuracy: float) -> dict[str, str] | None:
    if square_accuracy < white_box_accuracy - TOLERANCE:
        return warning(
            "square-stronger-than-white-box",
            f"the black-box Square attack reaches {pct(square_accuracy, 1)}, below the white-box "
            f"attacks' {pct(white_box_accuracy, 1)}: gradients mislead the white-box attacks "
            "(gradient masking suspected)",
        )
    return None


def check_sweep(attack: str, points: list[dict[str, float]]) -> dict[str, str] | None:
    for before, after in itertools.pairwise(points):
        if after["robust_accuracy"] > before["robust_accuracy"] + TOLERANCE:
            return warning(
                "sweep-not-monotonic",
                f"{attack} accuracy rises from {pct(before['robust_accuracy'], 1)} at eps "
                f"{before['eps']:g} to {pct(after['robust_accuracy'], 1)} at eps {after['eps']:g}: "
                "a larger ball contains the smaller one, so the attack is not finding its optimum",
            )
    return None


def check_robustness_gap(
    fgsm_accuracy: float, strongest: str, strongest_accuracy: float, clean_accuracy: float
) -> dict[str, str] | None:
    """Fires when FGSM makes the model look robust (accuracy at least half the clean
    accuracy) and a stronger attack is more than 10 pp lower."""
    if fgsm_accuracy - strongest_accuracy > GAP and fgsm_accuracy >= 0.5 * clean_accuracy:
        return warning(
            "robustness-gap",
            f"FGSM accuracy {pct(fgsm_accuracy, 1)} is more than 10 pp above {strongest}'s "
            f"{pct(strongest_accuracy, 1)}: robustness against FGSM is not robustness (label "
            "leaking, gradient masking or catastrophic overfitting)",
        )
    return None


# --------------------------------------------------------------------------- running them


def _accuracy(mask: torch.Tensor) -> float:
    return float(mask.float().mean()) if mask.numel() else float("nan")


SQUARE_QUERIES = 1000
"""Square's query budget in the checks when the evaluation ran no Square (AutoAttack, and a
defended model's evaluation, use 5,000)."""


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    result: RobustnessResult,
    *,
    batch_size: int = 500,
    seed: int = 0,
    check_examples: int = 500,
    square_examples: int = 200,
    square_queries: int = SQUARE_QUERIES,
    progress: bool = False,
    **settings: Any,
) -> list[dict[str, Any]]:
    """Every check of :data:`CHECKS` on the first ``check_examples`` evaluated images.

    Reuses the evaluation's per-example masks; runs FGSM, PGD (also with doubled steps and
    restarts, and at a large eps), each evaluated attack at eps = 0 (at most 5 steps), and
    Square (L∞, ``square_queries`` queries on ``square_examples`` images) where needed.
    Each warning names the number of images it was measured on (``n_examples``, also in
    its message); ``result.checks_n_examples`` records the checks' image count.
    """
    eps, norm = result.eps, result.norm
    m = min(int(x.shape[0]), check_examples)
    if result.clean_correct is None:
        raise ValueError("run_checks needs a RobustnessResult from evaluate_robustness")
    model = check_layout(model, x)  # before mask_of, which runs it too
    all_correct = result.clean_correct
    correct = all_correct[:m]
    clean_acc = _accuracy(correct)
    result.checks_n_examples = m
    warnings: list[dict[str, Any]] = []
    bar = tqdm(desc=f"sanity checks on {m} images", unit="check", disable=None if progress else True, leave=False)

    def add(found: dict[str, str] | None, rows: int = m) -> None:
        bar.update(1)
        if found is not None:
            warnings.append({**found, "message": f"{found['message']} (measured on the first {rows} test images)",
                             "n_examples": rows})

    def mask_of(attack: str, at_eps: float = eps, rows: int = m, **overrides: Any) -> torch.Tensor:
        if at_eps == eps and not overrides and attack in result.robust:
            return result.robust[attack][:rows]
        seed_everything(seed)
        _, mask, _, _ = run_attack(
            model, x[:rows], y[:rows], attack, eps=at_eps, norm=norm, batch_size=batch_size,
            settings={**settings, **overrides}, clean_correct=all_correct[:rows], progress=progress,
        )  # fmt: skip
        return mask

    xf = channels_last(x[:256].float().div(255.0) if x.dtype == torch.uint8 else x[:256].float())
    with torch.no_grad(), eval_mode(model):
        add(check_logits(model(xf)), int(xf.shape[0]))
    with eval_mode(model):
        grad, _, _ = input_gradient(model, xf, y[:256])
    add(check_zero_gradients(grad), int(xf.shape[0]))

    few = min(m, 200)
    for attack in result.robust:
        steps = settings.get("steps") or 100
        at_zero = mask_of(attack, 0.0, rows=few, steps=min(int(steps), 5))
        add(check_eps_zero(attack, _accuracy(all_correct[:few]), _accuracy(at_zero)), few)

    fgsm_mask = mask_of("fgsm")
    pgd_mask = mask_of("pgd")
    add(check_pgd_vs_fgsm(_accuracy(fgsm_mask), _accuracy(pgd_mask)))

    iterative = next((a for a in ("pgd", "apgd-ce") if a in result.robust), "pgd")
    base = result.robust[iterative][:m] if iterative in result.robust else pgd_mask
    resolved_steps = int(settings.get("steps") or (40 if iterative == "pgd" else 100))
    resolved_restarts = int(settings.get("restarts") or 1)
    doubled_steps = mask_of(iterative, steps=2 * resolved_steps)
    add(check_convergence(f"{iterative} steps ({resolved_steps} -> {2 * resolved_steps})",
                          _accuracy(base), _accuracy(doubled_steps)))  # fmt: skip
    doubled_restarts = mask_of(iterative, restarts=2 * resolved_restarts)
    add(check_convergence(f"{iterative} restarts ({resolved_restarts} -> {2 * resolved_restarts})",
                          _accuracy(base), _accuracy(doubled_restarts)))  # fmt: skip

    large = LARGE_EPS[norm]
    add(check_large_eps(large, norm, _accuracy(mask_of("pgd", large, alpha=2.5 * large / 40, steps=40))))

    white_box = correct & fgsm_mask & pgd_mask
    for attack, mask in result.robust.items():
        if attack != "square":
            white_box &= mask[:m]
    if norm == "linf":
        rows = min(m, square_examples)
        if "square" in result.robust:
            square_mask = result.robust["square"][:rows]
        else:
            square_mask = mask_of("square", rows=rows, steps=square_queries, restarts=1)
        add(check_square(_accuracy(square_mask), _accuracy(white_box[:rows])), rows)

    for attack, points in (result.sweep or {}).items():
        if attack != "fgsm":  # one fixed-size step: overshooting at large eps is expected
            add(check_sweep(attack, points), result.sweep_n_examples or int(x.shape[0]))

    others = {a: _accuracy(mk[:m]) for a, mk in result.robust.items() if a != "fgsm"}
    others.setdefault("pgd", _accuracy(pgd_mask))
    strongest = min(others, key=lambda a: others[a])
    add(check_robustness_gap(_accuracy(fgsm_mask), strongest, others[strongest], clean_acc))
    bar.close()
    names = ", ".join(w["id"] for w in warnings) or "none"
    progress_line(progress, f"sanity checks on {m} images: {len(warnings)} warning(s) ({names})")
    return warnings
