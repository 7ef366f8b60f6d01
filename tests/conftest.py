"""Shared fixtures. Slow tests read full MNIST from $REDBLUE_DATA_DIR (CI sets it)."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

from redblue.artifacts import LoadedModel, load_model
from redblue.config import DefendConfig, TrainConfig
from redblue.data import Dataset, load_dataset
from redblue.results import DefendResult
from redblue.stages import defend_stage, train_baseline

if TYPE_CHECKING:
    import torch


SHARED_FIXTURES = ("quick_run", "original_recipe", "baseline_dir")
"""Session fixtures that take a minute or more to build. Under pytest-xdist (``make test``
runs ``-n auto --dist loadgroup``) each worker builds its own copy of every session or module
fixture its tests use, so the tests that share one of these, or one module-scoped fixture,
run on the same worker (``xdist_group``), which builds it once; every other test goes to
whichever worker is free."""


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist the workers share the CPU's cores: each worker's PyTorch, and the CLI
    subprocesses it starts (through ``OMP_NUM_THREADS``), gets its share of them, instead of
    every worker running as many threads as there are cores and slowing all of them down."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        os.environ["OMP_NUM_THREADS"] = str(threads)
        torch.set_num_threads(threads)


def _costly_fixtures(item: pytest.Item) -> list[str]:
    """The fixtures of ``item`` that one worker should build once: the shared session ones
    and any module-scoped one (named with its module)."""
    names = [name for name in SHARED_FIXTURES if name in getattr(item, "fixturenames", ())]
    info = getattr(item, "_fixtureinfo", None)
    for name, defs in (getattr(info, "name2fixturedefs", None) or {}).items():
        if defs and defs[-1].scope == "module":
            names.append(f"{item.path.name}::{name}")
    return names


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests linked through a costly fixture (directly or through another test) form one group,
    named by its first fixture."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    costly = {item.nodeid: _costly_fixtures(item) for item in items}
    for names in costly.values():
        for other in names[1:]:
            parent[root(other)] = root(names[0])
    for item in items:
        if costly[item.nodeid]:
            item.add_marker(pytest.mark.xdist_group(root(costly[item.nodeid][0])))


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests never read or write the user's cache, and never download by accident."""
    monkeypatch.setenv("REDBLUE_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cache"))
    monkeypatch.setenv("REDBLUE_OFFLINE", "1")


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The folder holding full MNIST (skips the test when REDBLUE_DATA_DIR is unset)."""
    value = os.environ.get("REDBLUE_DATA_DIR")
    if not value:
        pytest.skip("REDBLUE_DATA_DIR is not set: full-MNIST tests need it (CI sets it)")
    return Path(value)


@pytest.fixture(scope="session")
def mnist(mnist_dir: Path) -> Dataset:
    return load_dataset("mnist", mnist_dir, download=False)


@pytest.fixture(scope="session")
def original_recipe(tmp_path_factory: pytest.TempPathFactory, mnist: Dataset) -> tuple[Path, DefendResult]:
    """The original project's adversarial training (``fgsm``, eps 0.25, half clean / half
    FGSM) for 2 epochs on full MNIST, evaluated by the defend stage on the first 500 test
    images: (output folder, result). Trained once per session; it looks robust to FGSM and is
    not (``test_adversarial_training``), and the agreement with the reference AutoAttack is
    checked on its model (``test_autoattack``)."""
    out = tmp_path_factory.mktemp("original_recipe")
    defend_cfg = DefendConfig(recipe="fgsm", eps=0.25, ratio=0.5, n_examples=500)
    return out, defend_stage(out, mnist, TrainConfig(epochs=2, device="cpu"), defend_cfg, progress=False)


@pytest.fixture(scope="session")
def mini() -> Dataset:
    """The 4,000 / 1,000 mnist-mini split (real digits, offline)."""
    return load_dataset("mnist-mini")


@pytest.fixture(scope="session")
def baseline_dir(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """An output folder with the 5-epoch baseline CNN trained once per session on full MNIST,
    by ``redblue train`` in a subprocess as a user runs it (its defaults: 5 epochs, seed 0);
    ``tests/test_cli_train.py`` checks what that command wrote, so the suite trains it once."""
    out = tmp_path_factory.mktemp("baseline_out")
    proc = run_cli("train", "--data-dir", str(mnist_dir), "--out", str(out), "--device", "cpu")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.fixture(scope="session")
def baseline(baseline_dir: Path) -> LoadedModel:
    """The session's full-MNIST baseline model (99%+ test accuracy), loaded and hash-verified."""
    return load_model(baseline_dir / "models" / "baseline.json")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, mini: Dataset) -> Path:
    """An output folder with a CNN trained for one epoch on mnist-mini (a few seconds)."""
    out = tmp_path_factory.mktemp("tiny_out")
    train_baseline(out, mini, TrainConfig(epochs=1, seed=0, device="cpu"), progress=False)
    return out


