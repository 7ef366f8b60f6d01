"""Sweeps: a grid of stage runs (models x attacks x budgets, recipes x eps, poison rates x
trigger sizes, ...) scheduled on Ray, from a laptop to a cluster.

A grid file is a redblue config file with two more sections::

    [sweep]
    stage = "attack"        # train | evaluate | attack | defend | poison
    name = "eps-grid"       # results under OUT/sweeps/NAME/ (default: the file's stem)
    num_cpus = 1            # what one cell needs (Ray schedules by it)
    num_gpus = 0
    model = "out/models/baseline.json"   # attack / evaluate: the model, unless it is an axis

    [data]                  # fixed settings, exactly as in a config file
    dataset = "mnist"
    [attack]
    attack = "pgd"
    n_examples = 500

    [axes]                  # the grid is the product of these lists
    "attack.eps" = [0.1, 0.2, 0.3]       # SECTION.KEY, or KEY for the stage's own section
    model = ["out/models/baseline.json", "out/models/advtrain.json"]

Every cell is one stage run with the stage's usual outputs under ``OUT/sweeps/NAME/<cell>/``
and a ``cell.json`` (schema ``redblue.sweep_cell``) written when it ends. A cell whose
``cell.json`` says done with the same key (the SHA-256 of its settings, its model's weights
and the dataset's identity) is not run again, so a sweep killed with ``kill -9`` and started
again runs only the missing cells. A cell that fails is recorded with its one-line error and
the others go on. ``OUT/sweeps/NAME/sweep_summary.json`` (schema ``redblue.sweep``) has one
row per cell. Paths in a grid file (``model``, ``data_dir``) are relative to the grid file.

Ray runs the cells: a local instance (dashboard and usage statistics off) with this
machine's CPUs and GPUs, or the cluster at ``ray_address``. The dataset is loaded once by
the driver and put in Ray's object store; cells read it from there.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from redblue.artifacts import load_model, read_record
from redblue.config import (
    AttackConfig,
    ConfigFile,
    DataConfig,
    DefendConfig,
    PoisonConfig,
    TrainConfig,
    build,
    load_toml,
    preset_bases,
)
from redblue.data import Dataset
from redblue.errors import ConfigError, IntegrityError, RedblueError
from redblue.report.stage_plots import render_stage_plots
from redblue.results import Result, SweepCellResult, SweepResult, validate_result
from redblue.stages import attack_stage, defend_stage, evaluate_stage, poison_stage, train_baseline
from redblue.utils import atomic_write_json, one_line, read_json, resolve_device, sha256_json
from redblue.validate import check_choice, check_float, check_name

SWEEP_STAGES = ("train", "evaluate", "attack", "defend", "poison")
STAGE_SECTIONS: dict[str, tuple[str, ...]] = {
    "train": ("train",),
    "evaluate": (),
    "attack": ("attack",),
    "defend": ("train", "defend"),
    "poison": ("train", "poison"),
}
"""The config sections each stage reads (besides ``[data]``, which is fixed per sweep)."""
SECTION_CLASSES: dict[str, type[Any]] = {
    "train": TrainConfig, "attack": AttackConfig, "defend": DefendConfig, "poison": PoisonConfig,
}  # fmt: skip
NEEDS_MODEL = ("evaluate", "attack")
MAX_CELLS = 10_000
CELL_FORMAT = "redblue.sweep_cell"


@dataclass(frozen=True)
class SweepConfig:
    """The ``[sweep]`` section: which stage every cell runs, and what one cell needs."""

    stage: str
    name: str
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    model: str | None = None

    def __post_init__(self) -> None:
        check_choice("stage", self.stage, SWEEP_STAGES)
        check_name("name", self.name)
        check_float("num_cpus", self.num_cpus, 0.01, 1024.0)
        check_float("num_gpus", self.num_gpus, 0.0, 64.0)


@dataclass(frozen=True)
class Cell:
    """One point of the grid: its axis values and everything needed to run it."""

    cell_id: str
    axes: dict[str, Any]
    configs: dict[str, Any]  # section -> frozen config
    model: str | None
    key: str


@dataclass(frozen=True)
class Grid:
    """A parsed grid file: the sweep settings, the axes, the data config and every cell."""

    path: Path
    sweep: SweepConfig
    axes: dict[str, list[Any]]
    data: DataConfig
    cells: list[Cell]
    fixed: dict[str, dict[str, Any]]  # the stage's sections as the file sets them, before the axes
    data_identity: dict[str, Any] | None  # what the cells' keys were computed for (None: not yet)


# --------------------------------------------------------------------------- the grid file


def _axis_target(key: str, stage: str) -> tuple[str, str]:
    """(section, setting) an axis key names: ``SECTION.KEY``, ``KEY`` of the stage's own
    section, or ``model``."""
    if key == "model":
        if stage not in NEEDS_MODEL:
            raise ConfigError(f"[axes] model: stage {stage!r} trains its own model; only "
                              f"{' and '.join(NEEDS_MODEL)} take a model axis")  # fmt: skip
        return "sweep", "model"
    section, _, setting = key.rpartition(".")
    sections = STAGE_SECTIONS[stage]
    if not section:
        if not sections:
            raise ConfigError(f"[axes] {key}: stage {stage!r} has no settings to vary except model")
        section = sections[-1]
    if section not in sections:
        raise ConfigError(
            f"[axes] {key}: stage {stage!r} reads {', '.join(f'[{s}]' for s in sections) or 'no section'}"
            " (the [data] section is fixed for a whole sweep)"
        )
    names = {f.name for f in dataclasses.fields(SECTION_CLASSES[section])}
    if setting.replace("-", "_") not in names:
        raise ConfigError(f"[axes] {key}: [{section}] has no setting {setting!r}, expected one of {', '.join(sorted(names))}")
    return section, setting.replace("-", "_")


def _cell_id(axes: Mapping[str, Any]) -> str:
    """A readable, unique folder name for a cell: its axis values, then a short hash."""
    parts = []
    for key, value in axes.items():
        shown = Path(str(value)).stem if key == "model" else str(value)
        parts.append(f"{key.rpartition('.')[2]}-{shown}")
    readable = re.sub(r"[^A-Za-z0-9._+-]", "_", "_".join(parts))[:80].strip("._-") or "cell"
    digest = sha256_json(axes)[:8]
    return f"{readable}-{digest}" if readable[0].isalnum() else f"c{readable}-{digest}"


def _resolve(base: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str(path if path.is_absolute() else (base / path))


def _canonical(value: bool | float | str) -> tuple[str, object]:
    """``1`` and ``1.0`` are one value (the same setting); ``True`` and ``1`` are not."""
    if isinstance(value, bool):
        return ("bool", value)
    if isinstance(value, int | float):
        return ("number", float(value))
    return ("str", value)


def load_grid(path: str | Path, data: Dataset | None = None) -> Grid:
    """Parse and check a grid file: every cell's settings are built (and validated) here,
    before anything runs. ``data`` (when given) enters each cell's key."""
    grid_path = Path(path).absolute()  # cells may run elsewhere (a Ray worker's own folder)
    file = load_toml(grid_path, ("sweep", "axes", "data", "train", "attack", "defend", "poison"), option="grid file")
    raw_sweep = dict(file.section("sweep") or {})
    if "stage" not in raw_sweep:
        raise ConfigError(f"{grid_path}: [sweep] stage is missing, expected one of {', '.join(SWEEP_STAGES)}")
    raw_sweep.setdefault("name", grid_path.stem)
    sweep = build(SweepConfig, ConfigFile(grid_path, {"sweep": raw_sweep}), {}, "sweep")
    stage = sweep.stage
    allowed = {"sweep", "axes", "data", *STAGE_SECTIONS[stage]}
    for section in file.sections:
        if section not in allowed:
            raise ConfigError(f"{grid_path}: [{section}] is not read by stage {stage!r}; "
                              f"expected {', '.join(f'[{s}]' for s in sorted(allowed))}")  # fmt: skip
    base = grid_path.parent
    data_section = dict(file.section("data") or {})
    for key in ("data_dir", "cache_dir"):
        if isinstance(data_section.get(key), str):
            data_section[key] = _resolve(base, data_section[key])
    data_cfg = build(DataConfig, ConfigFile(grid_path, {"data": data_section}), {}, "data")

    axes: dict[str, list[Any]] = {}
    targets: dict[str, tuple[str, str]] = {}
    for key, values in (file.section("axes") or {}).items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{grid_path}: [axes] {key} = {values!r}: expected a non-empty list of values")
        if not all(isinstance(v, bool | int | float | str) for v in values):
            raise ConfigError(f"{grid_path}: [axes] {key}: values must be numbers, strings or booleans")
        if len({_canonical(v) for v in values}) != len(values):
            raise ConfigError(f"{grid_path}: [axes] {key}: a value is listed twice")
        try:
            targets[key] = _axis_target(key, stage)
        except ConfigError as exc:
            raise ConfigError(f"{grid_path}: {exc}") from None
        axes[key] = values
    if not axes:
        raise ConfigError(f"{grid_path}: [axes] is empty; name at least one setting to vary, e.g. \"attack.eps\" = [0.1, 0.3]")
    n_cells = 1
    for values in axes.values():
        n_cells *= len(values)
    if n_cells > MAX_CELLS:
        raise ConfigError(f"{grid_path}: [axes] make {n_cells} cells, more than {MAX_CELLS}")
    if stage in NEEDS_MODEL and "model" not in axes and sweep.model is None:
        raise ConfigError(f"{grid_path}: stage {stage!r} needs a model: [sweep] model = \"...\" or a model axis")

    data_identity = data.identity() if data is not None else None
    fixed = {s: dict(file.section(s) or {}) for s in STAGE_SECTIONS[stage]}
    model_hashes: dict[str, str] = {}
    cells = []
    for combo in itertools.product(*axes.values()):
        point = dict(zip(axes, combo, strict=True))
        sections = {s: dict(values) for s, values in fixed.items()}
        model = sweep.model
        for key, value in point.items():
            section, setting = targets[key]
            if section == "sweep":
                model = value
            else:
                sections[section][setting] = value
        where = ", ".join(f"{k} = {v!r}" for k, v in point.items())
        try:
            cell_file = ConfigFile(grid_path, sections)
            _, bases = preset_bases(None, cell_file) if "defend" in sections else (None, {})
            configs = {s: build(SECTION_CLASSES[s], cell_file, {}, s, base=bases.get(s)) for s in sections}
        except ConfigError as exc:
            raise ConfigError(f"{exc} (in the cell {where})") from None
        model_path = None
        if stage in NEEDS_MODEL:
            if not isinstance(model, str):
                raise ConfigError(f"{grid_path}: model {model!r}: expected the path of a model record (.json)")
            model_path = _resolve(base, model)
            if model_path not in model_hashes:
                try:
                    model_hashes[model_path] = str(read_record(Path(model_path)).get("weights_sha256"))
                except IntegrityError as exc:
                    raise ConfigError(f"{grid_path}: model {model!r}: {exc}") from None
        key = sha256_json(
            {
                "stage": stage,
                "configs": {s: dataclasses.asdict(c) for s, c in configs.items()},
                "model": model_hashes.get(model_path) if model_path else None,
                "data": data_identity or {"dataset": data_cfg.dataset},
            }
        )
        cells.append(Cell(_cell_id(point), point, configs, model_path, key))
    if len({c.cell_id for c in cells}) != len(cells):  # pragma: no cover - the hash makes ids unique
        raise ConfigError(f"{grid_path}: two cells share a folder name")
    return Grid(grid_path, sweep, axes, data_cfg, cells, fixed, data_identity)


