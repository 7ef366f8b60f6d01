"""``--precision auto`` decides by measuring the model's training step, not by a CPU flag; the
choice is kept per machine and model, and measuring changes nothing about the training."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from redblue import precision as prec
from redblue.config import TrainConfig
from redblue.data import Dataset
from redblue.errors import ConfigError
from redblue.models import build_model
from redblue.train import fit


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A private, empty user cache and no choice remembered by this process."""
    monkeypatch.setenv("REDBLUE_CACHE_DIR", str(tmp_path))
    saved = dict(prec._choices)
    prec._choices.clear()
    yield tmp_path
    prec._choices.clear()
    prec._choices.update(saved)


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.5), nn.Flatten(), nn.Linear(4 * 26 * 26, 10)
    )


def _batch(n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


def _fake_timer(
    monkeypatch: pytest.MonkeyPatch, fp32_ms: float, bf16_ms: float, noise: float = 0.05, others: float | None = 0.0
) -> list[int]:
    calls: list[int] = []

    def fake(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int = prec.ROUNDS) -> prec.StepTimes:
        calls.append(int(x.shape[0]))
        return prec.StepTimes(fp32_ms, bf16_ms, noise, others)

    monkeypatch.setattr(prec, "measure_train_step", fake)
    return calls


def _cpu(monkeypatch: pytest.MonkeyPatch, flags: list[str]) -> None:
    monkeypatch.setattr(prec, "cpu_description", lambda: {"cpu": "Test CPU", "flags": flags})


def test_decide_needs_ten_percent() -> None:
    assert prec.BF16_MIN_SPEEDUP == 1.10
    assert prec.decide(11.0, 10.0) == "bf16"  # exactly 1.10x
    assert prec.decide(10.9, 10.0) == "fp32"
    assert prec.decide(10.0, 10.0) == "fp32"
    assert prec.decide(10.0, 20.0) == "fp32"


def test_the_measurement_decides_not_the_cpu_flag(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch()
    _cpu(monkeypatch, ["avx512_bf16", "amx_bf16"])  # native bf16, but measured slower
    _fake_timer(monkeypatch, 10.0, 12.0)
    slower = prec.choose_precision("auto", _net(), x, y)
    assert (slower.precision, slower.reason, slower.fp32_ms, slower.bf16_ms) == ("fp32", "measured", 10.0, 12.0)

    prec._choices.clear()
    _cpu(monkeypatch, [])  # no bf16 flag at all, but measured faster
    _fake_timer(monkeypatch, 20.0, 10.0)
    faster = prec.choose_precision("auto", _net(), x, y)
    assert (faster.precision, faster.reason) == ("bf16", "measured")


def test_asked_precisions_are_not_measured(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _fake_timer(monkeypatch, 20.0, 10.0)
    x, y = _batch()
    assert prec.choose_precision("fp32", _net(), x, y) == prec.PrecisionChoice("fp32", "asked")
    assert prec.choose_precision("bf16", _net(), x, y) == prec.PrecisionChoice("bf16", "asked")
    assert calls == [] and not (cache_dir / prec.CACHE_FILE).exists()
    with pytest.raises(ConfigError, match="expected auto, fp32 or bf16"):
        prec.choose_precision("fp16", _net(), x, y)


def test_the_choice_is_kept_per_model_and_batch_and_survives_the_process(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _fake_timer(monkeypatch, 20.0, 10.0)
    x, y = _batch()
    first = prec.choose_precision("auto", _net(), x, y)
    assert prec.choose_precision("auto", _net(), x, y) is first  # same process: remembered
    assert len(calls) == 1

    stored = json.loads((cache_dir / prec.CACHE_FILE).read_text())
    assert stored["format"] == prec.FORMAT
    (entry,) = stored["choices"].values()
    assert entry["precision"] == "bf16" and entry["fp32_ms"] == 20.0 and entry["bf16_ms"] == 10.0
    assert entry["cpu"] == prec.cpu_description()["cpu"]

    prec._choices.clear()  # a new process: read back from the user cache, not measured again
    _fake_timer(monkeypatch, 10.0, 20.0)  # would now say fp32
    again = prec.choose_precision("auto", _net(), x, y)
    assert (again.precision, again.reason, again.fp32_ms, again.bf16_ms) == ("bf16", "cached", 20.0, 10.0)
    assert again.noise is None and again.detail.startswith("measured 20")

    # Another batch shape or another architecture is measured for itself.
    other = _fake_timer(monkeypatch, 10.0, 20.0)
    assert prec.choose_precision("auto", _net(), *_batch(8)).precision == "fp32"
    assert prec.choose_precision("auto", build_model("cnn-small", seed=0), x, y).precision == "fp32"
    assert other == [8, 16]
    assert len(json.loads((cache_dir / prec.CACHE_FILE).read_text())["choices"]) == 3


@pytest.mark.parametrize(
    "content",
    [
        "not json",
        json.dumps({"format": "other", "choices": {}}),
        json.dumps({"format": prec.FORMAT, "choices": "x"}),
        "BAD-ENTRY",
        "INFINITE-ENTRY",
    ],
)
def test_a_damaged_cache_is_measured_again(cache_dir: Path, monkeypatch: pytest.MonkeyPatch, content: str) -> None:
    x, y = _batch()
    key = prec.cache_key(_net(), x)
    if content == "BAD-ENTRY":  # our format, but an entry that is not a measurement
        content = json.dumps({"format": prec.FORMAT, "choices": {key: {"precision": "fp16", "fp32_ms": -1}}})
    if content == "INFINITE-ENTRY":  # JSON that Python reads but cannot write back
        bad = {"fp32_ms": float("inf"), "bf16_ms": 1.0}
        content = json.dumps({"format": prec.FORMAT, "choices": {key: bad, "other": {"fp32_ms": float("nan")}}})
    (cache_dir / prec.CACHE_FILE).write_text(content)
    calls = _fake_timer(monkeypatch, 20.0, 10.0)
    choice = prec.choose_precision("auto", _net(), x, y)
    assert (choice.precision, choice.reason) == ("bf16", "measured") and calls == [16]
    stored = json.loads((cache_dir / prec.CACHE_FILE).read_text())  # rewritten with only sound entries
    assert stored["format"] == prec.FORMAT and list(stored["choices"]) == [key]


def test_a_busy_machine_is_measured_again_and_never_picks_bf16_from_noise(
    cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    x, y = _batch()
    calls = _fake_timer(monkeypatch, 20.0, 10.0, noise=0.9)  # other work competes for the cores every time
    busy = prec.choose_precision("auto", _net(), x, y)
    assert (busy.precision, busy.reason, busy.noise) == ("fp32", "measured-noisy", 0.9)
    assert calls == [16] * prec.ATTEMPTS
    assert prec.choose_precision("auto", _net(), x, y) is busy and len(calls) == prec.ATTEMPTS  # this process
    assert not (cache_dir / prec.CACHE_FILE).exists()  # but not kept for later runs

    prec._choices.clear()
    results = iter([prec.StepTimes(20.0, 10.0, 0.9), prec.StepTimes(20.0, 10.0, prec.MAX_NOISE, prec.MAX_OTHERS)])
    monkeypatch.setattr(prec, "measure_train_step", lambda *a, **k: next(results))
    settled = prec.choose_precision("auto", _net(), x, y)  # noisy, then quiet: the quiet one decides
    assert (settled.precision, settled.reason, settled.noise) == ("bf16", "measured", prec.MAX_NOISE)
    (entry,) = json.loads((cache_dir / prec.CACHE_FILE).read_text())["choices"].values()
    assert entry["precision"] == "bf16" and entry["noise"] == prec.MAX_NOISE and entry["others"] == prec.MAX_OTHERS


def test_steady_but_shared_cpu_counts_as_busy(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Beside another PyTorch job every step is slow but steady: only the other processes' CPU
    share shows it, and such a measurement never decides (it said fp32 for the original CNN)."""
    x, y = _batch()
    calls = _fake_timer(monkeypatch, 271.0, 252.0, noise=0.05, others=0.5)
    busy = prec.choose_precision("auto", _net(), x, y)
    assert (busy.precision, busy.reason, busy.others) == ("fp32", "measured-noisy", 0.5)
    assert len(calls) == prec.ATTEMPTS and not (cache_dir / prec.CACHE_FILE).exists()
    assert prec.StepTimes(1.0, 1.0, 0.05, None).quiet  # no /proc/stat: the rounds' spread alone
    assert not prec.StepTimes(1.0, 1.0, 0.05, prec.MAX_OTHERS + 0.01).quiet


def test_other_processes_cpu_share_is_read_from_proc_stat(monkeypatch: pytest.MonkeyPatch) -> None:
    if prec._machine_busy_s() is None:
        pytest.skip("no /proc/stat on this system")
    readings = iter([100.0, 103.0])  # the machine used 3 s of CPU time in all ...
    monkeypatch.setattr(prec, "_machine_busy_s", lambda: next(readings))
    monkeypatch.setattr(prec.time, "process_time", lambda: 11.0)  # ... this process 1 s of it
    monkeypatch.setattr(prec.time, "perf_counter", lambda: 52.0)
    monkeypatch.setattr(prec.os, "cpu_count", lambda: 2)
    busy, own, wall = prec._machine_busy_s(), 10.0, 50.0  # over 2 s of wall time on 2 CPUs
    assert prec._others_share(busy, own, wall) == pytest.approx(2.0 / 4.0)


def test_a_real_measurement_reports_its_conditions() -> None:
    x, y = _batch(32)
    t = prec.measure_train_step(_net(), x, y, rounds=3)
    assert t.noise >= 0 and (t.others is None or 0 <= t.others <= 1.5)


def test_the_first_measurement_stored_wins(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two runs measuring at once: the one that stores second trains as the cache says."""
    x, y = _batch()
    key = prec.cache_key(_net(), x)

    def other_process_stores_first(*args: Any, **kwargs: Any) -> prec.StepTimes:
        entry = {"precision": "fp32", "fp32_ms": 10.0, "bf16_ms": 12.0, "measured": "2026-01-01 00:00:00"}
        (cache_dir / prec.CACHE_FILE).write_text(json.dumps({"format": prec.FORMAT, "choices": {key: entry}}))
        return prec.StepTimes(20.0, 10.0, 0.01)  # this process measured bf16 faster

    monkeypatch.setattr(prec, "measure_train_step", other_process_stores_first)
    choice = prec.choose_precision("auto", _net(), x, y)
    assert (choice.precision, choice.reason, choice.fp32_ms) == ("fp32", "cached", 10.0)
    assert choice.detail == "measured 2026-01-01 00:00:00" and choice.noise is None


def test_a_cached_measurement_is_judged_by_todays_rule(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    x, y = _batch()
    key = prec.cache_key(_net(), x)
    entry = {"precision": "bf16", "fp32_ms": 10.5, "bf16_ms": 10.0}  # stored under a looser threshold
    (cache_dir / prec.CACHE_FILE).write_text(json.dumps({"format": prec.FORMAT, "choices": {key: entry}}))
    calls = _fake_timer(monkeypatch, 20.0, 10.0)
    choice = prec.choose_precision("auto", _net(), x, y)
    assert (choice.precision, choice.reason) == ("fp32", "cached") and calls == []  # 1.05x < 1.10x


def test_the_key_sees_layer_settings_not_only_shapes() -> None:
    x, _ = _batch()
    strided = _net()
    strided[0].stride = (2, 2)  # same parameters, another architecture
    frozen = _net()
    frozen[0].weight.requires_grad_(False)
    keys = {prec.cache_key(m, x) for m in (_net(), strided, frozen)}
    assert len(keys) == 3 and prec.cache_key(_net(), x) == prec.cache_key(_net(), x)
    assert prec.cache_key(_net(), x) != prec.cache_key(_net(), x[:8])


def test_a_model_that_fails_in_bf16_trains_in_fp32(cache_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any, **kwargs: Any) -> tuple[float, float]:
        raise RuntimeError("bf16 kernel missing\nfor this layer")

    monkeypatch.setattr(prec, "measure_train_step", broken)
    choice = prec.choose_precision("auto", _net(), *_batch())
    assert (choice.precision, choice.reason) == ("fp32", "unmeasurable")
    assert "\n" not in choice.detail and "bf16 kernel missing" in choice.detail


def test_measuring_changes_neither_the_model_nor_the_random_streams() -> None:
    model = _net()
    before = {k: v.clone() for k, v in model.state_dict().items()}  # BatchNorm buffers included
    x, y = _batch()
    torch.manual_seed(7)
    times = prec.measure_train_step(model, x, y, rounds=3)
    after_measuring = torch.rand(4)
    torch.manual_seed(7)
    assert torch.equal(after_measuring, torch.rand(4))  # the Dropout draws did not advance the stream
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    assert all(math.isfinite(t) and t > 0 for t in (times.fp32_ms, times.bf16_ms)) and times.noise >= 0


def test_fit_records_the_choice_and_trains_the_same_whether_measured_or_cached(
    cache_dir: Path, mini: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first run really measures (on a copy, drawing Dropout masks), the second reads the
    cache; the weights are identical. The verdict is pinned so a busy machine cannot make the
    two runs train in different precisions."""
    monkeypatch.setattr(prec, "MAX_NOISE", math.inf)
    monkeypatch.setattr(prec, "MAX_OTHERS", math.inf)
    monkeypatch.setattr(prec, "decide", lambda fp32_ms, bf16_ms: "bf16")
    data = mini.subset(n_train=600, n_test=200)
    cfg = TrainConfig(epochs=1, seed=5, device="cpu", precision="auto", batch_size=64)
    runs = []
    for _ in range(2):
        prec._choices.clear()  # each run as a new process
        model = build_model("cnn", seed=5)  # the original CNN has Dropout: training draws random masks
        result = fit(model, data, cfg, progress=False)
        runs.append((result, [p.detach().clone() for p in model.parameters()]))
    (first, w1), (second, w2) = runs
    assert first.precision_choice["reason"] == "measured" and second.precision_choice["reason"] == "cached"
    assert first.precision == second.precision == "bf16" == first.summary()["precision_choice"]["precision"]
    assert first.precision_choice["fp32_ms"] == second.precision_choice["fp32_ms"] > 0
    assert all(torch.equal(a, b) for a, b in zip(w1, w2, strict=True))  # measuring did not change the training

    cfg32 = TrainConfig(epochs=1, seed=5, device="cpu", precision="fp32", batch_size=64)
    pinned = fit(build_model("cnn", seed=5), data, cfg32, progress=False)
    assert pinned.precision_choice == {"precision": "fp32", "reason": "asked"}
