"""The verbs: one function per action; each returns an ``Outcome`` and never prints or exits.

Each verb reads as a short script over named parts: ``control`` (Service, the
controllers' lock, preparing folders and files, filling free slots), ``slots``
(the read model, through ``Service.slots``) and ``stopping`` (targets, the
signal ladder, the alive lock). Nothing here trusts a pid file: slots are read
from their locks, and a process is signalled only through a pidfd opened after
that check.

Imports everything below it; never click or rich.
"""
from __future__ import annotations

import os
import time

from . import backoff, events, lean, probe, stopping
from .config import ServiceConfig
from .control import ControlLock, Service, clean_stale, fill, prepare, remove, suspect, touch
from .errors import ActionFailedError, ConfigError, NotRunningError
from .layout import read_pid_file
from .lean import TYPE_CHECKING
from .locks import flock
from .model import Outcome, Role, SlotReport, Step

if TYPE_CHECKING:
    from .watch import FolderWatch


# ------------------------------------------------------------ start, fork


def start(cfg: ServiceConfig) -> Outcome:
    """Remove the stop file and spawn whatever main and standby slots are free."""
    svc = Service(cfg)
    prepare(svc)
    with ControlLock(svc):
        remove(cfg.standby_stop_file)
        return _start_locked(svc, "start")


def _start_locked(svc: Service, action: str) -> Outcome:
    reports, stale = svc.slots()
    clean_stale(svc, stale)
    if all(r.running for r in reports):
        _end_extra_standbys(svc)  # a killed restart's
        svc.say("Already Running", "OK")
        return svc.outcome(action, 0, reports)
    if suspect(svc, reports):
        return svc.outcome(action, 1, reports)  # a second main would start beside them
    events.record(svc.layout, "start", action=action)
    status = fill(svc, reports)
    _end_extra_standbys(svc)
    return svc.outcome(action, status, svc.slots()[0])


def fork(cfg: ServiceConfig) -> Outcome:
    """For cron: refuse while the stop file exists, else spawn whatever is missing."""
    svc = Service(cfg)
    prepare(svc)
    with ControlLock(svc):
        # Checked only under the control lock: restart touches the stop file for a
        # moment (to clear the standbys), and a fork racing it must not fail.
        if os.path.lexists(cfg.standby_stop_file):
            svc.say(f"not forking: standby stop file {cfg.standby_stop_file} exists", "Failed", ok=False)
            return svc.outcome("fork", 1)
        _watchdog_check(svc)
        reports, stale = svc.slots()
        clean_stale(svc, stale)
        if not all(r.running for r in reports) and suspect(svc, reports):
            return svc.outcome("fork", 1, reports)  # a second main would start beside them
        status = fill(svc, reports)
        _end_extra_standbys(svc)  # a killed restart's
        return svc.outcome("fork", status, svc.slots()[0] if svc.steps else reports)


def _watchdog_check(svc: Service) -> None:
    """With a watchdog and no standby to watch, fork replaces a hung main (watchdog.py)."""
    cfg = svc.cfg
    if cfg.watchdog_timeout is None or cfg.locks.engine != "flock":
        return
    from . import watchdog

    for slot in watchdog.check_from_controller(cfg.pid_dir, list(range(1, cfg.locks.max_procs + 1)),
                                               lambda n: svc.layout.lock_file("main", n), cfg.watchdog_timeout,
                                               cfg.watchdog_signal, cfg.signal_timeout, svc.log):
        svc.say(f"main #{slot}: hung (silent for more than {cfg.watchdog_timeout:g} s), replaced", "Replaced")


# ------------------------------------------------------------ stop, hard-restart


def stop(cfg: ServiceConfig) -> Outcome:
    """Touch the stop file; stop standbys, then mains (stop ladder); clean pid files."""
    svc = Service(cfg)
    if not os.path.isdir(cfg.pid_dir):
        orphans = [r for r in svc.slots()[0] if r.running]
        if orphans:
            return _stop_orphans(svc, orphans)
        svc.say("Not Running", "OK")
        return svc.outcome("stop", 0)
    with ControlLock(svc):
        return _stop_locked(svc)


