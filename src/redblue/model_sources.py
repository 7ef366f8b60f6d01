"""Any model as a redblue model: a redblue record, a user's module + weights, TorchScript, ONNX.

``--model`` takes:

- a redblue record (``NAME.json`` / ``NAME.safetensors``), hash-verified (:mod:`redblue.artifacts`);
- ``path/to/net.py:build`` with ``--weights FILE``: the function or class ``build`` of the
  user's Python file, called with no argument, must return an ``nn.Module``; the weights are a
  state dict in safetensors, or a ``torch.save`` checkpoint that :mod:`redblue.scan` finds
  clean, read with ``torch.load(weights_only=True)``. Importing the file runs the user's code:
  that is the user's explicit choice (``docs/threat-model.md``);
- a TorchScript archive (``torch.jit.save``; any other suffix than ``.onnx``/``.py``), scanned
  first: only TorchScript's own code and its type-tag calls are accepted, anything else in
  its pickles refuses the file;
- an ONNX file (``.onnx``), run by :mod:`redblue.onnx_graph` and checked against
  ``onnxruntime`` on the first images at load.

Options say what the model expects (:class:`ModelOptions`): ``--input-shape C,H,W``,
``--num-classes``, ``--mean``/``--std`` (normalisation becomes the model's first layer, so eps
stays in pixel units of [0, 1]) and ``--class-names``. The SHA-256 of every file that defined
the model is recorded (``record["files"]``), and ``record["weights_sha256"]`` is the hash of
all of them with the options: what cache keys and results use as the model's identity.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import re
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from torch import nn

from redblue.artifacts import LoadedModel, load_model
from redblue.errors import ConfigError
from redblue.models import Normalize
from redblue.onnx_graph import OnnxNodeError, onnx_module, shape_text
from redblue.scan import FileReport, scan_file
from redblue.train import check_layout
from redblue.utils import read_input_file, sha256_bytes, sha256_json
from redblue.validate import NAME_PATTERN, check_int

USER_FORMAT = "redblue.user-model/1"
ONNX_TOLERANCE = 1e-3
"""Largest |logit difference| between redblue's ONNX module and onnxruntime accepted at load."""
PROBE_IMAGES = 16
TORCHSCRIPT_RULES = ("torchscript-code", "torchscript-class")
"""Scanner findings that every TorchScript archive has (its code and classes), accepted for it."""
TORCHSCRIPT_CALLS = ("torch.jit._pickle.",)
"""Pickle calls that TorchScript's own loader resolves (type tags, int lists), accepted for it."""


@dataclass(frozen=True)
class ModelOptions:
    """What a model that redblue did not train expects, and where its weights are."""

    weights: str | None = None
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    class_names: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if self.input_shape is not None:
            if len(self.input_shape) != 3:
                raise ConfigError(f"--input-shape {self.input_shape}: expected C,H,W (three integers)")
            for dim in self.input_shape:
                check_int("input_shape", dim, 1, 4096)
        if self.num_classes is not None:
            check_int("num_classes", self.num_classes, 2, 100_000)
        if (self.mean is None) != (self.std is None):
            raise ConfigError("--mean and --std: give both (one value, or one per channel) or neither")
        if self.std is not None and any(not s > 0 for s in self.std):
            raise ConfigError(f"--std {','.join(f'{s:g}' for s in self.std)}: every value must be > 0")
        if self.mean is not None and self.std is not None and len(self.mean) != len(self.std):
            raise ConfigError(f"--mean has {len(self.mean)} values and --std {len(self.std)}: expected as many")
        if self.class_names is not None and self.num_classes is not None and len(self.class_names) != self.num_classes:
            raise ConfigError(
                f"--class-names has {len(self.class_names)} names, --num-classes is {self.num_classes}: expected as many"
            )

    @property
    def given(self) -> bool:
        return any(v is not None for v in (self.weights, self.input_shape, self.num_classes, self.mean, self.class_names))


