"""``redblue sweep``: a grid of stage runs on a local Ray instance (2 CPUs in CI), resumed
after ``kill -9``, with a failing cell that does not stop the others; the grid file is
checked before anything runs; cells equal the same stage run alone."""

from __future__ import annotations

import contextlib
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
from typing import Any

import psutil
import pytest

from redblue.errors import ConfigError
from redblue.report.render import render_report
from redblue.report.sweep_plots import main_metric, render_sweep_plots, sorted_rows
from redblue.sweep import load_grid, run_sequentially, run_sweep
from tests.hostile_helpers import one_line_exit_2

Cli = Callable[..., CompletedProcess[str]]
TIMING = {"seconds", "images_per_s"}


def _grid(folder: Path, model: Path | list[Path], axes: str, attack: str = 'attack = "pgd"\nsteps = 10\n',
          name: str = "g") -> Path:  # fmt: skip
    models = [model] if isinstance(model, Path) else model
    model_line = f'model = "{models[0]}"' if len(models) == 1 else ""
    model_axis = "" if len(models) == 1 else "model = [" + ", ".join(f'"{m}"' for m in models) + "]\n"
    path = folder / f"{name}.toml"
    path.write_text(
        f'[sweep]\nstage = "attack"\nname = "{name}"\n{model_line}\n\n[data]\ndataset = "mnist-mini"\n\n'
        f'[attack]\n{attack}n_examples = 100\ndevice = "cpu"\nchecks = false\n\n[axes]\n{axes}{model_axis}'
    )
    return path


def _without_timing(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _without_timing(v) for k, v in obj.items() if k not in TIMING}
    if isinstance(obj, list):
        return [_without_timing(v) for v in obj]
    return obj


def _summary(out: Path, name: str = "g") -> dict[str, Any]:
    data: dict[str, Any] = json.loads((out / "sweeps" / name / "sweep_summary.json").read_text())
    return data


# --------------------------------------------------------------------------- the grid file


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ('[sweep]\nstage = "attack"\n[axes]\n"attack.eps" = [0.1]\n', "needs a model"),
        ('[sweep]\nstage = "sweep"\n[axes]\nx = [1]\n', "stage"),
        ('[sweep]\nname = "x"\n', "[sweep] stage is missing"),
        ('[sweep]\nstage = "train"\n[axes]\n"train.epochz" = [1, 2]\n', "epochz"),
        ('[sweep]\nstage = "train"\n[axes]\n"data.dataset" = ["mnist", "mnist-mini"]\n', "[data] section is fixed"),
        ('[sweep]\nstage = "train"\n[axes]\nepochs = 3\n', "expected a non-empty list"),
        ('[sweep]\nstage = "train"\n[axes]\nepochs = [1, 1]\n', "listed twice"),
        ('[sweep]\nstage = "train"\n[axes]\nepochs = [1, 0]\n', "epochs = 0"),
        ('[sweep]\nstage = "train"\n[axes]\n', "[axes] is empty"),
        ('[sweep]\nstage = "train"\n[attack]\neps = 0.1\n[axes]\nepochs = [1]\n', "[attack] is not read"),
        ('[sweep]\nstage = "train"\nname = "../x"\n[axes]\nepochs = [1]\n', "'../x'"),
        ('[sweep]\nstage = "defend"\n[axes]\nmodel = ["a.json"]\n', "trains its own model"),
        ('[sweep]\nstage = "attack"\nmodel = "missing.json"\n[axes]\neps = [0.1]\n', "missing.json"),
        ('[sweep]\nstage = "train"\n[axes]\nepochs = [1, 2]\nlr = [0.1, 0.2]\nseed = ' + str(list(range(3000)))
         + "\n", "more than 10000"),
        ('[sweep]\nstage = "train"\n[axes]\nseed = [1979-05-27]\n', "numbers, strings or booleans"),
        ('[sweep]\nstage = "train"\n[axes]\nlr = [0.1, 0.1000]\nepochs = [1, 1.0]\n', "listed twice"),
        ('[sweep]\nstage = "attack"\nmodel = "a\\u0000b.json"\n[axes]\neps = [0.1]\n', "not a usable path"),
        ('[sweep]\nstage = "train"\nnum_cpus = 0\n[axes]\nepochs = [1]\n', "num_cpus"),
        ("[sweep\n", "grid file"),
    ],
)
def test_a_bad_grid_file_is_one_error_before_anything_runs(tmp_path: Path, text: str, needle: str) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_grid(path)
    assert needle in str(info.value) and "\n" not in str(info.value)
    assert "--config" not in str(info.value)  # the grid is an argument, not --config


