"""Configuration: frozen dataclasses, loaded from TOML and overridden by CLI options.

Each stage has its own section in the TOML file (``[data]``, ``[train]``, ...). Field
names are the CLI option names with ``-`` for ``_`` (``batch_size`` <-> ``--batch-size``),
so one vocabulary serves the API, the CLI, the config file and the JSON results.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from redblue.attacks import expand
from redblue.data import DATASET_NAMES, is_dataset_path
from redblue.errors import ConfigError, IntegrityError
from redblue.models import MODELS
from redblue.poison.trigger import Trigger
from redblue.utils import read_regular_file
from redblue.validate import check_choice, check_float, check_int, opt

T = TypeVar("T")

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16")
LR_SCHEDULES = ("cosine", "one-cycle")
REPAIRS = ("unlearn", "fine-prune")


@dataclass(frozen=True)
class DataConfig:
    """Which dataset and where it comes from."""

    dataset: str = "auto"
    data_dir: str | None = None
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        if not is_dataset_path(self.dataset) and self.dataset not in DATASET_NAMES:
            raise ConfigError(
                f"--dataset {self.dataset!r}: expected one of {', '.join(DATASET_NAMES)}, an .npz file or an image folder"
            )


@dataclass(frozen=True)
class TrainConfig:
    """Training of one model (the baseline and every other stage that trains)."""

    model_name: str = "cnn"
    epochs: int = 5
    batch_size: int = 128
    lr: float = 3e-3
    lr_schedule: str = "cosine"
    weight_decay: float = 0.0
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"

    def __post_init__(self) -> None:
        check_choice("model_name", self.model_name, list(MODELS))
        check_int("epochs", self.epochs, 1, 1000)
        check_int("batch_size", self.batch_size, 1, 65536)
        check_float("lr", self.lr, 0.0, 10.0, low_open=True)
        check_choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        check_float("weight_decay", self.weight_decay, 0.0, 1.0)
        check_int("seed", self.seed, 0, 2**63 - 1)
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"--device {self.device!r}: expected auto, cpu or cuda")
        check_choice("precision", self.precision, PRECISIONS)


@dataclass(frozen=True)
class ConfigFile:
    """A TOML config file: its path and its sections (empty when no file was given)."""

    path: Path | None
    sections: dict[str, Any]

    def section(self, name: str) -> dict[str, Any] | None:
        value = self.sections.get(name)
        return value if isinstance(value, dict) else None


MAX_CONFIG_BYTES = 16 << 20
"""The largest config file redblue reads (16 MiB; a real one is a few hundred bytes)."""


def load_toml(path: str | Path | None, sections: tuple[str, ...] = (), *, option: str = "--config") -> ConfigFile:
    """Read a TOML config file strictly: a missing, unreadable or malformed file, a section
    that is not one of ``sections`` (when given) or a section that is not a table is a
    ConfigError naming the file (as ``option``) and what is accepted."""
    if path is None:
        return ConfigFile(None, {})
    p = Path(path)
    try:
        data = tomllib.loads(read_regular_file(p, MAX_CONFIG_BYTES).decode("utf-8"))
    except IntegrityError as exc:  # a device, FIFO or socket (never opened), or too large
        raise ConfigError(f"{option} {exc}") from None
    except FileNotFoundError:
        raise ConfigError(f"{option} {p}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"{option} {p}: is a directory, expected a TOML file") from None
    except OSError as exc:
        raise ConfigError(f"{option} {p}: cannot read ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{option} {p}: not UTF-8 text, expected a TOML file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{option} {p}: not valid TOML ({exc})") from None
    except RecursionError:
        raise ConfigError(f"{option} {p}: nested too deeply to be a redblue config") from None
    for name, value in data.items():
        if sections and name not in sections:
            raise ConfigError(f"{p}: unknown section [{name}], expected {', '.join(f'[{s}]' for s in sections)}")
        if not isinstance(value, dict):
            raise ConfigError(f"{p}: {name} = {value!r} is not a section, expected a [{name}] table")
    return ConfigFile(p, data)


_TYPE_NAMES = {"int": "an integer", "float": "a number", "str": "a string", "bool": "true or false"}


def _type_problem(value: Any, annotation: str) -> str | None:
    """Why a TOML value does not fit a field annotation (``int``, ``float | None``,
    ``tuple[str, ...]``, ...), or None when it fits."""
    options = [a.strip() for a in annotation.split("|")]
    if value is None and "None" in options:
        return None
    for option in options:
        if option == "None":
            continue
        if option.startswith("tuple[") and isinstance(value, list):
            inner = option[len("tuple[") : -len(", ...]")]
            bad = next((v for v in value if _type_problem(v, inner) is not None), None)
            if bad is None:
                return None
            return f"expected a list of {_TYPE_NAMES.get(inner, inner).removeprefix('a ').removeprefix('an ')}s"
        if option == "bool" and isinstance(value, bool):
            return None
        if option == "int" and isinstance(value, int) and not isinstance(value, bool):
            return None
        if option == "float" and isinstance(value, int | float) and not isinstance(value, bool):
            return None
        if option == "str" and isinstance(value, str):
            return None
    names = [
        f"a list of {o[len('tuple[') : -len(', ...]')]} values" if o.startswith("tuple[") else _TYPE_NAMES.get(o, o)
        for o in options
        if o != "None"
    ]
    return "expected " + " or ".join(names)


def build(
    cls: type[T],
    file: ConfigFile | dict[str, Any] | None,
    overrides: dict[str, Any],
    where: str = "",
    *,
    base: Mapping[str, Any] | None = None,
) -> T:
    """``cls`` from section ``where`` of a config file, overridden by CLI options (``None``
    means not given), on top of ``base`` (a preset's settings, which both override). An
    unknown key or a value of the wrong type in the file is one line naming the file, the
    section and the key, and what is accepted."""
    if isinstance(file, ConfigFile):
        section, origin = file.section(where), str(file.path)
    else:
        section, origin = file, "config"
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values: dict[str, Any] = dict(base or {})
    from_file: dict[str, str] = {}
    for key, value in (section or {}).items():
        k = key.replace("-", "_")
        if k not in fields:
            raise ConfigError(f"{origin}: [{where}] {key}: unknown setting, expected one of {', '.join(sorted(fields))}")
        problem = _type_problem(value, str(fields[k].type))
        if problem is not None:
            raise ConfigError(f"{origin}: [{where}] {key} = {value!r}: {problem}")
        values[k] = tuple(value) if isinstance(value, list) else value
        from_file[opt(k)] = key
    given = {k: v for k, v in overrides.items() if v is not None and k in fields}
    values.update(given)
    try:
        return cls(**values)
    except ConfigError as exc:
        flag = str(exc).split(" ", 1)[0]
        file_key = from_file.get(flag)
        if file_key is not None and file_key.replace("-", "_") not in given:
            reason = str(exc).split(": ", 1)[-1]
            value = values[file_key.replace("-", "_")]
            raise ConfigError(f"{origin}: [{where}] {file_key} = {value!r}: {reason}") from None
        raise


def as_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


RECIPES = ("fgsm", "fgsm-rs", "pgd", "trades", "mart")


@dataclass(frozen=True)
class Preset:
    """A named adversarial-training recipe: the training and defence settings that the
    project's own measurements chose (``docs/adversarial-training.md``). Settings given on
    the command line or in the config file override the preset's."""

    name: str
    summary: str
    train: Mapping[str, Any]
    defend: Mapping[str, Any]


PRESETS: dict[str, Preset] = {
    "mnist-robust": Preset(
        name="mnist-robust",
        summary="MART (beta 6, 10 steps) on cnn-wide trained at eps 0.35 for 8 epochs, then AutoAttack at eps 0.3 "
        "on all 10,000 test images",
        train=MappingProxyType(
            {"model_name": "cnn-wide", "epochs": 8, "batch_size": 100, "lr": 3e-3, "lr_schedule": "one-cycle"}
        ),
        defend=MappingProxyType(
            {"recipe": "mart", "eps": 0.3, "train_eps_margin": 0.05, "steps": 10, "beta": 6.0, "eps_ramp": 2,
             "n_examples": 10_000}
        ),
    ),
}
"""``--preset`` (``defend`` and ``run``, or ``preset = "..."`` in the [defend] section of a config
file or a sweep grid). Its settings are measured choices, not guarantees:
``docs/adversarial-training.md`` says what was measured and what was not."""


def find_preset(name: str | None, file: ConfigFile) -> Preset | None:
    """The preset named by ``--preset`` (``name``), else by ``preset`` in the config file's
    [defend] section; None when neither names one. An unknown name is a ConfigError naming
    where it was given."""
    where = "--preset"
    if name is None:
        value = (file.section("defend") or {}).get("preset")
        if value is None:
            return None
        where = f"{file.path}: [defend] preset ="
        name = value
    if not isinstance(name, str) or name not in PRESETS:
        raise ConfigError(f"{where} {name!r}: expected one of {', '.join(PRESETS)}")
    return PRESETS[name]


def preset_bases(name: str | None, file: ConfigFile) -> tuple[Preset | None, dict[str, Mapping[str, Any]]]:
    """The preset named by ``--preset`` or the file's [defend] ``preset`` (:func:`find_preset`)
    and the settings it lays under each config section, for :func:`build`'s ``base``: its
    ``train`` and its ``defend`` settings, the latter with the preset's name as the label.
    ``(None, {})`` when no preset is named."""
    preset = find_preset(name, file)
    if preset is None:
        return None, {}
    return preset, {"train": preset.train, "defend": MappingProxyType({**preset.defend, "preset": preset.name})}


@dataclass(frozen=True)
class DefendConfig:
    """Adversarial training: the recipe, its threat model (L-inf, pixel units) and its guard.

    ``alpha`` defaults per recipe (``None``): FGSM-RS takes 1.25·eps (Wong et al. 2020),
    PGD, TRADES and MART take 2.5·eps/steps; ``beta`` weighs the KL term of TRADES and
    MART. ``ratio`` (share of each batch replaced by adversarial images) applies to the
    ``fgsm`` recipe only. ``guard`` defaults to on for every recipe but ``fgsm`` (the
    original project's recipe, reproduced as it was).
    ``eps`` is the threat model the evaluation holds the model to; the training attack's
    radius is ``eps + train_eps_margin`` (:attr:`training_eps`; margin 0: the same), so a
    model can be trained a little beyond the radius it is judged at (``mnist-robust``: 0.05).
    ``awp_gamma`` > 0 adds adversarial weight perturbation (Wu et al. 2020) to the recipe:
    each batch's gradient is taken at weights moved, layer by layer, ``awp_gamma`` times
    the layer's norm along the recipe loss's gradient, once the eps ramp is done (0: off).
    ``preset`` names the :data:`PRESETS` entry the settings started from (a label: the
    settings themselves are the other fields).
    """

    recipe: str = "fgsm-rs"
    eps: float = 0.25
    alpha: float | None = None
    steps: int = 10
    beta: float = 6.0
    ratio: float = 0.5
    eps_ramp: int = 0
    train_eps_margin: float = 0.0
    awp_gamma: float = 0.0
    guard: bool | None = None
    guard_drop: float = 0.2
    guard_size: int = 1000
    guard_steps: int = 10
    n_examples: int = 1000
    preset: str | None = None

    def __post_init__(self) -> None:
        check_choice("recipe", self.recipe, RECIPES)
        if self.preset is not None:
            check_choice("preset", self.preset, list(PRESETS))
        check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        if self.alpha is not None:
            check_float("alpha", self.alpha, 0.0, None, low_open=True)
        check_int("steps", self.steps, 1, 10_000)
        check_float("beta", self.beta, 0.0, None)
        check_float("ratio", self.ratio, 0.0, 1.0)
        check_int("eps_ramp", self.eps_ramp, 0, 1000)
        check_float("train_eps_margin", self.train_eps_margin, 0.0, None)
        if self.eps + self.train_eps_margin > 1.0:
            raise ConfigError(
                f"{opt('train_eps_margin')} {self.train_eps_margin:g}: the training eps (eps {self.eps:g} + margin) "
                "must be at most 1"
            )
        check_float("awp_gamma", self.awp_gamma, 0.0, 1.0)
        if self.guard is not None and not isinstance(self.guard, bool):
            raise ConfigError(f"--guard {self.guard!r}: expected true or false")
        check_float("guard_drop", self.guard_drop, 0.0, 1.0, low_open=True)
        check_int("guard_size", self.guard_size, 1, 1_000_000)
        check_int("guard_steps", self.guard_steps, 1, 10_000)
        check_int("n_examples", self.n_examples, 1, 1_000_000)

    @property
    def training_eps(self) -> float:
        """The training attack's radius: ``eps + train_eps_margin``."""
        return round(self.eps + self.train_eps_margin, 12)  # 0.3 + 0.04 is 0.34, not 0.33999999999999997

    @property
    def step_size(self) -> float:
        """The training attack's step: ``alpha`` or the recipe's default (of :attr:`training_eps`)."""
        if self.alpha is not None:
            return self.alpha
        if self.recipe == "fgsm":
            return self.training_eps
        if self.recipe == "fgsm-rs":
            return 1.25 * self.training_eps
        return 2.5 * self.training_eps / self.steps

    @property
    def guarded(self) -> bool:
        """Whether the catastrophic-overfitting guard runs (``guard`` or the recipe default)."""
        return self.guard if self.guard is not None else self.recipe != "fgsm"


# --------------------------------------------------------------------------- backdoor (issue 5)

POISON_IMAGE_SIZE = 28  # every MNIST-family image is 28x28; the stage re-checks the real shape
DEFAULT_SWEEP_RATES = (0.001, 0.005, 0.01, 0.05, 0.1)


@dataclass(frozen=True)
class PoisonConfig:
    """BadNets poisoning: the trigger, the all-to-one target, the poisoned share, the sweep.

    ``rate`` is the share of non-target training examples poisoned; ``poison_seed`` seeds
    their choice (separate from the training seed); ``sweep_rates`` are the rates of
    ``redblue poison --sweep``.
    """

    rate: float = 0.1
    target: int = 7
    size: int = 4
    position: str = "bottom-right"
    pattern: str = "solid"
    blend: float = 1.0
    poison_seed: int = 0
    sweep_rates: tuple[float, ...] = DEFAULT_SWEEP_RATES
    name: str = "poisoned"

    def __post_init__(self) -> None:
        check_float("rate", self.rate, 0.0, 1.0)
        check_int("target", self.target)
        if not 0 <= self.target <= 9:
            raise ConfigError(f"--target {self.target}: not a class (expected 0..9)")
        check_int("poison_seed", self.poison_seed, 0, 2**63 - 1)
        self.trigger().box(POISON_IMAGE_SIZE, POISON_IMAGE_SIZE)
        rates = self.sweep_rates
        if isinstance(rates, str) or not isinstance(rates, tuple | list) or not rates:
            raise ConfigError(f"--sweep-rates {rates!r}: expected a list of rates in [0, 1]")
        for rate in rates:
            check_float("sweep_rates", rate, 0.0, 1.0)
        name_ok = isinstance(self.name, str) and self.name[:1].isalnum()
        if not name_ok or not all(ch.isalnum() or ch in "-_." for ch in self.name):
            raise ConfigError(f"--name {self.name!r}: expected letters, digits, -, _ or .")

    def trigger(self) -> Trigger:
        """The :class:`redblue.poison.Trigger` these settings describe."""
        return Trigger(size=self.size, position=self.position, pattern=self.pattern, blend=self.blend)


@dataclass(frozen=True)
class BackdoorAuditConfig:
    """Neural Cleanse on a model and clean images (``redblue audit-backdoor``).

    ``n_images`` clean test images (the first ones) feed the optimisation; at most ``epochs`` x
    ``steps_per_epoch`` steps of ``batch_size`` images per class and start, from ``restarts``
    independent starts per class side by side (each class keeps its smallest checked trigger),
    stopped early once no class's trigger has shrunk by 1% for ``early_stop`` epochs; ``target_asr`` is the attack success
    rate a reversed trigger must reach on all those images of the other classes (checked, not
    only on the batches), and the L1 cost changes after ``cost_patience`` epochs
    in a row that reach it or miss it. A class is flagged when its mask
    norm's anomaly index is above 2 (the paper's rule) or the norm is under ``size_ratio`` of
    the median norm (redblue's rule for when the MAD test cannot reach 2; 0 turns it off).
    The norms are judged with the paper's objective; then the triggers of the flagged classes
    (and ``unlearn_classes``) are restored for the repair with the masks' total variation
    weighed ``restore_smoothness`` beside their L1 norm (as TABOR does; 0: no restoration, the
    repair stamps the triggers judged), from ``restore_restarts`` starts per class.

    ``strip``: also set STRIP's run-time threshold on the same clean images at false-rejection
    rate ``strip_frr`` (``strip_copies`` superimposed copies per input). ``repair``: remove the
    backdoor from the model alone, ``unlearn`` (Neural Cleanse's unlearning with the reversed
    triggers of ``unlearn_classes``, default the flagged classes, each class's restored trigger
    and its next smallest ones found with the pixels of those before held out, up to
    ``unlearn_triggers`` per class while they stay under ``size_ratio`` (0.25 when 0) of the
    median norm;
    ``unlearn_share`` of each batch stamped) and/or ``fine-prune`` (dormant channels of the last convolution pruned
    while clean accuracy stays within ``prune_max_drop``), each fine-tuned for
    ``repair_epochs`` (Adam, ``repair_lr`` with cosine decay) on the first ``repair_images`` training images (clean, held out from the
    audit), with the next ``repair_val`` as validation.
    """

    n_images: int = 1000
    epochs: int = 70
    steps_per_epoch: int = 30
    batch_size: int = 8
    restarts: int = 2
    lr: float = 0.1
    init_cost: float = 1e-3
    target_asr: float = 0.99
    cost_patience: int = 2
    early_stop: int = 6
    size_ratio: float = 0.25
    restore_smoothness: float = 1.0
    restore_restarts: int = 2
    seed: int = 0
    device: str = "auto"
    strip: bool = True
    strip_copies: int = 100
    strip_frr: float = 0.01
    repair: tuple[str, ...] = ()
    unlearn_classes: tuple[int, ...] = ()
    unlearn_share: float = 0.2
    unlearn_triggers: int = 6
    prune_max_drop: float = 0.04
    repair_images: int = 6000
    repair_val: int = 1000
    repair_epochs: int = 2
    repair_lr: float = 1e-2

    def __post_init__(self) -> None:
        object.__setattr__(self, "repair", tuple(self.repair))
        object.__setattr__(self, "unlearn_classes", tuple(dict.fromkeys(self.unlearn_classes)))  # 7,7 is 7
        check_int("n_images", self.n_images, 2, 1_000_000)
        check_int("epochs", self.epochs, 1, 10_000)
        check_int("steps_per_epoch", self.steps_per_epoch, 1, 100_000)
        check_int("batch_size", self.batch_size, 1, 100_000)
        check_int("restarts", self.restarts, 1, 16)
        check_float("lr", self.lr, 0.0, None, low_open=True)
        check_float("init_cost", self.init_cost, 0.0, None, low_open=True)
        check_float("target_asr", self.target_asr, 0.0, 1.0, low_open=True)
        check_int("cost_patience", self.cost_patience, 1, 1000)
        check_int("early_stop", self.early_stop, 1, 10_000)
        check_float("size_ratio", self.size_ratio, 0.0, 1.0, high_open=True)
        check_float("restore_smoothness", self.restore_smoothness, 0.0, 1000.0)
        check_int("restore_restarts", self.restore_restarts, 1, 16)
        check_choice("device", self.device, DEVICES)
        check_int("strip_copies", self.strip_copies, 1, 10_000)
        check_float("strip_frr", self.strip_frr, 0.0, 1.0, low_open=True, high_open=True)
        for method in self.repair:
            check_choice("repair", method, REPAIRS)
        if len(set(self.repair)) != len(self.repair):
            raise ConfigError(f"--repair {','.join(self.repair)}: a method is named twice")
        for k in self.unlearn_classes:
            check_int("unlearn_classes", k, 0, 100_000)
        check_float("unlearn_share", self.unlearn_share, 0.0, 1.0, low_open=True)
        check_int("unlearn_triggers", self.unlearn_triggers, 1, 16)
        check_float("prune_max_drop", self.prune_max_drop, 0.0, 1.0)
        check_int("repair_images", self.repair_images, 1, 10_000_000)
        check_int("repair_val", self.repair_val, 1, 1_000_000)
        check_int("repair_epochs", self.repair_epochs, 1, 1000)
        check_float("repair_lr", self.repair_lr, 0.0, 10.0, low_open=True)


@dataclass(frozen=True)
class BackdoorDefenseConfig:
    """Backdoor detection in the training set (``redblue defend-backdoor``).

    ``method``: ``ac`` (activation clustering) or ``spectral`` (spectral signatures).
    AC: ``n_components`` dims by ``reduce`` (pca|ica), 2-means, the smaller cluster flagged
    when its share ≤ ``max_share`` and ``analysis`` says so: ``reclassify`` (fewer than
    ``reclass_threshold`` of it is nearest to its own class's centroid), ``size`` (always),
    ``silhouette`` (silhouette ≥ ``min_silhouette``). Spectral: flag
    ``spectral_factor`` × ``expected_share`` of each class (None: the recorded poison rate).
    ``retrain``: retrain without the flagged examples and measure again.
    """

    method: str = "ac"
    n_components: int = 10
    reduce: str = "pca"
    analysis: str = "reclassify"
    max_share: float = 0.5
    min_silhouette: float = 0.15
    reclass_threshold: float = 0.25
    expected_share: float | None = None
    spectral_factor: float = 1.5
    detection_seed: int = 0
    retrain: bool = True

    def __post_init__(self) -> None:
        check_choice("method", self.method, ("ac", "spectral"))
        check_int("n_components", self.n_components, 1, 4096)
        check_choice("reduce", self.reduce, ("pca", "ica"))
        check_choice("analysis", self.analysis, ("reclassify", "size", "silhouette"))
        check_float("max_share", self.max_share, 0.0, 0.5, low_open=True)
        check_float("min_silhouette", self.min_silhouette, -1.0, 1.0)
        check_float("reclass_threshold", self.reclass_threshold, 0.0, 1.0)
        if self.expected_share is not None:
            check_float("expected_share", self.expected_share, 0.0, 1.0)
        check_float("spectral_factor", self.spectral_factor, 0.0, None, low_open=True)
        check_int("detection_seed", self.detection_seed, 0, 2**32 - 1)
        if not isinstance(self.retrain, bool):
            raise ConfigError(f"--retrain {self.retrain!r}: expected true or false")


# --------------------------------------------------------------------------- the whole workflow (issue 6)

RUN_STAGES = ("baseline", "redteam", "blueteam", "poison", "report")


@dataclass(frozen=True)
class RunConfig:
    """``redblue run``: which stages, the red-team threat model, and the quick mode.

    Defaults reproduce the original project's configuration: FGSM at eps 0.25 on the
    baseline, then PGD (``pgd_steps`` of ``pgd_alpha``) and the ``standard`` suite at the
    same eps, the eps sweep, adversarial training at eps 0.25 and the 4x4 patch -> 7.
    ``quick`` shrinks everything (a subset of the data, one epoch per model, fewer test
    images) for a one-minute look.
    """

    stages: tuple[str, ...] = RUN_STAGES
    eps: float = 0.25
    pgd_steps: int = 40
    pgd_alpha: float = 0.01
    restarts: int = 1
    n_examples: int = 1000
    sweep: bool = True
    square: bool = False
    detection: tuple[str, ...] = ("ac", "spectral")
    quick: bool = False

    def __post_init__(self) -> None:
        stages = self.stages
        if isinstance(stages, str) or not isinstance(stages, tuple | list) or not stages:
            raise ConfigError(f"--stages {stages!r}: expected a comma-separated subset of {', '.join(RUN_STAGES)}")
        for stage in stages:
            check_choice("stages", stage, RUN_STAGES)
        check_float("eps", self.eps, 0.0, 1.0, low_open=True)
        check_int("pgd_steps", self.pgd_steps, 1, 10_000)
        check_float("pgd_alpha", self.pgd_alpha, 0.0, 1.0, low_open=True)
        check_int("restarts", self.restarts, 1, 100)
        check_int("n_examples", self.n_examples, 1, 1_000_000)
        for method in self.detection:
            check_choice("detection", method, ("ac", "spectral"))


# --------------------------------------------------------------------------- red team (issue 3)


@dataclass(frozen=True)
class AttackConfig:
    """``redblue attack``: which attacks, the threat model and the attack settings.

    ``attack`` is an attack, a suite or a comma-separated list (``fgsm``, ``pgd``,
    ``apgd-ce``, ``apgd-t``, ``fab-t``, ``square``, ``quick``, ``standard``, ``autoattack``,
    ``standard,square``).
    ``alpha``, ``steps`` and ``restarts`` left at None take each attack's default
    (``redblue.attacks.DEFAULTS``). ``n_examples`` None means the whole test set.
    ``save_adversarial`` keeps every image's worst-case adversarial example.
    """

    attack: str = "fgsm"
    eps: float = 0.25
    norm: str = "linf"
    alpha: float | None = None
    steps: int | None = None
    restarts: int | None = None
    random_start: bool = True
    n_targets: int = 9
    n_examples: int | None = None
    batch_size: int = 500
    sweep: bool = False
    checks: bool = True
    save_adversarial: bool = False
    seed: int = 0
    device: str = "auto"

    def __post_init__(self) -> None:
        expand(self.attack)
        check_choice("norm", self.norm, ("linf", "l2"))
        # L2: the image size bounds eps (sqrt(C*H*W), 28 for MNIST), checked where the images are known
        check_float("eps", self.eps, 0.0, 1.0 if self.norm == "linf" else None)
        if self.alpha is not None:
            check_float("alpha", self.alpha, 0.0, 1.0 if self.norm == "linf" else None, low_open=True)
        if self.steps is not None:
            check_int("steps", self.steps, 1, 100_000)
        if self.restarts is not None:
            check_int("restarts", self.restarts, 1, 1000)
        check_int("n_targets", self.n_targets, 1, 9)
        if self.n_examples is not None:
            check_int("n_examples", self.n_examples, 1, 10_000_000)
        check_int("batch_size", self.batch_size, 1, 65536)
        check_int("seed", self.seed, 0, 2**63 - 1)
        for name in ("random_start", "sweep", "checks", "save_adversarial"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{opt(name)} {getattr(self, name)!r}: expected true or false")
        if not (self.device in DEVICES or self.device.startswith("cuda:")):
            raise ConfigError(f"--device {self.device!r}: expected auto, cpu or cuda")