# --------------------------------------------------------------------------- one cell


def key_metrics(result: Mapping[str, Any]) -> dict[str, float]:
    """The scalar numbers of a stage result's ``metrics`` (and each attack's robust accuracy)."""
    metrics = result.get("metrics") or {}
    out = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    for attack, values in (metrics.get("attacks") or {}).items():
        if isinstance(values, dict) and isinstance(values.get("robust_accuracy"), int | float):
            out[f"{attack}_accuracy"] = float(values["robust_accuracy"])
    return out


def _run_stage(cell: Cell, stage: str, data: Dataset, data_cfg: DataConfig, out: Path) -> Result:
    configs = cell.configs
    device = resolve_device((configs["attack"] if stage == "attack" else configs.get("train", TrainConfig())).device)
    if device.type != "cpu":
        data = data.to(device)
    if stage == "train":
        return train_baseline(out, data, configs["train"], data_cfg=data_cfg, progress=False)
    if stage == "defend":
        return defend_stage(out, data, configs["train"], configs["defend"], data_cfg=data_cfg, progress=False)
    if stage == "poison":
        return poison_stage(out, data, configs["train"], configs["poison"], data_cfg=data_cfg, progress=False)
    if cell.model is None:  # pragma: no cover - load_grid requires a model for these stages
        raise ConfigError(f"cell {cell.cell_id}: no model")
    loaded = load_model(Path(cell.model), device=device)
    if stage == "evaluate":
        return evaluate_stage(out, loaded, data)
    return attack_stage(out, loaded, data, configs["attack"], data_cfg=data_cfg)


