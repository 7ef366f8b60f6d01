"""The HTML and Markdown reports, rendered from the JSON files under ``OUT/metrics`` only.

``render_report(out)`` can run any time after the stages: it reads ``metrics/*.json`` and
``images/*.png`` and writes ``report.html`` (self-contained: images inlined, no network)
and ``report.md`` (for a write-up), atomically. Nothing is re-computed.
"""

from __future__ import annotations

import base64
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import jinja2
from markupsafe import Markup, escape

from redblue.errors import IntegrityError, RedblueError
from redblue.evaluation.checks import CHECKS
from redblue.report.overview import eps_curves, model_cards, stage_facts
from redblue.report.plots import models_accuracy_vs_eps
from redblue.report.summary import build_summary, count, stage_results
from redblue.report.sweep_plots import main_metric, sorted_rows
from redblue.results import validate_result
from redblue.utils import atomic_write_bytes, pct, read_json, read_regular_file

TEMPLATES = Path(__file__).resolve().parent / "templates"


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


CHECKS_DOC = Path(__file__).resolve().parents[1] / "evaluation" / "checks.md"
"""The sanity checks' documentation, shipped in the package; the report carries it."""


_INLINE = re.compile(r"\*\*(.+?)\*\*|\*(.+?)\*|`([^`]+)`")
_TAGS = (Markup("<strong>{}</strong>"), Markup("<em>{}</em>"), Markup("<code>{}</code>"))


def _inline_markdown(text: str) -> Markup:
    """``text`` as safe HTML, its ``**bold**``, ``*emphasis*`` and `` `code` `` as tags (all
    text escaped)."""
    parts, pos = [], 0
    for match in _INLINE.finditer(text):
        parts.append(escape(text[pos : match.start()]))
        kind = next(i for i, group in enumerate(match.groups()) if group is not None)
        parts.append(_TAGS[kind].format(match.group(kind + 1)))
        pos = match.end()
    parts.append(escape(text[pos:]))
    return Markup("").join(parts)


def check_docs() -> list[dict[str, Any]]:
    """``[{"id", "summary", "paragraphs": [Markup, ...]}]``: every check's entry of the packaged
    checks.md (Fires when / Means / Do), or its one-line summary where the entry is missing."""
    entries = {k: {"id": k, "summary": v[:1].upper() + v[1:] + ".", "paragraphs": []} for k, v in CHECKS.items()}
    text = read_regular_file(CHECKS_DOC, 1 << 20).decode("utf-8") if CHECKS_DOC.is_file() else ""
    for section in text.split("\n## ")[1:]:
        check_id, _, body = section.partition("\n")
        if check_id.strip() in entries:
            paragraphs = re.split(r"\n(?=\*\*)", body.strip())
            entries[check_id.strip()]["paragraphs"] = [_inline_markdown(" ".join(p.split())) for p in paragraphs]
    return list(entries.values())


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


STAGE_TITLES = {
    "baseline": "Training",
    "evaluate": "Evaluation",
    "attack": "Red team: evasion attack",
    "defend": "Blue team: adversarial training",
    "poison": "Backdoor: data poisoning",
    "poison_sweep": "Backdoor: poison-rate sweep",
    "backdoor_audit": "Blue team: backdoor audit of the model (Neural Cleanse)",
    "backdoor_defense": "Blue team: backdoor detection and removal",
}
OVERVIEW_PLOT = "overview_accuracy_vs_eps.png"


WIDE_PX = 800
"""A plot wider than this (in image pixels) takes the full width of its section."""


def _images(out: Path) -> dict[str, str]:
    """PNG stem -> base64 data of every plot under ``out/images``."""
    return {png.stem: data for png in sorted((out / "images").glob("*.png")) if (data := _png_data(png)) is not None}


def _png_width(data: str) -> int:
    """The width of a base64 PNG, from its IHDR chunk (0 when it is not a PNG)."""
    head = base64.b64decode(data[:32])
    return int.from_bytes(head[16:20], "big") if head[:8] == b"\x89PNG\r\n\x1a\n" else 0


