"""One function per action; each returns an ``Outcome`` and never prints or exits.

Controllers that change state (start, stop, restart, fork, reload, upgrade)
take turns on ``PID_DIR/hadctl.lock`` so that concurrent runs end coherent.
Nothing here trusts a pid file: slots are read from their locks (probe.py) and
a process is signalled only through a pidfd opened after that check.
Imports everything below it; never click or rich.
"""
from __future__ import annotations

import _signal
import errno
import os
import time

from . import probe, spawn
from .config import ServiceConfig
from .errors import ActionFailedError, BusyError, ConfigError, NotPermittedError, NotRunningError
from .layout import Layout, read_pid_file, remove_stale
from .locks import flock
from .log import Log, follows_last_link, open_append
from .model import Outcome, Role, SlotReport, Step

SPAWN_TIMEOUT = 30.0
CONTROL_TIMEOUT = 60.0


class Service:
    """One service during one action: its config, paths, log and output lines."""

    def __init__(self, cfg: ServiceConfig) -> None:
        self.cfg = cfg
        self.layout = Layout(cfg.pid_dir, cfg.locks.path, cfg.locks.standby_path, cfg.standby_stop_file)
        self.log = Log(cfg.log_file)
        self.steps: list[Step] = []

    def say(self, what: str, result: str, ok: bool = True) -> None:
        self.steps.append(Step(what, result, ok))
        self.log.write("INFO" if ok else "ERROR", f"{what} [{result}]")

    def slots(self, holder_probe: flock.HolderProbe | None = None) -> tuple[list[SlotReport], list[probe.Stale]]:
        """Every expected slot from its lock (``holder_probe`` may be shared between services)."""
        reports, stale = probe.read_slots(self.layout, self.cfg.locks.max_procs, self.cfg.locks.standby_max_procs,
                                          holder_probe)
        if not (os.path.isdir(self.layout.lock_path) and os.path.isdir(self.layout.standby_lock_path)):
            # pid_dir (or a lock folder) was removed under running processes (issue #6)
            orphans = {(r.role, r.slot): r for r in probe.orphaned_holders(self.layout)}
        elif any(r.pid is None for r in reports) and self.lock_file_missing():
            # never made yet, or deleted under its holder (a cleaner of old files?),
            # who is then named by a pid file, stale now
            candidates = [item.pid for item in stale + probe.unknown_pid_files(self.layout) if item.pid]
            orphans = {(r.role, r.slot): r for r in probe.orphaned_holders(self.layout, candidates)}
        else:
            return reports, stale
        reports = [orphans.get((r.role, r.slot), r) if r.pid is None else r for r in reports]
        return reports, stale

    def lock_file_missing(self) -> bool:
        """Some expected slot has no lock file (a few stats: no lock is read)."""
        locks = self.cfg.locks
        return any(not os.path.lexists(self.layout.lock_file(role, slot))
                   for role, count in (("main", locks.max_procs), ("standby", locks.standby_max_procs))
                   for slot in range(1, count + 1))

    def outcome(self, action: str, status: int, slots: list[SlotReport] | None = None,
                **detail: object) -> Outcome:
        return Outcome(self.cfg.name, action, status, tuple(self.steps), tuple(slots or ()),
                       self.cfg.log_file, dict(detail))


# ------------------------------------------------------------------ helpers


