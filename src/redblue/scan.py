"""Static scanner for model files: finds code-execution risk without loading anything.

A pickle is a small program: its ``GLOBAL``/``STACK_GLOBAL`` opcodes import any
callable by name and ``REDUCE``/``INST``/``OBJ``/``NEWOBJ`` call it, so ``pickle.load``
(and ``torch.load``, and ``np.load(allow_pickle=True)``) on an untrusted file runs
whatever its author chose. This module never unpickles: it walks the opcodes with
:mod:`pickletools` and a symbolic stack (so imports assembled from memoised strings are
still resolved), and reports every imported global and every call whose target is not
on a small allowlist of tensor-rebuild constructors.

What is scanned, by content first (a pickle renamed ``.json`` is still found), then by
file extension:

- pickle streams (``.pkl``, ``.pickle``, raw/legacy ``torch.save`` files: all five of
  their pickles);
- zip archives (``torch.save`` checkpoints ``.pt``/``.pth``/``.ckpt``/``.bin``, ``.npz``,
  any zip): every ``*.pkl`` member and every ``*.npy`` member, read with :mod:`zipfile`;
- NumPy ``.npy``: the header is parsed with :func:`ast.literal_eval` (never ``np.load``);
  an object array is a finding and its pickled payload is scanned too;
- safetensors: the header is validated (8-byte length, JSON, dtypes, shapes, offsets
  contiguous and consistent with the file size). A malformed file is an *error*.

Severity of a finding: ``critical`` (``os``/``posix``/``nt``, ``subprocess``,
``builtins.eval``/``exec``/``compile``/``__import__``/``getattr``, ``runpy``,
``importlib``, nested deserialisers, network, ...), ``high`` (an unknown callable is
called, or a call target cannot be resolved statically), ``medium`` (an unknown global is
imported, a NumPy object array, TorchScript code, the copyreg extension registry),
``low`` (a known data-only standard-library constructor outside the allowlist, such as
``datetime.date`` or ``math.sqrt``).

Example:
    >>> import pickle, tempfile, pathlib
    >>> class Evil:
    ...     def __reduce__(self):
    ...         import os
    ...         return (os.system, ("echo owned",))
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "evil.pkl"
    >>> _ = path.write_bytes(pickle.dumps(Evil()))
    >>> report = scan_file(path)
    >>> report.status, report.findings[0].severity, report.findings[0].name
    ('findings', 'critical', 'posix.system')
"""

from __future__ import annotations

import _compat_pickle
import ast
import codecs
import contextlib
import io
import json
import os

# Bandit B403 flags any pickle-family import: pickletools is used only as an opcode parser
# (genops) over bytes; nothing here unpickles.
import pickletools  # nosec B403
import re
import tarfile
import warnings
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np

from redblue.errors import ConfigError, IntegrityError
from redblue.utils import MAX_JSON_BYTES, open_regular

SEVERITIES: tuple[str, ...] = ("low", "medium", "high", "critical")
SCANNED_SUFFIXES: tuple[str, ...] = (
    ".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin", ".npy", ".npz", ".safetensors",
)
PICKLE_SUFFIXES: tuple[str, ...] = (".pkl", ".pickle", ".pt", ".pth", ".ckpt", ".bin")
MAX_MEMBER_BYTES = 1 << 30  # a pickle or .npy header inside a zip larger than this is refused
MAX_NPY_HEADER = 1 << 16
MAX_TEXT_LINE = 1 << 16  # a protocol-0 argument line longer than this is not resolved (a finding)
MAX_SAFETENSORS_HEADER = 100 * (1 << 20)  # the safetensors library's own limit
TORCH_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # first pickle of a legacy (non-zip) torch.save file

# --- what a global is -------------------------------------------------------------------

_ALLOWED: frozenset[str] = frozenset(
    {
        "collections.OrderedDict",
        "collections.Counter",
        "_codecs.encode",
        "copyreg._reconstructor",
        "copy_reg._reconstructor",
        "copyreg.__newobj__",
        "torch.Size",
        "torch.Tensor",
        "torch.device",
        "torch.nn.parameter.Parameter",
        "torch.serialization._get_layout",
        "torch._tensor._rebuild_from_type_v2",
        "torch.storage.TypedStorage",
        "torch.storage.UntypedStorage",
        "numpy.ndarray",
        "numpy.dtype",
        "numpy.core.multiarray._reconstruct",
        "numpy._core.multiarray._reconstruct",
        "numpy.core.multiarray.scalar",
        "numpy._core.multiarray.scalar",
        "numpy.core.numeric._frombuffer",  # protocol-5 pickles of arrays
        "numpy._core.numeric._frombuffer",
    }
    | {f"torch._utils.{fn}" for fn in (
        "_rebuild_tensor", "_rebuild_tensor_v2", "_rebuild_tensor_v3", "_rebuild_parameter",
        "_rebuild_parameter_with_state", "_rebuild_qtensor", "_rebuild_sparse_tensor",
        "_rebuild_meta_tensor_no_storage", "_rebuild_nested_tensor", "_rebuild_wrapper_subclass",
        "_rebuild_device_tensor_from_numpy", "_rebuild_device_tensor_from_cpu_tensor",
    )}
    | {f"{m}.{t}" for m in ("builtins", "__builtin__") for t in (
        "object", "set", "frozenset", "bytearray", "bytes", "complex", "slice", "range",
        "list", "dict", "tuple", "int", "float", "str", "bool",
    )}
)
# torch.float32, torch.bfloat16, torch.qint8, torch.per_tensor_affine, ...; torch.FloatStorage,
# torch.cuda.HalfTensor, ...
_TORCH_DTYPE = re.compile(
    r"torch\.(u?int\d+|float\d*(_e\d+m\d+\w*)?|float4_\w+|bfloat16|complex\d+|half|double|short|long|"
    r"int|bool|chalf|cfloat|cdouble|q(u)?int\d+(x\d+)?|bits\w+|per_(tensor|channel)_\w+|strided|"
    r"sparse_\w+|_mkldnn|contiguous_format|channels_last(_3d)?|preserve_format)"
)
_TORCH_CLASS = re.compile(r"torch(\.cuda)?\.[A-Z][A-Za-z0-9]*(Storage|Tensor)")
_NUMPY_DTYPE_CLASS = re.compile(r"numpy\.dtypes\.[A-Za-z0-9]+DType")

