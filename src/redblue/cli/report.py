"""``redblue report``: re-render report.html and report.md from the JSON results alone."""

from __future__ import annotations

from pathlib import Path

import click

from redblue.cli.common import DEFAULT_OUT


@click.command()
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="Output folder holding metrics/ and images/.")
def report(out: str) -> None:
    """Render OUT/report.html (self-contained) and OUT/report.md from OUT/metrics/*.json.

    Nothing is re-computed: the report is built from the JSON files and PNG plots only.
    """
    from redblue.report.render import render_report

    html_path, md_path = render_report(Path(out))
    click.echo(f"wrote {html_path} and {md_path}")
