"""``--precision auto``: bf16 autocast only where it is measured faster for this model here.

A CPU flag (AVX512-BF16, AMX) says bf16 *can* run natively, not that it is faster for a given
model: on the AMD EPYC of this project's sessions bf16 makes the original CNN's training step
1.33x faster and ``cnn-wide``'s 1.45x, but ``cnn-small``'s only 1.03-1.16x, depending on the
run. So on a CPU ``auto`` times the model's own training step (forward, cross-entropy,
backward, batch of the training batch size, channels_last as ``fit`` runs it) in fp32 and
under bf16 autocast, interleaved, and picks bf16 only when it is at least
:data:`BF16_MIN_SPEEDUP` faster: below that, the precision it costs buys too little, and
timing noise could flip the choice from one run to the next.

The best of 7 steps per precision is compared (other work on the machine only adds time).
The measurement takes a fraction of a second for MNIST-sized models (0.2-0.3 s for ``cnn`` and
``cnn-wide`` on 2 cores). It runs on a copy of the model, with the random number generators'
state restored afterwards, so the training that follows is exactly what it would have been.

A quiet measurement is kept for the process and in ``precision.json`` in the user cache
(``$REDBLUE_CACHE_DIR`` or ``~/.cache/redblue``), keyed by the CPU (model name, bf16/AVX
flags, oneDNN ISA limits), the torch version and thread count, the model's architecture
(modules with their settings, parameter shapes) and the batch's shape; later runs reuse it,
so once it is stored the same command on the same machine trains in the same precision and
gives the same weights. Concurrent runs take the cache's lock, and the first measurement stored
wins. A measurement taken while other work competed for the CPU (other processes used more
than :data:`MAX_OTHERS` of it meanwhile, by ``/proc/stat``, or the rounds varied by more than
:data:`MAX_NOISE`) is taken again; a machine that stays busy trains in fp32 and keeps nothing.
This matters: beside another 2-thread PyTorch job every step was ~12x slower but steady, and
bf16's gain for the original CNN shrank from 1.33x to 1.08x, which the first version of this
module took for a verdict and cached. Every training account records the choice and why
(``training.precision_choice``); ``--precision fp32`` or ``bf16`` pins it and skips the
measurement.

On CUDA, ``auto`` is bf16 where the GPU supports it (every GPU with bf16 runs these models
faster in it).
"""

from __future__ import annotations

import copy
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import filelock
import torch
import torch.nn.functional as F
from torch import nn

from redblue.data import default_cache_dir
from redblue.errors import ConfigError, IntegrityError
from redblue.utils import atomic_write_json, autocast, one_line, read_json, sha256_json

BF16_MIN_SPEEDUP = 1.10
"""bf16 is chosen only when the training step's best time in fp32 is at least this many
times its best time under bf16 autocast."""

ROUNDS = 7
"""Timed training steps per precision (after two warm-up steps each), interleaved."""

MAX_NOISE = 0.5
"""A measurement whose rounds vary more than this (interquartile range over median) was taken
while other work competed for the CPU; it is taken again, up to :data:`ATTEMPTS` times."""

MAX_OTHERS = 0.2
"""Likewise when other processes used more than this share of the machine's CPU time while it
ran (from ``/proc/stat``)."""

ATTEMPTS = 3
"""Measurements before giving up on a busy machine: then fp32, for that process only (not
kept, so a later run on a quieter machine measures again)."""

FORMAT = "redblue.precision/1"
CACHE_FILE = "precision.json"
_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")

_choices: dict[str, PrecisionChoice] = {}


@dataclass(frozen=True)
class PrecisionChoice:
    """The precision a run uses and why (recorded in every training account)."""

    precision: str
    """``fp32`` or ``bf16``."""
    reason: str
    """``asked`` (``--precision fp32|bf16``), ``cuda``, ``measured`` (now), ``cached``
    (measured by an earlier run on this machine), ``measured-noisy`` (the machine stayed too
    busy to measure: fp32, not kept) or ``unmeasurable`` (the step failed in bf16: fp32)."""
    fp32_ms: float | None = None
    """Best training-step time in fp32, when measured."""
    bf16_ms: float | None = None
    """Best training-step time under bf16 autocast, when measured."""
    noise: float | None = None
    """How much the timed rounds varied (see :class:`StepTimes`), when measured now."""
    others: float | None = None
    """Other processes' share of the CPU meanwhile (see :class:`StepTimes`), when measured now."""
    detail: str = ""

    def summary(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v not in (None, "")}


