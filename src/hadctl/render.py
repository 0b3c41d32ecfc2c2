"""Outcomes -> HADaemon::Control's ``NAME : what [Result]`` lines, JSON or Prometheus's
text format; the event history (events.py) -> lines (``hadctl events``).

Colour policy: the result is green or red only when the stream is a terminal
and neither ``NO_COLOR`` nor ``HADC_NO_COLORS`` is set; rich is imported only
then (it costs ~15 ms, which ``status`` cannot afford). Imports lean and model only.
"""
from __future__ import annotations

import os
import time

from .lean import TYPE_CHECKING
from .model import Outcome

if TYPE_CHECKING:
    from collections.abc import Iterable
    from typing import IO, Any


def use_color(stream: IO[str]) -> bool:
    if os.environ.get("NO_COLOR") is not None or os.environ.get("HADC_NO_COLORS") is not None:
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def line(name: str, what: str, result: str) -> str:
    return f"{name} : {what} [{result}]"


def write_lines(outcome: Outcome, out: IO[str], err: IO[str], quiet: bool = False) -> None:
    """Print the outcome's steps; failed steps go to ``err``, the rest to ``out``.

    With ``quiet`` only failures print (what cron should mail). On a failing
    action (not status), a last line points at the log file.
    """
    color = use_color(out)
    console = _console(out) if color else None
    err_console = _console(err) if use_color(err) else None
    for step in outcome.steps:
        if quiet and step.ok:
            continue
        target, rich_target = (out, console) if step.ok else (err, err_console)
        if rich_target is not None:
            from rich.text import Text

            rich_target.print(Text.assemble(f"{outcome.name} : {step.what} ",
                                            (f"[{step.result}]", "bold green" if step.ok else "bold red")))
        else:
            target.write(line(outcome.name, step.what, step.result) + "\n")
    if outcome.exit_status != 0 and outcome.action not in ("status",) and outcome.log_file:
        where = (outcome.log_file if outcome.log_file != "syslog"  # log_file = "syslog": syslogsend.log_tag
                 else f"syslog (journalctl -t hadctl/{outcome.name})")
        err.write(f"{outcome.name} : check {where} for details\n")


def _console(stream: IO[str]):  # type: ignore[no-untyped-def]
    from rich.console import Console

    return Console(file=stream, force_terminal=True, color_system="standard", highlight=False,
                   soft_wrap=True, emoji=False, markup=False)


def as_dict(outcome: Outcome) -> dict[str, object]:
    data: dict[str, object] = {
        "name": outcome.name,
        "action": outcome.action,
        "exit_status": outcome.exit_status,
        "slots": [
            {
                "role": s.role.value,
                "slot": s.slot,
                "running": s.running,
                "pid": s.pid,
                "stale": list(s.stale),
                **({"host": s.host} if s.host is not None else {}),
                **({"backoff_until": s.backoff_until} if s.backoff_until is not None else {}),
                **({"tampered": s.tampered} if s.tampered is not None else {}),
            }
            for s in outcome.slots
        ],
        "messages": [{"what": s.what, "result": s.result, "ok": s.ok} for s in outcome.steps],
    }
    data.update(outcome.detail or {})
    return data


def as_json(outcomes: Outcome | Iterable[Outcome]) -> str:
    """One object for one outcome, a list for several (``status --all``)."""
    import json  # here, not at the top: ~1.2 ms that plain ``status`` does not need

    if isinstance(outcomes, Outcome):
        return json.dumps(as_dict(outcomes), indent=2)
    return json.dumps([as_dict(o) for o in outcomes], indent=2)


# ------------------------------------------------------------ status --format prometheus