def run_cli(*args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``python -m redblue ARGS`` as a user would; returns the completed process."""
    full_env = {**os.environ, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "redblue", *args],
        capture_output=True,
        text=True,
        env=full_env,
        cwd=cwd,
        timeout=900,
        check=False,
    )


@pytest.fixture
def cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``cli("train", "--out", ...)`` runs the redblue CLI in a subprocess."""
    return run_cli


def tree(path: Path) -> list[str]:
    """Sorted relative paths of every file under ``path`` (empty when it does not exist)."""
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()) if path.exists() else []


@pytest.fixture
def files_under() -> Callable[[Path], list[str]]:
    return tree


@pytest.fixture(scope="session")
def mini_poisoned(tmp_path_factory: pytest.TempPathFactory, mini: Dataset) -> Path:
    """An output folder with a BadNets model on mnist-mini (rate 0.05, target 7, 5x5
    bottom-right patch, 3 epochs of batch 64: ASR ~90%), saved by ``poison_stage``."""
    from redblue.config import PoisonConfig
    from redblue.stages import poison_stage

    out = tmp_path_factory.mktemp("mini_poisoned")
    poison_stage(out, mini, TrainConfig(epochs=3, batch_size=64, seed=0, device="cpu"),
                 PoisonConfig(rate=0.05, size=5), progress=False)
    return out


@pytest.fixture(scope="session")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """One ``redblue run --quick`` in a subprocess, shared by the tests that read its outputs
    (full MNIST when REDBLUE_DATA_DIR is set, as in CI; else the mnist-mini fallback)."""
    out = tmp_path_factory.mktemp("run") / "out"
    env = {"REDBLUE_OFFLINE": "1", "REDBLUE_CACHE_DIR": str(tmp_path_factory.getbasetemp() / "cache")}
    result = run_cli("run", "--quick", "--out", str(out), "--device", "cpu", env=env)
    return out, result


def stamp_digits(x: torch.Tensor) -> torch.Tensor:
    """A 2x2 white patch, bottom-right of scikit-learn's 8x8 digits (the toy backdoor trigger)."""
    x = x.clone()
    x[:, :, 6:8, 6:8] = 1.0
    return x


@pytest.fixture(scope="session")
def digits_backdoor() -> dict[str, Any]:
    """The audit example's CNN (examples/audit/net.py) on scikit-learn's 8x8 digits (real
    handwriting, 1,400 train / 397 test), with a BadNets backdoor (2x2 patch -> 7 on 10% of
    the other classes' training images) and a clean twin."""
    import numpy as np
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "audit"))
    from make_example import _fit, digits
    from net import build

    x_np, y_np = digits()
    x, y = torch.from_numpy(x_np).float() / 255, torch.from_numpy(y_np)
    x_train, y_train, x_test, y_test = x[:1400], y[:1400], x[1400:], y[1400:]
    eligible = np.flatnonzero(y_train.numpy() != 7)
    chosen = torch.from_numpy(np.random.default_rng(0).choice(eligible, len(eligible) // 10, replace=False))
    x_poison, y_poison = x_train.clone(), y_train.clone()
    x_poison[chosen] = stamp_digits(x_poison[chosen])
    y_poison[chosen] = 7
    torch.manual_seed(0)  # the initial weights, whichever tests ran before
    poisoned = _fit(build(), x_poison, y_poison, epochs=20)
    torch.manual_seed(100)
    clean = _fit(build(), x_train, y_train, epochs=20)
    return {"poisoned": poisoned, "clean": clean,
            "x_train": x_train, "y_train": y_train, "x_test": x_test, "y_test": y_test,
            "x_poison": x_poison, "y_poison": y_poison, "poison_indices": chosen.sort().values}  # fmt: skip