def cpu_description() -> dict[str, Any]:
    """The CPU's model name and the flags that matter for bf16 (from /proc/cpuinfo)."""
    name, flags = "unknown", set[str]()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and name == "unknown":
            name = value.strip()
        elif key.strip() == "flags" and not flags:
            flags = set(value.split())
    return {"cpu": name, "flags": [f for f in _CPU_FLAGS if f in flags]}


def _model_fingerprint(model: nn.Module) -> list[Any]:
    """The architecture: every module's type and settings (``repr``: strides, padding, pool
    sizes ...) and every parameter's shape, dtype and whether it is trained."""
    modules = [[name, type(module).__name__] for name, module in model.named_modules()]
    params = [[name, list(p.shape), str(p.dtype), p.requires_grad] for name, p in model.named_parameters()]
    return [repr(model), modules, params]


def cache_key(model: nn.Module, x: torch.Tensor) -> str:
    """What the choice depends on: CPU (and the instruction sets oneDNN may use), torch,
    threads, architecture, batch shape."""
    return sha256_json(
        {
            "machine": cpu_description(),
            "isa": [os.environ.get(v, "") for v in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")],
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "model": _model_fingerprint(model),
            "batch": [list(x.shape), str(x.dtype)],
        }
    )


def _train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str) -> float:
    start = time.perf_counter()
    with autocast(x.device, precision):
        loss = F.cross_entropy(model(x), y)
    model.zero_grad(set_to_none=True)
    loss.backward()
    return time.perf_counter() - start


@dataclass(frozen=True)
class StepTimes:
    """A training step's best time in each precision over the timed rounds, and how noisy the
    rounds were."""

    fp32_ms: float
    bf16_ms: float
    noise: float
    """The larger of the two precisions' interquartile range over median (0.04-0.32 on an idle
    AMD EPYC, 0.5-1.1 beside a test suite)."""
    others: float | None = None
    """The share of the machine's CPU time that other processes used while it ran (None where
    ``/proc/stat`` cannot be read). Beside another 2-thread PyTorch job on 2 cores every step
    is ~12x slower yet steady, and bf16's gain shrinks from 1.33x to 1.08x: only this shows it."""

    @property
    def quiet(self) -> bool:
        """Measured alone: steady rounds and no other process using the CPU meanwhile."""
        return self.noise <= MAX_NOISE and (self.others is None or self.others <= MAX_OTHERS)


def _noise(times: list[float]) -> float:
    q1, median, q3 = statistics.quantiles(times, n=4, method="inclusive")
    return (q3 - q1) / median if median > 0 else math.inf


