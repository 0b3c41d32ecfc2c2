"""The ``hadctl`` command: the table of actions, the fast path, one dispatch, exit statuses.

``ACTIONS`` is the one list of what hadctl can do. Each row names the action,
its other spellings, the function that runs it, its help, whether the fast path
takes it, whether the LSB init script offers it, and its options. Three readers:
``run`` here (the fast path), cli.py (it generates its click commands from the
rows) and initfile.py (the init script's actions). Adding an action is one row
here plus its function.

The fast path: the forms cron, init scripts and people type all day,
``hadctl -c FILE ACTION`` (plus an action's fast flags, ``status --json``), are
run here without importing click, which alone costs more than a whole ``stop``
is allowed. Anything else (help, other options, every mistake) goes to cli.py,
imported only then; both paths end in ``perform``, so they behave alike.

Errors: a HadctlError is one line on stderr and its LSB status; anything else
is our bug: its traceback goes to the log file, one line to stderr, status 1.

Imports only lean at module level (cheap); the rest inside the functions that
need it. Never imports cli at module level: cli imports this module.
"""
from __future__ import annotations

import sys

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import NoReturn

    from .config import ServiceConfig
    from .model import Outcome


class Option:
    """One ``--flag`` of an action. ``dest`` is the name perform reads; a flag takes
    no value, otherwise ``metavar`` names the value. ``fast``: the fast path accepts it."""

    __slots__ = ("decls", "dest", "help", "flag", "metavar", "fast")

    def __init__(self, decls: tuple[str, ...], dest: str, help: str, *, flag: bool = True,
                 metavar: str | None = None, fast: bool = False) -> None:
        self.decls, self.dest, self.help = decls, dest, help
        self.flag, self.metavar, self.fast = flag, metavar, fast


class Action:
    """One row of ``ACTIONS``.

    ``call`` is ``"module.function"`` inside hadctl; the function takes the loaded
    ``ServiceConfig`` and returns an ``Outcome`` (rendered as lines, or JSON with
    ``--json``), an ``int`` (the exit status; it did its own output) or a ``str``
    (printed as it is). ``report``: an Outcome that is a report (status) goes all to
    stdout and is silenced by ``quiet``; otherwise failures go to stderr.
    ``fast``: run without click for ``-c FILE NAME``. ``init``: the LSB script offers it.
    ``every``: the function for ``--all`` (a folder of service files -> (outcomes, status)).
    ``loads``: False when the function gets the service file's path and reads it itself
    (check: to report every error of the file, not config.load's first).
    """

    __slots__ = ("name", "aliases", "call", "help", "fast", "init", "options", "report", "every", "loads")

    def __init__(self, name: str, call: str, help: str, *, aliases: tuple[str, ...] = (),
                 fast: bool = True, init: bool = False, options: tuple[Option, ...] = (),
                 report: bool = False, every: str | None = None, loads: bool = True) -> None:
        self.name, self.call, self.help, self.aliases = name, call, help, aliases
        self.fast, self.init, self.options, self.report = fast, init, options, report
        self.every, self.loads = every, loads

    def spellings(self) -> tuple[str, ...]:
        return (self.name, *self.aliases)


JSON = Option(("--json",), "as_json", "Print the same facts as JSON.", fast=True)
ALL = Option(("--all",), "every", "Every *.toml service in the config folder.")
FORMAT = Option(("--format",), "format", "text (default), json, or prometheus (the text exposition format).",
                flag=False, metavar="FORMAT")
CONFIG_DIR = Option(("--config-dir",), "config_dir",
                    "Folder for --all (default: $HADCTL_CONFIG_DIR, else /etc/hadctl).",
                    flag=False, metavar="DIR")

