"""Workers that hang while they start (an import that waits for ever): the spawn
timeout, where a worker hangs, and ending what it started.

A worker has ``spawn_timeout()`` seconds to import the entrypoint, run warmup
and report its slot. Past it, a faulthandler thread in the worker writes where
it hangs on its report pipe and exits (worker.py); spawn.collect turns that
text into the report's detail, ``hung_at`` into one line naming the import;
``end_unreported`` then ends every process such a worker started.

Imports contain and errors (and the standard library); used by the controller only.
"""
from __future__ import annotations

import os

from . import contain
from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from .spawn import Report, Spawned

DEFAULT_SPAWN_TIMEOUT = 30.0


def spawn_timeout() -> float:
    """Seconds a spawned worker has to report (import the entrypoint, run warmup, take
    a slot): $HADCTL_SPAWN_TIMEOUT, else 30. ConfigError (6) if it is no number > 0."""
    text = os.environ.get("HADCTL_SPAWN_TIMEOUT")
    if text is None:
        return DEFAULT_SPAWN_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not 0 < value <= 86400:
        from .errors import ConfigError

        raise ConfigError(f"HADCTL_SPAWN_TIMEOUT: expected seconds from 0 to 86400, got {text!r}")
    return value


def hung_at(traceback: str, roots: tuple[str, ...] = ()) -> str:
    """Where a faulthandler traceback says a worker hangs: the innermost module being
    imported (its dotted name below one of ``roots``, else from the packages around
    its file), else the innermost frame."""
    import re

    frames = re.findall(r'File "([^"]+)", line (\d+) in (\S+)', traceback)  # most recent call first
    for path, line, function in frames:
        if function == "<module>" and not path.startswith("<"):
            return f"the import of {_module_name(path, roots)} hung ({path}, line {line})"
    if frames:
        path, line, function = frames[0]
        return f"hung in {function} ({path}, line {line})"
    return "hung"


def _module_name(path: str, roots: tuple[str, ...]) -> str:
    stem = path[:-3] if path.endswith(".py") else path
    for root in roots:
        if stem.startswith(root.rstrip("/") + "/"):
            dotted = stem[len(root.rstrip("/")) + 1:].replace("/", ".")
            return dotted[:-len(".__init__")] if dotted.endswith(".__init__") else dotted
    folder, name = os.path.split(stem)
    parts = [] if name == "__init__" else [name]
    while os.path.exists(os.path.join(folder, "__init__.py")):
        folder, package = os.path.split(folder)
        parts.insert(0, package)
    return ".".join(parts) or path


def end_unreported(spawned: list[Spawned], reports: list[Report], finder: contain.Finder, timeout: float) -> list[int]:
    """End every spawned worker that did not report (``no report within``, or hung) with
    what it started: each process of the service owned by it (contain.py: its cgroup
    or HADCTL_WORKER marker, which its process group's members carry too), KILLed
    through pidfds. Returns the pids that were still there to end."""
    late = {item.pid for item, report in zip(spawned, reports, strict=True)
            if item.pid is not None and report.kind == "error" and report.message.startswith("no report within")}
    if not late:
        return []
    members = [m for m in finder.members() if m.owner in late or m.pid in late]
    if members:
        contain.end(finder, members, ("KILL",), timeout)
    return sorted({m.pid for m in members})
