"""The ``redblue`` command line: one subcommand per stage.

Every user mistake ends with one line on stderr and exit code 2, never a traceback.
Each subcommand lives in its own module here; :func:`main` is the entry point.
"""

from __future__ import annotations

import sys

import click

from redblue._version import __version__
from redblue.cli import attack as attack_commands
from redblue.cli import defend as defend_commands
from redblue.cli import poison as poison_commands
from redblue.cli import report as report_commands
from redblue.cli import run as run_commands
from redblue.cli import scan as scan_commands
from redblue.cli import sweep as sweep_commands
from redblue.cli import train as train_commands
from redblue.errors import RedblueError
from redblue.utils import one_line


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="redblue")
def cli() -> None:
    """redblue: red- and blue-teaming image classifiers (MNIST family).

    Train a CNN, attack it, harden it, plant and remove a backdoor, and get numbers,
    plots and one HTML report. Every subcommand writes under --out
    (default secure_ai_outputs/: models/, metrics/, images/).
    """


for _command in (
    train_commands.train,
    train_commands.evaluate,
    attack_commands.attack,
    defend_commands.defend,
    poison_commands.poison,
    poison_commands.defend_backdoor,
    poison_commands.audit_backdoor,
    run_commands.run,
    report_commands.report,
    scan_commands.scan,
    scan_commands.verify,
    sweep_commands.sweep,
):
    cli.add_command(_command)


def _error(text: str) -> None:
    print(f"redblue: error: {one_line(text)}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI; user errors become one line and exit code 2."""
    args = sys.argv[1:] if argv is None else argv
    if not args:
        with click.Context(cli, info_name="redblue") as ctx:
            click.echo(cli.get_help(ctx))
        return 0
    try:
        returned = cli.main(args=args, prog_name="redblue", standalone_mode=False)
    except click.UsageError as exc:
        hint = f" (see 'redblue {exc.ctx.info_name} --help')" if exc.ctx and exc.ctx.parent else ""
        _error(f"{exc.format_message()}{hint}")
        return 2
    except click.ClickException as exc:
        _error(exc.format_message())
        return 2
    except click.exceptions.Abort:
        print("redblue: aborted", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("redblue: interrupted (completed results are kept; run again to resume)", file=sys.stderr)
        return 130
    except RedblueError as exc:
        _error(str(exc))
        return 2
    except OSError as exc:  # a full disk, a permission, a quota: what and where, in one line
        where = f"{exc.filename}: " if exc.filename else ""
        _error(f"{where}{exc.strerror or exc} (nothing half-written is kept)")
        return 2
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    # With standalone_mode=False, click returns ctx.exit(code)'s code (or the command's value).
    return returned if isinstance(returned, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