# Data-only standard-library constructors: outside the allowlist, but they run no code.
_LOW_RISK_MODULES: frozenset[str] = frozenset({"math", "cmath", "fractions", "decimal", "numbers"})
_LOW_RISK: frozenset[str] = frozenset(
    {
        "datetime.date", "datetime.datetime", "datetime.time", "datetime.timedelta",
        "datetime.timezone", "uuid.UUID", "argparse.Namespace", "collections.defaultdict",
        "collections.deque", "pathlib.Path", "pathlib.PosixPath", "pathlib.WindowsPath",
        "pathlib.PurePath", "pathlib.PurePosixPath", "pathlib.PureWindowsPath",
        "types.SimpleNamespace",
    }
)

_DANGEROUS_MODULES: dict[str, str] = {
    **dict.fromkeys(("os", "posix", "nt", "pty", "_posixsubprocess"), "operating-system calls: shell commands, files, processes"),
    **dict.fromkeys(("subprocess", "multiprocessing", "asyncio", "commands", "popen2"), "runs other programs or processes"),
    **dict.fromkeys(("runpy", "importlib", "imp", "pkgutil", "zipimport"), "imports or runs arbitrary modules"),
    **dict.fromkeys(("distutils", "setuptools", "pip", "venv", "ensurepip"), "builds, installs or runs code"),
    **dict.fromkeys(("code", "codeop", "pdb", "bdb", "timeit", "trace", "profile", "cProfile"), "compiles or runs Python code"),
    **dict.fromkeys(("pickle", "_pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"), "nested deserialisation, which runs code"),
    **dict.fromkeys(("socket", "ssl", "urllib", "urllib2", "http", "httplib", "requests", "ftplib", "smtplib", "telnetlib", "webbrowser", "xmlrpc"), "network access"),
    **dict.fromkeys(("shutil", "tempfile", "glob", "io", "_io", "fileinput", "zipfile", "tarfile"), "file-system access"),
    **dict.fromkeys(("sys", "ctypes", "_ctypes", "gc", "signal", "resource", "threading", "_thread"), "interpreter or native-code internals"),
}
_DANGEROUS_BUILTINS: dict[str, str] = {
    **dict.fromkeys(("eval", "exec", "compile", "breakpoint", "input", "help"), "evaluates or runs arbitrary Python code"),
    **dict.fromkeys(("__import__",), "imports arbitrary modules"),
    **dict.fromkeys(("getattr", "setattr", "delattr", "globals", "locals", "vars", "__getattribute__"), "reaches arbitrary attributes (getattr(os, 'system'), ...)"),
    **dict.fromkeys(("open", "exit", "quit", "memoryview"), "file access or interpreter control"),
}
_DANGEROUS_NAMES: dict[str, str] = {
    **dict.fromkeys(("operator.attrgetter", "operator.methodcaller", "operator.getitem", "functools.reduce"), "reaches arbitrary attributes or calls"),
    **dict.fromkeys(("types.FunctionType", "types.CodeType", "types.LambdaType", "types.MethodType", "types.ModuleType"), "builds functions from bytecode"),
    **dict.fromkeys(("torch.load", "torch.serialization.load", "torch.jit.load", "torch.storage._load_from_bytes", "numpy.load", "numpy.lib.npyio.load"), "nested deserialisation, which runs code"),
    **dict.fromkeys(("_operator.attrgetter", "_operator.methodcaller"), "reaches arbitrary attributes or calls"),
    **dict.fromkeys(("torch.hub.load", "torch.hub.load_state_dict_from_url", "torch.hub.download_url_to_file"), "downloads and runs code"),
}
_DANGEROUS_PREFIXES: dict[str, str] = {
    "torch.hub": "downloads and runs code",
    "torch.package": "runs packaged Python code",
    "torch._C._jit": "TorchScript internals",
    "numpy.f2py": "compiles and runs code",
    "numpy.distutils": "compiles and runs code",
    "numpy.testing": "runs programs",
}


def is_allowed(name: str) -> bool:
    """True when the global ``module.name`` is a known-safe tensor/array/container constructor."""
    return (
        name in _ALLOWED
        or _TORCH_DTYPE.fullmatch(name) is not None
        or _TORCH_CLASS.fullmatch(name) is not None
        or _NUMPY_DTYPE_CLASS.fullmatch(name) is not None
    )


def classify_global(module: str, name: str, *, called: bool) -> tuple[str | None, str]:
    """(severity or None when allowed, reason) for importing ``module.name`` (and calling it)."""
    full = f"{module}.{name}"
    if is_allowed(full):
        return None, "allowlisted constructor"
    root = module.split(".", 1)[0]
    if "." in name:  # protocol 4+ resolves dotted names by walking attributes
        parts = name.split(".")
        if any(part.startswith("__") or part in _DANGEROUS_MODULES or part in _DANGEROUS_BUILTINS for part in parts):
            return "critical", "walks attributes through a dunder or a dangerous name (e.g. __globals__, os, system)"
    if module in ("builtins", "__builtin__") and name in _DANGEROUS_BUILTINS:
        return "critical", _DANGEROUS_BUILTINS[name]
    if full in _DANGEROUS_NAMES:
        return "critical", _DANGEROUS_NAMES[full]
    for prefix, reason in _DANGEROUS_PREFIXES.items():
        if module == prefix or module.startswith(prefix + "."):
            return "critical", reason
    if root in _DANGEROUS_MODULES:
        return "critical", _DANGEROUS_MODULES[root]
    if root == "__torch__":
        return "medium", "TorchScript class: torch.jit.load compiles it from the archive's code/ files"
    if full in _LOW_RISK or module in _LOW_RISK_MODULES:
        return "low", "data-only standard-library constructor, but not a tensor constructor"
    if called:
        return "high", "unknown callable: loading the file runs it"
    return "medium", "unknown global: loading the file imports its module"