ACTIONS: tuple[Action, ...] = (
    Action("start", "actions.start", init=True, help=(
        "Remove the standby stop file and spawn the missing mains, then standbys; wait until each "
        "reports its role. Exit 0 when all run (or already ran), 1 on failure, 5 when the entrypoint "
        "cannot be imported.")),
    Action("stop", "actions.stop", init=True, help=(
        "Touch the standby stop file, stop the standbys, then stop each main: main_stop_file, then "
        "each signal of stop_signals with its timeout (its process group too with kill_mode = \"group\"). "
        "Exit 0 when nothing runs any more, 1 when something survived.")),
    Action("restart", "actions.restart", init=True, help=(
        "Zero-downtime restart: replace the standbys (they import the new code), then stop the "
        "mains one at a time, each time waiting until a standby holds the freed slot, then refill "
        "the standbys. Exit 1 naming the slot that failed.")),
    Action("hard-restart", "actions.hard_restart", aliases=("hard_restart",), init=True,
           help="Stop, then start (also spelled hard_restart)."),
    Action("fork", "actions.fork", init=True, help=(
        "For cron: exit 1 if the standby stop file exists, else spawn whatever main or standby "
        "slot is missing. Silent under quiet = true unless something fails.")),
    Action("reload", "actions.reload", init=True, help="Send SIGHUP to each main. Exit 7 when no main runs."),
    Action("upgrade", "actions.upgrade", help=(
        "Refresh the standbys, then touch main_upgrade_file (%p -> pid) for each main and wait "
        "upgrade_timeout for the main to remove it.")),
    Action("status", "actions.status", init=True, report=True, options=(JSON, ALL, CONFIG_DIR, FORMAT),
           every="services.status_all", help=(
        "One line per expected slot, read from the locks: Running or Not Running "
        "(stale pid files named); the last failover. Exit 0 all running, 3 none, 1 some.")),
    Action("foreground", "actions.foreground",
           help="Run the entrypoint in this process: no fork, no locks, no output of hadctl's own."),
    Action("get-init-file", "initfile.init_file", aliases=("get_init_file",), fast=False,
           help="Print an LSB init script that runs hadctl -c CONFIG ACTION (also get_init_file)."),
    Action("get-systemd-unit", "initfile.systemd_unit", fast=False,
           help="Print systemd units: the service, and a timer that runs fork every minute."),
    Action("reopen-logs", "outputs.reopen_logs", aliases=("reopen_logs",), help=(
        "Every worker reopens its output files by name (for logrotate's postrotate): sends "
        "reopen_signal and waits until each writes to the new files. Exit 7 when nothing runs.")),
    Action("get-logrotate", "outputs.get_logrotate", fast=False,
           help="Print a logrotate stanza for the service's files, whose postrotate runs reopen-logs."),
    Action("logs", "outputs.logs", fast=False, options=(
        Option(("-f",), "follow", "Keep printing what is appended, across rotations."),
        Option(("-n",), "lines", "How many lines to print first (default 10).", flag=False,
               metavar="N"),
        Option(("--stderr",), "stderr", "The main's stderr file instead of its stdout file."),
        Option(("--hadctl",), "hadctl", "hadctl's own log (log_file)."),
    ), help="Print the service's output (the main's stdout file), with -f following it across rotations."),
    Action("check", "check.check", loads=False, options=(ALL, CONFIG_DIR), every="check.check_all", help=(
        "Validate without starting anything: the config (every error), users and groups, folders, "
        "the entrypoint and warmup imported as the service user, listen addresses, limits. "
        "One line per problem and exit 6, else 0 with a summary.")),
    Action("events", "render.show_events", fast=False, options=(
        Option(("-n",), "lines", "How many events to print (default 20).", flag=False, metavar="N"),
        Option(("--json",), "json_output", "One JSON object per line."),
        Option(("--since",), "since", "Only events at TIME or later: 10m, 2h, 1d, @EPOCH, HH:MM, "
               "YYYY-MM-DD HH:MM.", flag=False, metavar="TIME"),
    ), help="Print the service's history: starts, stops, failovers (gap), restarts, back-off steps, "
            "watchdog replacements, spawn failures, mains that returned."),
    Action("top", "top.top", fast=False, options=(
        ALL, CONFIG_DIR, Option(("--once",), "once", "Print one frame and exit (also when not on a terminal)."),
    ), every="top.top_all", help=(
        "A live table of the service's (or, with --all, every service's) slots, refreshed every "
        "second until Ctrl-C: role, pid, uptime, CPU, RSS with descendants, listen sockets, last "
        "event, back-off. Reads /proc and pid_dir only: no signal, no wake-up of a standby.")),
)

