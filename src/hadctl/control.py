"""What every verb works through: ``Service`` (one service during one action), the
controllers' lock, the preparation of folders and files, and filling free slots.

Controllers that change state take turns on ``PID_DIR/hadctl.lock``
(``ControlLock``), so that concurrent runs end coherent. Folders and files are
made and checked before the first fork (``prepare``): bad input leaves state as
it was. Files and folders hadctl makes, opens or removes as root, in pid_dir or
a log folder that the service's user may write, are reached through safepath
(component by component, never through a link that user could plant), and
opened never blocking (``touch``). A pid_dir recorded as another service's is
refused by every action (owner.check, in ``Service``); start records its own.

Imports config, errors, layout, locks.flock, log, model, owner, probe, safepath and
slots; preflight (prepare) and spawn (fill) only where they work, so that stop and
status do not load them (and sockets, only when ``listen`` is set); never click or rich.
"""
from __future__ import annotations

import errno
import os

from . import events, lean, owner, probe, safepath
from . import slots as read_model
from .config import SYSLOG, ServiceConfig
from .errors import ActionFailedError, BusyError, ConfigError, NotPermittedError
from .layout import Layout, read_pid_file, remove_stale
from .locks import flock
from .log import open_append, open_log
from .model import Outcome, SlotReport, Step

if lean.TYPE_CHECKING:
    from socket import socket

    from . import contain, spawn
    from .locks.engine import Engine

CONTROL_TIMEOUT = 60.0


class Service:
    """One service during one action: its config, paths, log and output lines."""

    def __init__(self, cfg: ServiceConfig) -> None:
        owner.check(cfg)
        self.cfg = cfg
        self.layout = Layout(cfg.pid_dir, cfg.locks.path, cfg.locks.standby_path, cfg.standby_stop_file)
        self.log = open_log(cfg.log_file, cfg.name, cfg.syslog_facility)  # "syslog": its stderr if unsent
        self.steps: list[Step] = []
        self._engine: Engine | None = None
        self.listen_sockets: list[socket] | None = None  # sockets.for_workers: given to every worker spawned

    @property
    def engine(self) -> Engine:
        """The lock engine's controller side, made once per action (for ZooKeeper, one
        session for every question the action asks; for flock, nothing to open)."""
        if self._engine is None:
            from .locks.engine import controller_engine

            self._engine = controller_engine(self.cfg, self.log)
        return self._engine

    def say(self, what: str, result: str, ok: bool = True) -> None:
        """One output line (``NAME : what [result]``), also written to the log."""
        self.steps.append(Step(what, result, ok))
        self.log.write("INFO" if ok else "ERROR", f"{what} [{result}]")

    def slots(self, holder_probe: flock.HolderProbe | None = None) -> tuple[list[SlotReport], list[read_model.Stale]]:
        """Every expected slot from its lock, and the stale pid files (read_model.read)."""
        return read_model.read(self.layout, self.cfg.locks, holder_probe, self.lock_owners)

    @property
    def lock_owners(self) -> frozenset[int]:
        """Who may own the service's lock files: root, this controller's user, the
        service's user and the owners of the lock folders (who may make files there
        anyway, and whose files stay trusted when ``user`` changes). A lock file of
        anyone else's was moved in from elsewhere: it is tampered."""
        owners = {0, os.geteuid()}
        if self.cfg.identity.uid is not None:
            owners.add(self.cfg.identity.uid)
        for folder in (self.layout.lock_path, self.layout.standby_lock_path):
            try:
                owners.add(os.lstat(folder).st_uid)
            except OSError:
                pass
        return frozenset(owners)

    def extra_slots(self) -> list[SlotReport]:
        """Slots held beyond the configured counts (read_model.extra_slots)."""
        return read_model.extra_slots(self.layout, self.cfg.locks.max_procs, self.cfg.locks.standby_max_procs)

    def lock_file_missing(self) -> bool:
        """Some expected slot has no lock file (a few stats: no lock is read)."""
        return read_model.lock_file_missing(self.layout, self.cfg.locks)

    def outcome(self, action: str, status: int, slots: list[SlotReport] | None = None,
                **detail: object) -> Outcome:
        """The action's result: the lines said so far, ``slots`` and ``detail`` (for JSON)."""
        return Outcome(self.cfg.name, action, status, tuple(self.steps), tuple(slots or ()),
                       self.cfg.log_file, dict(detail))


