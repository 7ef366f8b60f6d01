"""``--attack autoattack``: AutoAttack's standard version as a cascade.

Each attack runs only on the images still robust after the ones before it; the result keeps
each attack's own numbers (images attacked, fooled, its own accuracy on them) and the
cascade's running accuracy, and scores the per-example worst case. Per-class robust accuracy
is in every evaluation.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from redblue.artifacts import load_model
from redblue.attacks import CASCADES, DEFAULTS, expand, is_cascade
from redblue.data import Dataset, to_float
from redblue.errors import ConfigError
from redblue.evaluation import evaluate_robustness, is_standard_autoattack
from redblue.evaluation.robustness import per_class_accuracy
from redblue.results import DefendResult

Cli = Callable[..., CompletedProcess[str]]


def test_autoattack_is_the_standard_version_with_the_papers_settings() -> None:
    assert expand("autoattack") == ["apgd-ce", "apgd-t", "fab-t", "square"] == CASCADES["autoattack"]
    assert is_cascade("autoattack") and is_cascade("pgd,autoattack") and not is_cascade("standard,square")
    assert DEFAULTS["apgd-ce"] == {"steps": 100, "restarts": 1}
    assert DEFAULTS["apgd-t"] == {"steps": 100, "restarts": 1, "n_targets": 9}
    assert DEFAULTS["fab-t"] == {"steps": 100, "restarts": 1, "n_targets": 9}
    assert DEFAULTS["square"]["steps"] == 5000 and DEFAULTS["square"]["restarts"] == 1


def test_only_the_papers_settings_count_as_the_standard_protocol() -> None:
    """What the model record's ``protocol`` and the reference benchmark's refusal rest on."""
    standard = {a: {"settings": {"eps": 0.3, "norm": "linf", **DEFAULTS[a]}} for a in CASCADES["autoattack"]}
    assert is_standard_autoattack(standard)
    assert is_standard_autoattack({**standard, "pgd": {"settings": {"steps": 40}}})  # extra attacks do not matter
    for attack, key, value in (("apgd-t", "n_targets", 3), ("fab-t", "n_targets", 3), ("square", "steps", 1000),
                               ("apgd-ce", "steps", 10), ("fab-t", "restarts", 2)):  # fmt: skip
        reduced = {**standard, attack: {"settings": {**standard[attack]["settings"], key: value}}}
        assert not is_standard_autoattack(reduced), (attack, key)
    assert not is_standard_autoattack({a: v for a, v in standard.items() if a != "square"})


def test_per_class_accuracy_by_hand() -> None:
    y = torch.tensor([0, 0, 1, 2, 2, 2])
    clean = torch.tensor([1, 0, 1, 1, 1, 0], dtype=torch.bool)
    robust = torch.tensor([1, 0, 0, 1, 0, 0], dtype=torch.bool)
    assert per_class_accuracy(y, clean, robust) == [
        {"class": 0, "n": 2, "clean_accuracy": 0.5, "robust_accuracy": 0.5},
        {"class": 1, "n": 1, "clean_accuracy": 1.0, "robust_accuracy": 0.0},
        {"class": 2, "n": 3, "clean_accuracy": 2 / 3, "robust_accuracy": 1 / 3},
    ]


def test_the_cascade_attacks_only_what_is_still_robust(tiny_model_dir: Path, mini: Dataset) -> None:
    model = load_model(tiny_model_dir / "models" / "baseline.json").model
    x, y = mini.x_test[:120], mini.y_test[:120]
    n = int(x.shape[0])
    result = evaluate_robustness(model, x, y, attacks="autoattack", eps=0.08, steps=8, n_targets=2, checks=False)
    assert result.protocol == "cascade"
    assert [a.attack for a in result.attacks] == CASCADES["autoattack"]
    n_correct = round(result.clean_accuracy * n)
    still = n
    running = []
    for k, a in enumerate(result.attacks):
        assert a.n_attacked == still, a.attack  # exactly the images still robust before it
        running.append(a.robust_accuracy)
        robust_after = round(a.robust_accuracy * n)
        if k:
            assert a.n_fooled == still - robust_after
            assert a.own_robust_accuracy == (robust_after / still if still else None)
        still = robust_after
        mask = result.robust[a.attack]
        assert int(mask.sum()) == robust_after
    assert running == sorted(running, reverse=True)  # the running accuracy never rises
    assert result.robust_accuracy == running[-1]
    assert sum(a.n_fooled for a in result.attacks) == n_correct - round(result.robust_accuracy * n)
    # A later attack's robust images are a subset of an earlier one's: it never saw the others.
    masks = [result.robust[a] for a in CASCADES["autoattack"]]
    for before, after in itertools.pairwise(masks):
        assert not bool((after & ~before).any())
    per_class = result.per_class
    assert sum(c["n"] for c in per_class) == n
    assert round(sum(c["robust_accuracy"] * c["n"] for c in per_class)) == round(result.robust_accuracy * n)
    assert json.loads(json.dumps(result.to_json()))["protocol"] == "cascade"


class _Constant(nn.Module):
    """Always predicts class 0: every image of another class is wrong, every 0 unbreakable."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = torch.zeros(x.shape[0], 10, device=x.device)
        logits[:, 0] = 1.0
        return logits + 0.0 * x.flatten(1).sum(1, keepdim=True)


