"""``ServiceConfig`` -> text that hands a service to the init system.

``lsb_script`` is ``get-init-file``: a POSIX sh LSB init script (HADaemon::Control's
``do_get_init_file``); ``systemd_units`` is ``get-systemd-unit``: a service, plus a
oneshot service and a timer that replace the cron ``fork`` line. Both are pure
functions of the config and the hadctl command line to embed; ``hadctl_path``
finds the latter. Every value is quoted for its target language, so paths with
spaces, quotes, ``$``, ``%`` or backslashes survive.

``init_file`` and ``systemd_unit`` are the actions (rows of ``entry.ACTIONS``).
Imports hadctl.config and hadctl.entry (the table of actions: which the script
offers) only, and the package's ``__version__``; never click or rich.
"""
from __future__ import annotations

import math
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
SYSTEMD_RUN = "/usr/bin/systemd-run"
UNIT_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-")


# ------------------------------------------------------------------ hadctl


def init_file(cfg: ServiceConfig) -> str:
    """The ``get-init-file`` action: ``lsb_script`` for this very hadctl."""
    return lsb_script(cfg, hadctl_path())


def systemd_unit(cfg: ServiceConfig) -> str:
    """The ``get-systemd-unit`` action: ``systemd_units`` for this very hadctl."""
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


def _command(cfg: ServiceConfig, hadctl: str) -> tuple[str, list[str]]:
    """(executable, leading arguments): ``[init] path`` wins over ``hadctl``."""
    if cfg.init.path:
        return cfg.init.path, []
    if hadctl.endswith(MODULE_SUFFIX):
        return hadctl[: -len(MODULE_SUFFIX)], ["-m", "hadctl"]
    return hadctl, []


