"""Outcomes -> HADaemon::Control's ``NAME : what [Result]`` lines, or JSON.

Colour policy: the result is green or red only when the stream is a terminal
and neither ``NO_COLOR`` nor ``HADC_NO_COLORS`` is set; rich is imported only
then (it costs ~15 ms, which ``status`` cannot afford). Imports lean and model only.
"""
from __future__ import annotations

import os

from .lean import TYPE_CHECKING
from .model import Outcome

if TYPE_CHECKING:
    from typing import IO, Iterable


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
        err.write(f"{outcome.name} : check {outcome.log_file} for details\n")


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