# --- results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Finding:
    """One suspicious thing in a file: a global, a call, an object array, code."""

    severity: str  # low | medium | high | critical
    rule: str  # dangerous-global, unknown-global, unknown-call, unusual-global, computed-call, ...
    name: str  # e.g. "posix.system", or what was found
    message: str
    member: str | None = None  # member of a zip archive, or the pickle payload of a .npy
    offset: int | None = None  # byte offset of the first occurrence in that stream
    count: int = 1  # how many times it occurs in that stream


@dataclass
class FileReport:
    """What the scanner saw in one file."""

    path: str
    kind: str  # pickle, torch-legacy, torch-zip, zip, npz, npy, safetensors, unknown
    status: str = "clean"  # clean | findings | error | skipped
    findings: list[Finding] = field(default_factory=list)
    imports: list[str] = field(default_factory=list)  # every global imported, allowed or not
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    explicit: bool = True  # named on the command line (False: found by walking a directory)

    @property
    def worst(self) -> str | None:
        """Highest severity among the findings, or None."""
        if not self.findings:
            return None
        return max((f.severity for f in self.findings), key=SEVERITIES.index)

    def finish(self) -> FileReport:
        if self.error is not None:
            self.status = "error"
        elif self.status != "skipped":
            self.status = "findings" if self.findings else "clean"
        self.findings.sort(key=lambda f: (-SEVERITIES.index(f.severity), f.member or "", f.offset or 0))
        self.imports = sorted(set(self.imports))
        return self


@dataclass
class ScanReport:
    """All files scanned by one call of :func:`scan_paths`."""

    files: list[FileReport]

    def counts(self) -> dict[str, int]:
        out = {"files": len(self.files), "clean": 0, "findings": 0, "error": 0, "skipped": 0}
        for report in self.files:
            out[report.status] += 1
        for severity in SEVERITIES:
            out[severity] = sum(1 for r in self.files for f in r.findings if f.severity == severity)
        return out

    def exit_code(self, fail_on: str = "low") -> int:
        """2 if any file could not be read or is malformed, else 1 if any finding is at
        least ``fail_on``, else 0."""
        if fail_on not in SEVERITIES:
            raise ConfigError(f"--fail-on {fail_on!r}: expected one of {', '.join(SEVERITIES)}")
        if any(r.status == "error" for r in self.files):
            return 2
        threshold = SEVERITIES.index(fail_on)
        if any(SEVERITIES.index(f.severity) >= threshold for r in self.files for f in r.findings):
            return 1
        return 0

    def to_dict(self, fail_on: str = "low") -> dict[str, Any]:
        return {
            "format": "redblue.scan/1",
            "exit_code": self.exit_code(fail_on),
            "fail_on": fail_on,
            "summary": self.counts(),
            "files": [asdict(r) for r in self.files],
        }


# --- the pickle walker ------------------------------------------------------------------


class MalformedError(Exception):
    """The stream is not a well-formed pickle (pickle.load would fail there too)."""


@dataclass(frozen=True)
class _Global:
    module: str
    name: str


@dataclass(frozen=True)
class _Const:
    value: str | int


class _Mark:
    pass


@dataclass(frozen=True)
class _Tuple:
    items: tuple[Any, ...]


# Allowlisted helpers that call the classes they receive as arguments (how many of them).
_CALLS_ITS_ARGUMENTS = {"copyreg._reconstructor": 2, "copyreg.__newobj__": 1, "copyreg.__newobj_ex__": 1}


_MARK = _Mark()
_UNKNOWN = object()
_LITERAL_STR = frozenset(
    {"STRING", "BINSTRING", "SHORT_BINSTRING", "UNICODE", "SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8"}
)
_LITERAL_INT = frozenset({"INT", "BININT", "BININT1", "BININT2", "LONG", "LONG1", "LONG4"})
_PUT = frozenset({"PUT", "BINPUT", "LONG_BINPUT"})
_GET = frozenset({"GET", "BINGET", "LONG_BINGET"})


@dataclass
class _Suspect:
    severity: str
    rule: str
    reason: str
    offset: int | None
    imported: int = 0
    called: int = 0


_RULES = {
    ("critical", False): "dangerous-global", ("critical", True): "dangerous-call",
    ("high", True): "unknown-call", ("medium", False): "unknown-global", ("medium", True): "torchscript-class",
    ("low", False): "unusual-global", ("low", True): "unusual-call",
}


def _module_and_name(stream: IO[bytes], pos: int | None, arg: Any) -> tuple[str, str]:
    """The exact (module, name) of a GLOBAL or INST opcode at ``pos``. pickletools joins the
    two lines with a space, which loses the boundary when the module holds a space; the
    unpickler reads each line as UTF-8, so they are read again from the stream."""
    if pos is None or not stream.seekable():
        module, _, name = str(arg).partition(" ")
        return module, name
    end = stream.tell()
    stream.seek(pos + 1)
    raw = stream.read(end - pos - 1)
    stream.seek(end)
    lines = raw.split(b"\n")
    if len(lines) != 3 or lines[2]:
        raise MalformedError(f"GLOBAL/INST argument at byte {pos} is not two lines")
    names = _decode_names(lines[0], lines[1])
    if names is None:
        raise MalformedError(f"GLOBAL/INST argument at byte {pos} is not UTF-8")
    return names


