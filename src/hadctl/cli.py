"""The ``hadctl`` command line, through click: help, options, every action.

entry.py runs the common ``-c FILE ACTION`` forms without click and sends
everything else here; both end in ``entry.perform``. Usage errors are click's
(status 2, with usage); other errors are turned into statuses by
``entry.guarded``.
"""
from __future__ import annotations

import os
import sys
from typing import Any

import click

from . import __version__
from .entry import load, perform

EPILOG = """\b
Exit status follows the LSB init-script conventions:
  0 ok, 1 failed (status: some slots not running), 2 bad arguments,
  3 not running (status), 4 not permitted, 5 entrypoint not importable,
  6 not configured (bad config file), 7 not running (reload).
See hadctl(1) for the configuration keys: man -l man/hadctl.1
"""


class _Group(click.Group):
    """Accepts HADaemon::Control's underscore spellings (hard_restart, get_init_file)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        return super().get_command(ctx, cmd_name.replace("_", "-"))

    def resolve_command(self, ctx: click.Context, args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
        name, command, rest = super().resolve_command(ctx, args)
        return (command.name if command else name), command, rest


@click.group(cls=_Group, epilog=EPILOG, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-c", "--config", "config_path", metavar="FILE", type=click.Path(dir_okay=False),
              help="The service's TOML file (required by every action but status --all).")
@click.version_option(__version__, prog_name="hadctl")
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """Keep a Python service running as N main processes plus M hot standbys.

    There is no resident supervisor: the processes coordinate through locks in
    pid_dir, and hadctl is a short-lived command run by a person, cron or an
    init script. A standby takes a dead main's slot within milliseconds.
    """
    ctx.obj = config_path


def _config_path(ctx: click.Context) -> str:
    path = ctx.find_root().obj
    if not path:
        raise click.UsageError("missing option -c/--config FILE", ctx=ctx)
    return str(path)


def _config(ctx: click.Context) -> Any:
    return load(_config_path(ctx))


def _simple(name: str, help_text: str) -> None:
    @main.command(name, help=help_text)
    @click.pass_context
    def command(ctx: click.Context) -> int:
        return perform(_config_path(ctx), name)


_simple("start", "Remove the standby stop file and spawn the missing mains, then standbys; wait until each "
        "reports its role. Exit 0 when all run (or already ran), 1 on failure, 5 when the entrypoint "
        "cannot be imported.")
_simple("stop", "Touch the standby stop file, stop the standbys, then stop each main: main_stop_file, then "
        "each signal of stop_signals with its timeout (its process group too with kill_mode = \"group\"). "
        "Exit 0 when nothing runs any more, 1 when something survived.")
_simple("restart", "Zero-downtime restart: replace the standbys (they import the new code), then stop the "
        "mains one at a time, each time waiting until a standby holds the freed slot, then refill "
        "the standbys. Exit 1 naming the slot that failed.")
_simple("hard-restart", "Stop, then start (also spelled hard_restart).")
_simple("fork", "For cron: exit 1 if the standby stop file exists, else spawn whatever main or standby "
        "slot is missing. Silent under quiet = true unless something fails.")
_simple("reload", "Send SIGHUP to each main. Exit 7 when no main runs.")
_simple("upgrade", "Refresh the standbys, then touch main_upgrade_file (%p -> pid) for each main and wait "
        "upgrade_timeout for the main to remove it.")


@main.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print the same facts as JSON.")
@click.option("--all", "every", is_flag=True, help="Every *.toml service in the config folder.")
@click.option("--config-dir", metavar="DIR", type=click.Path(file_okay=False),
              help="Folder for --all (default: $HADCTL_CONFIG_DIR, else /etc/hadctl).")
@click.pass_context
def status_command(ctx: click.Context, as_json: bool, every: bool, config_dir: str | None) -> int:
    """One line per expected slot, read from the locks: Running or Not Running
    (stale pid files named). Exit 0 all running, 3 none, 1 some."""
    if every:
        from .render import as_json as to_json, write_lines
        from .services import status_all

        folder = config_dir or os.environ.get("HADCTL_CONFIG_DIR") or "/etc/hadctl"
        outcomes, code = status_all(folder)
        if as_json:
            click.echo(to_json(outcomes))
        else:
            for outcome in outcomes:
                write_lines(outcome, sys.stdout, sys.stdout)
        return code
    return perform(_config_path(ctx), "status", as_json)


@main.command("foreground")
@click.pass_context
def foreground_command(ctx: click.Context) -> int:
    """Run the entrypoint in this process: no fork, no locks, no output of hadctl's own."""
    return perform(_config_path(ctx), "foreground")


@main.command("get-init-file")
@click.pass_context
def get_init_file_command(ctx: click.Context) -> int:
    """Print an LSB init script that runs hadctl -c CONFIG ACTION (also get_init_file)."""
    from . import initfile

    click.echo(initfile.lsb_script(_config(ctx), initfile.hadctl_path()), nl=False)
    return 0


@main.command("get-systemd-unit")
@click.pass_context
def get_systemd_unit_command(ctx: click.Context) -> int:
    """Print systemd units: the service, and a timer that runs fork every minute."""
    from . import initfile

    click.echo(initfile.systemd_units(_config(ctx), initfile.hadctl_path()), nl=False)
    return 0


def run_click(args: list[str]) -> int:
    """Parse ``args`` with click and run the command; click's own errors are
    printed here (usage, status 2); HadctlError goes up to entry.guarded."""
    try:
        code = main.main(args=args, prog_name="hadctl", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("hadctl: aborted", err=True)
        return 1
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    return code if isinstance(code, int) else 0


def run(argv: list[str] | None = None) -> None:
    """Entry point kept for compatibility: the same as hadctl.entry.run."""
    from .entry import run as entry_run

    entry_run(argv)
