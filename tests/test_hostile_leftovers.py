"""Hostile inputs, leftovers: temp files of a write killed with ``kill -9`` are removed by the
next command that holds the output lock, and nothing else is touched."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess

from redblue.utils import output_lock, remove_leftovers

Cli = Callable[..., CompletedProcess[str]]


def test_leftovers_of_a_killed_write_are_removed_by_the_next_lock_holder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    (out / "models").mkdir(parents=True)
    (out / "cache" / "adv").mkdir(parents=True)
    leftovers = [out / "models" / ".baseline.json.x1y2z3.tmp", out / "cache" / "adv" / ".k.safetensors.abc.tmp",
                 out / ".report.html.q.tmp"]  # fmt: skip
    for path in leftovers:
        path.write_text("{half")
    keep = [out / "models" / "baseline.json", out / "models" / "notes.tmp", out / "models" / ".hidden"]
    for path in keep:
        path.write_text("{}")
    with output_lock(out):
        assert not any(p.exists() for p in leftovers) and all(p.exists() for p in keep)


def test_leftover_removal_never_follows_a_link_out_of_the_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    precious = tmp_path / ".precious.tmp"
    precious.write_text("outside --out")
    (out / ".evil.json.x.tmp").symlink_to(precious)
    (out / "linked").symlink_to(tmp_path, target_is_directory=True)  # a link to a folder above
    removed = remove_leftovers(out)
    assert removed == [] and precious.read_text() == "outside --out"


def test_a_real_kill_9_during_a_write_is_cleaned_up_by_the_next_command(cli: Cli, tmp_path: Path,
                                                                        tiny_model_dir: Path) -> None:
    out = tmp_path / "out"
    script = textwrap.dedent(f"""
        import os, signal
        import redblue.utils as u
        os.replace = lambda src, dst: os.kill(os.getpid(), signal.SIGKILL)  # dies mid atomic write
        u.atomic_write_json(__import__("pathlib").Path({str(out / "metrics" / "x.json")!r}), {{"a": 1}})
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=120, check=False)
    assert proc.returncode == -9
    left = list((out / "metrics").glob(".x.json.*.tmp"))
    assert len(left) == 1
    result = cli("evaluate", "--model", str(tiny_model_dir / "models" / "baseline.json"), "--dataset", "mnist-mini",
                 "--device", "cpu", "--out", str(out))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not left[0].exists() and not list(out.rglob("*.tmp"))
    assert not (out / "metrics" / "x.json").exists()  # the killed write never published
