"""`redblue scan` and `redblue verify` as a user runs them (subprocesses on temp folders).

Exit codes: 0 clean, 1 findings / modified or missing artifacts, 2 unreadable or
malformed files and other errors.
"""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from subprocess import CompletedProcess
from typing import Any

import numpy as np
import torch

from redblue.artifacts import save_model
from redblue.cache import Cache
from redblue.models import build_model
from redblue.utils import atomic_write_json

Cli = Callable[..., CompletedProcess[str]]
SYSTEM = f"{os.system.__module__}.system"
DOCS = Path(__file__).resolve().parents[1] / "docs"


class SystemPayload:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {self.marker}",))


def redblue_outputs(out: Path) -> Path:
    """What redblue writes: a model record + weights, a cache entry, a metrics JSON."""
    record = save_model(out, "baseline", build_model("cnn"), {"model_name": "cnn"})
    Cache(out / "cache").put("adv", {"eps": 0.25, "model": record["weights_sha256"]}, {"x_adv": torch.rand(2, 1, 28, 28)})
    atomic_write_json(out / "metrics" / "baseline_metrics.json", {"accuracy": 0.1, "model": {"weights_sha256": record["weights_sha256"]}})
    return out


def test_scan_json_reports_every_file_and_exit_2_on_a_malformed_one(tmp_path: Path, cli: Cli) -> None:
    marker = tmp_path / "PWNED"
    folder = tmp_path / "downloads"
    folder.mkdir()
    (folder / "model.pkl").write_bytes(pickle.dumps({"w": [1.0], "x": SystemPayload(marker)}))
    torch.save({"state": {"w": torch.zeros(2)}, "x": SystemPayload(marker)}, folder / "ckpt.pt")
    np.save(folder / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    (folder / "readme.txt").write_text("not a model")
    save_model(folder, "good", build_model("cnn"), {"model_name": "cnn"})
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes((folder / "models" / "good.safetensors").read_bytes()[:-10])

    result = cli("scan", "--json", "--fail-on", "critical", str(folder))
    assert result.returncode == 1, result.stderr  # critical findings reach any threshold
    report = json.loads(result.stdout)
    assert report["fail_on"] == "critical"
    files = {Path(f["path"]).name: f for f in report["files"]}
    assert files["model.pkl"]["findings"][0]["name"] == SYSTEM
    assert files["model.pkl"]["findings"][0]["severity"] == "critical"
    assert files["ckpt.pt"]["kind"] == "torch-zip" and files["ckpt.pt"]["findings"][0]["member"] == "ckpt/data.pkl"
    assert files["objects.npy"]["findings"][0]["rule"] == "object-array"
    assert files["good.safetensors"]["status"] == "clean"
    assert files["readme.txt"]["status"] == "skipped"
    assert report["summary"]["critical"] == 2 and report["exit_code"] == 1

    result = cli("scan", str(folder), str(truncated))
    assert result.returncode == 2
    lines = result.stdout.splitlines()
    assert any(line.startswith("critical") and "model.pkl" in line and SYSTEM in line for line in lines)
    assert any(line.startswith("critical") and "ckpt.pt :: ckpt/data.pkl" in line for line in lines)
    assert any(line.startswith("error") and "cut.safetensors" in line and "truncated" in line for line in lines)
    assert "readme.txt" not in result.stdout  # files skipped while walking a folder are only counted
    assert re.search(r"1 error\(s\), \d+ skipped -> exit 2", lines[-2])
    assert not marker.exists()


def test_scan_and_verify_redblue_outputs_are_clean(tmp_path: Path, cli: Cli) -> None:
    out = redblue_outputs(tmp_path / "out")
    result = cli("scan", str(out))
    assert result.returncode == 0, result.stdout
    assert "0 with findings, 0 error(s)" in result.stdout
    clean = [line.split()[-1] for line in result.stdout.splitlines() if line.startswith("clean")]
    assert clean.count("safetensors") == 2  # weights + cached tensors
    assert set(clean) == {"safetensors", "json"}  # the records: JSON, data only
    result = cli("verify", str(out))
    assert result.returncode == 0, result.stdout
    assert "2 artifact(s) in 3 JSON record(s): 2 ok, 0 modified, 0 missing, 0 error(s) -> exit 0" in result.stdout


def test_verify_reports_a_flipped_byte_as_json(tmp_path: Path, cli: Cli) -> None:
    out = redblue_outputs(tmp_path / "out")
    weights = out / "models" / "baseline.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10
    weights.write_bytes(bytes(data))
    result = cli("verify", "--json", str(out))
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    assert sorted((c["file"], c["status"]) for c in report["checks"]) == sorted(
        [("models/baseline.safetensors", "modified"), (next(c["file"] for c in report["checks"] if c["field"] == "tensors"), "ok")]
    )
    assert report["summary"]["modified"] == 1 and report["exit_code"] == 1


def test_verify_errors_are_one_line_exit_2(tmp_path: Path, cli: Cli) -> None:
    result = cli("verify", str(tmp_path / "nope"))
    assert result.returncode == 2
    assert result.stderr.strip() == f"redblue: error: {tmp_path / 'nope'}: no such folder"
    assert "Traceback" not in result.stderr


def test_the_pickle_vs_json_doc_example_runs_and_flags_the_unsafe_cache(tmp_path: Path) -> None:
    text = (DOCS / "pickle-vs-json.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) == 1
    (tmp_path / "demo.py").write_text(blocks[0])
    result = subprocess.run(
        [sys.executable, "demo.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "$ redblue scan unsafe_cache.pkl  -> exit 1" in result.stdout
    assert f"{SYSTEM} imported and called 1x" in result.stdout
    assert "$ redblue scan cache  -> exit 0" in result.stdout
    assert not (tmp_path / "PWNED").exists()
