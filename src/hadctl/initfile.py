"""``ServiceConfig`` -> text that hands a service to the init system.

``lsb_script`` is ``get-init-file``: a POSIX sh LSB init script (HADaemon::Control's
``do_get_init_file``); ``systemdunits.systemd_units`` is ``get-systemd-unit``: a
service, plus a oneshot service and a timer that replace the cron ``fork`` line.
Both are pure functions of the config and the hadctl command line to embed;
``hadctl_path`` finds the latter (``command_for`` splits it). Every value is quoted
for its target language, so paths with spaces, quotes, ``$``, ``%`` or
backslashes survive.

``init_file`` and ``systemd_unit`` are the actions (rows of ``entry.ACTIONS``).
Imports hadctl.config and hadctl.entry (the table of actions: which the script
offers) only, systemdunits inside ``systemd_unit``, and the package's
``__version__``; never click or rich.
"""
from __future__ import annotations

import os
import re
import shutil
import sys

from . import __version__
from .config import ServiceConfig
from .entry import ACTIONS

DEFAULT_START = "2 3 4 5"
DEFAULT_STOP = "0 1 6"
MODULE_SUFFIX = " -m hadctl"  # what hadctl_path() appends when only the interpreter is known
INIT_ONLY = ("try-restart", "force-reload")  # LSB's, run as restart (if running) / restart


# ------------------------------------------------------------------ hadctl


def init_file(cfg: ServiceConfig) -> str:
    """The ``get-init-file`` action: ``lsb_script`` for this very hadctl."""
    return lsb_script(cfg, hadctl_path())


def systemd_unit(cfg: ServiceConfig) -> str:
    """The ``get-systemd-unit`` action: ``systemdunits.systemd_units`` for this very hadctl."""
    from .systemdunits import systemd_units

    return systemd_units(cfg, hadctl_path())


def hadctl_path() -> str:
    """The command that runs this very hadctl, as an absolute path.

    1. The ``hadctl`` script next to ``sys.executable``: the same installation as
       the code now running (a venv, pipx or ``/usr``), even when that folder is
       not on $PATH. This deliberately wins over $PATH, whose first ``hadctl`` may
       belong to another installation.
    2. ``shutil.which("hadctl")`` made absolute (``pip install --user`` puts the
       script in ~/.local/bin, not next to the interpreter).
    3. ``"<sys.executable> -m hadctl"``: no script at all (a checkout run with
       ``python -m hadctl``). ``lsb_script`` and ``systemd_units`` recognise
       this form and run the interpreter with ``-m hadctl``.

    Symlinks are kept, not resolved: re-pointing /usr/local/bin/hadctl at a new
    installation then updates every generated script too.
    """
    beside = os.path.join(os.path.dirname(os.path.abspath(sys.executable)), "hadctl")
    if os.path.isfile(beside) and os.access(beside, os.X_OK):
        return beside
    found = shutil.which("hadctl")
    if found:
        return os.path.abspath(found)
    return os.path.abspath(sys.executable) + MODULE_SUFFIX


def command_for(cfg: ServiceConfig, hadctl: str) -> tuple[str, list[str]]:
    """(executable, leading arguments): ``[init] path`` wins over ``hadctl``."""
    if cfg.init.path:
        return cfg.init.path, []
    if hadctl.endswith(MODULE_SUFFIX):
        return hadctl[: -len(MODULE_SUFFIX)], ["-m", "hadctl"]
    return hadctl, []


def one_line(text: str) -> str:
    """Text safe inside a comment line (no line breaks)."""
    return " ".join(text.split())


# ------------------------------------------------------------------ LSB


def _sh(text: str) -> str:
    """Quote ``text`` as one POSIX sh word that expands to exactly ``text``.

    Single quotes when that is enough; text holding ', $ or ` goes in double
    quotes with \\, ", $ and ` escaped (shellcheck flags a literal $ in single quotes).
    """
    if not any(c in text for c in "'$`"):
        return "'" + text + "'"
    return '"' + "".join("\\" + c if c in '\\"$`' else c for c in text) + '"'


def _lsb_description(cfg: ServiceConfig) -> list[str]:
    """The Description field: first line, then continuation lines ("#" + 2 spaces)."""
    text = cfg.init.lsb_desc or (
        f"Runs {cfg.entrypoint} as {cfg.locks.max_procs} main process(es) with "
        f"{cfg.locks.standby_max_procs} hot standby(s), kept up by hadctl.")
    lines = [one_line(line) for line in text.splitlines() if line.strip()] or [cfg.name]
    return [f"# Description:       {lines[0]}"] + [f"#                    {line}" for line in lines[1:]]


