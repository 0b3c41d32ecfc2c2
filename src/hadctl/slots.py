"""The read model: who holds each slot, what pid files are stale, orphaned holders.

Reads only; never writes, signals or spawns (control.py and stopping.py act on
what this finds). The lock is the truth, a pid file a hint: ``read_slots`` names
a slot's holder only when the holder's fd really holds the slot's lock.

Two sights need more than the lock files: *orphans*, processes holding slot lock
files that were deleted under them (pid_dir or a lock folder removed while the
service ran, or a cleaner of old files), and *extra* slots, held beyond the
configured counts (max_procs lowered while the service ran).

Imports layout, locks.flock, model, probe and record; never click or rich.
"""
from __future__ import annotations

import os

from . import probe
from .layout import Layout, PidFile, read_pid_file
from .lean import TYPE_CHECKING
from .locks.flock import HolderProbe, holds
from .model import Role, SlotReport
from .record import record

if TYPE_CHECKING:
    from .config import LocksConfig

DELETED_LOCK = "holds a deleted lock file"


@record
class Stale:
    """A pid file (or junk in its place) that does not name its slot's holder."""

    path: str
    why: str
    pid: int | None = None


def read(layout: Layout, locks: LocksConfig, holder_probe: HolderProbe | None = None,
         owners: frozenset[int] | None = None) -> tuple[list[SlotReport], list[Stale]]:
    """Every expected slot with its holder, and the stale pid files found.

    A slot whose lock file is missing may still be held through a deleted file:
    its holder (an orphan) is found through the fds of the candidates, and shown
    as holding it, so that nothing starts a second main beside it.
    ``holder_probe`` may be shared between services (``status --all``); a lock
    file owned by someone outside ``owners`` is tampered (``read_slots``).
    """
    reports, stale = read_slots(layout, locks.max_procs, locks.standby_max_procs, holder_probe, owners)
    if not (os.path.isdir(layout.lock_path) and os.path.isdir(layout.standby_lock_path)):
        # pid_dir (or a lock folder) was removed under running processes: every holder of the host is a candidate
        orphans = {(r.role, r.slot): r for r in orphaned_holders(layout)}
    elif any(r.pid is None for r in reports) and lock_file_missing(layout, locks):
        # never made yet, or deleted under its holder (a cleaner of old files?),
        # who is then named by a pid file, stale now
        candidates = [item.pid for item in stale + unknown_pid_files(layout) if item.pid]
        orphans = {(r.role, r.slot): r for r in orphaned_holders(layout, candidates)}
    else:
        return reports, stale
    reports = [orphans.get((r.role, r.slot), r) if r.pid is None else r for r in reports]
    return reports, stale


def lock_file_missing(layout: Layout, locks: LocksConfig) -> bool:
    """Some expected slot has no lock file (a few stats: no lock is read)."""
    return any(not os.path.lexists(layout.lock_file(role, slot))
               for role, count in (("main", locks.max_procs), ("standby", locks.standby_max_procs))
               for slot in range(1, count + 1))


def read_slots(layout: Layout, max_procs: int, standby_max_procs: int, holder_probe: HolderProbe | None = None,
               owners: frozenset[int] | None = None) -> tuple[list[SlotReport], list[Stale]]:
    """Every expected slot with its holder, plus the stale pid files found (lock files only).

    A slot whose lock file is a link, not a plain file, a hard link, or owned by
    someone outside ``owners`` is reported with ``tampered`` set and no holder:
    whoever holds the file it leads to is no process of ours, and is never
    signalled (the service's user owns pid_dir and could plant it)."""
    holder_probe = holder_probe or HolderProbe()
    reports: list[SlotReport] = []
    stale: list[Stale] = []
    for role, count in ((Role.MAIN, max_procs), (Role.STANDBY, standby_max_procs)):
        for slot in range(1, count + 1):
            pid_file = read_pid_file(layout.pid_file(role.value, slot))
            hints = [pid_file.pid] if pid_file is not None else []
            path = layout.lock_file(role.value, slot)
            holder, problem = holder_probe.inspect(path, hints, owners)
            notes = stale_notes(pid_file, holder, role, slot)
            stale.extend(notes)
            reports.append(SlotReport(role, slot, holder, tuple(n.why for n in notes),
                                      tampered=None if problem is None else f"lock file {path} {problem}"))
    return reports, stale


