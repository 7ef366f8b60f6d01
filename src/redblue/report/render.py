"""The HTML and Markdown reports, rendered from the JSON files under ``OUT/metrics`` only.

``render_report(out)`` can run any time after the stages: it reads ``metrics/*.json`` and
``images/*.png`` and writes ``report.html`` (self-contained: images inlined, no network)
and ``report.md`` (for a write-up), atomically. Nothing is re-computed.
"""

from __future__ import annotations

import base64
import json
import sys
import time
from pathlib import Path
from typing import Any

import jinja2

from redblue.errors import IntegrityError, RedblueError
from redblue.evaluation.checks import CHECKS
from redblue.report.sweep_plots import main_metric, sorted_rows
from redblue.results import validate_result
from redblue.utils import atomic_write_bytes, read_json, read_regular_file

TEMPLATES = Path(__file__).resolve().parent / "templates"
STAGE_ORDER = ["baseline", "fgsm", "pgd", "standard", "attack", "advtrain", "poison", "backdoor"]


def _stage_rank(name: str) -> tuple[int, str]:
    for i, prefix in enumerate(STAGE_ORDER):
        if name.startswith(prefix):
            return i, name
    return len(STAGE_ORDER), name


def _numbers(
    obj: Any, prefix: str = "", depth: int = 0, out: list[tuple[str, Any]] | None = None
) -> list[tuple[str, Any]]:
    """(dotted key, value) for scalar leaves of a metrics dict, two levels deep at most."""
    rows = [] if out is None else out
    if isinstance(obj, dict):
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if isinstance(value, bool | int | float | str) or value is None:
                rows.append((name, value))
            elif isinstance(value, dict) and depth < 1:
                _numbers(value, name + ".", depth + 1, rows)
    return rows