def parse_ints(option: str, text: str | None) -> tuple[int, ...] | None:
    """``"3,32,32"`` -> ``(3, 32, 32)``; ConfigError naming ``option`` otherwise."""
    if text is None:
        return None
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated integers, such as 3,32,32") from None


def parse_floats(option: str, text: str | None) -> tuple[float, ...] | None:
    if text is None:
        return None
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ConfigError(f"{option} {text!r}: expected comma-separated numbers, such as 0.485,0.456,0.406") from None
    if any(v != v or v in (float("inf"), float("-inf")) for v in values):
        raise ConfigError(f"{option} {text!r}: expected finite numbers")
    return values


def parse_names(option: str, text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    names = tuple(v.strip() for v in text.split(","))
    if any(not n for n in names):
        raise ConfigError(f"{option} {text!r}: expected comma-separated non-empty names")
    return names


def _safe_name(stem: str) -> str:
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", stem).lstrip("._+-").replace("..", "_")[:100]
    return name if NAME_PATTERN.fullmatch(name or "-") else "model"


def _read(path: Path, what: str) -> bytes:
    return read_input_file(path, ConfigError, option=what)


def _scan_bytes(payload: bytes, path: Path) -> FileReport:
    """The scanner's report on exactly the bytes that will be loaded (a private copy, so a file
    swapped on disk after the scan cannot be loaded unscanned)."""
    with tempfile.TemporaryDirectory(prefix="redblue-scan-") as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(payload)
        report = scan_file(copy)
    return report


def _import_factory(spec: str) -> tuple[nn.Module, Path, bytes]:
    """``file.py:attr`` -> (the module that ``attr()`` returns, the file, its bytes)."""
    file_text, _, attr = spec.rpartition(":")
    path = Path(file_text)
    if not attr.isidentifier():
        raise ConfigError(f"--model {spec}: {attr!r} is not a Python name; expected FILE.py:FUNCTION")
    source = _read(path, "--model")
    module_name = f"redblue_user_model_{sha256_bytes(source)[:16]}"
    loader_spec = importlib.util.spec_from_file_location(module_name, path)
    if loader_spec is None or loader_spec.loader is None:
        raise ConfigError(f"--model {path}: cannot be imported as a Python file")
    module = importlib.util.module_from_spec(loader_spec)
    sys.modules[module_name] = module
    try:
        loader_spec.loader.exec_module(module)  # the user's own code: their explicit choice (threat model)
    except Exception as exc:
        sys.modules.pop(module_name, None)
        raise ConfigError(f"--model {path}: importing it failed ({type(exc).__name__}: {exc})") from None
    factory = getattr(module, attr, None)
    if factory is None or not callable(factory):
        raise ConfigError(f"--model {spec}: {path.name} has no function or class {attr!r}")
    try:
        net = factory()
    except Exception as exc:
        raise ConfigError(f"--model {spec}: calling {attr}() failed ({type(exc).__name__}: {exc})") from None
    if not isinstance(net, nn.Module):
        raise ConfigError(f"--model {spec}: {attr}() returned {type(net).__name__}, expected a torch.nn.Module")
    return net, path, source


def _state_dict(path: Path, payload: bytes) -> dict[str, torch.Tensor]:
    """A state dict from safetensors bytes, or from a torch.save checkpoint the scanner finds clean."""
    if path.suffix == ".safetensors":
        try:
            return st_load(payload)
        except (SafetensorError, ValueError) as exc:
            raise ConfigError(f"--weights {path}: not a valid safetensors file ({exc})") from None
    report = _scan_bytes(payload, path)
    if report.status != "clean":
        what = report.error or "; ".join(f"{f.severity} {f.rule} {f.name}" for f in report.findings[:3])
        raise ConfigError(
            f"--weights {path}: refused, `redblue scan` does not find it clean ({what}); "
            "convert it to safetensors or give a plain state dict"
        )
    try:
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError(f"--weights {path}: not a torch.save checkpoint of tensors ({str(exc).splitlines()[0][:160]})") from None
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--weights {path}: expected a state dict (parameter name -> tensor)")
    return state


def _load_weights(net: nn.Module, path: Path, state: dict[str, torch.Tensor]) -> None:
    """``load_state_dict(strict)``; ConfigError naming missing, unexpected and mis-shaped keys."""
    lazy = [name for name, p in net.named_parameters() if isinstance(p, nn.parameter.UninitializedParameter)]
    if lazy:
        raise ConfigError(
            f"--weights {path}: the model has lazy layers whose shapes are not known before a forward pass "
            f"({', '.join(lazy[:3])}); build them with explicit sizes (nn.Linear instead of nn.LazyLinear)"
        )
    own = net.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    misshaped = sorted(k for k in set(own) & set(state) if tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        if unexpected:
            parts.append(f"unexpected {', '.join(unexpected[:5])}{' …' if len(unexpected) > 5 else ''}")
        if misshaped:
            k = misshaped[0]
            parts.append(f"mis-shaped {k} ({tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in the model)"
                         + (f" and {len(misshaped) - 1} more" if len(misshaped) > 1 else ""))  # fmt: skip
        raise ConfigError(f"--weights {path}: do not fit the model: {'; '.join(parts)}")
    net.load_state_dict(state, strict=True)


def _torchscript(path: Path, payload: bytes) -> nn.Module:
    report = _scan_bytes(payload, path)
    if report.status == "error":
        raise ConfigError(f"--model {path}: not a TorchScript archive or ONNX file ({report.error})")
    refused = [f for f in report.findings
               if f.rule not in TORCHSCRIPT_RULES and not f.name.startswith(TORCHSCRIPT_CALLS)]  # fmt: skip
    if refused:
        f = refused[0]
        raise ConfigError(
            f"--model {path}: refused, `redblue scan` found {f.severity} {f.rule} {f.name}"
            f"{' in ' + f.member if f.member else ''} (run `redblue scan {path}` for every finding)"
        )
    if report.kind != "torch-zip" or not any(f.rule == "torchscript-code" for f in report.findings):
        raise ConfigError(
            f"--model {path}: not a TorchScript archive (torch.jit.save); expected a redblue .json/.safetensors "
            "record, FILE.py:FUNCTION with --weights, a TorchScript archive or an .onnx file"
        )
    try:
        net: nn.Module = torch.jit.load(io.BytesIO(payload), map_location="cpu")
    except Exception as exc:
        raise ConfigError(f"--model {path}: torch.jit.load failed ({str(exc).splitlines()[0][:160]})") from None
    return net


def _input_shape(options: ModelOptions, declared: list[int | None] | None, probe: torch.Tensor | None) -> tuple[int, ...]:
    if options.input_shape is not None:
        return options.input_shape
    if probe is not None:
        return tuple(int(d) for d in probe.shape[1:])
    if declared is not None and len(declared) == 4 and all(d is not None for d in declared[1:]):
        return tuple(int(d) for d in declared[1:] if d is not None)
    raise ConfigError("--input-shape: needed to load this model without data (C,H,W, such as 1,28,28)")


def _check_outputs(net: nn.Module, x: torch.Tensor, where: str, options: ModelOptions) -> torch.Tensor:
    try:
        with torch.no_grad():
            out = net(x)
    except OnnxNodeError as exc:
        raise ConfigError(f"{where}: an ONNX node redblue cannot evaluate as used: {exc}") from None
    except Exception as exc:
        raise ConfigError(
            f"{where}: the model rejects inputs of shape {tuple(x.shape)} "
            f"({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}); set --input-shape C,H,W to what it expects"
        ) from None
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != x.shape[0]:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{where}: the model returns {shape} for {x.shape[0]} images; expected scores of shape (N, classes)")
    if options.num_classes is not None and out.shape[1] != options.num_classes:
        raise ConfigError(
            f"{where}: the model outputs {out.shape[1]} scores per image, --num-classes is {options.num_classes}"
        )
    if options.class_names is not None and out.shape[1] != len(options.class_names):
        raise ConfigError(f"{where}: the model outputs {out.shape[1]} scores, --class-names names {len(options.class_names)}")
    return out


def _onnx_parity(net: nn.Module, payload: bytes, x: torch.Tensor, where: str) -> float:
    try:
        import onnxruntime as ort
    except ImportError:
        raise ConfigError(f"{where}: the parity check needs onnxruntime (pip install onnxruntime)") from None
    try:
        session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        expected = session.run(None, {name: x.detach().cpu().numpy().astype(np.float32)})[0]
    except Exception as exc:  # onnxruntime's errors have no common public base class
        raise ConfigError(
            f"{where}: onnxruntime cannot run it on inputs of shape {tuple(x.shape)} ({str(exc).strip().splitlines()[0][:160]})"
        ) from None
    with torch.no_grad():
        got = net(x).detach().cpu().numpy()
    if got.shape != expected.shape:
        raise ConfigError(f"{where}: redblue's conversion gives {got.shape}, onnxruntime {expected.shape}")
    diff = float(np.abs(got.astype(np.float64) - expected).max()) if got.size else 0.0
    if not diff <= ONNX_TOLERANCE:
        raise ConfigError(
            f"{where}: conversion fails the parity check against onnxruntime (max |logit difference| {diff:.3g} "
            f"> {ONNX_TOLERANCE:g} on the first {x.shape[0]} images)"
        )
    return diff


def _model_name(main_path: Path, weights_path: Path, factory: str | None) -> str:
    """A result name that tells the routes apart: ``net.onnx`` -> ``net-onnx``, a module's
    weights ``rgb.safetensors`` -> ``rgb`` (``net.pt`` -> ``net-pt``), with a factory other than
    ``build`` appended (``net.py:build_rgb`` + ``rgb.safetensors`` -> ``rgb-build_rgb``)."""
    if factory is None:
        return main_path.name.replace(".", "-")
    stem = weights_path.stem if weights_path.suffix == ".safetensors" else weights_path.name.replace(".", "-")
    return stem if factory == "build" else f"{stem}-{factory}"


def _fingerprint(net: nn.Module, shape: tuple[int, ...]) -> str:
    """SHA-256 of what the model *is* beyond the files named on the command line: every tensor
    of its state dict, its module structure, and its outputs (to 4 decimals) on fixed random
    images. A helper module that the user's file imports, or ONNX data read from beside the
    file, changes it, so no cached result of another model is reused."""
    digest = hashlib.sha256(repr(net).encode())
    for key, tensor in sorted(net.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                      if tensor.numel() else b"")  # fmt: skip
    probe = torch.rand((4, *shape), generator=torch.Generator().manual_seed(1234))
    with torch.no_grad():
        outputs = net(probe).detach().cpu().double().numpy()
    digest.update(np.round(outputs, 4).tobytes())
    return digest.hexdigest()


def is_record(spec: str) -> bool:
    return Path(spec).suffix in (".json", ".safetensors") and ":" not in Path(spec).name


def load_any_model(
    spec: str,
    options: ModelOptions | None = None,
    *,
    device: torch.device | str = "cpu",
    probe: torch.Tensor | None = None,
) -> LoadedModel:
    """The model ``spec`` names (see the module docstring), on ``device``, in eval mode;
    one that fails in channels_last layout on the probe is marked to run in the default one
    (:func:`redblue.train.check_layout`).

    ``probe``: a few test images (float in [0, 1]) to check the model on at load: it must
    accept them and output ``(N, classes)`` scores; an ONNX model must agree with onnxruntime
    on them. ConfigError / IntegrityError with one line naming the file otherwise.
    """
    options = options or ModelOptions()
    if is_record(spec):
        if options.weights is not None:
            raise ConfigError(f"--weights: not used with a redblue record ({spec} pins its own weights)")
        if options.mean is not None or options.input_shape is not None or options.num_classes is not None \
                or options.class_names is not None:  # fmt: skip
            raise ConfigError(
                "--mean/--std/--input-shape/--num-classes/--class-names: a redblue record already says what its model expects"
            )
        return load_model(Path(spec), device=device)
    files: dict[str, str] = {}
    factory: str | None = None
    declared: list[int | None] | None = None
    payload = b""
    if spec.endswith(".py") or (":" in Path(spec).name and spec.rpartition(":")[0].endswith(".py")):
        if ":" not in Path(spec).name:
            raise ConfigError(f"--model {spec}: name the function that builds the model, as {spec}:build")
        net, source_path, source = _import_factory(spec)
        files[str(source_path)] = sha256_bytes(source)
        if options.weights is None:
            raise ConfigError(f"--model {spec}: give its weights with --weights FILE (.safetensors or a torch.save state dict)")
        weights_path = Path(options.weights)
        weights = _read(weights_path, "--weights")
        files[str(weights_path)] = sha256_bytes(weights)
        _load_weights(net, weights_path, _state_dict(weights_path, weights))
        kind, main_path, factory = "module", source_path, spec.rpartition(":")[2]
    else:
        if options.weights is not None:
            raise ConfigError(f"--weights: only used with --model FILE.py:FUNCTION ({spec} holds its own weights)")
        main_path = weights_path = Path(spec)
        payload = _read(main_path, "--model")
        files[str(main_path)] = sha256_bytes(payload)
        if main_path.suffix == ".onnx":
            net, declared = onnx_module(payload, f"--model {main_path}")
            kind = "onnx"
        else:
            net, kind = _torchscript(main_path, payload), "torchscript"
    net.eval()
    inner, normalize = net, None
    if options.mean is not None and options.std is not None:
        normalize = Normalize(options.mean, options.std)
        net = nn.Sequential(normalize, inner)
    shape = _input_shape(options, declared, probe)
    if probe is not None and tuple(probe.shape[1:]) != tuple(shape):
        raise ConfigError(f"--input-shape {','.join(map(str, shape))}: the data's images are {shape_text(list(probe.shape[1:]))}")
    x = probe[:PROBE_IMAGES].float().cpu() if probe is not None else torch.rand((2, *shape), generator=torch.Generator().manual_seed(0))
    if options.mean is not None and len(options.mean) not in (1, shape[0]):
        raise ConfigError(f"--mean has {len(options.mean)} values for images with {shape[0]} channels")
    where = f"--model {main_path}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = _check_outputs(net, x, where, options)
        parity = None
        if kind == "onnx":
            parity = _onnx_parity(inner, payload, x if normalize is None else normalize(x), where)
    num_classes = int(out.shape[1])
    fingerprint = _fingerprint(net, shape)
    settings = {"factory": factory, "input_shape": list(shape), "num_classes": num_classes,
                "mean": list(options.mean) if options.mean else None, "std": list(options.std) if options.std else None,
                "class_names": list(options.class_names) if options.class_names else None}  # fmt: skip
    record: dict[str, Any] = {
        "format": USER_FORMAT,
        "name": _safe_name(_model_name(main_path, weights_path, factory)),
        "model_name": kind,
        "source": kind,
        "files": files,
        "weights_sha256": sha256_json({"files": files, "settings": settings, "fingerprint": fingerprint}),
        **settings,
        "onnx_parity_max_abs_diff": parity,
    }
    net = check_layout(net, x).to(torch.device(device)).eval()
    return LoadedModel(model=net, record=record, json_path=main_path, weights_path=weights_path,
                       definition=inner if kind == "module" else None)  # fmt: skip
