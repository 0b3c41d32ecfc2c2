"""Facts about processes: does pid P hold its slot, who is in its group, has it exited.

The lock is the truth, a pid file a hint: ``read_slots`` names a slot's holder
only when the holder's fd really holds the slot's lock. Signals go through a
pidfd opened *after* that check, so a recycled pid can never be signalled.
Exits are waited for as events (pidfd + poll), never with sleeps; a zombie has
exited (the lock is already free), whoever reaps it and whenever.

Imports layout, model and locks. psutil is not needed: /proc is read directly.
"""
from __future__ import annotations

import os
import select
import _signal  # not signal: its enum costs every command milliseconds
import time

from .layout import Layout, PidFile, read_pid_file
from .locks.flock import HolderProbe, holds
from .model import Role, SlotReport
from .record import record


DELETED_LOCK = "holds a deleted lock file"


@record
class Stale:
    """A pid file (or junk in its place) that does not name its slot's holder."""

    path: str
    why: str
    pid: int | None = None


def read_slots(layout: Layout, max_procs: int, standby_max_procs: int,
               probe: HolderProbe | None = None) -> tuple[list[SlotReport], list[Stale]]:
    """Every expected slot with its holder, plus the stale pid files found."""
    probe = probe or HolderProbe()
    reports: list[SlotReport] = []
    stale: list[Stale] = []
    for role, count in ((Role.MAIN, max_procs), (Role.STANDBY, standby_max_procs)):
        for slot in range(1, count + 1):
            pid_file = read_pid_file(layout.pid_file(role.value, slot))
            hints = [pid_file.pid] if pid_file is not None else []
            holder = probe.holder(layout.lock_file(role.value, slot), hints)
            notes = _stale_notes(pid_file, holder, role, slot)
            stale.extend(notes)
            reports.append(SlotReport(role, slot, holder, tuple(n.why for n in notes)))
    return reports, stale


def extra_slots(layout: Layout, max_procs: int, standby_max_procs: int) -> list[SlotReport]:
    """Held slots beyond the configured counts (max_procs lowered while the service
    ran): read_slots does not look there, yet their holders are ours (issue #6)."""
    probe = HolderProbe()
    found = []
    for role, count, folder in ((Role.MAIN, max_procs, layout.lock_path),
                                (Role.STANDBY, standby_max_procs, layout.standby_lock_path)):
        for name in sorted(_listdir(folder)):
            number = name[: -len(".lock")]
            if not (name.endswith(".lock") and number.isdigit() and int(number) > count):
                continue
            pid_file = read_pid_file(layout.pid_file(role.value, int(number)))
            holder = probe.holder(os.path.join(folder, name), [pid_file.pid] if pid_file is not None else [])
            if holder is not None:
                key = "max_procs" if role is Role.MAIN else "standby_max_procs"
                found.append(SlotReport(role, int(number), holder, (f"beyond {key} = {count}",)))
    return found


