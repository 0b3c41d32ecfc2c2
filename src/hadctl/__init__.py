"""hadctl: keep a Python service highly available with hot standbys and no supervisor.

This package's top level is the small API for code that runs under hadctl.
It imports only hadctl.lean (and socket inside ``listen_sockets``), so a standby
stays small; everything is a no-op (or None, or {}) when the code runs outside
hadctl (for example under ``hadctl foreground``).
"""
from __future__ import annotations

import os
from time import monotonic_ns as _monotonic_ns

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    import socket

__version__ = "0.1.0"
__all__ = ["alive", "fencing_token", "listen_sockets", "lock_fd", "ready", "reopen_outputs", "slot", "warmup_result"]

# Filled in by hadctl.worker when this process becomes main.
_state: dict[str, object] = {}


def ready() -> None:
    """Tell hadctl this main is ready to serve (``restart`` waits for it when
    ``ready_timeout`` is set). Call once, after your set-up; harmless to repeat."""
    alive()
    path = _state.get("ready_file")
    if not isinstance(path, str):
        return
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w") as handle:
        handle.write(f"{os.getpid()}\n")
    os.replace(temporary, path)


def alive() -> None:
    """Tell the watchdog this main is alive (``watchdog_timeout``): call it at least
    that often. One store into a shared mapping, no system call; a no-op without a
    watchdog. ``ready()`` counts as a beat, and so does the function's start."""
    beat: object = _state.get("beat")
    if beat is not None:
        beat[0:8] = _monotonic_ns().to_bytes(8, "little")  # type: ignore[index]


def slot() -> int | None:
    """The main slot this process holds (1-based), or None."""
    value = _state.get("slot")
    return value if isinstance(value, int) else None


def warmup_result() -> object:
    """What the ``warmup`` function returned in this process (None without one)."""
    return _state.get("warmup")


def fencing_token() -> int | None:
    """A number that grows with each new holder of this slot (ZooKeeper engine), else None."""
    value = _state.get("fencing_token")
    return value if isinstance(value, int) else None


def lock_fd() -> int | None:
    """The fd holding the main slot's lock (also in ``$HADC_lock_fd``), or None."""
    value = _state.get("lock_fd")
    return value if isinstance(value, int) else None


def listen_sockets() -> dict[str, socket.socket]:
    """The listening sockets of ``listen``, by name, in config order (``list(...values())``
    for the order): socket objects on the fds 3, 4, ... this process holds
    (``LISTEN_FDS``, ``LISTEN_PID``, ``LISTEN_FDNAMES``; so also under systemd socket
    activation). {} when there are none. Each call returns the same objects. Accept
    on them only in the entrypoint; never close them expecting the port to be freed:
    every other worker of the service holds them too."""
    cached = _state.get("listen_sockets")
    if isinstance(cached, dict):
        return dict(cached)
    import socket

    found: dict[str, socket.socket] = {}
    if os.environ.get("LISTEN_PID") == str(os.getpid()):
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        for index in range(int(os.environ.get("LISTEN_FDS", "0") or 0)):
            name = names[index] if index < len(names) and names[index] else f"listen{index or ''}"
            found[name] = socket.socket(fileno=3 + index)
    _state["listen_sockets"] = found
    return dict(found)


def reopen_outputs() -> None:
    """Reopen this worker's output files by name, as ``reopen_signal`` does. For code
    that installs its own handler for that signal: call this from it."""
    reopen = _state.get("reopen_outputs")
    if callable(reopen):
        reopen()
