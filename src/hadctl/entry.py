"""The ``hadctl`` command's entry point, and the one place errors become exit statuses.

The forms cron, init scripts and people type all day, ``hadctl -c FILE ACTION``
(and ``status --json``), are run here without importing click: click alone
costs about 25 ms, more than a whole ``stop`` is allowed. Anything else (help,
options, other actions, every mistake) goes to the click command in cli.py,
which parses it properly and calls ``perform`` too, so both paths behave alike.

Errors: a HadctlError is one line on stderr and its LSB status; anything else
is our bug: its traceback goes to the log file, one line to stderr, status 1.
Imports only what the chosen action needs.
"""
from __future__ import annotations

import sys

TYPE_CHECKING = False  # not typing's: importing typing costs this path milliseconds
if TYPE_CHECKING:
    from typing import Callable, NoReturn

    from .config import ServiceConfig

FAST_ACTIONS = frozenset({"start", "stop", "restart", "hard-restart", "hard_restart", "fork", "reload",
                          "upgrade", "status", "foreground"})
_CRASH_LOG = [""]  # where an internal error's traceback goes once a config is loaded


def run(argv: list[str] | None = None) -> NoReturn:
    """Run one hadctl command and exit with its status."""
    args = sys.argv[1:] if argv is None else list(argv)
    simple = _simple_form(args)
    if simple is not None:
        path, action, as_json = simple
        code = guarded(lambda: perform(path, action, as_json))
        if action != "foreground" and "kazoo" not in sys.modules:
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


def _simple_form(args: list[str]) -> tuple[str, str, bool] | None:
    """``-c FILE ACTION`` / ``--config FILE ACTION`` / ``--config=FILE ACTION``
    (``status`` may add ``--json``); None for anything else."""
    if len(args) >= 3 and args[0] in ("-c", "--config") and not args[1].startswith("-"):
        path, rest = args[1], args[2:]
    elif len(args) >= 2 and args[0].startswith("--config=") and len(args[0]) > len("--config="):
        path, rest = args[0][len("--config="):], args[1:]
    else:
        return None
    if rest and rest[0] in FAST_ACTIONS:
        if len(rest) == 1:
            return path, rest[0].replace("_", "-"), False
        if rest[0] == "status" and rest[1:] == ["--json"]:
            return path, "status", True
    return None


def load(path: str) -> ServiceConfig:
    """Load the service file; later internal errors log their traceback in its log_file."""
    from .config import load as load_config

    cfg = load_config(path)
    _CRASH_LOG[0] = cfg.log_file
    return cfg


def perform(path: str, action: str, as_json: bool = False) -> int:
    """Load the config, run ``action`` (CLI spelling), render it; returns the exit status."""
    from . import actions

    cfg = load(path)
    if action == "foreground":
        return actions.foreground(cfg)
    if action == "status":
        outcome = actions.status(cfg)
        if as_json:
            from .render import as_json as to_json

            sys.stdout.write(to_json(outcome) + "\n")
        elif not cfg.quiet:
            from .render import write_lines

            write_lines(outcome, sys.stdout, sys.stdout)
        return outcome.exit_status
    outcome = getattr(actions, action.replace("-", "_"))(cfg)
    from .render import write_lines

    write_lines(outcome, sys.stdout, sys.stderr, quiet=cfg.quiet)
    return int(outcome.exit_status)


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
    except Exception as exc:  # noqa: BLE001 - our bug: log it, say one line
        return _internal_error(exc)
    return code if isinstance(code, int) else 0


def _internal_error(exc: BaseException) -> int:
    import traceback

    from .log import Log

    where = _CRASH_LOG[0]
    if where:
        Log(where).error("internal error:\n" + "".join(traceback.format_exception(exc)).rstrip())
    else:
        where = "stderr"
        traceback.print_exception(exc)
    sys.stderr.write(f"hadctl: internal error: {type(exc).__name__}: {exc} (traceback in {where})\n")
    return 1