# Options perform reads itself; any other option of a row is passed to its function by name.
_PERFORM_OPTIONS = ("as_json", "every", "config_dir", "format")
FORMATS = ("text", "json", "prometheus")


def find(name: str) -> Action | None:
    """The row spelled ``name`` (its name or an alias), or None."""
    for action in ACTIONS:
        if name in action.spellings():
            return action
    return None


_CRASH_LOG = ["", "", ""]  # log_file, name, syslog_facility: where an internal error's traceback goes


def run(argv: list[str] | None = None) -> NoReturn:
    """Run one hadctl command and exit with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    fast = _fast_form(args)
    if fast is not None:
        path, action, options = fast
        code = guarded(lambda: perform(path, action, options))
        if action.name != "foreground" and "kazoo" not in sys.modules:
            _exit_now(code)
    else:
        from .cli import run_click

        code = guarded(lambda: run_click(args))
    sys.exit(code)


def _exit_now(code: int) -> NoReturn:
    """Exit without the interpreter's clean-up, about 2 ms of every command: nothing
    here needs it (no user code ran, no thread, no atexit handler: the ZooKeeper
    engine registers one and starts threads, so kazoo being loaded means a normal
    exit). Only the output must be flushed; when it cannot be (a closed pipe), a
    normal exit reports it as Python always does."""
    import os

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):
        sys.exit(code)
    os._exit(code)


def _fast_form(args: list[str]) -> tuple[str, Action, dict[str, object]] | None:
    """``-c FILE ACTION`` / ``--config FILE ACTION`` / ``--config=FILE ACTION``, the
    action's fast flags after it, each at most once; None for anything else."""
    if len(args) >= 3 and args[0] in ("-c", "--config") and not args[1].startswith("-"):
        path, rest = args[1], args[2:]
    elif len(args) >= 2 and args[0].startswith("--config=") and len(args[0]) > len("--config="):
        path, rest = args[0][len("--config="):], args[1:]
    else:
        return None
    action = find(rest[0]) if rest else None
    if action is None or not action.fast:
        return None
    flags = {decl: option for option in action.options if option.fast and option.flag for decl in option.decls}
    options: dict[str, object] = {}
    for arg in rest[1:]:
        option = flags.get(arg)
        if option is None or option.dest in options:
            return None
        options[option.dest] = True
    return path, action, options


def load(path: str) -> ServiceConfig:
    """Load the service file; later internal errors log their traceback in its log_file."""
    from .config import load as load_config

    cfg = load_config(path)
    _CRASH_LOG[:] = [cfg.log_file, cfg.name, cfg.syslog_facility]
    return cfg


def function(call: str) -> Callable[..., object]:
    """The function ``"module.function"`` inside hadctl (``__import__``: importlib costs an import)."""
    module, _, name = call.rpartition(".")
    found: Callable[..., object] = getattr(__import__(f"{__package__}.{module}", fromlist=[name]), name)
    return found