def _machine_busy_s() -> float | None:
    """Seconds of CPU time all processes have used since boot (``/proc/stat``), or None."""
    try:
        fields = Path("/proc/stat").read_text(encoding="ascii").splitlines()[0].split()
        ticks = [int(v) for v in fields[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")  # guest time is already in user time


def _others_share(busy_before: float | None, own_before: float, wall_before: float) -> float | None:
    """Share of the machine's CPU capacity used by other processes since the ``*_before``
    readings (``_machine_busy_s``, ``time.process_time``, ``time.perf_counter``)."""
    busy_after = _machine_busy_s()
    wall = time.perf_counter() - wall_before
    if busy_before is None or busy_after is None or wall <= 0:
        return None
    others = (busy_after - busy_before) - (time.process_time() - own_before)
    return max(0.0, others / (wall * (os.cpu_count() or 1)))


def measure_train_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, rounds: int = ROUNDS) -> StepTimes:
    """Time one training step (forward, cross-entropy, backward) of a copy of ``model`` on
    ``(x, y)`` in fp32 and under bf16 autocast: two warm-up steps each, then ``rounds`` timed
    steps each, alternating which precision goes first. The best time of each is kept (other
    work on the machine only ever adds time), with how steady the rounds were and how much CPU
    other processes used meanwhile. ``model`` and the random number generators are left
    exactly as they were."""
    busy, own, wall = _machine_busy_s(), time.process_time(), time.perf_counter()
    with torch.random.fork_rng(devices=[]):
        twin = copy.deepcopy(model).train()
        for precision in ("fp32", "bf16", "fp32", "bf16"):
            _train_step(twin, x, y, precision)
        times: dict[str, list[float]] = {"fp32": [], "bf16": []}
        for r in range(rounds):
            for precision in ("fp32", "bf16") if r % 2 == 0 else ("bf16", "fp32"):
                times[precision].append(_train_step(twin, x, y, precision) * 1e3)
    others = _others_share(busy, own, wall)
    noise = max(_noise(times["fp32"]), _noise(times["bf16"]))
    return StepTimes(min(times["fp32"]), min(times["bf16"]), round(noise, 3), None if others is None else round(others, 3))


def decide(fp32_ms: float, bf16_ms: float) -> str:
    """``bf16`` when its step is at least :data:`BF16_MIN_SPEEDUP` times faster, else ``fp32``.

    >>> decide(20.0, 15.0), decide(5.5, 5.1), decide(10.0, 12.0)
    ('bf16', 'fp32', 'fp32')
    """
    return "bf16" if fp32_ms >= BF16_MIN_SPEEDUP * bf16_ms else "fp32"


def _cache_path() -> Path:
    return default_cache_dir() / CACHE_FILE


def _read_cache(path: Path) -> dict[str, Any]:
    """The cached choices, or none when the file is missing, unreadable or not ours."""
    try:
        payload = read_json(path)
    except IntegrityError:
        return {}
    if not isinstance(payload, dict) or payload.get("format") != FORMAT or not isinstance(payload.get("choices"), dict):
        return {}
    choices: dict[str, Any] = payload["choices"]
    return choices


def _finite_ms(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _from_cache(entry: Any) -> PrecisionChoice | None:
    """A cached measurement, decided again by today's rule (so a changed threshold applies),
    or None when the entry is not a sound measurement."""
    if not isinstance(entry, dict):
        return None
    if not (_finite_ms(entry.get("fp32_ms")) and _finite_ms(entry.get("bf16_ms"))):
        return None
    fp32_ms, bf16_ms = float(entry["fp32_ms"]), float(entry["bf16_ms"])
    measured = f"measured {str(entry.get('measured', ''))[:19]}"
    return PrecisionChoice(decide(fp32_ms, bf16_ms), "cached", fp32_ms, bf16_ms, detail=measured)


def _lock(path: Path) -> filelock.BaseFileLock:
    return filelock.FileLock(str(path) + ".lock", timeout=60)


def _store(key: str, choice: PrecisionChoice) -> PrecisionChoice:
    """Keep ``choice`` in the user cache and return what the cache holds for ``key``: when
    another process stored a measurement first, that one (so concurrent runs agree). A cache
    that cannot be written is skipped: the choice still holds for this process."""
    path = _cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with _lock(path):
            choices = {k: v for k, v in _read_cache(path).items() if _from_cache(v) is not None}
            earlier = _from_cache(choices.get(key))
            if earlier is not None:
                return earlier
            choices[key] = {
                "precision": choice.precision,
                "fp32_ms": choice.fp32_ms,
                "bf16_ms": choice.bf16_ms,
                "noise": choice.noise,
                "others": choice.others,
                "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
                **cpu_description(),
            }
            atomic_write_json(path, {"format": FORMAT, "choices": choices})
    except (OSError, ValueError, TypeError, filelock.Timeout):
        pass
    return choice


def _measure(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PrecisionChoice:
    """Measure up to :data:`ATTEMPTS` times until a measurement is quiet (:attr:`StepTimes.quiet`);
    when none is (the machine stayed busy), fp32, so a busy machine never picks bf16."""
    noisiest = busiest = 0.0
    for _ in range(ATTEMPTS):
        t = measure_train_step(model, x, y)
        if t.quiet:
            return PrecisionChoice(decide(t.fp32_ms, t.bf16_ms), "measured", round(t.fp32_ms, 3),
                                   round(t.bf16_ms, 3), t.noise, t.others)  # fmt: skip
        noisiest = max(noisiest, t.noise)
        busiest = max(busiest, t.others or 0.0)
    return PrecisionChoice("fp32", "measured-noisy", noise=noisiest, others=busiest,
                           detail=f"{ATTEMPTS} measurements while the machine was busy")  # fmt: skip


def choose_precision(precision: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> PrecisionChoice:
    """The precision to train ``model`` in on batches like ``(x, y)`` (float images in [0, 1]
    on the model's device, in the memory format training uses).

    ``fp32`` and ``bf16`` are taken as asked; ``auto`` is decided as the module docstring
    says: by measurement on a CPU, kept per machine and model.
    """
    if precision in ("fp32", "bf16"):
        return PrecisionChoice(precision, "asked")
    if precision != "auto":
        raise ConfigError(f"--precision {precision!r}: expected auto, fp32 or bf16")
    if x.device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        return PrecisionChoice("bf16" if supported else "fp32", "cuda")
    key = cache_key(model, x)
    if key in _choices:
        return _choices[key]
    choice = _from_cache(_read_cache(_cache_path()).get(key))
    if choice is None:
        try:
            choice = _measure(model, x, y)
        except RuntimeError as err:  # bf16 unsupported by some layer of this model
            choice = PrecisionChoice("fp32", "unmeasurable", detail=one_line(str(err))[:200])
        else:
            if choice.reason == "measured":
                choice = _store(key, choice)
    _choices[key] = choice
    return choice