def _one_line(text: str) -> str:
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
    lines = [_one_line(line) for line in text.splitlines() if line.strip()] or [cfg.name]
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
    init = cfg.init
    program, lead = _command(cfg, hadctl)
    provides = re.sub(r"[^A-Za-z0-9_.+-]+", "-", cfg.name).strip("-") or "hadctl-service"
    short = _one_line(init.lsb_sdesc or f"{cfg.name} (kept up by hadctl)")
    out = [
        "#!/bin/sh",
        "### BEGIN INIT INFO",
        f"# Provides:          {provides}",
        f"# Required-Start:    {_one_line(init.lsb_start)}",
        f"# Required-Stop:     {_one_line(init.lsb_stop)}",
        f"# Default-Start:     {DEFAULT_START}",
        f"# Default-Stop:      {DEFAULT_STOP}",
        f"# Short-Description: {short}",
        *_lsb_description(cfg),
        "### END INIT INFO",
        "#",
        f"# Generated by hadctl {__version__} from {_one_line(cfg.config_file)}.",
        "# Do not edit: regenerate with get-init-file after changing the config.",
        "",
        f"HADCTL={_sh(program)}",
        f"CONFIG={_sh(cfg.config_file)}",
        f"NAME={_sh(cfg.name)}",
        "",
    ]
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
    args = "".join(f" {_sh(a)}" for a in lead)
    offered = [action for action in ACTIONS if action.init]
    names = [action.name for action in offered] + list(INIT_ONLY)
    aliases = [f"    {alias}) ACTION={action.name} ;;" for action in offered for alias in action.aliases]
    out += [
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
    return "\n".join(out)


# ------------------------------------------------------------------ systemd


def unit_name(text: str, keep_dash: bool = True) -> str:
    """``text`` escaped into one unit-name component, as systemd-escape does.

    Characters outside ``[A-Za-z0-9:_.-]`` become ``\\xNN`` (each UTF-8 byte), as
    does a leading dot. ``keep_dash=False`` escapes ``-`` too, for slice names,
    where a dash means "child of".
    """
    out = []
    for index, char in enumerate(text):
        if char in UNIT_NAME_CHARS and not (char == "." and index == 0) and (keep_dash or char != "-"):
            out.append(char)
        else:
            out.extend(f"\\x{byte:02x}" for byte in char.encode("utf-8"))
    return "".join(out)


def _unit_value(text: str) -> str:
    """A plain setting value (a path, a description): specifiers (%) doubled, one line."""
    return text.replace("\n", " ").replace("%", "%%")


def _exec_word(text: str) -> str:
    """One word of an Exec*= line: double-quoted, with C escapes, $$ and %%."""
    escaped = (text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
               .replace("$", "$$").replace("%", "%%"))
    return f'"{escaped}"'


def _exec(words: list[str]) -> str:
    """An Exec*= command line; only words that need it are quoted."""
    return " ".join(_exec_word(w) if any(c in w for c in ' \t\n"\'\\$%;') or not w else w for w in words)


def _seconds(value: float) -> int:
    """Whole seconds, rounded up."""
    return math.ceil(value)


_UNIT_RLIMITS = (("nofile", "LimitNOFILE"), ("nproc", "LimitNPROC"), ("core", "LimitCORE"),
                 ("memlock", "LimitMEMLOCK"), ("address_space", "LimitAS"))


def unit_limits(cfg: ServiceConfig) -> list[str]:
    """``[limits]`` as systemd sees them: rlimits as Limit*= (hadctl sets them on each
    worker as well), memory_max, cpu_max, pids_max as MemoryMax=, CPUQuota=, TasksMax=
    (hadctl also writes them to its own cgroup of the service, see contain.py)."""
    limits = cfg.limits
    lines = []
    for key, name in _UNIT_RLIMITS:
        value = getattr(limits, key)
        if value is not None:
            lines.append(f"{name}={'infinity' if value == -1 else value}")
    if limits.memory_max is not None:
        lines.append(f"MemoryMax={limits.memory_max}")
    if limits.cpu_max is not None:
        lines.append(f"CPUQuota={round(limits.cpu_max * 100)}%")
    if limits.pids_max is not None:
        lines.append(f"TasksMax={limits.pids_max}")
    return ["# [limits] of the service file", *lines] if lines else []


def systemd_units(cfg: ServiceConfig, hadctl: str) -> str:
    """Three systemd units for ``cfg``, each after a ``# ---- FILE ----`` line.

    * ``NAME.service``: ``Type=oneshot`` + ``RemainAfterExit=yes``: hadctl leaves
      no resident process (mains change, so neither a main PID nor a PIDFile
      means anything); the processes it double-forks stay in the unit's cgroup,
      which systemd leaves alone until the unit stops. start/stop map to
      hadctl start/stop (systemctl restart is therefore a hard restart);
      ``systemctl reload`` runs the zero-downtime ``hadctl restart``, whose new
      processes land in this unit's cgroup. ``KillMode=control-group``: after
      ``hadctl stop`` has run its stop ladder, systemd ends whatever is left.
    * ``NAME-fork.service`` + ``NAME-fork.timer``: ``hadctl fork`` every minute,
      only while NAME.service is active and no standby stop file exists. A
      oneshot's cgroup is killed when it finishes, so fork runs inside a
      transient scope (``systemd-run --scope``) in the service's slice; the scope
      is bound to NAME.service, so stopping the service ends it as well.
    """
    program, lead = _command(cfg, hadctl)
    base = [program, *lead, "-c", cfg.config_file]
    service = unit_name(cfg.name) + ".service"
    fork_service = unit_name(cfg.name) + "-fork.service"
    timer = unit_name(cfg.name) + "-fork.timer"
    slice_name = "hadctl-" + unit_name(cfg.name, keep_dash=False) + ".slice"
    described = _unit_value(_one_line(cfg.init.lsb_sdesc or cfg.name))
    systemd_run = SYSTEMD_RUN if os.path.exists(SYSTEMD_RUN) else (shutil.which("systemd-run") or SYSTEMD_RUN)

    ladder = len(cfg.stop_signals) * cfg.signal_timeout + (cfg.stop_file_timeout if cfg.main_stop_file else 0)
    stop_timeout = max(90, _seconds(2 * ladder + 30))
    start_timeout = max(120, _seconds(90 + cfg.locks.max_procs * (ladder + 30 + (cfg.ready_timeout or 0))))

    head = [
        f"# Generated by hadctl {__version__} from {_one_line(cfg.config_file)}.",
        "# Install: write each part below into /etc/systemd/system/, named as its marker",
        "# line says, then: systemctl daemon-reload && systemctl enable --now " + service,
        "# See hadctl(1), SYSTEMD, for why the units look like this.",
        "",
    ]
    main = [
        f"# ---- {service} ----",
        "[Unit]",
        f"Description={described} (hadctl: mains and hot standbys)",
        "After=network.target remote-fs.target",
        f"Wants={timer}",
        "",
        "[Service]",
        "# hadctl is short-lived and the processes it spawns change identity (a standby",
        "# becomes main), so there is no main PID: oneshot + RemainAfterExit keeps the unit",
        "# active, and systemd leaves the spawned processes alone in this unit's cgroup.",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"Slice={slice_name}",
    ]
    if cfg.init.init_config:
        main.append(f"EnvironmentFile=-{_unit_value(cfg.init.init_config)}")
    main += [
        f"ExecStart={_exec([*base, 'start'])}",
        "# systemctl reload = zero-downtime restart (new code, no gap); SIGHUP: hadctl reload",
        f"ExecReload={_exec([*base, 'restart'])}",
        f"ExecStop={_exec([*base, 'stop'])}",
        "# After hadctl stop has run its ladder, end whatever is left in the cgroup.",
        "KillMode=control-group",
        f"TimeoutStartSec={start_timeout}",
        f"TimeoutStopSec={stop_timeout}",
        *unit_limits(cfg),
        "",
        "[Install]",
        "WantedBy=multi-user.target",
        "",
    ]
    scope = [systemd_run, "--scope", "--quiet", "--collect", f"--slice={slice_name}",
             f"--description={cfg.name} (processes started by hadctl fork)",
             f"--property=BindsTo={service}", f"--property=Before={service}", "--", *base, "fork"]
    fork = [
        f"# ---- {fork_service} ----",
        "[Unit]",
        f"Description={described} (hadctl fork: respawn missing mains and standbys)",
        f"Requisite={service}",
        f"After={service}",
        f"ConditionPathExists=!{_unit_value(cfg.standby_stop_file)}",
        "",
        "[Service]",
        "Type=oneshot",
        "# A oneshot's cgroup is emptied when it ends: what fork spawns must live",
        "# elsewhere. systemd-run --scope moves hadctl into a new scope in the service's",
        "# slice, bound to the service (systemctl stop ends it too) and stopped after it.",
    ]
    if cfg.init.init_config:
        fork.append(f"EnvironmentFile=-{_unit_value(cfg.init.init_config)}")
    fork += [
        f"ExecStart={_exec(scope)}",
        "",
    ]
    timer_unit = [
        f"# ---- {timer} ----",
        "[Unit]",
        f"Description={described} (hadctl fork every minute, like the cron line)",
        f"BindsTo={service}",
        f"After={service}",
        "",
        "[Timer]",
        "OnCalendar=minutely",
        "AccuracySec=1s",
        f"Unit={fork_service}",
        "",
    ]
    return "\n".join(head + main + fork + timer_unit + _socket_unit(cfg, service, described))


def _socket_unit(cfg: ServiceConfig, service: str, described: str) -> list[str]:
    """``NAME.socket`` when ``listen`` is set: systemd binds the addresses (in config
    order) and hands them to ``hadctl start``, which passes them on to the workers
    (socket activation, sockets.py). [] without ``listen``."""
    if not cfg.listen:
        return []
    lines = [
        f"# ---- {service.removesuffix('.service')}.socket ----",
        "[Unit]",
        f"Description={described} (listening sockets, handed to hadctl start)",
        "",
        "[Socket]",
    ]
    for address in cfg.listen:
        if address.kind == "unix":
            lines.append(f"ListenStream={_unit_value(address.path)}")
        elif address.kind == "inet6":
            lines.append(f"ListenStream=[{address.host}]:{address.port}")
        else:
            lines.append(f"ListenStream={address.host or '0.0.0.0'}:{address.port}")
    if cfg.listen_backlog is not None:
        lines.append(f"Backlog={cfg.listen_backlog}")
    if any(a.kind == "unix" for a in cfg.listen):
        lines.append(f"SocketMode={cfg.listen_mode:04o}")
        if cfg.identity.user is not None:
            lines.append(f"SocketUser={_unit_value(cfg.identity.user)}")
        if cfg.group is not None:
            lines.append(f"SocketGroup={_unit_value(cfg.group)}")
    lines += [
        "# hadctl's workers hold the sockets among themselves; this unit only binds them",
        "# (as root, before privileges drop) and starts the service on the first connection.",
        f"Service={service}",
        "",
        "[Install]",
        "WantedBy=sockets.target",
        "",
    ]
    return lines