def _result_file(out: Path, result: Result) -> str:
    """The stage's result JSON under ``out/metrics`` (stages name their files differently:
    ``baseline_metrics.json``, ``poison_metrics.json``, ``NAME_evaluate_metrics.json``)."""
    written = result.to_json()
    for path in sorted((out / "metrics").glob("*_metrics.json")):
        with contextlib.suppress(IntegrityError):
            saved = read_json(path)
            if saved.get("schema") == written["schema"] and saved.get("cache_key") == written.get("cache_key"):
                return f"metrics/{path.name}"
    raise IntegrityError(f"{out / 'metrics'}: the {written['schema']['name']} result was not written")


def cell_path(root: Path, cell: Cell) -> Path:
    return root / cell.cell_id / "cell.json"


def run_cell(cell: Cell, stage: str, data: Dataset, data_cfg: DataConfig, root: Path, num_threads: int = 0) -> dict[str, Any]:
    """Run one cell in this process and write its ``cell.json``; never raises for the cell's
    own failure (it is recorded with its one-line error). Returns the cell's row."""
    if num_threads > 0:
        torch.set_num_threads(num_threads)
    out = root / cell.cell_id
    start = time.perf_counter()
    metrics: dict[str, float] = {}
    result_file = error = None
    try:
        result = _run_stage(cell, stage, data, data_cfg, out)
        render_stage_plots(out, result)
        metrics = key_metrics(result)
        result_file = _result_file(out, result)
        status = "done"
    except Exception as exc:  # a cell's failure is recorded, never raised: the sweep goes on
        status = "failed"
        error = one_line(str(exc) if isinstance(exc, RedblueError | OSError) else f"{type(exc).__name__}: {exc}")
    record = SweepCellResult(cell=cell.cell_id, key=cell.key, stage=stage, axes=cell.axes, status=status,
                             seconds=round(time.perf_counter() - start, 3), metrics=metrics, result=result_file,
                             error=error)  # fmt: skip
    data_json = record.to_json()
    validate_result(data_json, "sweep_cell")
    atomic_write_json(cell_path(root, cell), data_json)
    return data_json