def _owner(stem: str, names: list[str]) -> str | None:
    """The stage whose name is the longest prefix of a plot's file name."""
    owners = [n for n in names if stem == n or stem.startswith(n + "_")]
    return max(owners, key=len) if owners else None


def _caption(stem: str, name: str) -> str:
    rest = stem.removeprefix(name).strip("_").replace("_", " ")
    return rest[:1].upper() + rest[1:] if rest else name.replace("_", " ")


def build_context(out: Path) -> dict[str, Any]:
    """Everything the templates show, from the JSON results (and plots) under ``out``."""
    results = load_results(out)
    stored = results.get("metrics_summary")
    staged = stage_results(out) if (out / "metrics").is_dir() else []
    summary = build_summary(out, quick=bool(stored.get("quick")) if isinstance(stored, dict) else False,
                            results=staged).to_json()  # fmt: skip
    curves = eps_curves(staged)
    if curves:
        models_accuracy_vs_eps(curves, out / "images" / OVERVIEW_PLOT)
    else:  # an earlier render's chart would show sweeps that are no longer in the results
        (out / "images" / OVERVIEW_PLOT).unlink(missing_ok=True)
    images = _images(out)
    overview = images.pop(OVERVIEW_PLOT.removesuffix(".png"), None)
    docs = check_docs()
    documented = {d["id"] for d in docs}
    names = [name for name, _ in staged]
    owned: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    other: list[dict[str, Any]] = []
    for stem, png in images.items():
        owner = _owner(stem, names)
        entry = {"title": _caption(stem, owner or ""), "file": f"images/{stem}.png", "data": png,
                 "wide": _png_width(png) > WIDE_PX}  # fmt: skip
        (owned[owner] if owner else other).append(entry)
    stages = []
    warnings: list[dict[str, Any]] = []
    for name, data in staged:
        found = _warnings(data, name, [])
        for w in found:
            w["anchor"] = f"check-{w['id']}" if w["id"] in documented else None
        warnings += found
        model = data.get("model") if isinstance(data.get("model"), dict) else {}
        stages.append({
            "name": name,
            "stage": data.get("stage"),
            "title": f"{STAGE_TITLES.get(str(data.get('stage')), str(data.get('stage')))}: {name}",
            **stage_facts(data),
            "images": owned[name],
            "warnings": found,
            "raw": json.dumps(data, indent=2, sort_keys=True),
            "weights_sha256": (model or {}).get("weights_sha256"),
            "dataset": data.get("dataset") if isinstance(data.get("dataset"), dict) else {},
        })  # fmt: skip
    configs = {s: results[s] for s in results if s.endswith("_config")}
    versions: dict[str, Any] = {}
    for _, data in staged:
        if isinstance(data.get("versions"), dict):
            versions = data["versions"]
            break
    datasets = [s["dataset"] for s in stages if s["dataset"].get("files")]
    return {
        "generated": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "out": str(out),
        "summary": summary,
        "cards": model_cards(staged),
        "overview": overview,
        "overview_file": f"images/{OVERVIEW_PLOT}",
        "stages": stages,
        "warnings": warnings,
        "check_docs": docs,
        "configs": {k: json.dumps(v, indent=2, sort_keys=True) for k, v in configs.items()},
        "images": other,
        "sweeps": sweep_sections(out),
        "dataset": datasets[0] if datasets else None,
        "versions": versions,
        "fmt": _fmt,
        "pct": pct,
        "count": count,
    }


def _md_cell(value: Any) -> str:
    """A value as Markdown text that cannot break a table or carry HTML: ``|`` escaped, ``<``
    as an entity, newlines as spaces."""
    return " ".join(str(value).split()).replace("|", "\\|").replace("<", "&lt;")


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
    md_env.filters["md"] = _md_cell
    markdown = md_env.get_template("report.md.j2").render(**context)
    html_path, md_path = out / "report.html", out / "report.md"
    atomic_write_bytes(html_path, html.encode("utf-8"))
    atomic_write_bytes(md_path, markdown.encode("utf-8"))
    return html_path, md_path
