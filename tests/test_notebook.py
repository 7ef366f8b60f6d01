"""The walkthrough notebook is executed, so it never goes stale."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "walkthrough.ipynb"


def test_walkthrough_notebook_runs_end_to_end(tmp_path: Path) -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.get("outputs", [])]
    assert not [o for o in outputs if o.get("output_type") == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.get("output_type") == "stream")
    assert "clean test accuracy" in text and "clean accuracy" in text and "report.html" in text
    assert "pixels changed per image: [16, 16, 16, 16]" in text
    # the walkthrough's backdoor takes, so the removal that follows removes something
    asr = re.search(r"ASR ([0-9.]+)%", text)
    assert asr is not None and float(asr.group(1)) >= 80.0, text
    images = [o for o in outputs if o.get("output_type") == "display_data" and "image/png" in o.get("data", {})]
    assert len(images) >= 3
    # The committed notebook carries no outputs (they are produced here, from real runs).
    committed = json.loads(NOTEBOOK.read_text())
    assert all(not cell.get("outputs") for cell in committed["cells"] if cell["cell_type"] == "code")
