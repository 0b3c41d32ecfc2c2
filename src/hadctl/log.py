"""hadctl's own log: ``[YYYY-MM-DD HH:MM:SS.fffff][pid][LEVEL] message``.

Leaf module (os, time only) so the spawned worker can use it cheaply. Lines are
appended with one write each, so several processes can share one file.
TRACE lines are written only when ``HADC_TRACE=1``.
"""
from __future__ import annotations

import os
import time

_APPEND = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC


def open_append(path: str) -> int:
    """Open ``path`` for appending (created 0644), the way every hadctl log and output file is.

    As root, a symlink as the last part of ``path`` is followed only in a folder
    that root alone can write: log_file often lies in pid_dir, which belongs to
    the service's user, who could otherwise swap the file for a link to
    /etc/passwd and have a root controller append to it. There it is refused
    (OSError ELOOP, "Too many levels of symbolic links").
    """
    return os.open(path, _APPEND if follows_last_link(path) else _APPEND | os.O_NOFOLLOW, 0o644)


def follows_last_link(path: str) -> bool:
    """Whether open_append follows a symlink at the last part of ``path``: always,
    unless we are root and someone other than root can write ``path``'s folder."""
    if os.geteuid() != 0:
        return True
    try:
        st = os.stat(os.path.dirname(path) or ".")
    except OSError:
        return False
    return st.st_uid == 0 and not st.st_mode & 0o022


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
