"""The ``hadctl`` command line through click: help, options, usage errors.

Its commands are generated from ``entry.ACTIONS``, one per row (options, help,
other spellings included); each ends in ``entry.perform``, as the fast path
does. entry.py imports this module only for what its fast path does not take.
Usage errors are click's (status 2, with usage); other errors become statuses
in ``entry.guarded``. The only module that imports click.
"""
from __future__ import annotations

import click

from . import __version__
from .entry import ACTIONS, Action, find, perform

EPILOG = """\b
Exit status follows the LSB init-script conventions:
  0 ok, 1 failed (status: some slots not running), 2 bad arguments,
  3 not running (status), 4 not permitted, 5 entrypoint not importable,
  6 not configured (bad config file), 7 not running (reload).
See hadctl(1) for the configuration keys: man -l man/hadctl.1
"""


class _Group(click.Group):
    """Finds a command by any spelling of its row (hard_restart, get_init_file)."""

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        action = find(cmd_name)
        return super().get_command(ctx, action.name if action else cmd_name)

    def resolve_command(self, ctx: click.Context,
                        args: list[str]) -> tuple[str | None, click.Command | None, list[str]]:
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


def _command(action: Action) -> click.Command:
    """The click command of one row of ``entry.ACTIONS``."""

    @click.pass_context
    def callback(ctx: click.Context, /, **options: object) -> int:
        every = action.every is not None and bool(options.get("every"))
        return perform(None if every else _config_path(ctx), action, options)

    params: list[click.Parameter] = [
        # A value option names a folder (--config-dir): click says so when it is a file.
        click.Option([*option.decls, option.dest], is_flag=option.flag, metavar=option.metavar,
                     help=option.help, type=None if option.flag else click.Path(file_okay=False))
        for option in action.options
    ]
    return click.Command(action.name, callback=callback, params=params, help=action.help)


for _action in ACTIONS:
    main.add_command(_command(_action))


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