class _control:
    """``with _control(svc):`` holds the controllers' lock for the body; another
    controller waits its turn (a class, not contextlib: a fast command's import)."""

    def __init__(self, svc: Service, timeout: float = CONTROL_TIMEOUT) -> None:
        self.svc = svc
        self.timeout = timeout
        self.fd = -1

    def __enter__(self) -> None:
        path = self.svc.layout.control_lock
        try:
            fd = flock.take_control(path, self.timeout)
        except PermissionError as exc:
            raise NotPermittedError(f"cannot take lock {path}: {exc.strerror}") from exc
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise NotPermittedError(f"cannot take lock {path}: it is a symbolic link (never followed)") from exc
            raise ConfigError(f"cannot take lock {path}: {exc.strerror}") from exc
        if fd is None:
            raise BusyError(f"another hadctl is working on {self.svc.cfg.name} (it holds {path}); "
                            f"gave up after {self.timeout:g} s")
        self.fd = fd

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def _prepare(svc: Service) -> None:
    """Create pid_dir, lock folders and log file before the first fork.

    Folders we create are given to the service's user, so an unprivileged
    worker can write its pid files. Bad paths fail here, before anything runs.
    """
    cfg = svc.cfg
    _refuse_beside_orphans(svc)
    _check_paths(cfg)
    ident = cfg.identity
    chown = os.geteuid() == 0 and ident.uid is not None
    for key, folder in (("pid_dir", cfg.pid_dir), ("locks.path", cfg.locks.path),
                        ("locks.standby_path", cfg.locks.standby_path)):
        existed = os.path.isdir(folder)
        try:
            os.makedirs(folder, 0o755, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f'{cfg.config_file}: key "{key}": {folder} is not a directory') from None
        except PermissionError:
            raise NotPermittedError(f"cannot create {folder}: Permission denied") from None
        except OSError as exc:
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot create {folder}: {exc.strerror}') from None
        if not os.access(folder, os.W_OK):
            raise NotPermittedError(f"cannot write in {folder}: Permission denied")
        if chown and not existed:
            # never through a link: once pid_dir is the user's, its user could swap
            # the lock folder we just made for a link to /etc
            os.chown(folder, ident.uid or 0, -1 if ident.gid is None else ident.gid, follow_symlinks=False)
    for key, path in (("log_file", cfg.log_file), ("stdout_file", cfg.stdout_file),
                      ("stderr_file", cfg.stderr_file)):
        if path is None:
            continue
        existed = os.path.exists(path)
        try:
            fd = open_append(path)
        except PermissionError:
            raise NotPermittedError(f"cannot open {key} {path}: Permission denied") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _link_refused(key, path) from None
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot open {path}: {exc.strerror}') from None
        try:
            if chown and not existed:
                os.fchown(fd, ident.uid or 0, -1 if ident.gid is None else ident.gid)  # the file we opened
        finally:
            os.close(fd)


def _link_refused(key: str, path: str) -> NotPermittedError:
    return NotPermittedError(f"{key} {path} is a symbolic link in a folder that others can write: "
                             "not followed as root")


def _check_paths(cfg: ServiceConfig) -> None:
    """Refuse an unusable folder or file before _prepare creates any (issue #6): a bad
    log_file must not leave new folders in pid_dir. Changes nothing; _prepare still
    reports whatever this cannot foresee."""
    import stat

    for key, path, folder in (("pid_dir", cfg.pid_dir, True), ("locks.path", cfg.locks.path, True),
                              ("locks.standby_path", cfg.locks.standby_path, True),
                              ("log_file", cfg.log_file, False), ("stdout_file", cfg.stdout_file, False),
                              ("stderr_file", cfg.stderr_file, False)):
        if path is None:
            continue
        existing = path
        while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)  # the nearest part of the path that exists
        if existing == path and folder != os.path.isdir(path):
            problem = "is not a directory" if folder else "is a directory"
            raise ConfigError(f'{cfg.config_file}: key "{key}": {path} {problem}')
        if existing == path and not folder and (stat.S_ISFIFO(os.lstat(path).st_mode) or
                                                stat.S_ISSOCK(os.lstat(path).st_mode)):
            # opening a FIFO for writing blocks until someone reads it: every command would hang
            # (lstat: /dev/stdout, a link to whatever fd 1 is, stays allowed)
            raise ConfigError(f'{cfg.config_file}: key "{key}": {path} is a FIFO or a socket, not a file')
        if existing == path and not folder and os.path.islink(path) and not follows_last_link(path):
            raise _link_refused(key, path)
        if existing != path and not os.path.isdir(existing):
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot create {path}: {existing} is not a directory')
        if not os.access(existing, os.W_OK | (os.X_OK if existing != path else 0)):
            what = (f"write in {path}" if folder else f"open {key} {path}") if existing == path else f"create {path}"
            raise NotPermittedError(f"cannot {what}: Permission denied")


def _refuse_beside_orphans(svc: Service) -> None:
    """Start nothing beside processes that hold lock files deleted from under them:
    fresh lock files would let a second main in (issue #6)."""
    if not svc.lock_file_missing():
        return
    orphans = [r for r in svc.slots()[0] if r.running and probe.DELETED_LOCK in r.stale]
    if orphans:
        held = ", ".join(f"{r.label} (pid {r.pid})" for r in orphans)
        raise ActionFailedError(f"{held} still hold slots whose lock files were deleted (was {svc.cfg.pid_dir} "
                                f"removed while {svc.cfg.name} ran?); run stop first")


def _stop_orphans(svc: Service, reports: list[SlotReport]) -> Outcome:
    """Stop the holders of deleted lock files: the usual ladder, standbys first, but
    without the control lock and the stop file, which were in the removed pid_dir."""
    svc.say(f"{svc.cfg.pid_dir} is gone, yet {len(reports)} processes hold its deleted lock files", "Found")
    survivors = _stop_standbys(svc, reports)
    targets = _targets(svc, reports, Role.MAIN)
    survivors += _end(svc, targets, Role.MAIN)
    for report, _t in targets:
        if report not in survivors:
            svc.say(f"main #{report.slot} (pid {report.pid})", "Stopped")
    for report in survivors:
        svc.say(f"{report.label} (pid {report.pid}) still holds its slot", "Failed", ok=False)
    return svc.outcome("stop", 1 if survivors else 0, svc.slots()[0])


