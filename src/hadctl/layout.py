"""Every path under ``pid_dir``, and reading/writing pid files.

The layout is HADaemon::Control's: ``main-<slot>.pid``, ``standby-<slot>.pid``,
``unknown-<pid>.pid``, ``LOCKS/<slot>.lock``, ``STANDBY_LOCKS/<slot>.lock`` and the
standby stop file. hadctl adds ``hadctl.lock`` (controllers take turns on it),
``hadctl-alive.lock`` (held shared by every live worker),
``main-<slot>.ready`` (readiness) and ``hadctl-starts`` (crash-loop record).

Takes plain strings, not ServiceConfig, because the spawned worker uses it and
must stay small (no dataclasses). Imports nothing from hadctl.
"""
from __future__ import annotations

import errno
import os

PID_MAX = 4194304  # Linux's upper bound for pid_max


class Layout:
    """The paths of one service."""

    __slots__ = ("pid_dir", "lock_path", "standby_lock_path", "standby_stop_file")

    def __init__(self, pid_dir: str, lock_path: str, standby_lock_path: str, standby_stop_file: str) -> None:
        self.pid_dir = pid_dir
        self.lock_path = lock_path
        self.standby_lock_path = standby_lock_path
        self.standby_stop_file = standby_stop_file

    def pid_file(self, role: str, slot: int) -> str:
        """``role`` is "main" or "standby"."""
        return os.path.join(self.pid_dir, f"{role}-{slot}.pid")

    def unknown_pid_file(self, pid: int) -> str:
        return os.path.join(self.pid_dir, f"unknown-{pid}.pid")

    def lock_file(self, role: str, slot: int) -> str:
        folder = self.lock_path if role == "main" else self.standby_lock_path
        return os.path.join(folder, f"{slot}.lock")

    def ready_file(self, slot: int) -> str:
        return os.path.join(self.pid_dir, f"main-{slot}.ready")

    @property
    def control_lock(self) -> str:
        return os.path.join(self.pid_dir, "hadctl.lock")

    @property
    def alive_lock(self) -> str:
        """Every live process of the service holds a shared flock on it for its whole
        life, so ``stop`` knows when the last one, slot or no slot, has exited."""
        return os.path.join(self.pid_dir, "hadctl-alive.lock")

    @property
    def starts_file(self) -> str:
        return os.path.join(self.pid_dir, "hadctl-starts")

    @property
    def backoff_file(self) -> str:
        """Names the process waiting out a crash-loop back-off: ``PID`` then the delay."""
        return os.path.join(self.pid_dir, "hadctl-backoff.pid")


class PidFile:
    """What a pid file holds: ``pid`` when it names a plausible pid, else ``problem``."""

    __slots__ = ("path", "pid", "problem")

    def __init__(self, path: str, pid: int | None, problem: str | None) -> None:
        self.path = path
        self.pid = pid
        self.problem = problem


def read_pid_file(path: str) -> PidFile | None:
    """Read a pid file without following symlinks. None when there is no file.

    Accepts "123" and "123\\n" (and ignores anything after the first line, so
    metadata may follow). Anything else comes back with ``problem`` set.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if os.path.islink(path):
            return PidFile(path, None, "is a symlink")
        return PidFile(path, None, exc.strerror or "unreadable")
    try:
        import stat

        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return PidFile(path, None, "is not a regular file")
        data = os.read(fd, 64)
    except OSError as exc:
        return PidFile(path, None, exc.strerror or "unreadable")
    finally:
        os.close(fd)
    text = data.decode("ascii", "replace").split("\n", 1)[0].strip()
    if not text.isdigit() or not text.isascii():
        shown = text if len(text) <= 20 else text[:17] + "..."
        return PidFile(path, None, f"holds {shown!r}, not a pid" if text else "is empty")
    pid = int(text)
    if not 1 < pid <= PID_MAX:
        return PidFile(path, None, f"holds {pid}, not a usable pid")
    return PidFile(path, pid, None)


def write_pid_file(path: str, pid: int, extra: str = "") -> None:
    """Write ``pid`` (and an optional second line) to ``path`` atomically: write, then rename."""
    temporary = f"{path}.{pid}.tmp"
    fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    try:
        try:
            os.write(fd, f"{pid}\n{extra}".encode() + (b"\n" if extra else b""))
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        try:
            os.unlink(temporary)  # (no space left): not a file for ever; a writer killed here leaves it
        except OSError:  # to the next controller (slots.leftover_temporaries)
            pass
        raise


def remove_if_ours(path: str, pid: int) -> None:
    """Remove ``path`` if it still names ``pid`` (another process may own it now)."""
    found = read_pid_file(path)
    if found is not None and found.pid == pid:
        try:
            os.unlink(path)
        except OSError as exc:
            # gone already; or a read-only pid_dir, where a leaving worker must still leave
            # cleanly (the controller names what stays as stale)
            if exc.errno not in (errno.ENOENT, errno.EROFS):
                raise


def remove_stale(path: str) -> bool:
    """Remove a stale pid file, symlink or empty directory; True when it is gone."""
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            os.rmdir(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True