def lsb_script(cfg: ServiceConfig, hadctl: str) -> str:
    """An LSB init script (POSIX sh, clean under ``shellcheck -s sh``) for ``cfg``.

    It runs ``HADCTL -c CONFIG ACTION`` for start, stop, restart, status, reload,
    fork and hard-restart (hard_restart too), maps force-reload to restart and
    try-restart to restart-if-running, and exits with hadctl's status. Exit 5
    when hadctl or the config file is missing, 2 with a usage line on a bad or
    missing action. ``[init] path`` overrides ``hadctl``; ``[init] init_config``
    is sourced when readable, ``[init] init_code`` is inserted verbatim.
    """
    program, lead = command_for(cfg, hadctl)
    args = "".join(f" {_sh(a)}" for a in lead)
    out = _lsb_header(cfg, program) + _lsb_init_settings(cfg) + _lsb_action(args) + _lsb_checks_and_run()
    return "\n".join(out)


def _lsb_header(cfg: ServiceConfig, program: str) -> list[str]:
    """The LSB comment block (``### BEGIN INIT INFO``), then HADCTL, CONFIG and NAME."""
    init = cfg.init
    provides = re.sub(r"[^A-Za-z0-9_.+-]+", "-", cfg.name).strip("-") or "hadctl-service"
    short = one_line(init.lsb_sdesc or f"{cfg.name} (kept up by hadctl)")
    return [
        "#!/bin/sh",
        "### BEGIN INIT INFO",
        f"# Provides:          {provides}",
        f"# Required-Start:    {one_line(init.lsb_start)}",
        f"# Required-Stop:     {one_line(init.lsb_stop)}",
        f"# Default-Start:     {DEFAULT_START}",
        f"# Default-Stop:      {DEFAULT_STOP}",
        f"# Short-Description: {short}",
        *_lsb_description(cfg),
        "### END INIT INFO",
        "#",
        f"# Generated by hadctl {__version__} from {one_line(cfg.config_file)}.",
        "# Do not edit: regenerate with get-init-file after changing the config.",
        "",
        f"HADCTL={_sh(program)}",
        f"CONFIG={_sh(cfg.config_file)}",
        f"NAME={_sh(cfg.name)}",
        "",
    ]


def _lsb_init_settings(cfg: ServiceConfig) -> list[str]:
    """``[init] init_config`` sourced when readable, then ``init_code`` verbatim."""
    init = cfg.init
    out = []
    if init.init_config:
        out += [
            "# init_config: settings for this script and the environment of the service",
            f"if [ -r {_sh(init.init_config)} ]; then",
            "    # shellcheck source=/dev/null",
            f"    . {_sh(init.init_config)}",
            "fi",
            "",
        ]
    if init.init_code:
        out += ["# init_code (verbatim from the config)", init.init_code.rstrip("\n"), ""]
    return out


def _lsb_action(args: str) -> list[str]:
    """usage() and run_hadctl(), then ACTION: one of the init actions (``entry.ACTIONS``
    rows with ``init``, their aliases, LSB's own), or usage and exit 2."""
    offered = [action for action in ACTIONS if action.init]
    names = [action.name for action in offered] + list(INIT_ONLY)
    aliases = [f"    {alias}) ACTION={action.name} ;;" for action in offered for alias in action.aliases]
    return [
        "usage() {",
        f'    echo "Usage: $0 {{{"|".join(names)}}}" >&2',
        "    exit 2",
        "}",
        "",
        "run_hadctl() {",
        f'    "$HADCTL"{args} -c "$CONFIG" "$@"',
        "}",
        "",
        '[ "$#" -ge 1 ] || usage',
        'ACTION=$1',
        "shift",
        'case "$ACTION" in',
        f"    {'|'.join(names)}) ;;",
        *aliases,
        "    *) usage ;;",
        "esac",
        "",
    ]


def _lsb_checks_and_run() -> list[str]:
    """Exit 5 without hadctl or the config file; force-reload and try-restart as
    restarts; then hadctl runs the action and its status is the script's."""
    return [
        'if [ ! -x "$HADCTL" ]; then',
        '    echo "$0: $NAME: hadctl is not installed: $HADCTL is not an executable file" >&2',
        "    exit 5",
        "fi",
        'if [ ! -f "$CONFIG" ]; then',
        '    echo "$0: $NAME: config file $CONFIG is missing" >&2',
        "    exit 5",
        "fi",
        "",
        'case "$ACTION" in',
        "    force-reload)",
        '        ACTION=restart',
        "        ;;",
        "    try-restart)",
        '        run_hadctl status >/dev/null 2>&1',
        "        STATUS=$?",
        '        case "$STATUS" in',
        "            0|1) ACTION=restart ;;  # all or some slots running",
        '            3) echo "$NAME is not running: not restarting"; exit 0 ;;',
        '            *) exit "$STATUS" ;;',
        "        esac",
        "        ;;",
        "esac",
        'run_hadctl "$ACTION" "$@"',
        "",
    ]