def test_images_the_first_attacks_settle_never_reach_the_later_ones(mini: Dataset) -> None:
    x, y = to_float(mini.x_test[:50]), mini.y_test[:50]
    zeros = int((y == 0).sum())
    result = evaluate_robustness(_Constant(), x, y, attacks="autoattack", eps=0.3, steps=4, n_targets=2,
                                 checks=False)  # fmt: skip
    assert result.clean_accuracy == zeros / 50 == result.robust_accuracy
    for a in result.attacks[1:]:
        assert a.n_attacked == zeros and a.n_fooled == 0
    (zero_class,) = [c for c in result.per_class if c["class"] == 0]
    assert zero_class["robust_accuracy"] == 1.0


def test_autoattack_from_the_cli_writes_the_cascade_and_per_class(tiny_model_dir: Path, cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "out"
    result = cli("attack", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--attack", "autoattack",
                 "--eps", "0.1", "--steps", "5", "--n-targets", "2", "--n-examples", "60", "--no-checks",
                 "--dataset", "mnist-mini", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    metrics = json.loads((out / "metrics" / "baseline_autoattack_metrics.json").read_text())["metrics"]
    assert metrics["protocol"] == "cascade" and len(metrics["per_class"]) == 10
    assert list(metrics["attacks"]) == CASCADES["autoattack"]
    assert metrics["attacks"]["apgd-t"]["n_attacked"] == round(metrics["attacks"]["apgd-ce"]["robust_accuracy"] * 60)
    assert cli("report", "--out", str(out)).returncode == 0
    html = (out / "report.html").read_text()
    assert "AutoAttack (APGD-CE, APGD-T, FAB-T, Square)" in html and "Accuracy per class" in html


def test_kept_adversarial_examples_are_the_worst_case_and_in_the_threat_model(
    tiny_model_dir: Path, mini: Dataset
) -> None:
    model = load_model(tiny_model_dir / "models" / "baseline.json").model
    x, y = mini.x_test[:100], mini.y_test[:100]
    for spec in ("fgsm,pgd", "autoattack"):
        result = evaluate_robustness(model, x, y, attacks=spec, eps=0.1, steps=6, n_targets=2, checks=False,
                                     keep_adversarial=True)  # fmt: skip
        adv = result.adversarial
        assert adv is not None and adv.shape == (100, 1, 28, 28)
        assert float((adv - to_float(x)).abs().max()) <= 0.1 + 1e-6
        assert float(adv.min()) >= 0.0 and float(adv.max()) <= 1.0
        with torch.no_grad():
            still_right = model(adv).argmax(1) == y
        # Robust images keep their label on the kept example, fooled ones lose it (FAB-T's points
        # sit on the decision boundary: allow two recomputation flips).
        worst = result.clean_correct & torch.stack([result.robust[a] for a in result.robust]).all(0)
        assert int((still_right != worst).sum()) <= 2, spec


def test_save_adversarial_writes_hashed_examples_and_a_per_class_grid(
    tiny_model_dir: Path, cli: Cli, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    result = cli("attack", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--attack", "pgd",
                 "--eps", "0.1", "--steps", "5", "--n-examples", "80", "--no-checks", "--save-adversarial",
                 "--dataset", "mnist-mini", "--device", "cpu", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    record = json.loads((out / "metrics" / "baseline_pgd_metrics.json").read_text())
    adv = record["adversarial"]
    assert adv["images_file"] == "baseline_pgd_adversarial.safetensors" and adv["n"] == 80
    path = out / "metrics" / adv["images_file"]
    assert hashlib.sha256(path.read_bytes()).hexdigest() == adv["images_sha256"]
    tensors = load_file(str(path))
    assert tensors["adversarial.x"].shape == (80, 1, 28, 28)
    right = (tensors["adversarial.pred"] == tensors["adversarial.y"]).float().mean().item()
    assert abs(right - record["metrics"]["robust_accuracy"]) <= 2 / 80
    assert (out / "images" / "baseline_pgd_adversarial_by_class.png").stat().st_size > 10_000
    assert cli("verify", str(out)).returncode == 0
    path.write_bytes(path.read_bytes()[:-1] + b"\0")  # tampered: verify says so
    assert cli("verify", str(out)).returncode != 0
    # Run again without the option: the grid of the earlier run is not left in the report.
    again = cli("attack", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--attack", "pgd",
                "--eps", "0.1", "--steps", "5", "--n-examples", "80", "--no-checks", "--dataset", "mnist-mini",
                "--device", "cpu", "--out", str(out))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert json.loads((out / "metrics" / "baseline_pgd_metrics.json").read_text())["adversarial"] is None
    assert not (out / "images" / "baseline_pgd_adversarial_by_class.png").exists()


def test_the_sanity_checks_run_on_a_cascade(tiny_model_dir: Path, mini: Dataset) -> None:
    model = load_model(tiny_model_dir / "models" / "baseline.json").model
    x, y = mini.x_test[:60], mini.y_test[:60]
    result = evaluate_robustness(model, x, y, attacks="autoattack", eps=0.1, steps=5, n_targets=2,
                                 check_options={"check_examples": 60, "square_examples": 30, "square_queries": 20})  # fmt: skip
    assert result.checks_n_examples == 60
    fired = {w["id"] for w in result.warnings}
    # A normally trained model masks nothing: only the short budget may be called unconverged,
    # and in a cascade Square sits below the white-box attacks only by the images it broke.
    assert fired <= {"not-converged", "square-stronger-than-white-box"}
    rows = 30  # the check's square_examples
    broke = int((result.robust["fab-t"][:rows] & ~result.robust["square"][:rows]).sum())
    assert ("square-stronger-than-white-box" in fired) == (broke / rows > 0.005)


def test_a_cascade_that_breaks_everything_early_writes_valid_json(mini: Dataset) -> None:
    # Every image of a class other than 0 is wrong for the constant model: nothing is left
    # for the later attacks, whose steps are then empty but still serialisable.
    keep = mini.y_test != 0
    x, y = to_float(mini.x_test[keep][:40]), mini.y_test[keep][:40]
    result = evaluate_robustness(_Constant(), x, y, attacks="autoattack", eps=0.3, steps=4, n_targets=2,
                                 checks=False)  # fmt: skip
    assert result.robust_accuracy == 0.0
    assert [a.n_attacked for a in result.attacks] == [40, 0, 0, 0]
    assert all(a.images_per_s is None for a in result.attacks[1:])
    json.dumps(result.to_json(), allow_nan=False)  # what the cache and the result writer require


def test_per_attack_settings_reach_only_their_attack(tiny_model_dir: Path, mini: Dataset) -> None:
    """The defend stage gives Square its own query budget inside the cascade; the other
    attacks keep theirs, and a setting for an attack that does not run is refused."""
    model = load_model(tiny_model_dir / "models" / "baseline.json").model
    x, y = to_float(mini.x_test[:40]), mini.y_test[:40]
    result = evaluate_robustness(model, x, y, attacks="autoattack", eps=0.1, steps=3, checks=False,
                                 per_attack={"square": {"steps": 7}})  # fmt: skip
    steps = {a.attack: a.settings["steps"] for a in result.attacks}
    assert steps == {"apgd-ce": 3, "apgd-t": 3, "fab-t": 3, "square": 7}
    with pytest.raises(ConfigError, match="'square': not one of the attacks run"):
        evaluate_robustness(model, x, y, attacks="pgd", eps=0.1, checks=False, per_attack={"square": {"steps": 7}})
    with pytest.raises(ConfigError, match="unknown"):
        evaluate_robustness(model, x, y, attacks="square", eps=0.1, checks=False, per_attack={"square": {"queries": 7}})


@pytest.mark.slow
def test_autoattack_is_no_weaker_than_the_reference_assembled_from_torchattacks(
    mnist: Dataset, original_recipe: tuple[Path, DefendResult]
) -> None:
    """The agreement the AutoAttack issue asks for, on a redblue defended model and full MNIST:
    on the first 1,000 test images, redblue's AutoAttack robust accuracy (the cascade that
    ``defend`` runs: APGD-CE, APGD-T, FAB-T, Square with 5,000 queries, the paper's settings)
    is at most 0.5 pp above the reference's: torchattacks 3.5.1's attacks with the paper's
    settings in a ``MultiAttack`` (``benchmarks/bench_autoattack.py``; not its ``AutoAttack``
    class, which runs 10 APGD steps).

    Checked image by image, which is stricter than comparing the two figures: the reference
    attacks every image redblue left robust and may break at most 5 of them (0.5 pp of
    1,000), so no more than 0.5 pp of redblue's robust accuracy is robustness the reference
    can take away. (Its figure on all 1,000 can differ from that bound by chance only: its
    random starts depend on the batch.) Beside them, 20 images redblue broke show that the
    reference attacks at all. On this model (the original recipe, FGSM-trained at eps 0.25)
    this takes about 75 s where the reference on all 1,000 images took 97-116 s: its APGD-CE
    runs 100 steps on every image, redblue's stops on each once it is fooled (both sides
    4.50% on these images in ``results/autoattack_original_recipe.json``; the robust cnn-wide
    comparison, 84.10% against 84.20%, is the benchmark's)."""
    from benchmarks.bench_autoattack import reference_autoattack  # the benchmark's reference, one definition

    out, _ = original_recipe
    model = load_model(out / "models" / "advtrain.json").model.eval()
    x, y = to_float(mnist.x_test[:1000]), mnist.y_test[:1000]
    ours = evaluate_robustness(model, x, y, attacks="autoattack", eps=0.25, batch_size=1000, checks=False,
                               keep_adversarial=True)  # fmt: skip
    assert [a.attack for a in ours.attacks] == ["apgd-ce", "apgd-t", "fab-t", "square"]
    assert ours.attacks[0].settings["steps"] == ours.attacks[1].settings["steps"] == ours.attacks[2].settings["steps"] == 100
    assert ours.attacks[-1].settings["steps"] == 5000 and ours.attacks[1].settings["n_targets"] == 9
    x_ours = ours.adversarial
    assert x_ours is not None
    assert float((x_ours - x).abs().amax()) <= 0.25 + 1e-6 and 0.0 <= float(x_ours.min()) <= float(x_ours.max()) <= 1.0
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        robust = clean & (model(x_ours).argmax(1) == y)
    assert int(robust.sum()) == round(ours.robust_accuracy * len(y))  # the figure is what its images give
    kept = torch.nonzero(robust).flatten()
    assert 0 < kept.numel() < int(clean.sum()) - 500  # a weak model with something left for the later attacks
    broken_by_us = torch.nonzero(clean & ~robust).flatten()[:20]
    both = torch.cat([kept, broken_by_us])
    x_ref = reference_autoattack(model, x[both], y[both], eps=0.25, batch_size=1000)
    assert float((x_ref - x[both]).abs().amax()) <= 0.25 + 1e-5 and 0.0 <= float(x_ref.min()) <= float(x_ref.max()) <= 1.0
    with torch.no_grad():
        fooled = model(x_ref).argmax(1) != y[both]
    assert int(fooled[kept.numel():].sum()) >= 18, "the reference failed on images redblue's cascade breaks"
    broken = int(fooled[: kept.numel()].sum())
    assert broken <= 5, f"the reference broke {broken} of the {kept.numel()} images redblue's AutoAttack left robust"
