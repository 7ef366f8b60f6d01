"""``redblue verify``: check every artifact in an output folder against its recorded SHA-256.

Convention: in any JSON object, at any depth, a pair of keys ``X_file`` and
``X_sha256`` says "the file ``X_file`` (relative to this JSON's folder) has SHA-256
``X_sha256``". redblue writes it for model weights (``weights_file``/``weights_sha256``,
:func:`redblue.artifacts.save_model`), cached tensors (``tensors_file``/``tensors_sha256``,
:mod:`redblue.cache`) and poison indices (``poison_indices_file``/``poison_indices_sha256``).
Every ``*.json`` under the folder is read; each pair is checked and reported as ``ok``,
``modified``, ``missing`` or ``error``. An ``X_file`` without its ``X_sha256`` is noted,
not checked. The JSON records themselves are the root of trust: someone who can rewrite
both a file and its record is not detected (keep a copy of the records, or their hashes,
elsewhere).

Example:
    >>> import tempfile, json, hashlib, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> _ = (out / "w.bin").write_bytes(b"weights")
    >>> record = {"weights_file": "w.bin", "weights_sha256": hashlib.sha256(b"weights").hexdigest()}
    >>> _ = (out / "w.json").write_text(json.dumps(record))
    >>> report = verify_dir(out)
    >>> [(c.file, c.status) for c in report.checks], report.exit_code()
    ([('w.bin', 'ok')], 0)
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from redblue.errors import ConfigError, IntegrityError
from redblue.utils import read_json, sha256_file

_SHA256 = re.compile(r"[0-9a-f]{64}")
STATUSES = ("ok", "modified", "missing", "error")


@dataclass(frozen=True)
class ArtifactCheck:
    """One ``X_file``/``X_sha256`` pair and what was found on disk."""

    record: str  # the JSON file, relative to the verified folder
    field: str  # where the pair sits in the JSON, e.g. "weights" or "stages[1].poison_indices"
    file: str  # the artifact, relative to the verified folder when inside it
    status: str  # ok | modified | missing | error
    expected: str | None
    actual: str | None
    message: str


@dataclass
class VerifyReport:
    """Everything ``verify_dir`` checked under ``root``."""

    root: str
    records: int = 0  # JSON files read
    checks: list[ArtifactCheck] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # JSON files that could not be read
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {status: sum(1 for c in self.checks if c.status == status) for status in STATUSES}
        out["records"] = self.records
        out["unreadable_records"] = len(self.errors)
        return out

    def exit_code(self) -> int:
        """2 when a record or artifact could not be read or is malformed, 1 when an artifact
        is modified or missing, else 0."""
        if self.errors or any(c.status == "error" for c in self.checks):
            return 2
        if any(c.status in ("modified", "missing") for c in self.checks):
            return 1
        return 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "redblue.verify/1",
            "root": self.root,
            "exit_code": self.exit_code(),
            "summary": self.counts(),
            "checks": [asdict(c) for c in self.checks],
            "errors": self.errors,
            "notes": self.notes,
        }


def find_pairs(obj: Any, where: str = "") -> Iterator[tuple[str, Any, Any]]:
    """(field, file value, sha256 value or None) for every ``X_file`` key in a JSON value.

    ``field`` is the dotted path of ``X`` (``"weights"``, ``"stages[1].poison_indices"``).
    """
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, str) and key.endswith("_file") and len(key) > len("_file"):
                stem = key[: -len("_file")]
                yield (f"{where}.{stem}" if where else stem), value, obj.get(f"{stem}_sha256")
        for key, value in obj.items():
            if isinstance(value, dict | list):
                yield from find_pairs(value, f"{where}.{key}" if where else str(key))
    elif isinstance(obj, list):
        for index, value in enumerate(obj):
            yield from find_pairs(value, f"{where}[{index}]")


def _display(path: Path, root: Path) -> str:
    try:
        return str(path.relative_to(root))
    except ValueError:
        return str(path)


def _json_files(root: Path) -> list[Path]:
    if root.is_file():
        return [root]
    found: list[Path] = []
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        found.extend(Path(folder) / name for name in sorted(files) if name.endswith(".json"))
    return found


def verify_dir(root: str | os.PathLike[str]) -> VerifyReport:
    """Check every ``X_file``/``X_sha256`` pair in every JSON under ``root`` (a folder or
    one JSON file). Raises ConfigError when ``root`` does not exist."""
    root = Path(root)
    if not root.exists():
        raise ConfigError(f"{root}: no such folder")
    base = root if root.is_dir() else root.parent
    report = VerifyReport(root=str(root))
    digests: dict[Path, str | OSError | IntegrityError] = {}
    for json_path in _json_files(root):
        shown = _display(json_path, base)
        try:
            obj = read_json(json_path)
        except IntegrityError as exc:
            report.errors.append(f"{shown}: {str(exc).removeprefix(f'{json_path}: ')}")
            continue
        report.records += 1
        for where, file_value, sha_value in find_pairs(obj):
            if sha_value is None:
                report.notes.append(f"{shown}: {where}_file has no {where.rsplit('.', 1)[-1]}_sha256; not checked")
                continue
            report.checks.append(_check(json_path, shown, base, where, file_value, sha_value, digests))
    return report


def _check(
    json_path: Path,
    shown: str,
    base: Path,
    where: str,
    file_value: Any,
    sha_value: Any,
    digests: dict[Path, str | OSError | IntegrityError],
) -> ArtifactCheck:
    def result(file: str, status: str, actual: str | None, message: str) -> ArtifactCheck:
        expected = sha_value if isinstance(sha_value, str) else None
        return ArtifactCheck(shown, where, file, status, expected, actual, message)

    if not isinstance(file_value, str) or not file_value:
        return result(str(file_value), "error", None, f"{where}_file must be a non-empty path string")
    if not isinstance(sha_value, str) or not _SHA256.fullmatch(sha_value):
        return result(file_value, "error", None, f"{where}_sha256 must be 64 lowercase hex digits")
    path = (json_path.parent / file_value).resolve()
    file = _display(path, base.resolve())
    if not path.is_relative_to(base.resolve()):
        return result(file, "error", None, f"{where}_file points outside the verified folder (recorded in {shown})")
    if path not in digests:
        try:
            digests[path] = sha256_file(path)
        except (OSError, IntegrityError) as exc:
            digests[path] = exc
    digest = digests[path]
    if isinstance(digest, FileNotFoundError):
        return result(file, "missing", None, f"file not found (recorded in {shown})")
    if isinstance(digest, OSError):
        return result(file, "error", None, f"cannot read ({digest.strerror or digest})")
    if isinstance(digest, IntegrityError):
        return result(file, "error", None, str(digest).removeprefix(f"{path}: "))
    if digest != sha_value:
        return result(
            file, "modified", digest, f"SHA-256 {digest[:16]}… differs from {sha_value[:16]}… recorded in {shown}"
        )
    return result(file, "ok", digest, "matches")