def orphaned_holders(layout: Layout, candidates: list[int] | None = None) -> list[SlotReport]:
    """Holders of slot lock files that were deleted (pid_dir or a lock folder removed
    while the service ran, or single lock files: a cleaner of old files). Their slots
    no longer show through the files, yet they are held, and a fresh lock file would
    let a second main in beside them (issue #6).

    Without ``candidates``, every flock holder of the host is looked at (/proc/locks,
    ~10 ms the first time in a process); with them, only those pids (read from the
    pid files, which a lock folder's removal takes away but a lone file's does not).
    Each one's fds tell which deleted lock file it holds."""
    folders = {os.path.realpath(layout.lock_path): Role.MAIN,
               os.path.realpath(layout.standby_lock_path): Role.STANDBY}
    table = HolderProbe().every_holder() if candidates is None else None
    found: dict[tuple[Role, int], int] = {}
    for pid in sorted(set(table.values()) if table is not None else set(candidates or ())):
        for fd in _listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
                if not target.endswith(" (deleted)"):
                    continue
                info = os.stat(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            path = target[: -len(" (deleted)")]
            role, slot = folders.get(os.path.dirname(path)), os.path.basename(path)[: -len(".lock")]
            key = (os.major(info.st_dev), os.minor(info.st_dev), info.st_ino)
            held = table.get(key) == pid if table is not None else holds(pid, key)
            if role is not None and path.endswith(".lock") and slot.isdigit() and held:
                found[(role, int(slot))] = pid
    return [SlotReport(role, slot, pid, (DELETED_LOCK,)) for (role, slot), pid in sorted(
        found.items(), key=lambda item: (item[0][0] is Role.STANDBY, item[0][1]))]


def _stale_notes(pid_file: PidFile | None, holder: int | None, role: Role, slot: int) -> list[Stale]:
    if pid_file is None:
        return []
    name = os.path.basename(pid_file.path)
    if pid_file.problem is not None:
        return [Stale(pid_file.path, f"{name} {pid_file.problem}")]
    if pid_file.pid != holder:
        return [Stale(pid_file.path, f"{name} names pid {pid_file.pid}, which does not hold {role.value} slot {slot}",
                      pid_file.pid)]
    return []


def unknown_pid_files(layout: Layout, service: str | None = None) -> list[Stale]:
    """``unknown-PID.pid`` files (and ``hadctl-backoff.pid``) whose process is gone (a
    worker that died starting), or, given the ``service`` name, is no starting (or
    backed-off) worker of this service: junk that must be neither trusted nor kept."""
    found = []
    try:
        names = os.listdir(layout.pid_dir)
    except OSError:
        return []
    for name in names:
        if (name.startswith("unknown-") and name.endswith(".pid")) or name == os.path.basename(layout.backoff_file):
            pid_file = read_pid_file(os.path.join(layout.pid_dir, name))
            if pid_file is None:
                continue
            if pid_file.pid is None or not is_alive(pid_file.pid):
                found.append(Stale(pid_file.path, f"{name} names no running process", pid_file.pid))
            elif service is not None and not is_worker_of(pid_file.pid, layout, service):
                found.append(Stale(pid_file.path, f"{name} names pid {pid_file.pid}, no starting worker of "
                                   f"{service}", pid_file.pid))
    return found


def strays(layout: Layout, name: str, starting: list[int] | None = None) -> list[int]:
    """Live hadctl workers of this service that hold no slot: starting
    (``unknown-PID.pid``) or waiting out a crash-loop back-off. Workers named there
    that cannot be told yet to be ours (still starting, their main gone) go to
    ``starting``: they may be waited for, never signalled (issue #6)."""
    found = []
    paths = [os.path.join(layout.pid_dir, n) for n in _listdir(layout.pid_dir) if n.startswith("unknown-")]
    for path in paths + [layout.backoff_file]:
        pid_file = read_pid_file(path)
        if pid_file is None or pid_file.pid is None:
            continue
        if is_worker_of(pid_file.pid, layout, name):
            found.append(pid_file.pid)
        elif starting is not None and is_worker(pid_file.pid, name) and _still_starting(pid_file.pid):
            starting.append(pid_file.pid)
    return found


def _still_starting(pid: int) -> bool:
    """A worker that may still be starting: it holds no lock file. (Not "and has no
    folder open": while the interpreter imports, it holds folders of sys.path open for
    a moment, and stop then took a starting replacement standby for another
    service's worker and returned while it ran.) Only waited for, never signalled."""
    return not any(target.endswith(".lock") for target in _open_files(pid))


def is_worker_of(pid: int, layout: Layout, name: str) -> bool:
    """``is_worker``, and of this service: a worker keeps the folder of its standby
    stop file open (its dnotify watch) until it is main, or is the child of a process
    holding our lock files, so a pid file dropped in pid_dir cannot make us signal
    another service's worker (issue #6)."""
    if not is_worker(pid, name):
        return False
    folder = os.path.realpath(os.path.dirname(layout.standby_stop_file))
    if any(target == folder for target in _open_files(pid)):
        return True
    # A replacement standby still starting has no such fd yet; its parent, the main
    # that spawned it (spawn_from_worker), has this service's lock files open.
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        parent = int(data[data.rfind(b")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return False
    locks = os.path.realpath(layout.lock_path) + os.sep
    return parent > 1 and any(target.startswith(locks) for target in _open_files(parent))


def _open_files(pid: int) -> list[str]:
    """What the fds of ``pid`` point to (paths, as /proc/PID/fd shows them)."""
    found = []
    for fd in _listdir(f"/proc/{pid}/fd"):
        try:
            found.append(os.readlink(f"/proc/{pid}/fd/{fd}"))
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


def _listdir(folder: str) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


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


def proc_stat(pid: int) -> ProcStat | None:
    """/proc/PID/stat of ``pid``, or None when it is gone. The one parser of that
    file: the command name may hold spaces and parentheses, so fields are counted
    from the last ``)``."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
        fields = data[data.rfind(b")") + 2:].split()
        return ProcStat(fields[0].decode(), int(fields[1]), int(fields[2]), int(fields[3]), int(fields[19]))
    except (OSError, ValueError, IndexError):
        return None


def stat_fields(pid: int) -> tuple[str, int, int] | None:
    """(state, process group, session) of ``pid`` from /proc, or None when gone."""
    found = proc_stat(pid)
    return None if found is None else (found.state, found.pgid, found.sid)


def is_alive(pid: int) -> bool:
    """Running, sleeping or stopped; a zombie or a missing pid is not alive."""
    fields = stat_fields(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes in process group ``pgid``."""
    members = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            fields = stat_fields(int(name))
            if fields is not None and fields[1] == pgid and fields[0] not in ("Z", "X"):
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
        fields = stat_fields(pid)
        self.pgid = fields[1] if fields else None
        self.sid = fields[2] if fields else None

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
            _signal.pidfd_send_signal(self.pidfd, signum)
        except ProcessLookupError:
            pass

    def group_left(self) -> list[int]:
        """Live members of the process's group and session, other than itself."""
        if not self.pgid or self.pgid <= 1 or self.pgid == os.getpgrp():
            return []
        return [pid for pid in group_members(self.pgid)
                if pid != self.pid and (stat_fields(pid) or ("", 0, 0))[2] == self.sid]

    def exited(self, timeout: float = 0.0) -> bool:
        """Wait up to ``timeout`` seconds for the process to exit (zombie counts)."""
        return wait_for_exit([self.pidfd], time.monotonic() + timeout) == []

    def close(self) -> None:
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1


def open_target(pid: int) -> Target | None:
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