def _stop_locked(svc: Service) -> Outcome:
    """Stop file; every slot's holder (rounds: a respawn racing us is caught on the
    next); then the last process of any kind (the alive lock); then clean pid_dir."""
    cfg = svc.cfg
    reports = svc.slots()[0] + svc.extra_slots()  # before the stop file: standbys leave on it, each named Stopped
    no_stop_file = stopping.make_stop_file(svc)  # (a failure is said, and makes the exit status 1)
    stopped_any = False
    for round_ in range(5):
        if round_:
            reports = svc.slots()[0] + svc.extra_slots()
        if not any(r.running for r in reports):
            break
        stopped_any = True
        stopping.stop_round(svc, reports)
    left = stopping.wait_for_the_last(svc)
    left += stopping.end_leftovers(svc)  # what the workers started (contain.py)
    reports, stale = svc.slots()
    reports += svc.extra_slots()
    clean_stale(svc, stale)
    for slot in range(1, cfg.locks.max_procs + 1):
        remove(svc.layout.ready_file(slot))
    running = [r for r in reports if r.running]
    for report in running:
        svc.say(f"{report.label} (pid {report.pid}) still holds its slot", "Failed", ok=False)
    if not running:
        remove(svc.layout.starts_file)  # a clean stop ends any crash-loop history
        for slot in range(1, cfg.locks.max_procs + 1):
            remove(backoff.handover_file(cfg.pid_dir, slot))
    doubtful = suspect(svc, reports, elsewhere=not stopped_any)  # (workers elsewhere: when none ran here)
    events.record(svc.layout, "stop", stopped=stopped_any, left=len(running))
    if not stopped_any and not doubtful:
        svc.say("Not Running", "OK")
    return svc.outcome("stop", 1 if running or left or doubtful or no_stop_file else 0, reports)


def _stop_orphans(svc: Service, reports: list[SlotReport]) -> Outcome:
    """Stop the holders of deleted lock files: the usual ladder, standbys first, but
    without the control lock and the stop file, which were in the removed pid_dir."""
    svc.say(f"{svc.cfg.pid_dir} is gone, yet {len(reports)} processes hold its deleted lock files", "Found")
    survivors = stopping.stop_standbys(svc, reports)
    mains = stopping.targets(svc, reports, Role.MAIN)
    survivors += stopping.end(svc, mains, Role.MAIN)
    stopping.say_mains_stopped(svc, [r for r, _t in mains], survivors)
    for report in survivors:
        svc.say(f"{report.label} (pid {report.pid}) still holds its slot", "Failed", ok=False)
    return svc.outcome("stop", 1 if survivors else 0, svc.slots()[0])


def hard_restart(cfg: ServiceConfig) -> Outcome:
    """stop, then start; exits as start does."""
    svc = Service(cfg)
    prepare(svc)
    with ControlLock(svc):
        stopped = _stop_locked(svc)
        if stopped.exit_status != 0:
            return svc.outcome("hard-restart", stopped.exit_status, list(stopped.slots))
        remove(cfg.standby_stop_file)
        return _start_locked(svc, "hard-restart")


# ------------------------------------------------------------ restart


def restart(cfg: ServiceConfig) -> Outcome:
    """Zero-downtime restart: fresh standbys first, then mains one at a time.

    1. spawn new standbys (the new code) into slots above the configured ones,
       while the old standbys keep theirs: if the new code cannot start, they are
       ended and the service is left exactly as it was (exit 1);
    2. once every new standby is ready, end the old ones;
    3. for each main: stop it, then wait until another process holds its slot
       (and says ready, when ``ready_timeout`` is set) before the next one;
    4. refill the configured standby slots, then end the new standbys left above
       them. On failure stop there, naming the slot; exit 1.

    The standby stop file is never made (only stop makes it): a restart killed at
    any moment leaves nothing that keeps the next start or fork from filling the
    pool; the new standbys it left above the slots are ended by the next restart.
    """
    svc = Service(cfg)
    prepare(svc)
    with ControlLock(svc):
        reports, stale = svc.slots()
        remove(cfg.standby_stop_file)  # a restart starts: left by a stop, it must not keep standbys away
        if not any(r.running for r in reports if r.role is Role.MAIN):
            return _start_locked(svc, "restart")
        clean_stale(svc, stale)
        if cfg.listen:  # a new address that cannot be bound refuses the restart before anything stops
            from . import sockets

            sockets.for_workers(svc)
        if cfg.locks.standby_max_procs == 0:
            return _restart_without_standbys(svc, reports)
        if not _refresh_standbys(svc, "restart"):
            return svc.outcome("restart", 1, svc.slots()[0])
        for report in [r for r in reports if r.role is Role.MAIN and r.running]:
            if not _hand_over(svc, report):
                return svc.outcome("restart", 1, svc.slots()[0])
        reports = svc.slots()[0]
        status = fill(svc, reports)  # (all of them: the mains running now are no news)
        _end_extra_standbys(svc)
        return svc.outcome("restart", min(status, 1), svc.slots()[0])  # SPEC: restart exits 0 or 1