def _clean_stale(svc: Service, stale: list[probe.Stale]) -> None:
    """Remove stale pid files (re-read first: a new holder may have just renamed its own)."""
    for item in stale + probe.unknown_pid_files(svc.layout, svc.cfg.name):
        now = read_pid_file(item.path)
        if now is None or (now.pid is not None and now.pid != item.pid):
            continue  # gone, or replaced by a process that has just taken the slot
        if remove_stale(item.path):
            svc.say(f"removed stale {os.path.basename(item.path)} ({item.why})", "OK")
        else:
            svc.say(f"cannot remove stale {item.path} ({item.why})", "Failed", ok=False)


def _spawn(svc: Service, count: int) -> list[spawn.Report]:
    spec = svc.cfg.worker_spec()
    env = spawn.worker_environment(spec)
    started = [spawn.spawn(spec, env) for _ in range(count)]
    timeout = SPAWN_TIMEOUT + (svc.cfg.ready_timeout or 0)
    return spawn.collect(started, timeout)


def _fill(svc: Service, reports: list[SlotReport]) -> int:
    """Spawn one process per free slot; returns the LSB status of the attempt."""
    free = [r for r in reports if not r.running]
    if not free:
        return 0
    _cut_back_off(svc)
    status = 0
    failures: set[str] = set()
    started: set[tuple[str, int | None]] = set()
    others = False
    for report in _spawn(svc, len(free)):
        if report.kind in ("main", "standby"):
            svc.say(f"{report.kind} #{report.slot} started (pid {report.pid})", "Started")
            started.add((report.kind, report.slot))
        elif report.kind == "noslot":
            svc.log.trace(f"spawned process {report.pid} found every slot taken")
            others = True
        elif report.message not in failures:
            failures.add(report.message)
            if report.kind == "import-error":
                svc.say(f"cannot start: {report.message}", "Failed", ok=False)
                status = 5
            elif report.kind == "stopfile":
                svc.say(f"not started: standby stop file {svc.cfg.standby_stop_file} exists", "Failed", ok=False)
                status = max(status, 1)
            else:
                svc.say(f"cannot start: {report.message}", "Failed", ok=False)
                status = status or 1
    if others:  # a slot was filled by another process meanwhile (a promoted main's replacement standby)
        before = {(r.role.value, r.slot) for r in reports if r.running}
        for now in svc.slots()[0]:
            key = (now.role.value, now.slot)
            if now.running and key not in before and key not in started:
                svc.say(f"{now.label} started (pid {now.pid})", "Started")
    return status


def _cut_back_off(svc: Service) -> None:
    """A person (or cron) asked for processes: end a crash-loop back-off wait."""
    found = read_pid_file(svc.layout.backoff_file)
    if found is None or found.pid is None or not probe.is_worker_of(found.pid, svc.layout, svc.cfg.name):
        return
    target = probe.open_target(found.pid)
    if target is not None:
        target.signal(_signal.SIGTERM, group=False)
        target.exited(svc.cfg.signal_timeout)
        target.close()
        svc.say(f"crash-loop back-off of pid {found.pid} cut short", "OK")


