"""``redblue scan`` (model files, never loaded) and ``redblue verify`` (SHA-256 records).

Exit codes, for both: 0 clean, 1 findings (``scan``) or modified/missing artifacts
(``verify``), 2 an unreadable or malformed file or another error. The code is raised as
SystemExit: ``redblue.cli.main`` runs click with ``standalone_mode=False``, where
``ctx.exit(code)`` would be returned by click and dropped.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from redblue.errors import ConfigError
from redblue.scan import SEVERITIES, FileReport, ScanReport, scan_paths
from redblue.verify import VerifyReport, verify_dir


def _where(report: FileReport, member: str | None, offset: int | None) -> str:
    text = report.path + (f" :: {member}" if member else "")
    return text + (f" @{offset}" if offset is not None else "")


def _exit(code: int) -> None:
    if code:
        raise SystemExit(code)


def render_scan(report: ScanReport, fail_on: str) -> str:
    """The human table: one line per finding, error, clean file and named skipped file."""
    lines = [f"{'STATUS':<9} {'FILE':<48} FINDING"]
    for file in report.files:
        if file.status == "error":
            lines.append(f"{'error':<9} {file.path:<48} {file.error}")
        elif file.status == "skipped":
            if file.explicit:
                lines.append(f"{'skipped':<9} {file.path:<48} {'; '.join(file.notes)}")
            continue
        elif file.status == "clean":
            lines.append(f"{'clean':<9} {file.path:<48} {file.kind}")
        for finding in file.findings:
            lines.append(f"{finding.severity:<9} {_where(file, finding.member, finding.offset):<48} {finding.message}")
    counts = report.counts()
    severity = ", ".join(f"{counts[s]} {s}" for s in reversed(SEVERITIES) if counts[s])
    lines.append(
        f"{counts['files']} file(s): {counts['clean']} clean, {counts['findings']} with findings"
        f"{f' ({severity})' if severity else ''}, {counts['error']} error(s), {counts['skipped']} skipped"
        f" -> exit {report.exit_code(fail_on)}"
    )
    if counts["findings"] or counts["error"]:
        lines.append("Do not torch.load / pickle.load / np.load(allow_pickle=True) a file with findings or errors.")
    return "\n".join(lines)


def render_verify(report: VerifyReport) -> str:
    """The human table: one line per checked artifact and per unreadable record."""
    lines = [f"{'STATUS':<9} {'FILE':<48} DETAIL"]
    for check in report.checks:
        lines.append(f"{check.status:<9} {check.file:<48} {check.message} ({check.record}: {check.field})")
    for error in report.errors:
        lines.append(f"{'error':<9} {error}")
    counts = report.counts()
    lines.append(
        f"{len(report.checks)} artifact(s) in {counts['records']} JSON record(s): {counts['ok']} ok, "
        f"{counts['modified']} modified, {counts['missing']} missing, "
        f"{counts['error'] + counts['unreadable_records']} error(s) -> exit {report.exit_code()}"
    )
    return "\n".join(lines)


@click.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
@click.option(
    "--fail-on",
    type=click.Choice(SEVERITIES),
    default="low",
    show_default=True,
    help="Lowest finding severity that makes the exit code 1.",
)
def scan(paths: tuple[Path, ...], as_json: bool, fail_on: str) -> None:
    """Scan model files for code-execution risk WITHOUT loading them.

    PATHS are files or folders (walked). Pickles (.pkl, .pickle, raw torch.save), zip
    checkpoints (.pt, .pth, .ckpt, .bin), NumPy .npy/.npz and safetensors are recognised
    by content first, then by name; other files are skipped with a note. Exit code: 0
    clean, 1 findings, 2 unreadable or malformed file.
    """
    report = scan_paths(paths)
    if as_json:
        click.echo(json.dumps(report.to_dict(fail_on), indent=2))
    else:
        click.echo(render_scan(report, fail_on))
    _exit(report.exit_code(fail_on))


@click.command()
@click.argument("directory", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON instead of a table.")
def verify(directory: Path, as_json: bool) -> None:
    """Check every artifact under DIRECTORY against the SHA-256 in its JSON record.

    Every *.json is read; each X_file / X_sha256 pair (weights, cached tensors, poison
    indices, ...) is checked. Exit code: 0 all match, 1 modified or missing files,
    2 unreadable records or files, or nothing to verify.
    """
    report = verify_dir(directory)
    if not report.checks and not report.errors:

        raise ConfigError(f"{directory}: no JSON record with an X_file / X_sha256 pair found: nothing to verify")
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2))
    else:
        click.echo(render_verify(report))
    _exit(report.exit_code())
