"""``ServiceConfig`` -> systemd units: ``get-systemd-unit``'s text.

``systemd_units`` writes a service, plus a oneshot service and a timer that
replace the cron ``fork`` line (and a socket unit with ``listen``), each value
quoted for systemd (specifiers, ``$``, C escapes). A pure function of the config
and the hadctl command line to embed (``initfile.hadctl_path``).

Imports hadctl.config, hadctl.initfile (the command line and one-line helpers),
hadctl.record, and the package's ``__version__``; never click or rich.
"""
from __future__ import annotations

import math
import os
import shutil

from . import __version__
from .config import ServiceConfig
from .initfile import command_for, one_line
from .record import record

SYSTEMD_RUN = "/usr/bin/systemd-run"
UNIT_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:_.-")


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
    units = _unit_names(cfg, hadctl)
    return "\n".join(_units_header(cfg, units) + _service_unit(cfg, units) + _fork_service_unit(cfg, units)
                     + _fork_timer_unit(units) + _socket_unit(cfg, units.service, units.described))


@record
class _UnitNames:
    """What the units of one service call each other, and the command they run."""

    base: tuple[str, ...]  # hadctl -c CONFIG
    service: str
    fork_service: str
    timer: str
    slice_name: str
    described: str  # the Description= prefix


def _unit_names(cfg: ServiceConfig, hadctl: str) -> _UnitNames:
    program, lead = command_for(cfg, hadctl)
    return _UnitNames(
        base=(program, *lead, "-c", cfg.config_file),
        service=unit_name(cfg.name) + ".service",
        fork_service=unit_name(cfg.name) + "-fork.service",
        timer=unit_name(cfg.name) + "-fork.timer",
        slice_name="hadctl-" + unit_name(cfg.name, keep_dash=False) + ".slice",
        described=_unit_value(one_line(cfg.init.lsb_sdesc or cfg.name)),
    )


def _units_header(cfg: ServiceConfig, units: _UnitNames) -> list[str]:
    return [
        f"# Generated by hadctl {__version__} from {one_line(cfg.config_file)}.",
        "# Install: write each part below into /etc/systemd/system/, named as its marker",
        "# line says, then: systemctl daemon-reload && systemctl enable --now " + units.service,
        "# See hadctl(1), SYSTEMD, for why the units look like this.",
        "",
    ]


def _timeouts(cfg: ServiceConfig) -> tuple[int, int]:
    """(TimeoutStartSec, TimeoutStopSec): room for the whole stop ladder, and for each
    slot's hand-over (ladder, spawn, ready_timeout) on a start."""
    ladder = len(cfg.stop_signals) * cfg.signal_timeout + (cfg.stop_file_timeout if cfg.main_stop_file else 0)
    stop_timeout = max(90, _seconds(2 * ladder + 30))
    start_timeout = max(120, _seconds(90 + cfg.locks.max_procs * (ladder + 30 + (cfg.ready_timeout or 0))))
    return start_timeout, stop_timeout


def _service_unit(cfg: ServiceConfig, units: _UnitNames) -> list[str]:
    """``NAME.service``: oneshot + RemainAfterExit, start/reload/stop as hadctl's."""
    base = list(units.base)
    start_timeout, stop_timeout = _timeouts(cfg)
    main = [
        f"# ---- {units.service} ----",
        "[Unit]",
        f"Description={units.described} (hadctl: mains and hot standbys)",
        "After=network.target remote-fs.target",
        f"Wants={units.timer}",
        "",
        "[Service]",
        "# hadctl is short-lived and the processes it spawns change identity (a standby",
        "# becomes main), so there is no main PID: oneshot + RemainAfterExit keeps the unit",
        "# active, and systemd leaves the spawned processes alone in this unit's cgroup.",
        "Type=oneshot",
        "RemainAfterExit=yes",
        f"Slice={units.slice_name}",
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
    return main


def _fork_service_unit(cfg: ServiceConfig, units: _UnitNames) -> list[str]:
    """``NAME-fork.service``: ``hadctl fork`` in a transient scope of the service's slice."""
    systemd_run = SYSTEMD_RUN if os.path.exists(SYSTEMD_RUN) else (shutil.which("systemd-run") or SYSTEMD_RUN)
    service = units.service
    scope = [systemd_run, "--scope", "--quiet", "--collect", f"--slice={units.slice_name}",
             f"--description={cfg.name} (processes started by hadctl fork)",
             f"--property=BindsTo={service}", f"--property=Before={service}", "--", *units.base, "fork"]
    fork = [
        f"# ---- {units.fork_service} ----",
        "[Unit]",
        f"Description={units.described} (hadctl fork: respawn missing mains and standbys)",
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
    return fork


def _fork_timer_unit(units: _UnitNames) -> list[str]:
    """``NAME-fork.timer``: the fork service every minute while NAME.service is up."""
    return [
        f"# ---- {units.timer} ----",
        "[Unit]",
        f"Description={units.described} (hadctl fork every minute, like the cron line)",
        f"BindsTo={units.service}",
        f"After={units.service}",
        "",
        "[Timer]",
        "OnCalendar=minutely",
        "AccuracySec=1s",
        f"Unit={units.fork_service}",
        "",
    ]


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