def _refresh_standbys(svc: Service, action: str) -> bool:
    """Replace the standbys with new ones (the new code) without ever leaving the
    slots empty: the new ones take slots above ``standby_max_procs`` and report
    ready (imported, warmed up) while the old ones wait on; only then are the old
    ones ended. When the new ones cannot start, those that did are ended and the
    old ones keep their slots: False, said. (A new process may take a free main
    slot instead: a main was missing, and it stays.)"""
    count = svc.cfg.locks.standby_max_procs
    _end_extra_standbys(svc, force=True)  # left by a restart killed before it ended them
    old = [r for r in svc.slots()[0] if r.role is Role.STANDBY and r.running]
    if fill(svc, [SlotReport(Role.STANDBY, count + n, None) for n in range(count, 0, -1)], standby_extra=count):
        new = [r for r in svc.slots()[0] + svc.extra_slots()
               if r.role is Role.STANDBY and r.running and r.pid not in {o.pid for o in old}]
        stopping.stop_standbys(svc, new, quiet_lines=True)
        svc.say(f"{action} stopped: the new standbys did not start; the old mains and standbys still run",
                "Failed", ok=False)
        return False
    stopping.stop_standbys(svc, old, quiet_lines=True)
    return True


def _end_extra_standbys(svc: Service, force: bool = False) -> None:
    """End the standbys held above ``standby_max_procs`` (a restart's new ones that no
    main slot needed, or that a killed restart left behind) once every configured
    standby slot is held, filling them first if need be (or at once, with ``force``):
    they are spare, never the last standby."""
    extra = [r for r in svc.extra_slots() if r.role is Role.STANDBY]
    if not extra:
        return
    if not force:
        standbys = [r for r in svc.slots()[0] if r.role is Role.STANDBY]
        if not all(r.running for r in standbys) and fill(svc, standbys) != 0:
            return
        if not all(r.running for r in svc.slots()[0] if r.role is Role.STANDBY):
            return
    stopping.stop_standbys(svc, extra, quiet_lines=True)


def _hand_over(svc: Service, report: SlotReport) -> bool:
    """Stop the main of one slot and wait until a new process holds it (and is ready)."""
    from .watch import FolderWatch

    cfg = svc.cfg
    watch = FolderWatch(cfg.pid_dir)
    try:
        found = stopping.targets(svc, [report], Role.MAIN)
        if found and stopping.end(svc, found, Role.MAIN):  # (no target: it left on its own meanwhile)
            svc.say(f"main #{report.slot} (pid {report.pid}) did not stop; restart stopped there", "Failed", ok=False)
            return False
        wait = max(cfg.locks.interval, 5.0) + (cfg.ready_timeout or 0)
        holder = _wait_for_new_holder(svc, watch, report, time.monotonic() + wait)
        if holder is None:
            svc.say(f"main #{report.slot}: no standby took the slot within {wait:g} s; restart stopped there",
                    "Failed", ok=False)
            return False
        if cfg.ready_timeout is not None and \
                not _wait_for_ready(svc, watch, report.slot, holder, time.monotonic() + cfg.ready_timeout):
                svc.say(f"main #{report.slot} (pid {holder}) did not say ready within {cfg.ready_timeout:g} s; "
                        "restart stopped there", "Failed", ok=False)
                return False
        svc.say(f"main #{report.slot} (pid {report.pid}) replaced by pid {holder}", "OK")
        events.record(svc.layout, "restart", slot=report.slot, old_pid=report.pid, new_pid=holder)
        stopping.end_dead_leftovers(svc)  # what the replaced main started (contain.py)
        return True
    finally:
        watch.close()