def _warnings(obj: Any, where: str, found: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every dict with ``id`` and ``message`` in any list called ``warnings``, anywhere in ``obj``."""
    if isinstance(obj, dict):
        for key, value in obj.items():
            if key == "warnings" and isinstance(value, list):
                for item in value:
                    if isinstance(item, dict) and "message" in item:
                        check_id = item.get("id") or item.get("check") or "warning"
                        entry = {**item, "id": check_id, "where": where}
                        if not any(f["where"] == where and f["message"] == item["message"] for f in found):
                            found.append(entry)
            else:
                _warnings(value, where, found)
    elif isinstance(obj, list):
        for value in obj:
            _warnings(value, where, found)
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        if 0.0 <= value <= 1.0 and value != 0.0:
            return f"{value:.4f}"
        return f"{value:.4g}"
    return "—" if value is None else str(value)


def check_explanations() -> dict[str, str]:
    """Check id -> "Means ... Do ..." text from docs/checks.md (in a source checkout), else the
    one-line summaries of :data:`redblue.evaluation.checks.CHECKS`."""
    explanations = {k: v[:1].upper() + v[1:] + "." for k, v in CHECKS.items()}
    doc = Path(__file__).resolve().parents[3] / "docs" / "checks.md"
    if doc.is_file():
        for section in doc.read_text(encoding="utf-8").split("\n## ")[1:]:
            check_id, _, body = section.partition("\n")
            text = " ".join(line.strip() for line in body.splitlines() if line.strip())
            if check_id.strip() in explanations and text:
                explanations[check_id.strip()] = text.replace("**", "")
    return explanations


def load_results(out: Path) -> dict[str, dict[str, Any]]:
    """Every ``metrics/*.json`` under ``out``, by file stem (none when only sweeps ran)."""
    folder = out / "metrics"
    if not folder.is_dir():
        if sweep_summaries(out):
            return {}
        raise RedblueError(f"{folder}: no metrics folder (run a stage first, e.g. 'redblue run --out {out}')")
    results = {}
    for path in sorted(folder.glob("*.json")):
        results[path.stem] = read_json(path)  # bounded, regular files only; IntegrityError names the file
    return results


MAX_PNG_BYTES = 64 << 20


def _png_data(png: Path) -> str | None:
    """A plot's bytes as base64, or None (with a notice) when it is not a regular file of
    bounded size (a FIFO or a device would hang or never end the read)."""
    try:
        return base64.b64encode(read_regular_file(png, MAX_PNG_BYTES)).decode("ascii")
    except (IntegrityError, OSError) as exc:
        print(f"notice: report: {png.name} not shown ({exc})", file=sys.stderr)
        return None


def sweep_summaries(out: Path) -> list[Path]:
    """Every ``OUT/sweeps/NAME/sweep_summary.json``."""
    return sorted((out / "sweeps").glob("*/sweep_summary.json"))


def valid_sweep_summaries(out: Path) -> list[tuple[Path, dict[str, Any]]]:
    """(path, summary) of every sweep summary that reads and validates; the others are
    skipped with a notice."""
    found = []
    for path in sweep_summaries(out):
        try:
            summary = read_json(path)
            validate_result(summary, "sweep")
        except IntegrityError as exc:
            print(f"notice: report: {exc}; sweep not shown", file=sys.stderr)
            continue
        found.append((path, summary))
    return found


def sweep_sections(out: Path) -> list[dict[str, Any]]:
    """What the report shows of each sweep: its counts, table (best first) and plots."""
    sections = []
    for path, summary in valid_sweep_summaries(out):
        try:
            sections.append(_sweep_section(out, path, summary))
        except (KeyError, TypeError, ValueError) as exc:
            print(f"notice: report: {path}: inconsistent sweep summary ({exc!r}); sweep not shown", file=sys.stderr)
    return sections


def _sweep_section(out: Path, path: Path, summary: dict[str, Any]) -> dict[str, Any]:
    """One sweep in the report: its counts, its cells best first, its plots."""
    metric = main_metric(summary)
    rows = [
        {
            "cell": row["cell"],
            "values": [row["axes"].get(axis, "—") for axis in summary["axes"]],
            "status": row["status"],
            "value": row["metrics"].get(metric) if metric else None,
            "seconds": row["seconds"],
            "error": row["error"],
        }
        for row in sorted_rows(summary)
    ]
    images = [
        {"title": png.stem.replace("_", " "), "data": data}
        for png in sorted((path.parent / "images").glob("sweep_*.png"))
        if (data := _png_data(png)) is not None
    ]
    return {"name": summary["name"], "stage": summary["stage"], "axes": list(summary["axes"]),
            "metric": metric, "counts": summary["counts"], "seconds": summary["seconds"],
            "engine": summary["engine"], "rows": rows, "images": images,
            "file": str(path.relative_to(out))}  # fmt: skip


def build_context(out: Path) -> dict[str, Any]:
    results = load_results(out)
    summary = results.pop("metrics_summary", None)
    stages = []
    warnings: list[dict[str, Any]] = []
    for stem in sorted((s for s in results if s.endswith("_metrics")), key=_stage_rank):
        data = results[stem]
        name = stem.removesuffix("_metrics")
        _warnings(data, name, warnings)
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        dataset = data.get("dataset") if isinstance(data.get("dataset"), dict) else {}
        stages.append(
            {
                "name": name,
                "metrics": [(k, _fmt(v)) for k, v in _numbers(data.get("metrics", {}))],
                "settings": json.dumps(data.get("config") or data.get("settings") or {}, indent=2, sort_keys=True),
                "weights_sha256": (model or {}).get("weights_sha256"),
                "dataset": dataset,
                "seconds": data.get("seconds") or (data.get("training") or {}).get("seconds"),
            }
        )
    explanations = check_explanations()
    for w in warnings:
        w.setdefault("explanation", explanations.get(w["id"], ""))
    configs = {s: results[s] for s in results if s.endswith("_config")}
    images = []
    for png in sorted((out / "images").glob("*.png"), key=lambda p: (_stage_rank(p.stem), p.name)):
        encoded = _png_data(png)
        if encoded is not None:
            images.append(
                {"name": png.stem, "title": png.stem.replace("_", " "), "file": f"images/{png.name}", "data": encoded}
            )
    versions: dict[str, Any] = {}
    for data in results.values():
        if isinstance(data, dict) and isinstance(data.get("versions"), dict):
            versions = data["versions"]
            break
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "out": str(out),
        "summary": summary,
        "stages": stages,
        "warnings": warnings,
        "configs": {k: json.dumps(v, indent=2, sort_keys=True) for k, v in configs.items()},
        "images": images,
        "sweeps": sweep_sections(out),
        "versions": versions,
        "fmt": _fmt,
    }


def _env() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(TEMPLATES)),
        autoescape=jinja2.select_autoescape(enabled_extensions=("html", "j2"), default=True),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )


def render_report(out: Path) -> tuple[Path, Path]:
    """Write ``out/report.html`` and ``out/report.md`` from the JSON results; returns both paths."""
    context = build_context(out)
    env = _env()
    html = env.get_template("report.html.j2").render(**context)
    md_env = _env()
    md_env.autoescape = False
    markdown = md_env.get_template("report.md.j2").render(**context)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_bytes(html_path, html.encode("utf-8"))
    atomic_write_bytes(md_path, markdown.encode("utf-8"))
    return html_path, md_path
