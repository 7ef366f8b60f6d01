"""``redblue report``: re-render report.html and report.md from the JSON results alone."""

from __future__ import annotations

from pathlib import Path

import click

from redblue.cli.common import DEFAULT_OUT
from redblue.errors import RedblueError
from redblue.report.render import render_report, sweep_summaries, valid_sweep_summaries
from redblue.report.stage_plots import render_all_plots
from redblue.report.sweep_plots import render_sweep_plots
from redblue.utils import output_lock


@click.command()
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="Output folder holding metrics/ and images/.")
def report(out: str) -> None:
    """Render the plots, OUT/report.html (self-contained) and OUT/report.md from OUT/metrics/*.json
    and the sweeps' OUT/sweeps/*/sweep_summary.json.

    Nothing is re-computed: plots and report are built from the JSON result files (and the
    example files they name) only.
    """
    folder = Path(out)
    if not (folder / "metrics").is_dir() and not sweep_summaries(folder):
        raise RedblueError(f"{folder / 'metrics'}: no metrics folder (run a stage first, e.g. 'redblue run --out {out}')")
    with output_lock(folder):
        render_all_plots(folder)
        for path, summary in valid_sweep_summaries(folder):
            render_sweep_plots(path.parent, summary)
        html_path, md_path = render_report(folder)
    click.echo(f"wrote {html_path} and {md_path}")