def _wait_for_new_holder(svc: Service, watch: FolderWatch, report: SlotReport, deadline: float) -> int | None:
    """The pid of the process that took ``report``'s main slot after its holder, or
    None at ``deadline``. Woken by pid_dir's changes (``watch``), not by polling."""
    import select

    lock_file = svc.layout.lock_file("main", report.slot)
    pid_file = svc.layout.pid_file("main", report.slot)
    while True:
        # The new main renames its pid file just before it calls the function:
        # wait for that, not merely for the lock (held a little earlier).
        found = read_pid_file(pid_file)
        if found is not None and found.pid not in (None, report.pid):
            holder = flock.HolderProbe().holder(lock_file, [found.pid])
            if holder == found.pid:
                return holder
        remote = svc.engine.new_holder(report.slot, report.pid)  # another host's standby may take it
        if remote is not None:
            svc.log.info(f"main #{report.slot} taken over by pid {remote[1]} on {remote[0]}")
            return remote[1]
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Woken by the new main renaming its pid file; the timeout only bounds a missed event.
        if select.select([watch.fd], [], [], min(left, 0.05))[0]:
            watch.names()


def _wait_for_ready(svc: Service, watch: FolderWatch, slot: int, pid: int, deadline: float) -> bool:
    """True once ``pid``, main of ``slot``, has said it is ready (its ready file); False
    at ``deadline`` or when it has exited. Woken by pid_dir's changes (``watch``)."""
    import select

    path = svc.layout.ready_file(slot)
    if not svc.engine.sees_ready(slot, pid):
        return True  # its ready file is on another host, which this one cannot see
    while True:
        found = read_pid_file(path)
        if found is not None and found.pid == pid:
            return True
        left = deadline - time.monotonic()
        if left <= 0 or not probe.is_alive(pid):
            return False
        if select.select([watch.fd], [], [], min(left, 0.5))[0]:
            watch.names()


def _restart_without_standbys(svc: Service, reports: list[SlotReport]) -> Outcome:
    """With no standby slots a gap is unavoidable: stop each main, start a new one."""
    for report in [r for r in reports if r.role is Role.MAIN and r.running]:
        if stopping.end(svc, stopping.targets(svc, [report], Role.MAIN), Role.MAIN):
            svc.say(f"main #{report.slot} (pid {report.pid}) did not stop; restart stopped there", "Failed", ok=False)
            return svc.outcome("restart", 1, svc.slots()[0])
        status = fill(svc, [r for r in svc.slots()[0] if r.role is Role.MAIN])
        events.record(svc.layout, "restart", slot=report.slot, old_pid=report.pid, new_pid=None, gap=True)
        if status != 0:
            return svc.outcome("restart", status, svc.slots()[0])
    return svc.outcome("restart", 0, svc.slots()[0])


# ------------------------------------------------------------ reload, upgrade


def reload(cfg: ServiceConfig) -> Outcome:
    """SIGHUP to each main; NotRunningError (7) when no main runs."""
    svc = Service(cfg)
    if not os.path.isdir(cfg.pid_dir):  # removed under running mains? they hold its deleted lock files
        return _reload_locked(svc)
    with ControlLock(svc):
        return _reload_locked(svc)


def _reload_locked(svc: Service) -> Outcome:
    reports, _stale = svc.slots()
    found = stopping.targets(svc, reports, Role.MAIN)
    if not found:
        raise NotRunningError(f"{svc.cfg.name}: no main is running, nothing to reload")
    for report, target in found:
        target.signal(lean.SIGHUP, group=False)
        target.close()
        svc.say(f"main #{report.slot} (pid {report.pid}) sent SIGHUP", "OK")
    return svc.outcome("reload", 0, reports)


