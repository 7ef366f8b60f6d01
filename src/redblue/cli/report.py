"""``redblue report``: re-render report.html and report.md from the JSON results alone."""

from __future__ import annotations

from pathlib import Path

import click

from redblue.cli.common import DEFAULT_OUT
from redblue.report.render import render_report
from redblue.report.stage_plots import render_all_plots


@click.command()
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="Output folder holding metrics/ and images/.")
def report(out: str) -> None:
    """Render the plots, OUT/report.html (self-contained) and OUT/report.md from OUT/metrics/*.json.

    Nothing is re-computed: plots and report are built from the JSON result files (and the
    example files they name) only.
    """
    render_all_plots(Path(out))
    html_path, md_path = render_report(Path(out))
    click.echo(f"wrote {html_path} and {md_path}")