class ControlLock:
    """``with ControlLock(svc):`` holds the controllers' lock for the body; another
    controller waits its turn (a class, not contextlib: a fast command's import).

    Raises NotPermittedError (a symlink, or no permission), ConfigError (another
    reason the lock file cannot be opened), BusyError (not free within ``timeout``).
    """

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
                raise refusal(f"cannot take lock {path}", exc) from exc
            raise ConfigError(f"cannot take lock {path}: {exc.strerror}") from exc
        if fd is None:
            raise BusyError(f"another hadctl is working on {self.svc.cfg.name} (it holds {path}); "
                            f"gave up after {self.timeout:g} s")
        self.fd = fd

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


# ------------------------------------------------------------ folders and files


def prepare(svc: Service) -> None:
    """Create pid_dir, lock folders and log files before the first fork.

    Folders we create are given to the service's user, so an unprivileged
    worker can write its pid files. Bad paths fail here, before anything runs:
    ConfigError or NotPermittedError; ActionFailedError beside orphaned holders.
    """
    cfg = svc.cfg
    refuse_beside_orphans(svc)
    check_paths(cfg)
    _warn_of_low_open_files(svc)
    ident = cfg.identity
    chown = os.geteuid() == 0 and ident.uid is not None
    given = (ident.uid or 0, -1 if ident.gid is None else ident.gid) if chown else None
    for key, folder in (("pid_dir", cfg.pid_dir), ("locks.path", cfg.locks.path),
                        ("locks.standby_path", cfg.locks.standby_path)):
        try:
            # as root, never through a link: once pid_dir is the user's, its user could
            # swap the lock folder we just made for a link to /etc
            safepath.make_folders(folder, 0o755, given)
        except (FileExistsError, NotADirectoryError):
            raise ConfigError(f'{cfg.config_file}: key "{key}": {folder} is not a directory') from None
        except PermissionError:
            raise NotPermittedError(f"cannot create {folder}: Permission denied") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refusal(f'key "{key}": cannot create {folder}', exc) from None
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot create {folder}: {exc.strerror}') from None
        if not os.access(folder, os.W_OK):
            raise NotPermittedError(f"cannot write in {folder}: Permission denied")
    for key, path in (("log_file", cfg.log_file), ("stdout_file", cfg.stdout_file),
                      ("stderr_file", cfg.stderr_file)):
        if path is None or path == SYSLOG:  # "syslog": no file (outputs.py)
            continue
        try:
            fd, made = _open_output(path)
        except PermissionError:
            raise NotPermittedError(f"cannot open {key} {path}: Permission denied") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refusal(f"cannot open {key} {path}", exc) from None
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot open {path}: {exc.strerror}') from None
        try:
            if given is not None and made:
                os.fchown(fd, *given)  # the file we made, through its fd
        finally:
            os.close(fd)
    try:
        owner.claim(cfg, given)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise refusal(f"cannot record the owner of {cfg.pid_dir}", exc) from None
        raise ConfigError(f"cannot write {owner.owner_path(cfg)}: {exc.strerror}") from None

    from .contain import prepare_for

    prepare_for(cfg)  # the service's cgroup and its [limits] there (contain.py)


def _warn_of_low_open_files(svc: Service) -> None:
    """The open-files check before the first fork (preflight.check_open_files, imported
    here: only prepare needs it): ActionFailedError for a pool that cannot fit, a
    warning in the log when the limit was capped."""
    from .preflight import check_open_files

    low = check_open_files(svc.cfg)
    if low is not None:
        svc.log.warn(low)


def _open_output(path: str) -> tuple[int, bool]:
    """Open a log or output file for appending: (fd, whether this call created it)."""
    try:
        return safepath.open_beneath(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o644), True
    except FileExistsError:
        return open_append(path), False


def refusal(what: str, exc: OSError) -> NotPermittedError:
    """The one line for a link refused on the way to a path (exit 4), naming the link;
    ``what`` says what was being done."""
    link = exc.filename if isinstance(exc, safepath.LinkRefusedError) else None
    if link is None:
        return NotPermittedError(f"{what}: it is a symbolic link (never followed)")
    return NotPermittedError(f"{what}: {link} is a symbolic link in a folder that others can write "
                             "(never followed as root)")