def upgrade(cfg: ServiceConfig) -> Outcome:
    """Refresh standbys, then touch ``main_upgrade_file`` for each main and wait for its removal."""
    svc = Service(cfg)
    if not cfg.main_upgrade_file:
        raise ConfigError(f'{cfg.config_file}: key "main_upgrade_file": required by upgrade')
    prepare(svc)
    with ControlLock(svc):
        reports, _stale = svc.slots()
        mains = [r for r in reports if r.role is Role.MAIN and r.running]
        if not mains:
            raise ActionFailedError(f"{cfg.name}: no main is running, nothing to upgrade")
        if cfg.locks.standby_max_procs and not _refresh_standbys(svc, "upgrade"):
            return svc.outcome("upgrade", 1, svc.slots()[0])
        status = 0
        for report in mains:
            if not _upgrade_one(svc, report, cfg.main_upgrade_file):
                status = 1
        fill(svc, [r for r in svc.slots()[0] if r.role is Role.STANDBY])
        _end_extra_standbys(svc)
        return svc.outcome("upgrade", status, svc.slots()[0])


def _upgrade_one(svc: Service, report: SlotReport, upgrade_file: str) -> bool:
    """Touch ``upgrade_file`` (``%p`` -> pid) for ``report``'s main and wait for the main
    to remove it (``upgrade_timeout``, else ``kill_timeout``); says the result."""
    import select

    from .watch import IN_DELETE, IN_DELETE_SELF, FolderWatch

    cfg = svc.cfg
    timeout = cfg.upgrade_timeout if cfg.upgrade_timeout is not None else cfg.kill_timeout
    path = upgrade_file.replace("%p", str(report.pid))
    try:
        watch = FolderWatch(os.path.dirname(path), IN_DELETE | IN_DELETE_SELF)
    except OSError as exc:
        svc.say(f"main #{report.slot}: cannot watch {os.path.dirname(path)}: {exc.strerror}", "Failed", ok=False)
        return False
    try:
        try:
            touch(path)
        except OSError as exc:
            svc.say(f"main #{report.slot}: cannot create {path}: {exc.strerror}", "Failed", ok=False)
            return False
        deadline = time.monotonic() + timeout
        while os.path.exists(path) and time.monotonic() < deadline:
            select.select([watch.fd], [], [], max(0.0, deadline - time.monotonic()))
            watch.names()
    finally:
        watch.close()
    if os.path.exists(path):
        remove(path)
        svc.say(f"main #{report.slot} (pid {report.pid}) did not take the upgrade within {timeout:g} s",
                "Failed", ok=False)
        return False
    svc.say(f"main #{report.slot} (pid {report.pid}) upgraded", "OK")
    return True


# ------------------------------------------------------------ status, foreground


def status(cfg: ServiceConfig, holder_probe: flock.HolderProbe | None = None) -> Outcome:
    """Read every expected slot from its lock: 0 all running, 3 none, 1 some
    (4 when the ZooKeeper engine cannot tell who holds the main slots).

    ``status --all`` passes one ``holder_probe`` for all its services, so
    /proc/locks is read at most once.
    """
    svc = Service(cfg)
    reports, _stale = svc.slots(holder_probe)
    reports += svc.extra_slots()
    reports, problem = svc.engine.status_slots(reports, probe.is_alive)  # other hosts' holders
    for report in reports:
        stale = f" (stale: {'; '.join(report.stale)})" if report.stale else ""
        if report.running:
            on = f" on {report.host}" if report.host is not None else ""
            svc.steps.append(Step(f"{report.label} (pid {report.pid}{on}){stale}", "Running", True))
        elif problem is not None and report.role is Role.MAIN:  # another host may hold it: unknown
            svc.steps.append(Step(f"{report.label}{stale}", "Unknown", False))
        else:
            svc.steps.append(Step(f"{report.label}{stale}", "Not Running", False))
    doubtful = suspect(svc, reports, log=False)
    from .outputs import unopened

    svc.steps.extend(Step(line, "Output", False) for line in unopened(cfg, reports))
    detail: dict[str, object] = {}
    found = read_pid_file(svc.layout.backoff_file)
    if found is not None and found.pid is not None and probe.is_worker_of(found.pid, svc.layout, cfg.name):
        delay = _second_line(svc.layout.backoff_file)
        svc.steps.append(Step(f"crash loop: standby pid {found.pid} is backing off {delay} s", "Back-off", False))
        detail["backoff"] = {"pid": found.pid, "delay": float(delay) if delay else None}
    _failover_status(svc, detail)
    if cfg.listen:
        from . import sockets

        steps, detail["listen"] = sockets.status(cfg, reports)
        svc.steps.extend(steps)
    from .environment import slot_digests

    detail["environment"] = slot_digests(reports)  # drift between workers shows as different digests
    _contain_status(svc, reports, detail)
    if problem is not None:  # who holds the main slots is unknown: LSB status 4
        svc.steps.append(Step(problem, "Unknown", False))
        return svc.outcome("status", 4, reports, **detail)
    return svc.outcome("status", 1 if doubtful else status_code(reports), reports, **detail)