def extra_slots(layout: Layout, max_procs: int, standby_max_procs: int) -> list[SlotReport]:
    """Held slots beyond the configured counts (max_procs lowered while the service
    ran): read_slots does not look there, yet their holders are ours to stop."""
    holder_probe = HolderProbe()
    found = []
    for role, count, folder in ((Role.MAIN, max_procs, layout.lock_path),
                                (Role.STANDBY, standby_max_procs, layout.standby_lock_path)):
        for name in sorted(probe.listdir(folder)):
            number = name[: -len(".lock")]
            if not (name.endswith(".lock") and number.isdigit() and int(number) > count):
                continue
            pid_file = read_pid_file(layout.pid_file(role.value, int(number)))
            holder = holder_probe.holder(os.path.join(folder, name), [pid_file.pid] if pid_file is not None else [])
            if holder is not None:
                key = "max_procs" if role is Role.MAIN else "standby_max_procs"
                found.append(SlotReport(role, int(number), holder, (f"beyond {key} = {count}",)))
    return found


def orphaned_holders(layout: Layout, candidates: list[int] | None = None) -> list[SlotReport]:
    """Holders of slot lock files that were deleted (pid_dir or a lock folder removed
    while the service ran, or single lock files: a cleaner of old files). Their slots
    no longer show through the files, yet they are held, and a fresh lock file would
    let a second main in beside them.

    Without ``candidates``, every flock holder of the host is looked at (/proc/locks,
    ~10 ms the first time in a process); with them, only those pids (read from the
    pid files, which a lock folder's removal takes away but a lone file's does not).
    Each one's fds tell which deleted lock file it holds."""
    folders = {os.path.realpath(layout.lock_path): Role.MAIN,
               os.path.realpath(layout.standby_lock_path): Role.STANDBY}
    table = HolderProbe().every_holder() if candidates is None else None
    found: dict[tuple[Role, int], int] = {}
    for pid in sorted(set(table.values()) if table is not None else set(candidates or ())):
        for fd, target in probe.fd_targets(pid).items():
            if not target.endswith(" (deleted)"):
                continue
            try:
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


def stale_notes(pid_file: PidFile | None, holder: int | None, role: Role, slot: int) -> list[Stale]:
    """The pid file of a slot as stale, unless it names ``holder`` (the lock's): [] or one ``Stale``."""
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
    for name in probe.listdir(layout.pid_dir):
        if (name.startswith("unknown-") and name.endswith(".pid")) or name == os.path.basename(layout.backoff_file):
            pid_file = read_pid_file(os.path.join(layout.pid_dir, name))
            if pid_file is None:
                continue
            if pid_file.pid is None or not probe.is_alive(pid_file.pid):
                found.append(Stale(pid_file.path, f"{name} names no running process", pid_file.pid))
            elif service is not None and not probe.is_worker_of(pid_file.pid, layout, service):
                found.append(Stale(pid_file.path, f"{name} names pid {pid_file.pid}, no starting worker of "
                                   f"{service}", pid_file.pid))
    return found


def leftover_temporaries(layout: Layout) -> list[Stale]:
    """``NAME.pid.PID.tmp`` files (layout.write_pid_file's, before its rename) whose
    writer PID is gone: a spawn that failed half-way (no space, no inode left) left
    them, and nobody else ever will remove them. A live PID may be writing it now."""
    found = []
    for name in probe.listdir(layout.pid_dir):
        head, _dot, rest = name.rpartition(".pid.")
        pid = rest[:-len(".tmp")] if rest.endswith(".tmp") else ""
        if not head or not pid.isdigit() or not pid.isascii() or probe.is_alive(int(pid)):
            continue
        found.append(Stale(os.path.join(layout.pid_dir, name), f"left by pid {pid}, which is gone", int(pid)))
    return found
