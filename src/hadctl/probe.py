"""Facts about processes from /proc: alive or not, whose worker, what its fds point
to, who is in its group; a pidfd ``Target`` to signal; waiting for exits.

A process is signalled only through a pidfd opened *after* the caller checked it
(it holds its slot, or the alive lock), so a recycled pid is never signalled.
Exits are waited for as events (pidfd + poll), never with sleeps; a zombie has
exited (its locks are already free), whoever reaps it and whenever.
/proc/PID/stat has one parser here, ``proc_stat``.

Imports layout, lean and record. psutil is not needed: /proc is read directly.
"""
from __future__ import annotations

import os
import select
import time

from . import lean
from .layout import Layout
from .record import record


def listdir(folder: str) -> list[str]:
    """The names in ``folder``; [] when it cannot be listed (gone, not ours to read)."""
    try:
        return os.listdir(folder)
    except OSError:
        return []


def fd_targets(pid: int) -> dict[str, str]:
    """What the fds of ``pid`` point to: fd number (as text) -> path, as /proc/PID/fd
    shows it (`` (deleted)`` appended for a removed file). {} when it is gone."""
    found = {}
    for fd in listdir(f"/proc/{pid}/fd"):
        try:
            found[fd] = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
    return found


def is_worker(pid: int, name: str) -> bool:
    """True when ``pid`` is a live hadctl worker: our interpreter, running hadctl's
    worker (or titled after the service by process_name_change)."""
    if not is_alive(pid):
        return False
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            cmdline = handle.read()
    except OSError:
        return False
    import sys

    if exe != os.path.realpath(sys.executable):
        return False
    return b"hadctl.worker" in cmdline or cmdline.startswith(name.encode())


def is_worker_of(pid: int, layout: Layout, name: str) -> bool:
    """``is_worker``, and of this service: a worker keeps the folder of its standby
    stop file open (its dnotify watch) until it is main, or is the child of a process
    holding our lock files. The service's user can drop any pid into pid_dir; this
    keeps a root controller from signalling another service's worker on its word."""
    if not is_worker(pid, name):
        return False
    folder = os.path.realpath(os.path.dirname(layout.standby_stop_file))
    if folder in fd_targets(pid).values():
        return True
    # A replacement standby still starting has no such fd yet; its parent, the main
    # that spawned it (spawn_from_worker), has this service's lock files open.
    found = proc_stat(pid)
    if found is None or found.ppid <= 1:
        return False
    locks = os.path.realpath(layout.lock_path) + os.sep
    return any(target.startswith(locks) for target in fd_targets(found.ppid).values())


# ------------------------------------------------------------ processes


@record
class ProcStat:
    """The fields of /proc/PID/stat that hadctl uses (proc(5)); ``starttime`` is in
    clock ticks since boot: with the pid, it names one process for ever."""

    state: str
    ppid: int
    pgid: int
    sid: int
    starttime: int
    utime: int = 0  # clock ticks in user mode
    stime: int = 0  # clock ticks in kernel mode
    rss_pages: int = 0  # resident set, in pages


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat of ``pid``, or None when it is gone. The one parser of that
    file: the command name may hold spaces and parentheses, so fields are counted
    from the last ``)``."""
    try:
        data = lean.read_proc(f"/proc/{pid}/stat")
        fields = data[data.rfind(b")") + 2:].split()
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]),
                        int(fields[11]), int(fields[12]), int(fields[21]))
    except (OSError, ValueError, IndexError):
        return None


def is_alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie or a missing pid is not alive."""
    found = proc_stat(pid)
    return found is not None and found.state not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            found = proc_stat(int(name))
            if found is not None and found.pgid == pgid and found.state not in ("Z", "X"):
                members.append(int(name))
    return members


class Target:
    """A process we have checked and may signal: held through a pidfd.

    Open it right after confirming the pid holds its slot; from then on the
    pidfd names that very process, even if its pid is later reused.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.pidfd = os.pidfd_open(pid)
        found = proc_stat(pid)
        self.pgid = found.pgid if found else None
        self.sid = found.sid if found else None

    def signal(self, signum: int, group: bool) -> None:
        """Send ``signum`` to the process; with ``group``, to its whole process group.

        While the process lives its group id is surely its own; once it has
        exited, the group's remaining members are signalled one by one, each
        checked to be in the same group and session.
        """
        if group and self.pgid and self.pgid > 1 and self.pgid != os.getpgrp():
            if not self.exited():
                try:
                    os.killpg(self.pgid, signum)
                    return
                except ProcessLookupError:
                    pass
            for pid in self.group_left():
                try:
                    os.kill(pid, signum)
                except ProcessLookupError:
                    pass
            return
        try:
            lean.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def group_left(self) -> list[int]:
        """Live members of the process's group and session, other than itself."""
        if not self.pgid or self.pgid <= 1 or self.pgid == os.getpgrp():
            return []
        return [pid for pid in group_members(self.pgid)
                if pid != self.pid and getattr(proc_stat(pid), "sid", None) == self.sid]

    def exited(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit (zombie counts)."""
        return wait_for_exit([self.pidfd], time.monotonic() + timeout) == []

    def close(self) -> None:
        """Close the pidfd (once); the process is not affected."""
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def open_target(pid: int) -> Target | None:
    """A ``Target`` for ``pid``, or None when it has already exited."""
    try:
        return Target(pid)
    except ProcessLookupError:
        return None


def wait_for_exit(pidfds: list[int], deadline: float) -> list[int]:
    """Block until every pidfd's process has exited or ``deadline``; returns those left."""
    left = list(pidfds)
    poller = select.poll()
    for fd in left:
        poller.register(fd, select.POLLIN)
    while left:
        remaining = deadline - time.monotonic()
        events = poller.poll(max(0, int(remaining * 1000) + (1 if remaining > 0 else 0)))
        for fd, _event in events:
            poller.unregister(fd)
            left.remove(fd)
        if remaining <= 0:
            break
    return left


def wait_for_group(pgid: int, deadline: float) -> list[int]:
    """Wait until no live process is left in group ``pgid``; returns those still alive."""
    members = group_members(pgid)
    fds = []
    for pid in members:
        try:
            fds.append(os.pidfd_open(pid))
        except ProcessLookupError:
            continue
    try:
        left = wait_for_exit(fds, deadline)
    finally:
        for fd in fds:
            os.close(fd)
    return group_members(pgid) if left else []
