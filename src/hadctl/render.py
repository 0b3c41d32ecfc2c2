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
