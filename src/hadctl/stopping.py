"""Ending processes: which ones may be signalled (``targets``), the signal ladder
(``end``), and the alive lock that tells when the last process has exited.

A process is signalled only through a pidfd opened after checking that it holds
its slot (or the alive lock), so a recycled pid is never signalled. Exits are
waited for on pidfds (and for process groups, on their members' pidfds), so a
stop returns as soon as they are gone.

Why the alive lock and no search for slot-less workers: every worker holds
``PID_DIR/hadctl-alive.lock`` shared from before it names itself in pid_dir
(``unknown-PID.pid``) until it exits, and a standby spawned by a main shares the
main's hold from birth. So the workers a pid-file search would find (starting,
backing off, a main that has returned but is still exiting) are exactly the
holders of that lock, and they are ours without any guess from pid files.

Leftovers (processes of the service that are no worker: a dead main's pool, a
setsid daemon) are found by contain.py, by cgroup or marker, and ended last
(``end_leftovers``).

Imports backoff, contain, control, errors, lean, locks.flock, model, probe and safepath; never click or rich.
"""
from __future__ import annotations

import errno
import os
import time

from . import backoff, lean, probe
from .control import Service, refusal, remove, touch
from .errors import ActionFailedError, NotPermittedError
from .locks import flock
from .model import Role, SlotReport
from .safepath import open_beneath

Targets = list[tuple[SlotReport, probe.Target]]


def targets(svc: Service, reports: list[SlotReport], role: Role) -> Targets:
    """A pidfd on each holder of a ``role`` slot, opened first and then checked once
    more against the slot's lock: from then on the pidfd names a process that held
    the slot, so a pid that died and was reused meanwhile is never signalled. (A slot
    whose lock file was deleted under it was found through its holder's fds just now.)
    The caller closes them (``end`` does)."""
    found = []
    for report in reports:
        if report.role is role and report.pid is not None:
            target = probe.open_target(report.pid)
            if target is None:
                continue
            path = svc.layout.lock_file(role.value, report.slot)
            if os.path.lexists(path) and not flock.holds_path(report.pid, path, svc.lock_owners):
                svc.log.warn(f"pid {report.pid} no longer holds {report.label}: not signalled")
                target.close()
                continue
            found.append((report, target))
    return found


def end(svc: Service, found: Targets, role: Role) -> list[SlotReport]:
    """The stop ladder for the ``found`` targets, all at once; closes them and returns
    the slots whose holder survived.

    Mains: ``main_stop_file`` (``%p`` -> pid) and ``stop_file_kill_timeout``, then
    each of ``stop_signals`` with ``signal_kill_timeout`` between them; with
    ``kill_mode = "group"`` every signal goes to the main's process group, and
    the ladder goes on while anything of the group lives. Standbys: TERM, KILL.
    """
    cfg = svc.cfg
    group = role is Role.MAIN and cfg.kill_mode == "group"
    alive = [t for _r, t in found]
    stop_files: list[str] = []
    if role is Role.MAIN and cfg.main_stop_file:
        for target in alive:
            path = cfg.main_stop_file.replace("%p", str(target.pid))
            try:
                touch(path)
                stop_files.append(path)
            except OSError as exc:
                svc.log.warn(f"cannot touch main stop file {path}: {exc.strerror}")
        alive = _still_alive(alive, time.monotonic() + cfg.stop_file_timeout, group)
    if role is Role.MAIN:  # ended on purpose: their successors count no death (backoff.py)
        for report, target in found:
            backoff.note_handover(cfg.pid_dir, report.slot, target.pid)
    ladder = cfg.stop_signals if role is Role.MAIN else ("TERM", "KILL")
    for number, name in enumerate(ladder):
        if not alive:
            break
        for target in alive:
            svc.log.trace(f"sending SIG{name} to {role.value} pid {target.pid}{' and its group' if group else ''}")
            target.signal(lean.signum(name), group)
            if name not in ("KILL", "CONT", "STOP"):
                target.signal(lean.SIGCONT, group)  # a stopped process must run to act on it (as systemd does)
        last = number == len(ladder) - 1
        wait = cfg.signal_timeout if not last else max(cfg.signal_timeout, 1.0)
        alive = _still_alive(alive, time.monotonic() + wait, group)
    for path in stop_files:
        remove(path)
    survivors = {t.pid for t in alive}
    # a main ended by a signal could not free its slot in a remote engine: free it now
    svc.engine.after_stop([t.pid for _r, t in found if t.pid not in survivors])
    for _r, target in found:
        target.close()
    return [r for r, t in found if t.pid in survivors]