def _touch(path: str) -> None:
    """Make ``path`` exist, never through a symlink (a link planted in pid_dir must not
    make a root controller create files elsewhere: the link is removed) and never
    blocking (opening a FIFO for writing waits for a reader; it exists: enough) (issue #6)."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads: it exists, which is all we want
            return
        if exc.errno != errno.ELOOP:
            raise
        os.unlink(path)
        fd = os.open(path, flags, 0o644)
    os.close(fd)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _targets(svc: Service, reports: list[SlotReport], role: Role) -> list[tuple[SlotReport, probe.Target]]:
    """A pidfd on each holder of a ``role`` slot, opened first and then checked once
    more against the slot's lock: from then on the pidfd names a process that held
    the slot, so a pid that died and was reused meanwhile is never signalled. (A slot
    whose lock file was deleted under it was found through its holder's fds just now.)"""
    found = []
    for report in reports:
        if report.role is role and report.pid is not None:
            target = probe.open_target(report.pid)
            if target is None:
                continue
            path = svc.layout.lock_file(role.value, report.slot)
            if os.path.exists(path) and not flock.holds_path(report.pid, path):
                svc.log.warn(f"pid {report.pid} no longer holds {report.label}: not signalled")
                target.close()
                continue
            found.append((report, target))
    return found


def _end(svc: Service, targets: list[tuple[SlotReport, probe.Target]], role: Role) -> list[SlotReport]:
    """The stop ladder for ``targets``, all at once; returns the slots whose holder survived.

    Mains: ``main_stop_file`` (``%p`` -> pid) and ``stop_file_kill_timeout``, then
    each of ``stop_signals`` with ``signal_kill_timeout`` between them; with
    ``kill_mode = "group"`` every signal goes to the main's process group, and
    the ladder goes on while anything of the group lives. Standbys: TERM, KILL.
    Exits are waited for on pidfds, so this returns as soon as they are gone.
    """
    cfg = svc.cfg
    group = role is Role.MAIN and cfg.kill_mode == "group"
    alive = [t for _r, t in targets]
    stop_files: list[str] = []
    if role is Role.MAIN and cfg.main_stop_file:
        for target in alive:
            path = cfg.main_stop_file.replace("%p", str(target.pid))
            try:
                _touch(path)
                stop_files.append(path)
            except OSError as exc:
                svc.log.warn(f"cannot touch main stop file {path}: {exc.strerror}")
        alive = _still_alive(alive, time.monotonic() + cfg.stop_file_timeout, group)
    ladder = cfg.stop_signals if role is Role.MAIN else ("TERM", "KILL")
    for number, name in enumerate(ladder):
        if not alive:
            break
        for target in alive:
            svc.log.trace(f"sending SIG{name} to {role.value} pid {target.pid}{' and its group' if group else ''}")
            target.signal(getattr(_signal, "SIG" + name), group)
        last = number == len(ladder) - 1
        alive = _still_alive(alive, time.monotonic() + (cfg.signal_timeout if not last else max(cfg.signal_timeout, 1.0)),
                             group)
    for path in stop_files:
        _remove(path)
    survivors = {t.pid for t in alive}
    if cfg.locks.engine == "zookeeper":  # issue #7: free their lock nodes now, not at session expiry
        from .locks import zookeeper

        zookeeper.release_exited(cfg, [t.pid for _r, t in targets if t.pid not in survivors], svc.log)
    for _r, target in targets:
        target.close()
    return [r for r, t in targets if t.pid in survivors]


def _still_alive(targets: list[probe.Target], deadline: float, group: bool) -> list[probe.Target]:
    left = set(probe.wait_for_exit([t.pidfd for t in targets], deadline))
    alive = [t for t in targets if t.pidfd in left]
    if group:
        for target in targets:
            if target.pidfd not in left and target.pgid and target.group_left():
                if probe.wait_for_group(target.pgid, deadline):
                    alive.append(target)
    return alive


def _end_strays(svc: Service, grace: float | None = None) -> int:
    """Workers that hold no slot yet (starting, or in crash-loop back-off) leave by
    themselves once the stop file exists; wait for that, then TERM and KILL.
    Returns how many of ours survived."""
    starting: list[int] = []
    pids = probe.strays(svc.layout, svc.cfg.name, starting)
    if not pids and not starting:
        return 0
    targets = [t for t in (probe.open_target(p) for p in pids + starting) if t is not None]
    deadline = time.monotonic() + (svc.cfg.signal_timeout if grace is None else grace)
    left = _still_alive(targets, deadline, group=False)
    # Signal only those now known to be ours: a replacement standby still starting
    # when its main was stopped shows it by now, or is another service's (issue #6).
    left = [t for t in left if t.pid in pids or probe.is_worker_of(t.pid, svc.layout, svc.cfg.name)]
    for name in ("TERM", "KILL"):
        for target in left:
            target.signal(getattr(_signal, "SIG" + name), group=False)
        left = _still_alive(left, time.monotonic() + svc.cfg.signal_timeout, group=False)
    for target in targets:
        svc.log.trace(f"starting or backed-off worker {target.pid} ended")
        target.close()
    for target in left:
        svc.say(f"worker {target.pid} (holding no slot) survived TERM and KILL", "Failed", ok=False)
    return len(left)


def _wait_for_the_last(svc: Service) -> int:
    """Wait until every process of the service has exited, slot or no slot.

    A main that has returned gives its slot back at once, yet may take a while to
    exit (atexit handlers, a thread that outlives the function); a standby that its
    main spawned just before being stopped has no name in pid_dir yet. Every worker
    holds the alive lock shared for its whole life, so taking it exclusively is the
    answer. Those still holding it after signal_kill_timeout get TERM, then KILL.
    Returns how many survived.
    """
    path = svc.layout.alive_lock
    if not os.path.exists(path):
        return 0  # no worker of this hadctl ever ran here (or HADaemon::Control's)
    for name in (None, "TERM", "KILL"):
        if name is not None:
            for target in [t for t in map(probe.open_target, flock.holders_of(path)) if t is not None]:
                svc.log.warn(f"pid {target.pid} holds no slot but has not exited: SIG{name}")
                target.signal(getattr(_signal, "SIG" + name), group=False)
                target.close()
        fd = flock.take_control(path, svc.cfg.signal_timeout)
        if fd is not None:
            os.close(fd)
            return 0
    left = flock.holders_of(path)
    for pid in left:
        svc.say(f"pid {pid} (holding no slot) survived TERM and KILL", "Failed", ok=False)
    return len(left)


def _refresh_standbys_stop(svc: Service, reports: list[SlotReport]) -> list[SlotReport]:
    """First half of refreshing the standbys (restart, upgrade): make the standbys
    leave (stop file, so none is spawned meanwhile, and TERM), then remove the stop
    file. Returns the standbys that survived."""
    path = svc.cfg.standby_stop_file
    try:
        _touch(path)
    except PermissionError as exc:
        raise NotPermittedError(f"cannot create standby stop file {path}: {exc.strerror}") from exc
    except OSError as exc:
        raise ActionFailedError(f"cannot create standby stop file {path}: {exc.strerror}") from exc
    survivors = _stop_standbys(svc, reports, quiet_lines=True)
    _remove(path)
    return survivors


def _stop_standbys(svc: Service, reports: list[SlotReport], quiet_lines: bool = False,
                   targets: list[tuple[SlotReport, probe.Target]] | None = None) -> list[SlotReport]:
    targets = _targets(svc, reports, Role.STANDBY) if targets is None else targets
    survivors = _end(svc, targets, Role.STANDBY)
    # Every standby that held a slot, including those already gone (the stop file
    # made them leave before their pidfd could be opened).
    for report in [r for r in reports if r.role is Role.STANDBY and r.running]:
        if report in survivors:
            svc.say(f"standby #{report.slot} (pid {report.pid}) survived TERM and KILL", "Failed", ok=False)
        elif not quiet_lines:
            svc.say(f"standby #{report.slot} (pid {report.pid})", "Stopped")
    return survivors


# ------------------------------------------------------------------ actions


def start(cfg: ServiceConfig) -> Outcome:
    """Remove the stop file and spawn whatever main and standby slots are free."""
    svc = Service(cfg)
    _prepare(svc)
    with _control(svc):
        _remove(cfg.standby_stop_file)
        return _start_locked(svc, "start")


def _start_locked(svc: Service, action: str) -> Outcome:
    reports, stale = svc.slots()
    _clean_stale(svc, stale)
    if all(r.running for r in reports):
        svc.say("Already Running", "OK")
        return svc.outcome(action, 0, reports)
    status = _fill(svc, reports)
    return svc.outcome(action, status, svc.slots()[0])


def fork(cfg: ServiceConfig) -> Outcome:
    """For cron: refuse while the stop file exists, else spawn whatever is missing."""
    svc = Service(cfg)
    _prepare(svc)
    with _control(svc):
        # Checked only under the control lock: restart touches the stop file for a
        # moment (to clear the standbys), and a fork racing it must not fail (issue #6).
        if os.path.lexists(cfg.standby_stop_file):
            svc.say(f"not forking: standby stop file {cfg.standby_stop_file} exists", "Failed", ok=False)
            return svc.outcome("fork", 1)
        reports, stale = svc.slots()
        _clean_stale(svc, stale)
        status = _fill(svc, reports)
        return svc.outcome("fork", status, svc.slots()[0] if svc.steps else reports)


def stop(cfg: ServiceConfig) -> Outcome:
    """Touch the stop file; stop standbys, then mains (stop ladder); clean pid files."""
    svc = Service(cfg)
    if not os.path.isdir(cfg.pid_dir):
        orphans = [r for r in svc.slots()[0] if r.running]
        if orphans:
            return _stop_orphans(svc, orphans)
        svc.say("Not Running", "OK")
        return svc.outcome("stop", 0)
    with _control(svc):
        return _stop_locked(svc)


def _stop_locked(svc: Service) -> Outcome:
    cfg = svc.cfg

    def read() -> list[SlotReport]:
        return svc.slots()[0] + probe.extra_slots(svc.layout, cfg.locks.max_procs, cfg.locks.standby_max_procs)

    reports = read()  # before the stop file: standbys leave on it, and each is named as Stopped
    try:
        _touch(cfg.standby_stop_file)
    except OSError as exc:
        svc.say(f"cannot create standby stop file {cfg.standby_stop_file}: {exc.strerror}", "Failed", ok=False)
    stopped_any = False
    survivors: list[SlotReport] = []
    for round_ in range(5):  # a respawn racing us is caught on the next round
        if round_:
            reports = read()
        if not any(r.running for r in reports):
            break
        stopped_any = True
        # TERM the standbys first, but wait for them together with the mains: a
        # standby takes a few ms to leave, and one that grabs a main slot meanwhile
        # kills itself before running any code (it was asked to leave).
        standbys = _targets(svc, reports, Role.STANDBY)
        for _report, target in standbys:
            target.signal(_signal.SIGTERM, group=False)
        targets = _targets(svc, reports, Role.MAIN)
        survivors = _end(svc, targets, Role.MAIN)
        survivors += _stop_standbys(svc, reports, targets=standbys)
        for report in [r for r in reports if r.role is Role.MAIN and r.running]:
            if report not in survivors:
                svc.say(f"main #{report.slot} (pid {report.pid})", "Stopped")
    strays_left = _end_strays(svc) + _wait_for_the_last(svc)
    reports, stale = svc.slots()
    reports += probe.extra_slots(svc.layout, cfg.locks.max_procs, cfg.locks.standby_max_procs)
    _clean_stale(svc, stale)
    for slot in range(1, cfg.locks.max_procs + 1):
        _remove(svc.layout.ready_file(slot))
    running = [r for r in reports if r.running]
    for report in running:
        svc.say(f"{report.label} (pid {report.pid}) still holds its slot", "Failed", ok=False)
    if not running:
        _remove(svc.layout.starts_file)  # a clean stop ends any crash-loop history
    if not stopped_any:
        svc.say("Not Running", "OK")
    return svc.outcome("stop", 1 if running or strays_left else 0, reports)


def hard_restart(cfg: ServiceConfig) -> Outcome:
    """stop, then start; exits as start does."""
    svc = Service(cfg)
    _prepare(svc)
    with _control(svc):
        stopped = _stop_locked(svc)
        if stopped.exit_status != 0:
            return svc.outcome("hard-restart", stopped.exit_status, list(stopped.slots))
        _remove(cfg.standby_stop_file)
        return _start_locked(svc, "hard-restart")


def restart(cfg: ServiceConfig) -> Outcome:
    """Zero-downtime restart: fresh standbys first, then mains one at a time.

    1. stop the standbys (stop file + TERM, so waiting ones leave at once);
    2. remove the stop file and spawn new standbys, which import the new code;
    3. for each main: stop it, then wait until another process holds its slot
       (and says ready, when ``ready_timeout`` is set) before the next one;
    4. refill the standbys. On failure stop there, naming the slot; exit 1.
    """
    svc = Service(cfg)
    _prepare(svc)
    with _control(svc):
        reports, stale = svc.slots()
        if not any(r.running for r in reports if r.role is Role.MAIN):
            _remove(cfg.standby_stop_file)
            return _start_locked(svc, "restart")
        _clean_stale(svc, stale)
        if _refresh_standbys_stop(svc, reports):
            return svc.outcome("restart", 1, svc.slots()[0])
        if cfg.locks.standby_max_procs == 0:
            return _restart_without_standbys(svc, reports)
        reports = svc.slots()[0]
        if _fill(svc, [r for r in reports if r.role is Role.STANDBY]) != 0:
            svc.say("restart stopped: new standbys did not start; the old mains still run", "Failed", ok=False)
            return svc.outcome("restart", 1, svc.slots()[0])
        for report in [r for r in reports if r.role is Role.MAIN and r.running]:
            if not _hand_over(svc, report):
                return svc.outcome("restart", 1, svc.slots()[0])
        reports = svc.slots()[0]
        status = _fill(svc, [r for r in reports if r.role is Role.STANDBY or not r.running])
        return svc.outcome("restart", min(status, 1), svc.slots()[0])  # SPEC: restart exits 0 or 1


def _hand_over(svc: Service, report: SlotReport) -> bool:
    """Stop the main of one slot and wait until a new process holds it (and is ready)."""
    from .watch import FolderWatch

    cfg = svc.cfg
    watch = FolderWatch(cfg.pid_dir)
    try:
        targets = _targets(svc, [report], Role.MAIN)
        if not targets:  # it left on its own meanwhile
            pass
        elif _end(svc, targets, Role.MAIN):
            svc.say(f"main #{report.slot} (pid {report.pid}) did not stop; restart stopped there", "Failed", ok=False)
            return False
        wait = max(cfg.locks.interval, 5.0) + (cfg.ready_timeout or 0)
        holder = _wait_for_new_holder(svc, watch, report, time.monotonic() + wait)
        if holder is None:
            svc.say(f"main #{report.slot}: no standby took the slot within {wait:g} s; restart stopped there",
                    "Failed", ok=False)
            return False
        if cfg.ready_timeout is not None:
            if not _wait_for_ready(svc, watch, report.slot, holder, time.monotonic() + cfg.ready_timeout):
                svc.say(f"main #{report.slot} (pid {holder}) did not say ready within {cfg.ready_timeout:g} s; "
                        "restart stopped there", "Failed", ok=False)
                return False
        svc.say(f"main #{report.slot} (pid {report.pid}) replaced by pid {holder}", "OK")
        return True
    finally:
        watch.close()


def _wait_for_new_holder(svc: Service, watch: "object", report: SlotReport, deadline: float) -> int | None:
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
        if svc.cfg.locks.engine == "zookeeper":  # issue #7: another host's standby may take the slot
            from .locks import zookeeper

            remote = zookeeper.new_holder(svc.cfg, report.slot, report.pid, svc.log)
            if remote is not None:
                svc.log.info(f"main #{report.slot} taken over by pid {remote[1]} on {remote[0]}")
                return remote[1]
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        # Woken by the new main renaming its pid file; the timeout only bounds a missed event.
        if select.select([watch.fd], [], [], min(left, 0.05))[0]:  # type: ignore[attr-defined]
            watch.names()  # type: ignore[attr-defined]


def _wait_for_ready(svc: Service, watch: "object", slot: int, pid: int, deadline: float) -> bool:
    import select

    path = svc.layout.ready_file(slot)
    if svc.cfg.locks.engine == "zookeeper" and flock.HolderProbe().holder(svc.layout.lock_file("main", slot),
                                                                          [pid]) != pid:
        return True  # issue #7: held on another host, whose ready file this host cannot see
    while True:
        found = read_pid_file(path)
        if found is not None and found.pid == pid:
            return True
        left = deadline - time.monotonic()
        if left <= 0 or not probe.is_alive(pid):
            return False
        if select.select([watch.fd], [], [], min(left, 0.5))[0]:  # type: ignore[attr-defined]
            watch.names()  # type: ignore[attr-defined]


def _restart_without_standbys(svc: Service, reports: list[SlotReport]) -> Outcome:
    """With no standby slots a gap is unavoidable: stop each main, start a new one."""
    for report in [r for r in reports if r.role is Role.MAIN and r.running]:
        if _end(svc, _targets(svc, [report], Role.MAIN), Role.MAIN):
            svc.say(f"main #{report.slot} (pid {report.pid}) did not stop; restart stopped there", "Failed", ok=False)
            return svc.outcome("restart", 1, svc.slots()[0])
        status = _fill(svc, [r for r in svc.slots()[0] if r.role is Role.MAIN])
        if status != 0:
            return svc.outcome("restart", status, svc.slots()[0])
    return svc.outcome("restart", 0, svc.slots()[0])


def reload(cfg: ServiceConfig) -> Outcome:
    """SIGHUP to each main; NotRunningError (7) when no main runs."""
    svc = Service(cfg)
    if not os.path.isdir(cfg.pid_dir):  # removed under running mains? they hold its deleted lock files
        return _reload_locked(svc)
    with _control(svc):
        return _reload_locked(svc)


def _reload_locked(svc: Service) -> Outcome:
    reports, _stale = svc.slots()
    targets = _targets(svc, reports, Role.MAIN)
    if not targets:
        raise NotRunningError(f"{svc.cfg.name}: no main is running, nothing to reload")
    for report, target in targets:
        target.signal(_signal.SIGHUP, group=False)
        target.close()
        svc.say(f"main #{report.slot} (pid {report.pid}) sent SIGHUP", "OK")
    return svc.outcome("reload", 0, reports)


def upgrade(cfg: ServiceConfig) -> Outcome:
    """Refresh standbys, then touch ``main_upgrade_file`` for each main and wait for its removal."""
    import select

    from .watch import IN_DELETE_SELF, FolderWatch

    svc = Service(cfg)
    if not cfg.main_upgrade_file:
        raise ConfigError(f'{cfg.config_file}: key "main_upgrade_file": required by upgrade')
    _prepare(svc)
    with _control(svc):
        reports, _stale = svc.slots()
        mains = [r for r in reports if r.role is Role.MAIN and r.running]
        if not mains:
            raise ActionFailedError(f"{cfg.name}: no main is running, nothing to upgrade")
        if _refresh_standbys_stop(svc, reports) or \
                _fill(svc, [r for r in svc.slots()[0] if r.role is Role.STANDBY]) != 0:
            return svc.outcome("upgrade", 1, svc.slots()[0])
        status = 0
        timeout = cfg.upgrade_timeout if cfg.upgrade_timeout is not None else cfg.kill_timeout
        for report in mains:
            path = cfg.main_upgrade_file.replace("%p", str(report.pid))
            try:
                watch = FolderWatch(os.path.dirname(path), 0x200 | IN_DELETE_SELF)  # IN_DELETE
            except OSError as exc:
                svc.say(f"main #{report.slot}: cannot watch {os.path.dirname(path)}: {exc.strerror}", "Failed",
                        ok=False)
                status = 1
                continue
            try:
                try:
                    _touch(path)
                except OSError as exc:
                    svc.say(f"main #{report.slot}: cannot create {path}: {exc.strerror}", "Failed", ok=False)
                    status = 1
                    continue
                deadline = time.monotonic() + timeout
                while os.path.exists(path) and time.monotonic() < deadline:
                    select.select([watch.fd], [], [], max(0.0, deadline - time.monotonic()))
                    watch.names()
            finally:
                watch.close()
            if os.path.exists(path):
                _remove(path)
                svc.say(f"main #{report.slot} (pid {report.pid}) did not take the upgrade within {timeout:g} s",
                        "Failed", ok=False)
                status = 1
            else:
                svc.say(f"main #{report.slot} (pid {report.pid}) upgraded", "OK")
        return svc.outcome("upgrade", status, svc.slots()[0])


def status(cfg: ServiceConfig, holder_probe: flock.HolderProbe | None = None) -> Outcome:
    """Read every expected slot from its lock: 0 all running, 3 none, 1 some.

    ``status --all`` passes one ``holder_probe`` for all its services, so
    /proc/locks is read at most once.
    """
    svc = Service(cfg)
    reports, _stale = svc.slots(holder_probe)
    reports += probe.extra_slots(svc.layout, cfg.locks.max_procs, cfg.locks.standby_max_procs)
    zk_problem = None
    if cfg.locks.engine == "zookeeper":  # issue #7: main slots may be held on other hosts
        from .locks import zookeeper

        reports, zk_problem = zookeeper.status_slots(cfg, reports, svc.log, probe.is_alive)
    for report in reports:
        stale = f" (stale: {'; '.join(report.stale)})" if report.stale else ""
        if report.running:
            on = f" on {report.host}" if report.host is not None else ""
            svc.steps.append(Step(f"{report.label} (pid {report.pid}{on}){stale}", "Running", True))
        else:
            svc.steps.append(Step(f"{report.label}{stale}", "Not Running", False))
    detail: dict[str, object] = {}
    found = read_pid_file(svc.layout.backoff_file)
    if found is not None and found.pid is not None and probe.is_worker_of(found.pid, svc.layout, cfg.name):
        delay = _second_line(svc.layout.backoff_file)
        svc.steps.append(Step(f"crash loop: standby pid {found.pid} is backing off {delay} s", "Back-off", False))
        detail["backoff"] = {"pid": found.pid, "delay": float(delay) if delay else None}
    if zk_problem is not None:  # issue #7: who holds the main slots is unknown: LSB status 4
        svc.steps.append(Step(zk_problem, "Unknown", False))
        return svc.outcome("status", 4, reports, **detail)
    return svc.outcome("status", status_code(reports), reports, **detail)


def _second_line(path: str) -> str:
    try:
        with open(path) as handle:
            lines = handle.read().splitlines()
    except OSError:
        return ""
    return lines[1].strip() if len(lines) > 1 else ""


def status_code(reports: list[SlotReport]) -> int:
    running = sum(r.running for r in reports)
    if running == len(reports):
        return 0
    return 3 if running == 0 else 1


def foreground(cfg: ServiceConfig) -> int:
    """Run the entrypoint in this process: no fork, no locks. Returns its exit status."""
    import sys

    from .entrypoint import EntrypointError, exit_status, resolve
    from .errors import NotInstalledError

    sys.path[:0] = list(cfg.python_path)
    os.environ.update(dict(cfg.env))
    if cfg.directory:
        os.chdir(cfg.directory)
    if cfg.umask is not None:
        os.umask(cfg.umask)
    try:
        value = resolve(cfg.entrypoint)
    except EntrypointError as exc:
        raise NotInstalledError(f"cannot run {cfg.entrypoint}: {exc}") from exc
    try:
        code = value(*cfg.args)
    except SystemExit as exc:
        code = exc.code
    except Exception:  # noqa: BLE001 - the service's own failure, as a main reports it
        import traceback

        traceback.print_exc()
        return 1
    return exit_status(code)