def test_the_grid_is_the_product_of_the_axes_with_stable_readable_cell_names(tmp_path: Path,
                                                                             tiny_model_dir: Path) -> None:
    model = tiny_model_dir / "models" / "baseline.json"
    grid = load_grid(_grid(tmp_path, model, '"attack.eps" = [0.1, 0.3]\nattack = ["fgsm", "pgd"]\nsteps = [5]\n'))
    assert [c.axes for c in grid.cells] == [
        {"attack.eps": e, "attack": a, "steps": 5} for e in (0.1, 0.3) for a in ("fgsm", "pgd")
    ]
    assert [c.configs["attack"].eps for c in grid.cells] == [0.1, 0.1, 0.3, 0.3]
    assert grid.cells[0].cell_id.startswith("eps-0.1_attack-fgsm_steps-5-")
    assert all(Path(str(c.model)).is_absolute() for c in grid.cells)  # a Ray worker runs in its own folder
    assert len({c.key for c in grid.cells}) == 4
    again = load_grid(_grid(tmp_path, model, '"attack.eps" = [0.1, 0.3]\nattack = ["fgsm", "pgd"]\nsteps = [5]\n'))
    assert [c.cell_id for c in again.cells] == [c.cell_id for c in grid.cells]
    assert [c.key for c in again.cells] == [c.key for c in grid.cells]


# --------------------------------------------------------------------------- on local Ray