def _still_alive(found: list[probe.Target], deadline: float, group: bool) -> list[probe.Target]:
    """Wait until ``deadline`` for the targets (and with ``group``, their groups) to
    exit; returns those of which something still lives."""
    left = set(probe.wait_for_exit([t.pidfd for t in found], deadline))
    alive = [t for t in found if t.pidfd in left]
    if group:  # the leader is gone: does its group still hold someone?
        alive.extend(t for t in found if t.pidfd not in left and t.pgid and t.group_left()
                     and probe.wait_for_group(t.pgid, deadline))
    return alive


def stop_standbys(svc: Service, reports: list[SlotReport], quiet_lines: bool = False,
                  found: Targets | None = None) -> list[SlotReport]:
    """TERM, then KILL, the standbys of ``reports`` (or the ``found`` targets already
    opened and signalled); says a line for each, and returns the survivors."""
    found = targets(svc, reports, Role.STANDBY) if found is None else found
    survivors = end(svc, found, Role.STANDBY)
    # Every standby that held a slot, including those already gone (the stop file
    # made them leave before their pidfd could be opened).
    for report in [r for r in reports if r.role is Role.STANDBY and r.running]:
        if report in survivors:
            svc.say(f"standby #{report.slot} (pid {report.pid}) survived TERM and KILL", "Failed", ok=False)
        elif not quiet_lines:
            svc.say(f"standby #{report.slot} (pid {report.pid})", "Stopped")
    return survivors


def say_mains_stopped(svc: Service, reports: list[SlotReport], survivors: list[SlotReport]) -> None:
    """``main #N (pid P) [Stopped]`` for each main of ``reports`` that ran and did not survive."""
    for report in [r for r in reports if r.role is Role.MAIN and r.running]:
        if report not in survivors:
            svc.say(f"main #{report.slot} (pid {report.pid})", "Stopped")


def stop_round(svc: Service, reports: list[SlotReport]) -> list[SlotReport]:
    """Stop every holder of ``reports``; returns the survivors.

    TERM the standbys first, but wait for them together with the mains: a
    standby takes a few ms to leave, and one that grabs a main slot meanwhile
    kills itself before running any code (it was asked to leave)."""
    standbys = targets(svc, reports, Role.STANDBY)
    for _report, target in standbys:
        target.signal(lean.SIGTERM, group=False)
    survivors = end(svc, targets(svc, reports, Role.MAIN), Role.MAIN)
    survivors += stop_standbys(svc, reports, found=standbys)
    say_mains_stopped(svc, reports, survivors)
    return survivors


def clear_standbys(svc: Service, reports: list[SlotReport]) -> list[SlotReport]:
    """First half of refreshing the standbys (restart, upgrade): make the standbys
    leave (stop file, so none is spawned meanwhile, and TERM), then remove the stop
    file. Returns the standbys that survived; NotPermittedError or ActionFailedError
    when the stop file cannot be made."""
    path = svc.cfg.standby_stop_file
    try:
        touch(path)
    except PermissionError as exc:
        raise NotPermittedError(f"cannot create standby stop file {path}: {exc.strerror}") from exc
    except OSError as exc:
        raise ActionFailedError(f"cannot create standby stop file {path}: {exc.strerror}") from exc
    survivors = stop_standbys(svc, reports, quiet_lines=True)
    remove(path)
    return survivors


def make_stop_file(svc: Service) -> bool:
    """stop's first step: the standby stop file, which keeps cron's ``fork`` (and
    respawning mains) from starting the service again. True when it could not be
    made: then one failed line says so, and the stop exits 1 (what runs is still
    stopped; a stop that exits 0 must stay stopped)."""
    path = svc.cfg.standby_stop_file
    try:
        touch(path)
    except OSError as exc:
        why = str(refusal(f"cannot create standby stop file {path}", exc)) if exc.errno == errno.ELOOP \
            else f"cannot create standby stop file {path}: {exc.strerror}"
        svc.say(f"{why}: a fork (cron, timer) will start {svc.cfg.name} again", "Failed", ok=False)
        return True
    return False