def check_paths(cfg: ServiceConfig) -> None:
    """Refuse an unusable folder or file before ``prepare`` creates any: a bad
    log_file must not leave new folders in pid_dir. Changes nothing; raises
    ConfigError or NotPermittedError; ``prepare`` still reports whatever this
    cannot foresee."""
    from .preflight import not_a_file, read_only

    for key, path, folder in (("pid_dir", cfg.pid_dir, True), ("locks.path", cfg.locks.path, True),
                              ("locks.standby_path", cfg.locks.standby_path, True),
                              ("log_file", cfg.log_file, False), ("stdout_file", cfg.stdout_file, False),
                              ("stderr_file", cfg.stderr_file, False)):
        if path is None or path == SYSLOG:  # "syslog": no file (outputs.py)
            continue
        try:
            safepath.check_walk(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise refusal(f'key "{key}": {path}', exc) from None
        existing = path
        while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)  # the nearest part of the path that exists
        if existing == path and folder != os.path.isdir(path):
            problem = "is not a directory" if folder else "is a directory"
            raise ConfigError(f'{cfg.config_file}: key "{key}": {path} {problem}')
        why = not_a_file(path) if not folder else None
        if why is not None:
            raise ConfigError(f'{cfg.config_file}: key "{key}": {path} {why}')
        if existing != path and not os.path.isdir(existing):
            raise ConfigError(f'{cfg.config_file}: key "{key}": cannot create {path}: {existing} is not a directory')
        if read_only(existing):  # (a disk error remounted it): no worker could take a slot there
            what = f"start processes in {path}" if folder else f"write {key} {path}"
            raise ActionFailedError(f"cannot {what}: Read-only file system; what runs keeps running, "
                                    "stop and reload still work")
        if not os.access(existing, os.W_OK | (os.X_OK if existing != path else 0)):
            what = (f"write in {path}" if folder else f"open {key} {path}") if existing == path else f"create {path}"
            raise NotPermittedError(f"cannot {what}: Permission denied")


def refuse_beside_orphans(svc: Service) -> None:
    """Start nothing beside processes that hold lock files deleted from under them:
    fresh lock files would let a second main in. Raises ActionFailedError."""
    if not svc.lock_file_missing():
        return
    orphans = [r for r in svc.slots()[0] if r.running and read_model.DELETED_LOCK in r.stale]
    if orphans:
        held = ", ".join(f"{r.label} (pid {r.pid})" for r in orphans)
        raise ActionFailedError(f"{held} still hold slots whose lock files were deleted (was {svc.cfg.pid_dir} "
                                f"removed while {svc.cfg.name} ran?); run stop first")


