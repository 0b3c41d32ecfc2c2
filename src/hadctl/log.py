"""hadctl's own log: ``[YYYY-MM-DD HH:MM:SS.fffff][pid][LEVEL] message``.

Imports only safepath from hadctl (os, time otherwise), so the spawned worker
can use it cheaply. Lines are appended with one write each, so several
processes can share one file.
TRACE lines are written only when ``HADC_TRACE=1``.

``log_file = "syslog"``: ``open_log`` returns a syslogsend.SyslogLog instead,
imported only then (the worker's fast path never loads socket code otherwise).
"""
from __future__ import annotations

import os
import time

from .safepath import open_beneath

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def open_append(path: str) -> int:
    """Open ``path`` for appending (created 0644), the way every hadctl log and output file is.

    As root, never through a link that someone other than root could have
    planted anywhere on the way (safepath): log_file often lies in pid_dir or a
    log folder that belongs to the service's user, who could otherwise swap the
    file, or a folder above it, for a link into /etc. Raises OSError
    (safepath.LinkRefusedError, errno ELOOP, naming the link).
    """
    return open_beneath(path, _APPEND, 0o644)


def _stamp() -> str:
    now = time.time()
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{base}.{int((now % 1) * 100000):05d}"


SYSLOG = "syslog"  # log_file = "syslog": as config.SYSLOG (the worker does not import config)


def open_log(path: str, name: str, facility: str = "daemon", socket_path: str | None = None,
             fallback_fd: int = 2) -> Log:
    """hadctl's log for a service: the file ``path``, or syslog when ``path`` is "syslog"
    (tag hadctl/NAME, ``facility``; a line syslogd does not take goes to
    ``fallback_fd``, -1 drops it: syslogsend.SyslogLog)."""
    if path != SYSLOG:
        return Log(path)
    from .syslogsend import SyslogLog

    return SyslogLog(name, facility, socket_path, fallback_fd)


class Log:
    """Appends formatted lines to ``path``; never raises (a log must not kill)."""

    __slots__ = ("path", "tracing")

    def __init__(self, path: str) -> None:
        self.path = path
        self.tracing = os.environ.get("HADC_TRACE", "") not in ("", "0")

    def write(self, level: str, message: str) -> None:
        line = f"[{_stamp()}][{os.getpid()}][{level}] {message}\n"
        try:
            fd = open_append(self.path)
        except OSError:
            return
        try:
            os.write(fd, line.encode("utf-8", "replace"))
        except OSError:
            pass
        finally:
            os.close(fd)

    def trace(self, message: str) -> None:
        if self.tracing:
            self.write("TRACE", message)

    def info(self, message: str) -> None:
        self.write("INFO", message)

    def warn(self, message: str) -> None:
        self.write("WARN", message)

    def error(self, message: str) -> None:
        self.write("ERROR", message)