def _decode_names(module: bytes, name: bytes) -> tuple[str, str] | None:
    """A GLOBAL/INST argument's two lines (without newlines) as the unpickler reads them (UTF-8)."""
    try:
        return module.decode("utf-8"), name.decode("utf-8")
    except UnicodeDecodeError:
        return None


class _PickleWalker:
    """Symbolic execution of one pickle stream: stack and memo of names, nothing real."""

    def __init__(self, member: str | None) -> None:
        self.member = member
        self.stack: list[Any] = []
        self.memo: dict[int, Any] = {}
        self.imports: list[str] = []
        self.suspects: dict[str, _Suspect] = {}
        self.persistent_ids = 0
        self.protocol = 0

    # stack helpers
    def _pop(self, pos: int | None) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise MalformedError(f"stack underflow at byte {pos}")
        return self.stack.pop()

    def _pop_to_mark(self, pos: int | None) -> list[Any]:
        items: list[Any] = []
        while self.stack:
            item = self.stack.pop()
            if item is _MARK:
                items.reverse()
                return items
            items.append(item)
        raise MalformedError(f"no MARK on the stack at byte {pos}")

    def _top(self, pos: int | None) -> Any:
        if not self.stack or self.stack[-1] is _MARK:
            raise MalformedError(f"stack underflow at byte {pos}")
        return self.stack[-1]

    # findings
    def _suspect(self, name: str, severity: str, rule: str, reason: str, pos: int | None, *, called: bool) -> None:
        current = self.suspects.get(name)
        if current is None:
            current = self.suspects[name] = _Suspect(severity, rule, reason, pos)
        elif SEVERITIES.index(severity) > SEVERITIES.index(current.severity):
            current.severity, current.rule, current.reason = severity, rule, reason
        if called:
            current.called += 1
        else:
            current.imported += 1

    def _import(self, module: str, name: str, pos: int | None) -> _Global:
        if self.protocol < 3:  # what pickle.Unpickler(fix_imports=True) really imports
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[module, name]
            elif module in _compat_pickle.IMPORT_MAPPING:
                module = _compat_pickle.IMPORT_MAPPING[module]
        full = f"{module}.{name}"
        self.imports.append(full)
        severity, reason = classify_global(module, name, called=False)
        if severity is not None:
            self._suspect(full, severity, _RULES[severity, False], reason, pos, called=False)
        return _Global(module, name)

    def _call(self, target: Any, opcode: str, pos: int | None) -> None:
        if isinstance(target, _Global):
            full = f"{target.module}.{target.name}"
            severity, reason = classify_global(target.module, target.name, called=True)
            if severity is not None:
                self._suspect(full, severity, _RULES[severity, True], reason, pos, called=True)
        else:
            self._suspect(
                "<computed callable>", "high", "computed-call",
                f"{opcode} calls a value built inside the pickle, not an imported global: "
                "it cannot be checked statically",
                pos, called=True,
            )

    def walk(self, stream: IO[bytes]) -> Any:
        """Walk one stream up to its STOP; returns the symbolic value it would produce.

        pickletools is stricter than the unpickler on a few text opcodes (see
        :meth:`_lenient_step`); where it stops on one of those, the opcode is read as the
        unpickler reads it and the walk goes on after it, so the scanner never stops earlier
        than ``pickle.load`` would."""
        seekable = stream.seekable()
        while True:
            next_op = stream.tell() if seekable else None
            try:
                with warnings.catch_warnings():  # pickletools warns on odd escapes in STRING arguments
                    warnings.simplefilter("ignore", DeprecationWarning)
                    for op, arg, pos in pickletools.genops(stream):
                        if op.name in ("GLOBAL", "INST"):
                            arg = _module_and_name(stream, pos, arg)
                        result = self._step(op, arg, pos)
                        if op.name == "STOP":
                            return result
                        next_op = stream.tell() if seekable else None
            except (ValueError, OverflowError, MemoryError) as exc:
                # pickletools raises ValueError for unknown opcodes, truncated or undecodable
                # arguments and a stream that ends before STOP.
                if next_op is not None and self._lenient_step(stream, next_op):
                    continue
                raise MalformedError(str(exc) or type(exc).__name__) from None
            raise MalformedError("stream ended before STOP")

    def _lenient_step(self, stream: IO[bytes], pos: int) -> bool:
        """Read the text opcode at ``pos`` as the unpickler does where pickletools refuses it:
        GLOBAL/INST names in UTF-8 (pickletools: ASCII), INT/LONG in any base (``0x10``, as
        C's strtol), STRING with non-ASCII bytes (torch.load decodes them as UTF-8). True when
        the opcode was consumed (the walk goes on after it)."""
        stream.seek(pos)
        code = stream.read(1)
        if code in (b"c", b"i"):
            lines = [stream.readline(MAX_TEXT_LINE + 1), stream.readline(MAX_TEXT_LINE + 1)]
            if any(len(line) > MAX_TEXT_LINE for line in lines):
                self._suspect("<unreadable import>", "high", "computed-import",
                              f"a GLOBAL/INST name longer than {MAX_TEXT_LINE} bytes: not resolved",
                              pos, called=False)  # fmt: skip
                return False
            names = _decode_names(lines[0][:-1], lines[1][:-1])
            if not all(line.endswith(b"\n") for line in lines) or names is None:
                return False
            self._step(_OPCODES[code], names, pos)  # the same GLOBAL / INST step as any other
            return True
        if code in (b"I", b"L"):
            line = stream.readline(MAX_TEXT_LINE + 1)
            if not line.endswith(b"\n") or not re.fullmatch(rb"\s*[-+]?\w+L?\s*", line[:-1]):
                return False
            self._generic(_OPCODES[code], pos)  # a number of unknown value: it never names an import
            return True
        if code == b"S":
            line = stream.readline(MAX_TEXT_LINE + 1)
            body = line[:-1]
            if not line.endswith(b"\n") or len(body) < 2 or body[:1] not in (b"'", b'"') or body[-1:] != body[:1]:
                return False
            try:
                raw = codecs.escape_decode(body[1:-1])[0]
            except ValueError:
                return False
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                text = raw.decode("latin-1")
            self._step(_OPCODES[code], text, pos)
            return True
        return False

    def _step(self, op: pickletools.OpcodeInfo, arg: Any, pos: int | None) -> Any:
        name = op.name
        if name in _LITERAL_STR:
            self.stack.append(_Const(arg) if isinstance(arg, str) else _UNKNOWN)
        elif name in _LITERAL_INT:
            self.stack.append(_Const(int(arg)))
        elif name == "GLOBAL":
            module, attr = arg
            self.stack.append(self._import(module, attr, pos))
        elif name == "STACK_GLOBAL":
            attr, module = self._pop(pos), self._pop(pos)
            if isinstance(module, _Const) and isinstance(attr, _Const) and isinstance(module.value, str) and isinstance(attr.value, str):
                self.stack.append(self._import(module.value, attr.value, pos))
            else:
                self._suspect(
                    "<computed import>", "high", "computed-import",
                    "STACK_GLOBAL imports a name built inside the pickle: it cannot be checked statically",
                    pos, called=False,
                )
                self.stack.append(_UNKNOWN)
        elif name == "INST":
            module, attr = arg
            target = self._import(module, attr, pos)  # as CPython: the import comes before the MARK is popped
            self._pop_to_mark(pos)
            self._call(target, name, pos)
            self.stack.append(_UNKNOWN)
        elif name == "OBJ":
            items = self._pop_to_mark(pos)
            if not items:
                raise MalformedError(f"OBJ without a class at byte {pos}")
            self._call(items[0], name, pos)
            self.stack.append(_UNKNOWN)
        elif name in ("REDUCE", "NEWOBJ", "NEWOBJ_EX"):
            popped = [self._pop(pos) for _ in range(len(op.stack_before) - 1)]  # (kwargs,) args
            target = self._pop(pos)
            self._call(target, name, pos)
            if name == "REDUCE" and isinstance(target, _Global) and isinstance(popped[-1], _Tuple):
                for item in popped[-1].items[: _CALLS_ITS_ARGUMENTS.get(f"{target.module}.{target.name}", 0)]:
                    self._call(item, f"REDUCE via {target.module}.{target.name}", pos)
            self.stack.append(_UNKNOWN)
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            items = [self._pop(pos) for _ in op.stack_before]
            self.stack.append(_Tuple(tuple(reversed(items))))
        elif name == "TUPLE":
            self.stack.append(_Tuple(tuple(self._pop_to_mark(pos))))
        elif name == "EMPTY_TUPLE":
            self.stack.append(_Tuple(()))
        elif name in _PUT:
            self.memo[int(arg)] = self._top(pos)
        elif name == "MEMOIZE":
            self.memo[len(self.memo)] = self._top(pos)
        elif name in _GET:
            if int(arg) not in self.memo:
                raise MalformedError(f"memo key {arg} read before it was stored, at byte {pos}")
            self.stack.append(self.memo[int(arg)])
        elif name in ("EXT1", "EXT2", "EXT4"):
            self._suspect(
                f"<extension {arg}>", "medium", "extension-registry",
                f"{name} imports a global through the copyreg extension registry (code {arg}): "
                "what it names depends on the loading process",
                pos, called=False,
            )
            self.stack.append(_UNKNOWN)
        elif name in ("PERSID", "BINPERSID"):
            self.persistent_ids += 1
            if name == "BINPERSID":
                self._pop(pos)
            self.stack.append(_UNKNOWN)
        elif name == "BUILD":
            self._pop(pos)  # the state
            target = self._pop(pos)
            if isinstance(target, _Global):
                self._suspect(
                    f"{target.module}.{target.name}", "high", "build-on-global",
                    "BUILD sets attributes on an imported object, not on a new instance: "
                    "loading the file would monkey-patch it",
                    pos, called=True,
                )
            self.stack.append(target)
        elif name == "POP":
            if not self.stack:
                raise MalformedError(f"stack underflow at byte {pos}")
            self.stack.pop()  # as CPython: right after a MARK, POP drops the mark itself
        elif name == "DUP":
            self.stack.append(self._top(pos))
        elif name == "MARK":
            self.stack.append(_MARK)
        elif name == "PROTO":
            self.protocol = int(arg)
        elif name == "STOP":
            return self._pop(pos)
        else:
            self._generic(op, pos)
        return None

    def _generic(self, op: pickletools.OpcodeInfo, pos: int | None) -> None:
        before = list(op.stack_before)
        if pickletools.markobject in before:
            cut = before.index(pickletools.markobject)
            self._pop_to_mark(pos)
            before = before[:cut]
        for _ in before:
            self._pop(pos)
        for _ in op.stack_after:
            self.stack.append(_UNKNOWN)

    def findings(self) -> list[Finding]:
        out = []
        for name, s in self.suspects.items():
            if name.startswith("<"):
                message = s.reason
            elif s.rule == "build-on-global":
                message = f"{name}: {s.reason}"
            else:
                how = "imported" + (f" and called {s.called}x" if s.called else ", not called")
                message = f"{name} {how}: {s.reason}"
            rule = s.rule if name.startswith("<") or s.rule == "build-on-global" else _RULES.get((s.severity, s.called > 0), s.rule)
            out.append(Finding(s.severity, rule, name, message, self.member, s.offset, max(s.imported, s.called)))
        return out