def test_a_2x2_grid_on_local_ray_equals_the_stage_run_alone(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    model = tiny_model_dir / "models" / "baseline.json"
    grid = _grid(tmp_path, model, '"attack.eps" = [0.1, 0.2]\nattack = ["fgsm", "pgd"]\n')
    out = tmp_path / "out"
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    summary = _summary(out)
    assert summary["counts"] == {"cells": 4, "done": 4, "failed": 0, "reused": 0}
    assert summary["engine"]["engine"] == "ray" and summary["engine"]["cpus"] >= 1
    assert (out / "report.html").is_file() and "Sweeps" in (out / "report.html").read_text()
    assert sorted(p.name for p in (out / "sweeps" / "g" / "images").iterdir()) == [
        "sweep_heatmap.png", "sweep_metric_vs_axis.png"
    ]  # fmt: skip
    # one cell against the same stage run alone (one thread, as a cell with num_cpus = 1 runs)
    cell = next(c for c in summary["cells"] if c["axes"] == {"attack.eps": 0.2, "attack": "pgd"})
    alone = tmp_path / "alone"
    proc = cli("attack", "--model", str(model), "--attack", "pgd", "--steps", "10", "--eps", "0.2", "--n-examples",
               "100", "--no-checks", "--device", "cpu", "--dataset", "mnist-mini", "--out", str(alone),
               env={"OMP_NUM_THREADS": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    in_sweep = json.loads((out / "sweeps" / "g" / cell["cell"] / cell["result"]).read_text())
    by_itself = json.loads((alone / "metrics" / "baseline_pgd_metrics.json").read_text())
    assert _without_timing(in_sweep) == _without_timing(by_itself)
    assert cell["metrics"]["robust_accuracy"] == by_itself["metrics"]["robust_accuracy"]
    # a second run reuses every finished cell and starts no Ray
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.returncode == 0 and _summary(out)["counts"]["reused"] == 4
    assert _summary(out)["engine"]["engine"] == "none"


def test_a_failing_cell_is_recorded_and_the_others_go_on(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    good = tiny_model_dir / "models" / "baseline.json"
    bad_dir = tmp_path / "bad" / "models"
    bad_dir.mkdir(parents=True)
    shutil.copy(good, bad_dir / "baseline.json")
    weights = (tiny_model_dir / "models" / "baseline.safetensors").read_bytes()
    (bad_dir / "baseline.safetensors").write_bytes(weights[:-1] + bytes([weights[-1] ^ 1]))  # tampered
    grid = _grid(tmp_path, [good, bad_dir / "baseline.json"], '"attack.eps" = [0.1, 0.2]\n',
                 attack='attack = "fgsm"\n')  # fmt: skip
    out = tmp_path / "out"
    proc = cli("sweep", str(grid), "--out", str(out))
    assert proc.returncode == 1, proc.stderr
    summary = _summary(out)
    assert summary["counts"] == {"cells": 4, "done": 2, "failed": 2, "reused": 0}
    failed = [c for c in summary["cells"] if c["status"] == "failed"]
    assert all("SHA-256 mismatch" in c["error"] and "\n" not in c["error"] for c in failed)
    assert all(str(bad_dir) in json.dumps(c["axes"]) for c in failed)
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("redblue: failed cells:") and all(c["cell"] in last for c in failed)


def test_a_sweep_killed_with_kill_9_resumes_with_the_missing_cells_only(tmp_path: Path,
                                                                        tiny_model_dir: Path) -> None:
    model = tiny_model_dir / "models" / "baseline.json"
    grid = _grid(tmp_path, model, '"attack.eps" = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3]\n',
                 attack='attack = "pgd"\nsteps = 40\n')  # fmt: skip
    out = tmp_path / "out"
    command = [sys.executable, "-m", "redblue", "sweep", str(grid), "--out", str(out)]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not list((out / "sweeps" / "g").glob("*/cell.json")):
            time.sleep(0.2)
        assert list((out / "sweeps" / "g").glob("*/cell.json")), "no cell finished in 5 minutes"
    finally:
        family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep, and the local Ray it started
        for child in family:
            with contextlib.suppress(psutil.Error):
                child.kill()
        proc.wait(timeout=60)
    done_before = {p.parent.name: p.stat().st_mtime_ns for p in (out / "sweeps" / "g").glob("*/cell.json")}
    assert 1 <= len(done_before) < 6 and not (out / "sweeps" / "g" / "sweep_summary.json").exists()
    resumed = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert resumed.returncode == 0, resumed.stderr
    summary = _summary(out)
    assert summary["counts"]["done"] == 6 and summary["counts"]["reused"] == len(done_before)
    assert {c["cell"] for c in summary["cells"] if c["reused"]} == set(done_before)
    for cell, mtime in done_before.items():  # finished cells were not run again
        assert (out / "sweeps" / "g" / cell / "cell.json").stat().st_mtime_ns == mtime


# --------------------------------------------------------------------------- report


def test_the_sweep_plots_and_table_come_from_the_summary_alone(tmp_path: Path) -> None:
    cells = [
        {"cell": f"c{i}", "axes": {"attack.eps": eps, "model": model}, "status": "done", "seconds": 1.0,
         "metrics": {"robust_accuracy": acc, "clean_accuracy": 0.9}, "error": None, "result": "m.json", "reused": False}
        for i, (eps, model, acc) in enumerate([(0.1, "a.json", 0.8), (0.3, "a.json", 0.2), (0.1, "b.json", 0.9)])
    ] + [{"cell": "c3", "axes": {"attack.eps": 0.3, "model": "b.json"}, "status": "failed", "seconds": 0.5,
          "metrics": {}, "error": "boom", "result": None, "reused": False}]  # fmt: skip
    summary = {"schema": {"name": "redblue.sweep", "version": 1}, "name": "s", "stage": "attack",
               "axes": {"attack.eps": [0.1, 0.3], "model": ["a.json", "b.json"]}, "fixed": {}, "cells": cells,
               "counts": {"cells": 4, "done": 3, "failed": 1, "reused": 0}, "seconds": 3.0,
               "engine": {"engine": "ray", "cpus": 2.0}}  # fmt: skip
    assert main_metric(summary) == "robust_accuracy"
    assert [r["cell"] for r in sorted_rows(summary)] == ["c2", "c0", "c1", "c3"]
    root = tmp_path / "out" / "sweeps" / "s"
    root.mkdir(parents=True)
    (root / "sweep_summary.json").write_text(json.dumps(summary))
    paths = render_sweep_plots(root, summary)
    assert [p.name for p in paths] == ["sweep_metric_vs_axis.png", "sweep_heatmap.png"]
    html, _ = render_report(tmp_path / "out")  # a folder with only a sweep renders
    text = html.read_text()
    assert "failed: boom" in text and text.index("90.00%") < text.index("80.00%") < text.index("20.00%")


def test_ray_is_pinned_and_needs_no_setup() -> None:
    constraints = (Path(__file__).resolve().parents[1] / "constraints.txt").read_text()
    assert any(line.startswith("ray==") for line in constraints.splitlines())
    proc = subprocess.run([sys.executable, "-c", "import ray; print(ray.__version__)"], capture_output=True,
                          text=True, timeout=120, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr


def test_a_bad_grid_is_one_line_exit_2_from_the_cli(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "g.toml"
    path.write_text('[sweep]\nstage = "train"\n[axes]\nepochs = [1, 0]\n')
    one_line_exit_2(cli("sweep", str(path), "--out", str(tmp_path / "out")), "g.toml", "epochs")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("stage", "settings", "axes", "result"),
    [
        ("train", "[train]\nepochs = 1\ndevice = \"cpu\"\n", "seed = [0, 1]\n", "baseline_metrics.json"),
        ("evaluate", "", "model = [\"{model}\"]\n", "baseline_evaluate_metrics.json"),
        ("poison", "[train]\nepochs = 1\ndevice = \"cpu\"\n", "\"poison.rate\" = [0.05]\n", "poison_metrics.json"),
    ],
)
def test_every_stage_records_its_result_and_resumes(tmp_path: Path, tiny_model_dir: Path, mini: Any, stage: str,
                                                    settings: str, axes: str, result: str) -> None:
    model = tiny_model_dir / "models" / "baseline.json"
    path = tmp_path / "grid.toml"
    path.write_text(f'[sweep]\nstage = "{stage}"\nname = "s"\n[data]\ndataset = "mnist-mini"\n{settings}'
                    f"[axes]\n{axes.format(model=model)}")  # fmt: skip
    grid = load_grid(path, mini)
    out = tmp_path / "out"
    first = run_sweep(grid, out, mini, progress=False, runner=run_sequentially)
    assert first.counts["done"] == len(grid.cells) and first.counts["reused"] == 0, first.cells
    for cell in first.cells:
        assert cell["result"] == f"metrics/{result}"
        assert (out / "sweeps" / "s" / cell["cell"] / cell["result"]).is_file()
    again = run_sweep(grid, out, mini, progress=False, runner=run_sequentially)
    assert again.counts["reused"] == len(grid.cells) and again.engine["engine"] == "none"


def test_a_grid_checked_for_other_data_is_refused(tmp_path: Path, tiny_model_dir: Path, mini: Any) -> None:
    grid = load_grid(_grid(tmp_path, tiny_model_dir / "models" / "baseline.json", "eps = [0.1]\n"), mini)
    with pytest.raises(ConfigError, match=r"load_grid\(path, data\)"):
        run_sweep(grid, tmp_path / "out", mini.subset(n_test=10), progress=False, runner=run_sequentially)
    unkeyed = load_grid(_grid(tmp_path, tiny_model_dir / "models" / "baseline.json", "eps = [0.1]\n"))
    with pytest.raises(ConfigError, match=r"load_grid\(path, data\)"):  # keys without the data's hashes
        run_sweep(unkeyed, tmp_path / "out", mini, progress=False, runner=run_sequentially)


def test_a_cell_no_node_can_hold_is_one_line_not_a_hang(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    grid = _grid(tmp_path, tiny_model_dir / "models" / "baseline.json", "eps = [0.1]\n")
    grid.write_text(grid.read_text().replace('name = "g"', 'name = "g"\nnum_cpus = 1000'))
    line = one_line_exit_2(cli("sweep", str(grid), "--out", str(tmp_path / "out")), "num_cpus = 1000", "no node")
    assert "largest" in line


def test_a_bad_ray_address_is_one_line(cli: Cli, tmp_path: Path, tiny_model_dir: Path) -> None:
    grid = _grid(tmp_path, tiny_model_dir / "models" / "baseline.json", "eps = [0.1]\n")
    one_line_exit_2(cli("sweep", str(grid), "--out", str(tmp_path / "out"), "--ray-address", "host:abc"),
                    "--ray-address host:abc")  # fmt: skip


def test_a_tampered_sweep_summary_is_skipped_by_the_report(cli: Cli, tmp_path: Path) -> None:
    root = tmp_path / "out" / "sweeps" / "s"
    root.mkdir(parents=True)
    summary = {"schema": {"name": "redblue.sweep", "version": 1}, "name": "s", "stage": "attack",
               "axes": {"eps": [0.1, 0.3], "attack": ["fgsm", "pgd"]}, "fixed": {},
               "cells": [{"cell": "c0", "axes": {"eps": 0.2, "other": 1}, "status": "done", "seconds": 1.0,
                          "metrics": {"robust_accuracy": 0.5}, "error": None, "result": None, "reused": False}],
               "counts": {"cells": 1, "done": 1, "failed": 0, "reused": 0}, "seconds": 1.0, "engine": {}}  # fmt: skip
    (root / "sweep_summary.json").write_text(json.dumps(summary))  # axis values that are not on the axes
    proc = cli("report", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    (root / "sweep_summary.json").write_text('{"schema": {"name": "redblue.sweep", "version": 1}}')
    proc = cli("report", "--out", str(tmp_path / "out"))
    assert proc.returncode == 0 and "sweep not shown" in proc.stderr, proc.stderr
