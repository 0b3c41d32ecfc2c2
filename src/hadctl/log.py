"""hadctl's own log: ``[YYYY-MM-DD HH:MM:SS.fffff][pid][LEVEL] message``.

Leaf module (os, time only) so the spawned worker can use it cheaply. Lines are
appended with one write each, so several processes can share one file.
TRACE lines are written only when ``HADC_TRACE=1``.
"""
from __future__ import annotations

import os
import time


def _stamp() -> str:
    now = time.time()
    base = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now))
    return f"{base}.{int((now % 1) * 100000):05d}"


class Log:
    """Appends formatted lines to ``path``; never raises (a log must not kill)."""

    __slots__ = ("path", "tracing")

    def __init__(self, path: str) -> None:
        self.path = path
        self.tracing = os.environ.get("HADC_TRACE", "") not in ("", "0")

    def write(self, level: str, message: str) -> None:
        line = f"[{_stamp()}][{os.getpid()}][{level}] {message}\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
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