def wait_for_the_last(svc: Service) -> int:
    """Wait until every process of the service has exited, slot or no slot, and
    return how many survived.

    A main that has returned gives its slot back at once, yet may take a while to
    exit (atexit handlers, a thread that outlives the function); a worker still
    starting or waiting out a crash-loop back-off holds no slot; a standby that its
    main spawned just before being stopped has no name in pid_dir yet. Every worker
    holds the alive lock shared for its whole life, so taking it exclusively is the
    answer (the stop file makes them leave meanwhile). Those still holding it after
    signal_kill_timeout get TERM, then KILL.
    """
    path = svc.layout.alive_lock
    if not os.path.exists(path):
        return 0  # no worker of this hadctl ever ran here (or HADaemon::Control's)
    try:
        alive_lock = _file_key(path)
    except OSError as exc:  # planted by the service's user: said, and counted as a survivor
        return _refused(svc, path, exc)
    for name in (None, "TERM", "KILL"):
        if name is not None:
            for target in [t for t in map(probe.open_target, _holders(alive_lock)) if t is not None]:
                svc.log.warn(f"pid {target.pid} holds no slot but has not exited: SIG{name}")
                target.signal(lean.signum(name), group=False)
                target.close()
        try:
            fd = flock.take_control(path, svc.cfg.signal_timeout)
        except OSError as exc:  # swapped for a link meanwhile
            return _refused(svc, path, exc)
        if fd is not None:
            os.close(fd)
            return 0
    left = _holders(alive_lock)
    for pid in left:
        svc.say(f"pid {pid} (holding no slot) survived TERM and KILL", "Failed", ok=False)
    return len(left)


def _refused(svc: Service, path: str, exc: OSError) -> int:
    """The alive lock cannot be opened (a link planted in its place): one failed line
    (what was stopped stays said), and 1 as the number of processes not waited for."""
    why = str(refusal(f"cannot wait for the last process on {path}", exc)) if exc.errno == errno.ELOOP \
        else f"cannot wait for the last process on {path}: {exc.strerror}"
    svc.say(why, "Failed", ok=False)
    return 1


def end_leftovers(svc: Service) -> int:
    """After the workers: end every process of the service that is left (contain.py),
    with the ``stop_signals`` ladder; returns how many survived, each named. With
    ``kill_mode = "process"`` they are left running, and said so."""
    from . import contain

    cfg = svc.cfg
    finder = contain.finder_for(cfg)
    found = finder.members()
    if found and cfg.kill_mode == "process":
        svc.say(f"{len(found)} processes of the service left running (kill_mode = \"process\"): "
                + " ".join(str(m.pid) for m in found), "OK")
        contain.remove_cgroup(finder.cgroup)  # what is empty of it
        return 0
    if found:
        svc.log.info(f"ending {len(found)} leftover processes ({finder.mode}): "
                     + "; ".join(f"pid {m.pid}: {contain.command(m.pid)}" for m in found))
    survivors = contain.end(finder, found, cfg.stop_signals, cfg.signal_timeout, svc.log.trace) if found else []
    for pid in survivors:
        svc.say(f"leftover pid {pid} ({contain.command(pid)}) survived {'/'.join(cfg.stop_signals)}", "Failed",
                ok=False)
    if found and not survivors:
        svc.say(f"{len(found)} leftover processes", "Stopped")
    contain.remove_cgroup(finder.cgroup)  # what is empty of it (a populated cgroup cannot be removed)
    from .watchdog import beat_file, replaced_file

    for slot in range(1, cfg.locks.max_procs + 1):
        for path in (beat_file(cfg.pid_dir, slot), replaced_file(cfg.pid_dir, slot)):
            remove(path)
    return len(survivors)


def end_dead_leftovers(svc: Service) -> None:
    """restart, once a main is replaced: with ``kill_mode = "group"``, end what it left
    behind (the new main's own sweep may have run while the old one was still exiting)."""
    from . import contain

    if svc.cfg.kill_mode == "group":
        contain.sweep(contain.finder_for(svc.cfg), svc.layout.alive_lock, svc.cfg.stop_signals,
                      svc.cfg.signal_timeout, svc.log, "restart")


def _file_key(path: str) -> tuple[int, int, int]:
    """(major, minor, inode) of the file at ``path``, opened never through a symlink
    (OSError ELOOP): its user may write in pid_dir, and a link there swapped in while
    stop waits must not make a root controller signal whoever holds the link's target."""
    fd = open_beneath(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)  # (a read-only pid_dir too)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return os.major(st.st_dev), os.minor(st.st_dev), st.st_ino


def _holders(key: tuple[int, int, int]) -> list[int]:
    """Every process holding a flock on the file ``key`` (a /proc walk, as flock.holders_of)."""
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and flock.holds(int(name), key)]