def _contain_status(svc: Service, reports: list[SlotReport], detail: dict[str, object]) -> None:
    """Containment mode, each main's figures with its descendants, leftovers, and mains
    the watchdog or max_rss replaced (contain.py, watchdog.py); read from /proc."""
    from . import contain, watchdog

    cfg = svc.cfg
    mains = [(r.slot, r.pid) for r in reports if r.role is Role.MAIN and r.pid is not None and r.host is None]
    facts = contain.status_facts(cfg, mains)
    for slot, _pid in mains:
        f = facts["mains"][str(slot)]  # type: ignore[index]
        svc.steps.append(Step(f"main #{slot}: up {f['uptime']:.0f} s, rss {f['rss'] / 1048576:.1f} MB, "
                              f"cpu {f['cpu']:.2f} s, {f['processes']} processes", "Figures", True))
    replaced = {}
    for slot in range(1, cfg.locks.max_procs + 1):
        found = watchdog.read_replaced(cfg.pid_dir, slot)
        if found is not None:
            replaced[str(slot)] = found
            why = "hung, replaced" if found["why"] == watchdog.HUNG else "over max_rss, replaced"
            svc.steps.append(Step(f"main #{slot}: pid {found['pid']} {why}", "Replaced", False))
    for item in facts["leftovers"]:  # type: ignore[attr-defined]
        svc.steps.append(Step(f"leftover pid {item['pid']} of exited worker {item['owner']}: {item['command']}",
                              "Leftover", False))
    if mains or facts["leftovers"]:  # (JSON has the mode always)
        svc.steps.append(Step(f"containment: {facts['mode']}" + (f" {facts['cgroup']}" if facts["cgroup"] else ""),
                              "OK", True))
    detail["containment"] = {**facts, "replaced": replaced}


def _failover_status(svc: Service, detail: dict[str, object]) -> None:
    """The last failover and how many in the last hour (events.py), read without json."""
    summary = events.failover_summary(svc.cfg.pid_dir)
    detail["failovers"] = summary
    last = summary["last"]
    if last is not None:
        gap = f", gap <= {last['gap_ms']:.3f} ms" if last["gap_ms"] is not None else ""
        ago = events.age(time.time() - last["time"])
        svc.steps.append(Step(f"last failover: main #{last['slot']} pid {last['old_pid'] or '?'} -> "
                              f"{last['new_pid']}{gap}, {ago} ago; {summary['last_hour']} in the last hour",
                              "Failover", True))


def _second_line(path: str) -> str:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ""
    return lines[1].strip() if len(lines) > 1 else ""


def status_code(reports: list[SlotReport]) -> int:
    """LSB status of a service from its slots: 0 all running, 3 none, 1 some."""
    running = sum(r.running for r in reports)
    if running == len(reports):
        return 0
    return 3 if running == 0 else 1


def foreground(cfg: ServiceConfig) -> int:
    """Run the entrypoint in this process: no fork, no locks. Returns its exit status."""
    import sys

    from .entrypoint import EntrypointError, call, resolve
    from .errors import NotInstalledError

    sys.path[:0] = list(cfg.python_path)
    os.environ.update(dict(cfg.env))
    if cfg.directory:
        os.chdir(cfg.directory)
    if cfg.umask is not None:
        os.umask(cfg.umask)
    if cfg.listen:  # at fds 3, 4, ... as every worker holds them
        from . import sockets

        sockets.for_this_process(cfg)
    try:
        value = resolve(cfg.entrypoint)
    except EntrypointError as exc:
        raise NotInstalledError(f"cannot run {cfg.entrypoint}: {exc}") from exc
    try:
        return call(value, cfg.args)
    except KeyboardInterrupt:  # Ctrl-C in a terminal: the shell's convention, no traceback
        return 130
