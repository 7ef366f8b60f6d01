"""``redblue sweep GRID.toml``: a grid of stage runs on Ray (see :mod:`redblue.sweep`)."""

from __future__ import annotations

from pathlib import Path

import click

from redblue.cli.common import DEFAULT_OUT, check_output_dir
from redblue.report.render import render_report
from redblue.report.sweep_plots import main_metric, render_sweep_plots, sorted_rows
from redblue.stages import load_data
from redblue.sweep import load_grid, run_sweep
from redblue.utils import output_lock, pct


@click.command()
@click.argument("grid_file", type=click.Path(path_type=Path))
@click.option("--out", default=DEFAULT_OUT, show_default=True, help="Output folder; cells go to OUT/sweeps/NAME/.")
@click.option(
    "--ray-address",
    default=None,
    help="Run on this Ray cluster (e.g. 'auto', or ray://HEAD:10001). [default: a local Ray instance with "
    "this machine's CPUs and GPUs]",
)
def sweep(grid_file: Path, out: str, ray_address: str | None) -> None:
    """Run a grid of stage runs (train, evaluate, attack, defend or poison) on Ray.

    GRID_FILE is a TOML file: [sweep] names the stage (and the model, for attack and
    evaluate), [data] and the stage's sections hold fixed settings, [axes] the lists to vary
    ("attack.eps" = [0.1, 0.2, 0.3], model = [...]); the grid is their product. Each cell
    writes the stage's usual outputs and a cell.json under OUT/sweeps/NAME/<cell>/; cells
    that finished before with the same settings are not run again. Writes
    OUT/sweeps/NAME/sweep_summary.json, its plots, and the sweep section of OUT/report.html.
    Exit code 1 when a cell failed (the others still run), 2 for a bad grid file.
    """
    grid = load_grid(grid_file)  # every cell checked before anything is loaded or run
    out_dir = check_output_dir(out).absolute()  # cells may run in another folder (a Ray worker's)
    with output_lock(out_dir):
        data = load_data(grid.data, device="cpu")
        grid = load_grid(grid_file, data)  # the keys include the data's identity
        summary = run_sweep(grid, out_dir, data, ray_address=ray_address)
        root = out_dir / "sweeps" / grid.sweep.name
        render_sweep_plots(root, summary)
        html, _ = render_report(out_dir)
    metric = main_metric(summary)
    for row in sorted_rows(summary):
        axes = ", ".join(f"{k} {v}" for k, v in row["axes"].items())
        shown = pct(row["metrics"].get(metric)) if metric and row["status"] == "done" else row["error"]
        click.echo(f"{row['status']:<7} {row['cell']:<48} {axes}: {metric or ''} {shown}")
    counts = summary.counts
    click.echo(
        f"sweep {summary.name}: {counts['cells']} cells, {counts['done']} done ({counts['reused']} reused), "
        f"{counts['failed']} failed in {summary.seconds:.1f} s; {root / 'sweep_summary.json'}; report {html}"
    )
    if counts["failed"]:
        failed = ", ".join(c["cell"] for c in summary.cells if c["status"] != "done")
        click.echo(f"redblue: failed cells: {failed}", err=True)
        raise SystemExit(1)