_METRICS = (
    ("hadctl_status", "gauge", "LSB status of the service: 0 all running, 1 some, 3 none, 4 unknown."),
    ("hadctl_up", "gauge", "1 when the slot's lock is held (the process runs), else 0."),
    ("hadctl_failovers_total", "counter", "Failovers (a main died, a standby took its slot) in the kept history."),
    ("hadctl_failovers_last_hour", "gauge", "Failovers in the last hour."),
    ("hadctl_last_failover_timestamp_seconds", "gauge", "When the last failover happened (Unix time)."),
    ("hadctl_last_failover_gap_seconds", "gauge", "Upper bound of the last failover's gap (lock taken to entry)."),
    ("hadctl_restarts_total", "counter", "Main slots replaced by restart, in the kept history."),
    ("hadctl_backoff_seconds", "gauge", "The crash-loop back-off a standby is waiting out (0: none)."),
    ("hadctl_rss_bytes", "gauge", "Resident memory of a main with its descendants."),
    ("hadctl_cpu_seconds_total", "counter", "CPU time of a main with its descendants."),
    ("hadctl_uptime_seconds", "gauge", "Seconds since a main started."),
)


def _label(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _samples(outcome: Outcome) -> dict[str, list[tuple[str, float]]]:
    """metric -> [(labels, value)] for one service's status."""
    service = f'service="{_label(outcome.name)}"'
    found: dict[str, list[tuple[str, float]]] = {name: [] for name, _type, _help in _METRICS}
    found["hadctl_status"].append((service, outcome.exit_status))
    for s in outcome.slots:
        found["hadctl_up"].append((f'{service},role="{s.role.value}",slot="{s.slot}"', 1 if s.running else 0))
    detail = outcome.detail or {}
    failovers = detail.get("failovers")
    if isinstance(failovers, dict):
        found["hadctl_failovers_total"].append((service, failovers["total"]))
        found["hadctl_failovers_last_hour"].append((service, failovers["last_hour"]))
        found["hadctl_restarts_total"].append((service, failovers["restarts"]))
        last = failovers["last"]
        if last is not None:
            found["hadctl_last_failover_timestamp_seconds"].append((service, last["time"]))
            if last["gap_ms"] is not None:
                found["hadctl_last_failover_gap_seconds"].append((service, last["gap_ms"] / 1000))
    if failovers is not None or outcome.slots:
        backoff = detail.get("backoff")
        delay = backoff.get("delay") if isinstance(backoff, dict) else None
        found["hadctl_backoff_seconds"].append((service, delay or 0))
    containment = detail.get("containment")
    mains = containment.get("mains", {}) if isinstance(containment, dict) else {}
    for slot, facts in sorted(mains.items()):
        labels = f'{service},slot="{_label(slot)}"'
        found["hadctl_rss_bytes"].append((labels, facts["rss"]))
        found["hadctl_cpu_seconds_total"].append((labels, facts["cpu"]))
        found["hadctl_uptime_seconds"].append((labels, facts["uptime"]))
    return found


def _value(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def as_prometheus(outcomes: Iterable[Outcome]) -> str:
    """Status in Prometheus's text exposition format (0.0.4): each metric's HELP and
    TYPE once, then its samples for every service (node_exporter's textfile collector)."""
    per_service = [_samples(o) for o in outcomes if o.action == "status"]  # (not status --all's summary)
    lines = []
    for name, kind, text in _METRICS:
        samples = [sample for found in per_service for sample in found[name]]
        if not samples:
            continue
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        lines += [f"{name}{{{labels}}} {_value(value)}" for labels, value in samples]
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------ hadctl events (events.py's history)


def show_events(cfg: Any, lines: str | None = None, json_output: bool = False, since: str | None = None) -> int:
    """``hadctl events``: the last ``lines`` (20) events, at ``since`` or later, as text
    lines or (``json_output``) one JSON object per line. Returns 0; ArgumentError (2)
    for a bad -n or --since."""
    import sys

    from .errors import count_option
    from .events import read

    count = count_option(lines, 20, "events -n", "events")
    start = None if since is None else parse_since(since, time.time())
    found = read(cfg.pid_dir, start)
    found = found[len(found) - count:] if count else []
    if json_output:
        import json

        text = "".join(json.dumps(event, separators=(",", ":")) + "\n" for event in found)
    else:
        text = "".join(describe(event) + "\n" for event in found)
    sys.stdout.write(text)
    return 0


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_since(text: str, now: float) -> float:
    """``--since``: ``90s``, ``10m``, ``2h``, ``1d`` ago; ``@EPOCH``; a local date and time
    (``2026-12-04 17:00[:00]``, ISO ``T`` too); a time today (``17:00``). Epoch seconds;
    ArgumentError for anything else."""
    from .errors import ArgumentError

    value = text.strip()
    try:
        if value[-1:] in _UNITS and value[:-1].replace(".", "", 1).isdigit():
            return now - float(value[:-1]) * _UNITS[value[-1]]
        if value.startswith("@"):
            return float(value[1:])
        from datetime import datetime

        if len(value) <= 8 and ":" in value:  # a time of today
            today = datetime.fromtimestamp(now).strftime("%Y-%m-%d")
            return datetime.fromisoformat(f"{today} {value}").timestamp()
        return datetime.fromisoformat(value).timestamp()
    except ValueError:
        raise ArgumentError(f"events --since: expected 10m, 2h, 1d, @EPOCH, HH:MM or YYYY-MM-DD HH:MM, "
                            f"got {text!r}") from None


def _pid(value: object) -> str:
    return str(value) if isinstance(value, int) else "?"


def what(event: dict[str, Any]) -> str:
    """One event in words, without its time (also top's "last event" column). The file
    is the service user's and the reader may be root at a terminal: control characters
    (escape sequences) are shown as "?"."""
    text = _words(event)
    return text if text.isprintable() else "".join(c if c.isprintable() else "?" for c in text)


def _words(event: dict[str, Any]) -> str:
    kind, slot = event.get("kind"), event.get("slot")
    gap = event.get("gap_ms")
    tick = event.get("clock_ms")
    gap_text = f", gap <= {gap:.3f} ms" if isinstance(gap, (int, float)) else ""
    gap_text += f" (file clock {tick:g} ms)" if gap_text and isinstance(tick, (int, float)) else ""
    if kind in ("failover", "handover"):
        how = "died" if kind == "failover" else "stopped by a controller"
        return (f"{kind} main #{slot}: pid {_pid(event.get('old_pid'))} {how}, "
                f"pid {_pid(event.get('new_pid'))} took the slot{gap_text}")
    if kind == "restart":
        return f"restart main #{slot}: pid {_pid(event.get('old_pid'))} replaced by pid {_pid(event.get('new_pid'))}"
    if kind == "replaced":
        why = "hung" if event.get("why") == "hung" else "over max_rss"
        return f"replaced main #{slot}: pid {_pid(event.get('main_pid'))} {why}"
    if kind == "backoff":
        return (f"backoff standby pid {_pid(event.get('pid'))} waits {event.get('delay')} s "
                f"({event.get('run')} promotions)")
    if kind == "exit":
        return f"exit main #{slot}: pid {_pid(event.get('pid'))} returned, exit status {event.get('status')}"
    if kind == "spawn_failure":
        return f"spawn_failure {event.get('reason')}: {event.get('message')}"
    if kind in ("start", "stop"):
        rest = ", ".join(f"{k} {v}" for k, v in event.items() if k not in ("time", "kind", "pid"))
        return f"{kind} by pid {_pid(event.get('pid'))}" + (f" ({rest})" if rest else "")
    rest = ", ".join(f"{k}={v}" for k, v in event.items() if k not in ("time", "kind"))
    return f"{kind} {rest}"


def describe(event: dict[str, Any]) -> str:
    """``2026-12-04 17:40:01.123 failover main #1: ...`` (local time)."""
    at = float(event["time"])
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(at)) + f".{int(at * 1000) % 1000:03d}"
    return f"{stamp} {what(event)}"
