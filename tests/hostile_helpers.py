"""Helpers shared by the hostile-input test modules (``test_hostile_*.py``)."""

from __future__ import annotations

import shutil
from pathlib import Path
from subprocess import CompletedProcess


def one_line_exit_2(proc: CompletedProcess[str], *needles: str) -> str:
    """The single stderr line of a command that must have failed with exit 2, no traceback,
    naming every one of ``needles``."""
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def copy_model(src: Path, dest: Path) -> Path:
    """Copy the ``baseline`` model of output folder ``src`` to ``dest/models``; its record's path."""
    (dest / "models").mkdir(parents=True)
    for suffix in (".json", ".safetensors"):
        shutil.copy(src / "models" / f"baseline{suffix}", dest / "models" / f"baseline{suffix}")
    return dest / "models" / "baseline.json"


def files_outside(root: Path, allowed: list[Path]) -> list[Path]:
    """Files under ``root`` that are not under one of ``allowed``."""
    out = []
    for path in root.rglob("*"):
        if path.is_file() and not any(path.is_relative_to(a) for a in allowed):
            out.append(path)
    return out