# --------------------------------------------------------------------------- the whole grid


def finished_cell(root: Path, cell: Cell) -> dict[str, Any] | None:
    """The ``cell.json`` of a cell that already ran to completion with the same key (and whose
    result file is still there), else None."""
    path = cell_path(root, cell)
    if not path.is_file():
        return None
    try:
        data = read_json(path)
        validate_result(data, "sweep_cell")
    except IntegrityError:
        return None
    if data["key"] != cell.key or data["status"] != "done":
        return None
    if data["result"] and not (root / cell.cell_id / data["result"]).is_file():
        return None
    result: dict[str, Any] = data
    return result


def _failed_row(root: Path, cell: Cell, stage: str, error: str) -> dict[str, Any]:
    record = SweepCellResult(cell=cell.cell_id, key=cell.key, stage=stage, axes=cell.axes, status="failed",
                             seconds=0.0, metrics={}, result=None, error=one_line(error)).to_json()  # fmt: skip
    with contextlib.suppress(OSError):
        atomic_write_json(cell_path(root, cell), record)
    return record


@contextlib.contextmanager
def ray_session(address: str | None) -> Iterator[dict[str, Any]]:
    """A Ray instance for the sweep: the cluster at ``address``, or a local one started here
    with this machine's CPUs and GPUs; dashboard and usage statistics off. Yields what the
    engine is (for the summary); shuts down what it started."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray  # deferred: a second or two to import, and only sweeps need it

    started = False
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.ERROR}
        try:
            if address:
                ray.init(address=address, **options)
            else:
                ray.init(num_cpus=os.cpu_count() or 1, num_gpus=torch.cuda.device_count(), **options)
        except (ValueError, ConnectionError, RuntimeError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            where = f"--ray-address {address}" if address else "local Ray instance"
            raise ConfigError(f"{where}: cannot start or connect ({one_line(first)})") from None
        started = True
    try:
        resources = ray.cluster_resources()
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        yield {
            "engine": "ray",
            "ray_version": ray.__version__,
            "address": address or "local",
            "cpus": float(resources.get("CPU", 0.0)),
            "gpus": float(resources.get("GPU", 0.0)),
            "nodes": len(nodes),
            "most_cpus_on_a_node": max((float(n["Resources"].get("CPU", 0.0)) for n in nodes), default=0.0),
            "most_gpus_on_a_node": max((float(n["Resources"].get("GPU", 0.0)) for n in nodes), default=0.0),
        }
    finally:
        if started:
            ray.shutdown()


def check_fits(sweep: SweepConfig, engine: Mapping[str, Any]) -> None:
    """ConfigError when no node can hold one cell (Ray would keep it pending for ever)."""
    import ray  # deferred, see ray_session

    fits = any(
        float(n["Resources"].get("CPU", 0.0)) >= sweep.num_cpus and float(n["Resources"].get("GPU", 0.0)) >= sweep.num_gpus
        for n in ray.nodes()
        if n.get("Alive")
    )
    if not fits:
        raise ConfigError(
            f"[sweep] num_cpus = {sweep.num_cpus:g}, num_gpus = {sweep.num_gpus:g}: no node of the Ray instance "
            f"({engine['address']}) has that much (the largest has {engine['most_cpus_on_a_node']:g} CPUs; "
            f"the most GPUs on a node: {engine['most_gpus_on_a_node']:g})"
        )


def _run_on_ray(
    todo: list[Cell], grid: Grid, data: Dataset, root: Path, address: str | None,
    on_done: Callable[[dict[str, Any]], None], on_start: Callable[[int], None],
) -> dict[str, Any]:  # fmt: skip
    import ray  # deferred, see ray_session

    sweep = grid.sweep
    with ray_session(address) as engine:
        check_fits(sweep, engine)
        slots = int(engine["cpus"] // sweep.num_cpus)
        if sweep.num_gpus:
            slots = min(slots, int(engine["gpus"] // sweep.num_gpus))
        on_start(max(1, slots))
        data_ref = ray.put(data)  # once: every cell reads it from the object store
        remote = ray.remote(num_cpus=sweep.num_cpus, num_gpus=sweep.num_gpus, max_retries=0)(run_cell)
        threads = max(1, int(sweep.num_cpus))
        pending = {remote.remote(cell, sweep.stage, data_ref, grid.data, root, threads): cell for cell in todo}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            for ref in ready:
                cell = pending.pop(ref)
                try:
                    row = ray.get(ref)
                except ray.exceptions.RayError as exc:  # the worker died (killed, out of memory, ...)
                    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                    row = _failed_row(root, cell, sweep.stage, f"{type(exc).__name__}: {first}")
                on_done(row)
    return engine


def run_sweep(
    grid: Grid,
    out: Path,
    data: Dataset,
    *,
    ray_address: str | None = None,
    progress: bool = True,
    runner: Callable[..., dict[str, Any]] | None = None,
) -> SweepResult:
    """Run every cell of ``grid`` that has not finished yet (on Ray, or with ``runner``, which
    takes the cells still to run and a callback per finished cell), then write
    ``OUT/sweeps/NAME/sweep_summary.json``. Returns the summary."""
    from tqdm import tqdm

    if grid.data_identity != data.identity():
        raise ConfigError(f"{grid.path}: the cells' keys must name this dataset: load the grid with "
                          "load_grid(path, data) for the data it runs on")  # fmt: skip
    root = out.absolute() / "sweeps" / grid.sweep.name  # absolute: cells may run in another folder
    rows: dict[str, dict[str, Any]] = {}
    todo = []
    for cell in grid.cells:
        done = finished_cell(root, cell)
        if done is not None:
            rows[cell.cell_id] = {**done, "reused": True}
        else:
            todo.append(cell)
    start = time.perf_counter()
    engine: dict[str, Any] = {"engine": "none", "reason": "every cell had finished before"}
    failed: list[str] = []
    slots = [1]  # cells that can run at once (Ray's CPUs and GPUs / what a cell asks for)
    bars: list[Any] = []  # opened once the engine runs (no bar when it fails to start)

    def show() -> None:
        left = len(grid.cells) - len(rows)
        bars[0].set_postfix(running=min(left, slots[0]), queued=max(0, left - slots[0]), failed=len(failed))

    def on_start(capacity: int) -> None:
        slots[0] = capacity
        bars.append(tqdm(total=len(grid.cells), initial=len(rows), desc=f"sweep {grid.sweep.name}", unit="cell",
                         disable=not progress, file=sys.stderr))  # fmt: skip
        show()

    def on_done(row: dict[str, Any]) -> None:
        rows[row["cell"]] = {**row, "reused": False}
        if row["status"] != "done":
            failed.append(row["cell"])
        bars[0].update(1)
        show()

    try:
        if todo:
            if runner is None:
                engine = _run_on_ray(todo, grid, data, root, ray_address, on_done, on_start)
            else:
                on_start(1)
                engine = runner(todo, grid, data, root, on_done)
    finally:
        for bar in bars:
            bar.close()
    cells = []
    for cell in grid.cells:
        row = rows.get(cell.cell_id)
        if row is None:  # pragma: no cover - every cell reports back or raises
            continue
        cells.append({k: row[k] for k in ("cell", "axes", "status", "seconds", "metrics", "error", "result")}
                     | {"reused": row["reused"]})  # fmt: skip
    counts = {
        "cells": len(grid.cells),
        "done": sum(1 for c in cells if c["status"] == "done"),
        "failed": sum(1 for c in cells if c["status"] != "done"),
        "reused": sum(1 for c in cells if c["reused"]),
    }
    fixed = {
        **grid.fixed,
        "data": dataclasses.asdict(grid.data),
        "model": grid.sweep.model,
        "num_cpus": grid.sweep.num_cpus,
        "num_gpus": grid.sweep.num_gpus,
    }
    summary = SweepResult(name=grid.sweep.name, stage=grid.sweep.stage, axes=grid.axes, fixed=fixed, cells=cells,
                          counts=counts, seconds=round(time.perf_counter() - start, 3), engine=engine)  # fmt: skip
    data_json = summary.to_json()
    validate_result(data_json, "sweep")
    atomic_write_json(root / "sweep_summary.json", data_json)
    return summary


def run_sequentially(
    todo: list[Cell], grid: Grid, data: Dataset, root: Path, on_done: Callable[[dict[str, Any]], None]
) -> dict[str, Any]:
    """A ``runner`` for :func:`run_sweep` without Ray: the cells one after another in this
    process (what the sweep benchmark compares Ray with)."""
    for cell in todo:
        on_done(run_cell(cell, grid.sweep.stage, data, grid.data, root))
    return {"engine": "sequential", "cpus": float(torch.get_num_threads())}