def perform(path: str | None, action: Action, options: dict[str, object] | None = None) -> int:
    """Load the config, run ``action``, render what it returns; returns the exit status.
    With ``every`` (``--all``) and a row that has an ``every`` function, that function
    gets the config folder instead, and returns (outcomes, status)."""
    options = options or {}
    form = _format(options)
    as_json = form == "json"
    if options.get("every") and action.every:
        return _perform_every(action, options, form)
    if not path:
        raise ValueError("perform: no config file")  # cli.py asks for -c before calling
    passed = {o.dest: options.get(o.dest) for o in action.options if o.dest not in _PERFORM_OPTIONS}
    cfg = load(path) if action.loads else None
    result = function(action.call)(path if cfg is None else cfg, **passed)
    if isinstance(result, bool) or result is None:
        raise TypeError(f"{action.call} returned {result!r}")
    if isinstance(result, int):
        return result
    if isinstance(result, str):
        sys.stdout.write(result)
        return 0
    if form == "prometheus":
        from .render import as_prometheus

        sys.stdout.write(as_prometheus([result]))  # type: ignore[list-item]
    elif as_json:
        from .render import as_json as to_json

        sys.stdout.write(to_json(result) + "\n")  # type: ignore[arg-type]
    else:
        from .render import write_lines

        quiet = cfg is not None and cfg.quiet
        if action.report:
            if not quiet:
                write_lines(result, sys.stdout, sys.stdout)  # type: ignore[arg-type]
        else:
            write_lines(result, sys.stdout, sys.stderr, quiet=quiet)  # type: ignore[arg-type]
    return int(result.exit_status)  # type: ignore[attr-defined]


def _format(options: dict[str, object]) -> str:
    """``--format`` (``--json`` is ``--format json``); ArgumentError (2) for an unknown one."""
    form = options.get("format")
    if form is None:
        return "json" if options.get("as_json") else "text"
    if form not in FORMATS or (options.get("as_json") and form != "json"):
        from .errors import ArgumentError

        raise ArgumentError(f"--format: expected one of {', '.join(FORMATS)}"
                            f"{' (or --json alone)' if options.get('as_json') else ''}, got {form!r}")
    return str(form)


def _perform_every(action: Action, options: dict[str, object], form: str) -> int:
    """``--all``: the row's ``every`` function gets the config folder (and the row's own
    options); it returns (outcomes, status) to render, or an exit status (it printed)."""
    import os

    folder = str(options.get("config_dir") or os.environ.get("HADCTL_CONFIG_DIR") or "/etc/hadctl")
    passed = {o.dest: options.get(o.dest) for o in action.options if o.dest not in _PERFORM_OPTIONS}
    found = function(action.every or "")(folder, **passed)
    if isinstance(found, int):
        return found
    outcomes: list[Outcome]
    code: int
    outcomes, code = found  # type: ignore[misc]
    if form == "prometheus":
        from .render import as_prometheus

        sys.stdout.write(as_prometheus(outcomes))
    elif form == "json":
        from .render import as_json as to_json

        sys.stdout.write(to_json(outcomes) + "\n")
    else:
        from .render import write_lines

        for outcome in outcomes:
            write_lines(outcome, sys.stdout, sys.stdout)
    return int(code)


def guarded(call: Callable[[], int]) -> int:
    """Run ``call``; turn what it raises into one line on stderr and an exit status."""
    from .errors import HadctlError

    try:
        code = call()
    except HadctlError as exc:
        sys.stderr.write(f"hadctl: error: {exc}\n")
        return exc.exit_status
    except BrokenPipeError:
        # The reader of our output went away (hadctl status | head -1): nothing to tell
        # it. Output still buffered must not fail again at exit (Python's advice).
        import os

        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 1
    except KeyboardInterrupt:
        sys.stderr.write("hadctl: interrupted\n")
        return 130
    except Exception as exc:  # our bug: log it, say one line
        return _internal_error(exc)
    return code if isinstance(code, int) else 0


def _internal_error(exc: BaseException) -> int:
    import traceback

    from .log import open_log

    where = _CRASH_LOG[0]
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)).rstrip()
    if where:
        open_log(where, _CRASH_LOG[1], _CRASH_LOG[2]).error("internal error:\n" + text)
    else:
        where = "stderr"
        sys.stderr.write(text + "\n")
    sys.stderr.write(f"hadctl: internal error: {type(exc).__name__}: {exc} (traceback in {where})\n")
    return 1
