"""Helpers shared by the test suite, the chaos run and the benchmark: find the
processes a run started (by an environment marker), tell live from zombie,
and wait for a condition with a deadline."""
from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from typing import Any


def toml_text(table: dict[str, Any]) -> str:
    """A flat TOML document (values and inline tables) from a dict of JSON-able values."""
    lines = []
    for key, value in table.items():
        if isinstance(value, dict):
            inner = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in value.items())
            lines.append(f"{key} = {{ {inner} }}")
        else:
            lines.append(f"{key} = {json.dumps(value)}")
    return "\n".join(lines) + "\n"


def wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition",
               interval: float = 0.005, error: type[Exception] = AssertionError) -> Any:
    """Poll ``predicate`` until truthy; on timeout raise ``error`` with the last value seen."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        last = predicate()
        if last:
            return last
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g} s waiting for {what}; last saw {last!r}")
        time.sleep(interval)  # the poll step of wait_until, never a synchronisation by itself


def is_alive(pid: int | None) -> bool:
    """Running, sleeping or stopped; a zombie has exited (PID 1 may reap it late)."""
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except OSError:
        return False


def marked_processes(variable: str, marker: str) -> list[int]:
    """Live processes (other than us) whose environment holds ``variable=marker``:
    double-forked processes are not our children, so they are found this way."""
    needle = f"{variable}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as handle:
                if needle not in handle.read().split(b"\0"):
                    continue
        except OSError:
            continue
        if is_alive(int(name)):
            found.append(int(name))
    return found


def describe(pid: int) -> str:
    """``PID command line`` (shortened), for messages about leftovers."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            command = handle.read().replace(b"\0", b" ").decode(errors="replace").strip()
        return f"{pid} {command[:100]}"
    except OSError:
        return str(pid)