def touch(path: str) -> None:
    """Make ``path`` exist, never through a symlink and never blocking; raises OSError.

    A link planted in pid_dir (its user may write there) must not make a root
    controller create files elsewhere: a link as the last part is removed (one on
    a folder on the way is refused: safepath.LinkRefusedError). Opening a FIFO for
    writing waits for a reader; a FIFO exists, which is all we want."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW | os.O_NONBLOCK
    try:
        fd = safepath.open_beneath(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ENXIO:  # a FIFO nobody reads: it exists, which is all we want
            return
        if exc.errno != errno.ELOOP or not getattr(exc, "final", True):  # (a folder on the way: refused)
            raise
        safepath.unlink(path)
        fd = safepath.open_beneath(path, flags, 0o644)
    os.close(fd)


def remove(path: str) -> None:
    """Remove ``path`` if it exists (a missing file is what we wanted); NotPermittedError
    when a folder on the way is a link that root does not follow."""
    try:
        safepath.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as exc:
        if exc.errno == errno.EROFS:  # a read-only pid_dir: stop goes on; what stays is said as stale
            return
        if exc.errno != errno.ELOOP:
            raise
        raise refusal(f"cannot remove {path}", exc) from exc


def clean_stale(svc: Service, stale: list[read_model.Stale]) -> None:
    """Remove stale pid files (re-read first: a new holder may have just renamed its own)."""
    for item in stale + read_model.unknown_pid_files(svc.layout, svc.cfg.name):
        now = read_pid_file(item.path)
        if now is None or (now.pid is not None and now.pid != item.pid):
            continue  # gone, or replaced by a process that has just taken the slot
        if remove_stale(item.path):
            svc.say(f"removed stale {os.path.basename(item.path)} ({item.why})", "OK")
        else:
            svc.say(f"cannot remove stale {item.path} ({item.why})", "Failed", ok=False)
    for item in read_model.leftover_temporaries(svc.layout):
        try:
            safepath.unlink(item.path)  # the name itself, never what a link there points to
            svc.log.info(f"removed {os.path.basename(item.path)} ({item.why})")
        except OSError as exc:
            if exc.errno != errno.ENOENT:
                svc.say(f"cannot remove {item.path} ({item.why}): {exc.strerror}", "Failed", ok=False)


def say_tampered(svc: Service, reports: list[SlotReport], log: bool = True) -> bool:
    """A failed line for each slot whose lock file is tampered with (``SlotReport.tampered``);
    True when there was one. ``log``: also into the log file (not for status)."""
    for report in reports:
        if report.tampered is not None:
            what = f"{report.label}: {report.tampered}; nothing is signalled through it"
            svc.say(what, "Tampered", ok=False) if log else svc.steps.append(Step(what, "Tampered", False))
    return any(r.tampered is not None for r in reports)


def say_elsewhere(svc: Service, log: bool = True) -> bool:
    """A failed line for each worker of this service that uses another pid_dir (changed
    in the config while it ran: owner.workers_elsewhere); True when there was one."""
    found = owner.workers_elsewhere(svc.cfg)
    for pid, folder in sorted(found.items()):
        what = (f"pid {pid}, a worker of {svc.cfg.name}, uses pid_dir {folder or '(unknown)'}, not "
                f"{svc.cfg.pid_dir} (changed while it ran?): stop it with its own pid_dir")
        svc.say(what, "Elsewhere", ok=False) if log else svc.steps.append(Step(what, "Elsewhere", False))
    return bool(found)


def suspect(svc: Service, reports: list[SlotReport], log: bool = True, elsewhere: bool = True) -> bool:
    """Say what must keep start, fork, stop and status from trusting the slots: tampered
    lock files, or (with ``elsewhere``, when none of ``reports`` runs) workers using
    another pid_dir. True when there was any."""
    if say_tampered(svc, reports, log):
        return True
    return elsewhere and not any(r.running for r in reports) and say_elsewhere(svc, log)


# ------------------------------------------------------------ filling free slots


def fill(svc: Service, reports: list[SlotReport], standby_extra: int = 0) -> int:
    """Spawn one process per free slot of ``reports``; returns the LSB status of the
    attempt (0; 1 failed; 5 the entrypoint cannot be imported), saying each result.
    ``standby_extra``: they try that many standby slots above the configured ones first
    (restart's new standbys, spec.py)."""
    free = [r for r in reports if not r.running]
    if not free:
        return 0
    _cut_back_off(svc)
    status = 0
    failures: set[str] = set()
    started: set[tuple[str, int | None]] = set()
    others = False
    for report in _spawn(svc, len(free), standby_extra):
        if report.kind in ("main", "standby"):
            svc.say(f"{report.kind} #{report.slot} started (pid {report.pid})", "Started")
            started.add((report.kind, report.slot))
        elif report.kind == "noslot":
            svc.log.trace(f"spawned process {report.pid} found every slot taken")
            others = True
        elif report.message not in failures:
            failures.add(report.message)
            events.record(svc.layout, "spawn_failure", reason=report.kind, message=report.message)
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
    if any(kind == "main" for kind, _slot in started):
        from .outputs import unopened

        new_mains = [r for r in svc.slots()[0] if ("main", r.slot) in started]
        for line in unopened(svc.cfg, new_mains):
            svc.say(line, "Output", ok=False)
    return status


def _spawn(svc: Service, count: int, standby_extra: int = 0) -> list[spawn.Report]:
    """Spawn ``count`` workers and read their reports; a worker that has not reported
    within the spawn timeout is ended with what it started (hung.py), and where it
    hung goes to the log."""
    from . import spawn
    from .hung import end_unreported, spawn_timeout
    from .record import replace

    timeout = spawn_timeout() + (svc.cfg.ready_timeout or 0)
    spec = replace(svc.cfg.worker_spec(), standby_extra=standby_extra, spawn_timeout=timeout)
    env = spawn.worker_environment(spec)  # with the service's marker (contain.MARKER, owner.py)
    listen_fds: tuple[int, ...] = ()
    if svc.cfg.listen:  # every socket in hand before the first fork
        from . import sockets

        listen_fds = sockets.for_workers(svc)
    started = [spawn.spawn(spec, env, listen_fds) for _ in range(count)]
    reports = spawn.collect(started, timeout, tuple(svc.cfg.python_path))
    for report in reports:
        if report.detail:
            svc.log.error(f"pid {report.pid} {report.message}; where it hangs:\n{report.detail.rstrip()}")
    ended = end_unreported(started, reports, _finder(svc), svc.cfg.signal_timeout)
    if ended:
        svc.log.warn(f"ended {len(ended)} processes of workers that did not report: {' '.join(map(str, ended))}")
    return reports


def _finder(svc: Service) -> contain.Finder:
    from .contain import finder_for

    return finder_for(svc.cfg)


def _cut_back_off(svc: Service) -> None:
    """A person (or cron) asked for processes: end a crash-loop back-off wait."""
    found = read_pid_file(svc.layout.backoff_file)
    if found is None or found.pid is None or not probe.is_worker_of(found.pid, svc.layout, svc.cfg.name):
        return
    target = probe.open_target(found.pid)
    if target is not None:
        target.signal(lean.SIGTERM, group=False)
        target.exited(svc.cfg.signal_timeout)
        target.close()
        svc.say(f"crash-loop back-off of pid {found.pid} cut short", "OK")