def _scan_pickle_stream(
    stream: IO[bytes], report: FileReport, member: str | None, *, allow_legacy: bool = True
) -> None:
    """Scan one pickle (or the five pickles of a legacy torch.save file) into ``report``."""
    streams = 1
    index = 0
    while index < streams:
        walker = _PickleWalker(member)
        try:
            value = walker.walk(stream)
        finally:
            report.findings.extend(walker.findings())
            report.imports.extend(walker.imports)
        if index == 0 and allow_legacy and isinstance(value, _Const) and value.value == TORCH_LEGACY_MAGIC:
            report.kind = "torch-legacy"
            streams = 5  # magic, protocol version, sys info, the object, storage keys
        if walker.persistent_ids:
            report.notes.append(
                f"{member or 'pickle'}: {walker.persistent_ids} persistent id(s) (tensor storages, "
                "resolved by the loader, not by pickle)"
            )
        index += 1


# --- formats ----------------------------------------------------------------------------

_SAFETENSORS_BITS: dict[str, int] = {
    "BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "I16": 16, "U16": 16, "F16": 16,
    "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}
MAX_RANK = 32
_OPCODES = {op.code.encode("latin-1"): op for op in pickletools.opcodes}
_OPCODE_BYTES = frozenset(_OPCODES)
_PROTOCOLS = (b"\x00", b"\x01", b"\x02", b"\x03", b"\x04", b"\x05")


class FormatError(Exception):
    """A file that does not follow its own format (truncated, corrupted header, ...)."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def validate_safetensors_header(header: bytes, file_size: int) -> dict[str, Any]:
    """Check a safetensors header (the JSON after the 8-byte length) against the file size.

    Returns the parsed header; raises :class:`FormatError` naming the first problem.
    """
    header_len = len(header)
    try:
        parsed = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise FormatError(f"header is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(parsed, dict):
        raise FormatError("header is not a JSON object")
    data_size = file_size - 8 - header_len
    spans: list[tuple[int, int, str]] = []
    for name, entry in parsed.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise FormatError("__metadata__ must map strings to strings")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise FormatError(f"tensor {name!r}: expected exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if dtype not in _SAFETENSORS_BITS:
            raise FormatError(f"tensor {name!r}: unknown dtype {dtype!r}")
        if not isinstance(shape, list) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
            raise FormatError(f"tensor {name!r}: shape must be a list of at most {MAX_RANK} non-negative integers, got {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise FormatError(f"tensor {name!r}: data_offsets must be [begin, end], got {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end:
            raise FormatError(f"tensor {name!r}: data_offsets {offsets} are not 0 <= begin <= end")
        numel = 1
        for dim in shape:
            numel *= dim
        bits = numel * _SAFETENSORS_BITS[dtype]
        if bits % 8 or bits // 8 != end - begin:
            raise FormatError(
                f"tensor {name!r}: {dtype} {shape} needs {bits / 8:g} bytes but data_offsets span {end - begin}"
            )
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            what = "overlaps the previous tensor" if begin < position else f"leaves a gap of {begin - position} bytes"
            raise FormatError(f"tensor {name!r}: data starts at {begin}, expected {position} ({what})")
        position = end
    if position != data_size:
        if position > data_size:
            raise FormatError(
                f"tensors need {position} data bytes but the file holds {data_size}: the file is truncated"
            )
        raise FormatError(f"{data_size - position} bytes after the last tensor: not a clean safetensors file")
    return parsed


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    header_len = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < header_len <= size - 8


def _scan_safetensors(handle: IO[bytes], size: int, report: FileReport) -> None:
    report.kind = "safetensors"
    if size < 8:
        raise FormatError(f"{size} bytes: too short for the 8-byte safetensors header length")
    header_len = int.from_bytes(handle.read(8), "little")
    if header_len > size - 8:
        raise FormatError(
            f"header length {header_len} exceeds the {size - 8} bytes after it: truncated or corrupted"
        )
    if header_len > MAX_SAFETENSORS_HEADER:
        raise FormatError(f"header length {header_len} exceeds the safetensors limit of 100 MiB")
    header = handle.read(header_len)
    if not header.startswith(b"{"):
        raise FormatError("header does not start with '{'")
    parsed = validate_safetensors_header(header, size)
    tensors = sum(1 for k in parsed if k != "__metadata__")
    report.notes.append(f"safetensors: {tensors} tensor(s), header and offsets consistent with the file size")


def parse_npy_header(head: bytes) -> tuple[np.dtype[Any], tuple[int, ...], bool, int]:
    """(dtype, shape, fortran_order, data offset) of a ``.npy`` stream, with no pickle and
    no ``np.load``: the header dict is read by :func:`ast.literal_eval`."""
    if head[:6] != b"\x93NUMPY" or len(head) < 10:
        raise FormatError("not a .npy stream (bad magic)")
    major = head[6]
    if major == 1:
        header_len, start = int.from_bytes(head[8:10], "little"), 10
    elif major in (2, 3):
        header_len, start = int.from_bytes(head[8:12], "little"), 12
    else:
        raise FormatError(f".npy format version {major} is not 1, 2 or 3")
    if header_len > MAX_NPY_HEADER:
        raise FormatError(f".npy header of {header_len} bytes exceeds {MAX_NPY_HEADER}")
    raw = head[start : start + header_len]
    if len(raw) != header_len:
        raise FormatError(".npy header is truncated")
    try:
        text = raw.decode("utf-8" if major == 3 else "latin1")
        header = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError) as exc:
        raise FormatError(f".npy header is not a Python literal ({type(exc).__name__})") from None
    if not isinstance(header, dict) or set(header) != {"descr", "fortran_order", "shape"}:
        raise FormatError(".npy header must be a dict with descr, fortran_order and shape")
    shape, fortran = header["shape"], header["fortran_order"]
    if not isinstance(shape, tuple) or len(shape) > MAX_RANK or not all(_is_int(d) and d >= 0 for d in shape):
        raise FormatError(f".npy shape must be a tuple of non-negative integers, got {shape!r}")
    if not isinstance(fortran, bool):
        raise FormatError(".npy fortran_order must be True or False")
    try:
        dtype = np.lib.format.descr_to_dtype(header["descr"])
    except (TypeError, ValueError, KeyError, IndexError, SyntaxError, RecursionError) as exc:
        raise FormatError(f".npy descr {header['descr']!r} is not a valid dtype ({exc})") from None
    return dtype, shape, fortran, start + header_len


def _scan_npy(handle: IO[bytes], size: int, report: FileReport, member: str | None) -> None:
    head = handle.read(12 + MAX_NPY_HEADER)
    dtype, shape, _, offset = parse_npy_header(head)
    where = member or "array"
    if dtype.hasobject:
        report.findings.append(
            Finding(
                "medium", "object-array", "numpy object array",
                f"{where}: NumPy array of dtype {dtype.descr if dtype.names else dtype.str} holds Python "
                "objects: reading it needs np.load(allow_pickle=True), which unpickles its payload",
                member,
                offset,
            )
        )
        rest = handle.read(MAX_MEMBER_BYTES + 1)
        if len(rest) > MAX_MEMBER_BYTES:
            raise FormatError(f"{where}: object-array payload larger than {MAX_MEMBER_BYTES} bytes, not scanned")
        payload = io.BytesIO(head[offset:] + rest)
        _scan_pickle_stream(payload, report, f"{where} (pickled payload)", allow_legacy=False)
        return
    numel = 1
    for dim in shape:
        numel *= dim
    expected = numel * dtype.itemsize
    available = size - offset
    if available < expected:
        raise FormatError(f"{where}: {dtype} {shape} needs {expected} data bytes, the file holds {available} (truncated)")
    if available > expected:
        report.notes.append(f"{where}: {available - expected} bytes after the array data are ignored by np.load")


def _read_member(archive: zipfile.ZipFile, info: zipfile.ZipInfo, limit: int) -> bytes:
    if info.file_size > limit:
        raise FormatError(f"member {info.filename} declares {info.file_size} bytes, more than {limit} scanned")
    with archive.open(info) as member:
        data = member.read(limit + 1)
    if len(data) > limit:
        raise FormatError(f"member {info.filename} is larger than {limit} bytes")
    return data


def _member_head(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> bytes:
    try:
        with archive.open(info) as member:
            return member.read(6)
    except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
        raise FormatError(f"cannot read member {info.filename} of the zip archive ({exc})") from None


def _is_tar(handle: IO[bytes]) -> bool:
    """True when ``handle`` is an uncompressed tar archive (what torch.load tries first)."""
    try:
        with tarfile.open(fileobj=handle, mode="r:"):
            return True
    except (tarfile.TarError, OSError, EOFError, ValueError):
        return False
    finally:
        handle.seek(0)


def _scan_tar(handle: IO[bytes], report: FileReport) -> None:
    """A tar archive: the legacy torch.save format, whose members ``storages``, ``tensors``
    and ``pickle`` torch.load unpickles (several pickles per member, raw data between them).
    Each member's first pickle is scanned, and the file is an error either way: the scanner
    cannot follow torch's layout inside the members, so it cannot say the file is safe."""
    report.kind = "tar"
    try:
        with tarfile.open(fileobj=handle, mode="r:") as archive:
            for member in archive:
                if not member.isfile():
                    continue
                if member.size > MAX_MEMBER_BYTES:
                    raise FormatError(f"tar member {member.name} is larger than {MAX_MEMBER_BYTES} bytes")
                extracted = archive.extractfile(member)
                if extracted is None:
                    continue
                with contextlib.suppress(MalformedError):
                    _scan_pickle_stream(io.BytesIO(extracted.read(MAX_MEMBER_BYTES)), report, member.name,
                                        allow_legacy=False)  # fmt: skip
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise FormatError(f"unreadable tar archive ({exc})") from None
    raise FormatError(
        "tar archive (the legacy torch.save format): torch.load unpickles its members, and the scanner "
        "cannot follow them completely; do not load it"
    )


def _scan_zip(handle: IO[bytes], path: Path, report: FileReport) -> None:
    try:
        archive = zipfile.ZipFile(handle)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise FormatError(f"not a readable zip archive ({exc})") from None
    with archive:
        infos = [i for i in archive.infolist() if not i.is_dir()]
        pickles = [i for i in infos if i.filename.endswith((".pkl", ".pickle"))]
        # np.load's NpzFile reads any member that starts with the .npy magic as an array,
        # whatever its name: members are classified by their first bytes, not their suffix.
        arrays = [i for i in infos if i not in pickles and _member_head(archive, i) == b"\x93NUMPY"]
        code = [i for i in infos if i.filename.endswith(".py") and "/code/" in f"/{i.filename}"]
        if any(i.filename.rsplit("/", 1)[-1] == "data.pkl" for i in pickles):
            report.kind = "torch-zip"
        elif arrays and not pickles:
            report.kind = "npz"
        else:
            report.kind = "zip"
        if not pickles and not arrays:
            if path.suffix.lower() in (".pt", ".pth", ".ckpt", ".npz"):
                raise FormatError(f"zip archive without any .pkl or .npy member: not a {path.suffix} file")
            report.status = "skipped"
            report.notes.append("zip archive without .pkl or .npy members: nothing to scan")
            return
        if code:
            report.findings.append(
                Finding(
                    "medium", "torchscript-code", f"{len(code)} code file(s)",
                    "TorchScript archive: torch.jit.load compiles and runs its code/ files; "
                    "treat it as a program, not as weights",
                    code[0].filename,
                )
            )
        try:
            for info in pickles:
                data = _read_member(archive, info, MAX_MEMBER_BYTES)
                try:
                    _scan_pickle_stream(io.BytesIO(data), report, info.filename, allow_legacy=False)
                except MalformedError as exc:
                    raise FormatError(f"member {info.filename}: malformed pickle ({exc})") from None
            for info in arrays:
                with archive.open(info) as member:
                    _scan_npy(member, info.file_size, report, info.filename)
        except (zipfile.BadZipFile, zlib.error, RuntimeError, NotImplementedError, EOFError, OSError) as exc:
            raise FormatError(f"cannot read a member of the zip archive ({exc})") from None


def _scan_pickle_file(handle: IO[bytes], report: FileReport, *, claimed: bool) -> bool:
    """Scan ``handle`` as a pickle. ``claimed``: its name or a PROTO header says pickle, so a
    malformed stream is an error. Otherwise a stream that does not parse is not a pickle and
    False is returned (the caller tries other formats) -- unless an import or a call was
    already seen before the stream broke: ``pickle.load`` would have run it by then, so the
    findings are kept and the file is reported as a malformed pickle."""
    report.kind = "pickle"
    try:
        _scan_pickle_stream(handle, report, None)
    except MalformedError as exc:
        if not claimed and not report.findings:
            report.kind = "unknown"
            report.imports.clear()
            report.notes.clear()
            return False
        raise FormatError(f"malformed pickle ({exc})") from None
    rest = handle.read(1)
    if rest and report.kind == "pickle":
        report.notes.append("bytes after the pickle's STOP are not read by pickle.load and were not scanned")
    return True


def _scan_json(handle: IO[bytes], size: int, report: FileReport) -> bool:
    """True (and a clean ``json`` report) when the file is UTF-8 JSON: data, never executed."""
    if size > MAX_JSON_BYTES:
        return False
    try:
        json.loads(handle.read(size).decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False
    report.kind = "json"
    report.notes.append("JSON: parsed as data, never executed")
    return True


def scan_file(path: str | os.PathLike[str], *, explicit: bool = True) -> FileReport:
    """Scan one file without loading or executing it; never raises for a bad file."""
    path = Path(path)
    report = FileReport(path=str(path), kind="unknown", explicit=explicit)
    suffix = path.suffix.lower()
    try:
        if path.exists() and not path.is_file():
            if explicit:  # a device, FIFO or socket named on purpose: never opened
                report.error = "not a regular file (a device, FIFO, socket or directory), never opened"
            else:
                report.status = "skipped"
                report.notes.append("not a regular file")
            return report.finish()
        with open_regular(path) as handle:  # non-blocking open: a FIFO swapped in cannot hang it
            size = os.fstat(handle.fileno()).st_size
            head = handle.read(16)
            handle.seek(0)
            if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
                _scan_zip(handle, path, report)
            elif _is_tar(handle):  # before the pickle check: a tar header can parse as a pickle
                _scan_tar(handle, report)
            elif head[:6] == b"\x93NUMPY":
                report.kind = "npy"
                _scan_npy(handle, size, report, None)
            elif _looks_like_safetensors(head, size):
                _scan_safetensors(handle, size, report)
            elif head[:1] in _OPCODE_BYTES and _scan_pickle_file(handle, report, claimed=(
                suffix in PICKLE_SUFFIXES or (head[:1] == b"\x80" and head[1:2] in _PROTOCOLS)
            )):
                pass  # a pickle of any protocol (0-5), found by content whatever the name
            elif suffix == ".safetensors":
                handle.seek(0)
                _scan_safetensors(handle, size, report)  # reports what is wrong with it
            elif suffix in (".npy", ".npz"):
                raise FormatError(f"not a {suffix} file (bad magic bytes)")
            elif suffix in PICKLE_SUFFIXES:
                raise FormatError(f"not a pickle: its first byte {head[:1]!r} is no pickle opcode")
            else:
                handle.seek(0)
                if not _scan_json(handle, size, report):
                    report.kind = "unknown"
                    message = (
                        "unrecognised format: not a pickle (protocols 0-5), zip checkpoint, NumPy "
                        "file, safetensors or JSON"
                    )
                    if explicit:
                        raise FormatError(message)
                    report.status = "skipped"
                    report.notes.append(message)
    except FileNotFoundError:
        report.error = "file not found"
    except IsADirectoryError:
        report.error = "is a directory"
    except PermissionError:
        report.error = "permission denied"
    except FormatError as exc:
        report.error = str(exc)
    except IntegrityError as exc:  # not a regular file after all
        report.error = str(exc).removeprefix(f"{path}: ")
    except MalformedError as exc:
        report.error = f"malformed pickle ({exc})"
    except OSError as exc:
        report.error = f"cannot read ({exc.strerror or exc})"
    return report.finish()


def iter_files(paths: Iterable[str | os.PathLike[str]]) -> Iterator[tuple[Path, bool]]:
    """(file, named explicitly) for each path; directories are walked in sorted order."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            for folder, dirs, files in os.walk(path):
                dirs.sort()
                for name in sorted(files):
                    yield Path(folder) / name, False
        else:
            yield path, True


def scan_paths(paths: Iterable[str | os.PathLike[str]]) -> ScanReport:
    """Scan files and directories (walked recursively); see :func:`scan_file`."""
    return ScanReport([scan_file(path, explicit=explicit) for path, explicit in iter_files(paths)])
