"""`redblue run --quick` end to end, as a user runs it: files, JSON schema, report sections,
interruption with kill -9 and resume, and the lock against a second concurrent run."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

Cli = Callable[..., CompletedProcess[str]]

STAGE_FILES = [
    "metrics/baseline_metrics.json",
    "metrics/fgsm_metrics.json",
    "metrics/pgd_metrics.json",
    "metrics/standard_metrics.json",
    "metrics/advtrain_metrics.json",
    "metrics/poison_metrics.json",
    "metrics/backdoor_defense_ac_metrics.json",
    "metrics/backdoor_defense_spectral_metrics.json",
    "metrics/metrics_summary.json",
    "metrics/run_config.json",
    "models/baseline.safetensors",
    "models/advtrain.safetensors",
    "models/poisoned.safetensors",
    "images/baseline_training_curves.png",
    "images/fgsm_examples.png",
    "images/pgd_accuracy_vs_eps.png",
    "images/standard_perturbation.png",
    "report.html",
    "report.md",
]
SCENARIOS = [
    "Baseline",
    "Baseline + FGSM",
    "Baseline + PGD",
    "Baseline + standard suite (APGD-CE + APGD-T)",
    "Adv. trained (fgsm-rs)",
    "Poisoned (BadNets)",
]
"""The scenario rows of a quick run before the two backdoor-defence rows, whose wording follows
what the defence did (see :func:`_check_backdoor_rows`)."""


def _check_backdoor_rows(out: Path, rows: list[dict[str, object]]) -> None:
    """Each backdoor-defence row says what happened, never a removal that did not happen."""
    assert len(rows) == 2
    for row, method in zip(rows, ("ac", "spectral"), strict=True):
        result = json.loads((out / "metrics" / f"backdoor_defense_{method}_metrics.json").read_text())
        before, after = result["before"]["asr"], result["after"]["asr"]
        label = str(row["scenario"])
        assert f"({method})" in label, label
        if before < 0.5:
            assert "nothing to remove" in label, (label, before)
        elif after <= 0.10:
            assert label == f"Backdoor removed ({method})", (label, after)
        else:
            assert label == f"Backdoor defence ({method}): not removed", (label, after)


def _numbers(summary: dict[str, object]) -> list[tuple[object, ...]]:
    rows = summary["rows"]
    assert isinstance(rows, list)
    return [(r["scenario"], r.get("clean_accuracy"), r.get("robust_accuracy"), r.get("asr"), r.get("ra")) for r in rows]


def test_quick_run_writes_every_stage_and_the_report(quick_run: tuple[Path, CompletedProcess[str]]) -> None:
    out, result = quick_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in STAGE_FILES:
        assert (out / name).is_file(), name
    summary = json.loads((out / "metrics" / "metrics_summary.json").read_text())
    assert [r["scenario"] for r in summary["rows"]][: len(SCENARIOS)] == SCENARIOS
    _check_backdoor_rows(out, summary["rows"][len(SCENARIOS) :])
    assert summary["quick"] is True and summary["schema"] == {"name": "redblue.summary", "version": 1}
    timings = json.loads((out / "run_timings.json").read_text())["seconds"]
    assert set(timings) == {"baseline", "redteam", "blueteam", "poison"}
    for row in summary["rows"]:
        assert isinstance(row["settings"], dict) and row["settings"]
        for key in ("clean_accuracy", "robust_accuracy", "asr", "ra"):
            assert row.get(key) is None or 0.0 <= row[key] <= 1.0
    fgsm_row = summary["rows"][1]
    assert fgsm_row["robust_accuracy"] < fgsm_row["clean_accuracy"]
    poison_row = summary["rows"][5]
    assert poison_row["asr"] is not None and poison_row["ra"] is not None
    # The console table ends the run.
    assert "Baseline + FGSM" in result.stdout and "report:" in result.stdout
    # The blue team's evaluation is the AutoAttack cascade, lightened for --quick as documented.
    defended = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())
    attacks = defended["evaluation"]["attacks"]
    assert list(attacks) == ["fgsm", "pgd", "apgd-ce", "apgd-t", "fab-t", "square"]
    assert attacks["apgd-t"]["settings"]["n_targets"] == attacks["fab-t"]["settings"]["n_targets"] == 3
    assert attacks["square"]["settings"]["steps"] == 200 and attacks["apgd-ce"]["settings"]["steps"] == 100
    assert defended["metrics"]["autoattack_accuracy"] == attacks["square"]["robust_accuracy"]


def test_report_is_self_contained_with_every_section(quick_run: tuple[Path, CompletedProcess[str]]) -> None:
    out, _ = quick_run
    html = (out / "report.html").read_text()
    for anchor in ('id="summary"', 'id="warnings"', 'id="stages"', 'id="plots"', 'id="data"', 'id="config"', 'id="versions"'):
        assert anchor in html
    assert "http://" not in html and "https://" not in html and "<script" not in html
    pngs = sorted(p.name for p in (out / "images").glob("*.png"))
    assert len(pngs) >= 8
    assert html.count("data:image/png;base64,") == len(pngs)
    for scenario in SCENARIOS:
        assert scenario.replace("+", "+") in html
    md = (out / "report.md").read_text()
    assert "## Scenario table" in md and "| Baseline + FGSM |" in md


def test_report_rerenders_from_json_alone(quick_run: tuple[Path, CompletedProcess[str]], cli: Cli, tmp_path: Path) -> None:
    out, _ = quick_run
    copy = tmp_path / "copy"
    (copy / "metrics").mkdir(parents=True)
    (copy / "images").mkdir()
    for sub in ("metrics", "images"):
        for f in (out / sub).iterdir():
            if f.suffix in (".json", ".png"):
                (copy / sub / f.name).write_bytes(f.read_bytes())
    result = cli("report", "--out", str(copy))
    assert result.returncode == 0, result.stderr
    assert not (copy / "models").exists()
    assert (copy / "report.md").read_text().split("\n", 3)[3] == (out / "report.md").read_text().split("\n", 3)[3]


def test_interrupted_run_resumes_to_the_same_summary(
    quick_run: tuple[Path, CompletedProcess[str]], tmp_path: Path, cli: Cli
) -> None:
    """A run killed with kill -9 in its poison stage, between the poisoned model and its
    detectors, then run again: it reuses what was finished and ends with the same summary as
    the uninterrupted run. The run starts from a copy of that run's folder without its poison
    stage (the earlier stages are reused, as after any interruption), which keeps the test
    to the stages it interrupts and resumes."""
    reference, _ = quick_run
    out = tmp_path / "out"
    shutil.copytree(reference, out)
    removed = [*(out / "models").glob("poisoned*"), *(out / "metrics").glob("backdoor_defense_*"),
               *(out / "metrics" / name for name in ("poison_metrics.json", "metrics_summary.json", "run_config.json")),
               *(out / "images").glob("poison_*"), *(out / "images").glob("backdoor_defense_*"),
               out / "report.html", out / "report.md", out / "run_timings.json"]  # fmt: skip
    for path in removed:
        path.unlink()
    shutil.rmtree(out / "cache" / "detection")
    env = {**os.environ}
    proc = subprocess.Popen(
        [sys.executable, "-m", "redblue", "run", "--quick", "--out", str(out), "--device", "cpu"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
    )
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics" / "poison_metrics.json").exists():
            assert proc.poll() is None, "run ended before it could be interrupted"
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # A second run on the same folder is refused while the first holds the lock.
        second = cli("run", "--quick", "--out", str(out), "--device", "cpu")
        assert second.returncode == 2 and "another redblue command is using this folder" in second.stderr
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "metrics" / "metrics_summary.json").exists()
    assert not (out / "metrics" / "backdoor_defense_spectral_metrics.json").exists()  # killed before its detectors ended
    weights = (out / "models" / "poisoned.safetensors").read_bytes()  # trained by the killed run
    resumed = cli("run", "--quick", "--out", str(out), "--device", "cpu")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"reusing {out / 'models' / 'poisoned.json'}" in resumed.stderr  # the killed run's model, not retrained
    assert (out / "models" / "poisoned.safetensors").read_bytes() == weights
    mine = json.loads((out / "metrics" / "metrics_summary.json").read_text())
    theirs = json.loads((reference / "metrics" / "metrics_summary.json").read_text())
    assert _numbers(mine) == _numbers(theirs)


def test_run_outputs_verify_and_scan_clean(quick_run: tuple[Path, CompletedProcess[str]], cli: Cli) -> None:
    out, _ = quick_run
    verified = cli("verify", str(out))
    assert verified.returncode == 0, verified.stdout + verified.stderr
    assert "0 modified, 0 missing" in verified.stdout
    scanned = cli("scan", str(out))
    assert scanned.returncode == 0, scanned.stdout + scanned.stderr


def test_a_second_identical_run_trains_and_attacks_nothing(
    quick_run: tuple[Path, CompletedProcess[str]], cli: Cli
) -> None:
    """Everything is reused: no model file, cache entry or metrics JSON changes, byte for byte."""
    out, _ = quick_run
    watched = [p for sub in ("metrics", "models", "cache") for p in sorted((out / sub).rglob("*")) if p.is_file()]
    before = {p: (p.read_bytes(), p.stat().st_mtime_ns) for p in watched}
    again = cli("run", "--quick", "--out", str(out), "--device", "cpu")
    assert again.returncode == 0, again.stderr[-3000:]
    after = [p for sub in ("metrics", "models", "cache") for p in sorted((out / sub).rglob("*")) if p.is_file()]
    assert after == watched  # no new file
    changed = [str(p.relative_to(out)) for p in watched if p.read_bytes() != before[p][0]]
    assert not changed, changed
    rewritten = [str(p.relative_to(out)) for p in watched
                 if p.stat().st_mtime_ns != before[p][1] and p.parent.name != "metrics"]  # fmt: skip
    assert not rewritten, rewritten  # no model retrained, no cache entry recomputed
    for stem in ("baseline", "fgsm", "pgd", "standard", "advtrain", "poison", "backdoor_defense_ac",
                 "backdoor_defense_spectral"):
        assert f"reusing {out / 'metrics' / stem}_metrics.json" in again.stderr, stem
    assert "epoch" not in again.stderr.lower()


def test_run_gate_exit_codes_on_the_defended_model(quick_run: tuple[Path, CompletedProcess[str]], cli: Cli) -> None:
    """``run --fail-under``: the blue team's defended model is gated (exit 1 below the bar,
    0 at or above it); the rerun is cached, so the gate reads the results it just reused."""
    out, _ = quick_run
    defended = json.loads((out / "metrics" / "advtrain_metrics.json").read_text())["evaluation"]["robust_accuracy"]
    failed = cli("run", "--quick", "--out", str(out), "--device", "cpu", "--fail-under", f"{defended + 0.001:.4f}")
    assert failed.returncode == 1, failed.stderr[-2000:]
    gate_lines = [line for line in failed.stderr.splitlines() if line.startswith("gate failed")]
    assert len(gate_lines) == 1 and f"advtrain: worst-case robust accuracy {100 * defended:.2f}%" in gate_lines[0]
    assert (out / "report.html").is_file()  # the results and the report are written before the gate
    passed = cli("run", "--quick", "--out", str(out), "--device", "cpu", "--fail-under", f"{max(defended - 1e-7, 0.0):.7f}")
    assert passed.returncode == 0, passed.stderr[-2000:]
    assert "gate failed" not in passed.stderr
