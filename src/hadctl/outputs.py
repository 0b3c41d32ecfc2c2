"""Where a worker's stdout and stderr go: files that can be reopened, or syslog.

Worker side (imported by worker.py: standard library, lean and log only):

* ``Outputs``: fds 1 and 2 of a worker and the files behind them (log_file for
  a standby; stdout_file/stderr_file once main). Its handler for
  ``reopen_signal`` (USR2 by default; Python leaves it alone) opens each file
  again by name (O_APPEND, through ``log.open_append``: the same owner and
  symlink rules as at start) and dup2()s it in place, so after logrotate has
  renamed a file the worker writes to the new one, with no restart. The handler
  is installed before the entrypoint runs; code that installs its own handler
  for that signal opts in by calling ``hadctl.reopen_outputs()`` from it.
* the syslog forwarder, for ``stdout_file``/``stderr_file = "syslog"``: a child
  process of the worker, started while it is still a standby (a promotion pays
  nothing), reading one pipe per stream and sending each line as one datagram
  to the local syslog socket (``$HADCTL_SYSLOG_SOCKET``, else /dev/log), tagged
  ``NAME[PID]``, stdout at ``info`` and stderr at ``err`` of ``syslog_facility``.
  A child process and not a thread: when the main dies, even by SIGKILL, what it
  wrote is still in the pipe, and the forwarder reads it to the end (EOF comes
  when the last writer, the main or a child of it, is gone) before it exits; a
  thread would die with the main and lose it. It ignores TERM/INT/HUP for the
  same reason, holds the service's alive lock (a stop waits until it has sent
  everything), blocks when syslogd is slow (nothing dropped), and appends a line
  it cannot send (no syslogd) to log_file rather than lose it (when log_file is
  "syslog" too, there is no file: such a line is dropped). The sending itself is
  syslogsend.py's, shared with hadctl's own log for ``log_file = "syslog"``.
  With ``log_file = "syslog"`` a standby's own fds 1 and 2 go to the forwarder
  too (they would go to log_file), and stdout_file/stderr_file default to it.

Controller side (imported inside functions: control, stopping...): the actions
``reopen-logs``, ``logs`` and ``get-logrotate``.
"""
from __future__ import annotations

import os
import sys

from . import lean
from .log import open_append

if lean.TYPE_CHECKING:
    from .config import ServiceConfig
    from .log import Log
    from .model import Outcome, SlotReport
    from .spec import WorkerSpec

SYSLOG = "syslog"  # as config.SYSLOG (the worker does not import config)
INFO, ERR = 6, 3
_STDERR_FD = 3  # where the forwarder reads the stderr pipe (stdout's is its stdin)
_ALIVE_FD = 4  # where it holds the service's alive lock
# Signals the worker itself lives by (leave, stop-file events, timers): never reopen_signal.
RESERVED = ("TERM", "INT", "KILL", "IO", "ALRM", "PIPE")


# ---------------------------------------------------------------- worker side


class Outputs:
    """fds 1 and 2 of this worker and what they are attached to (a path or "syslog")."""

    __slots__ = ("spec", "log", "targets", "pipes")

    def __init__(self, spec: WorkerSpec, log: Log) -> None:
        """Install the reopen handler now: until then reopen_signal would kill us."""
        self.spec = spec
        self.log = log
        self.targets = {1: spec.log_file, 2: spec.log_file}  # spawn.py's _stdio_to_log
        self.pipes: dict[int, int] = {}  # fd -> write end of the forwarder's pipe
        self.catch()

    def catch(self) -> None:
        """Install the reopen handler (again as main: the worker resets HUP then)."""
        if self.spec.reopen_signal in RESERVED:
            self.log.error(f"reopen_signal {self.spec.reopen_signal} is the worker's own: "
                           "output files are not reopened")
            return
        lean.set_handler(lean.signum(self.spec.reopen_signal), self._on_reopen_signal)

    def _on_reopen_signal(self, _signum: int, _frame: object) -> None:
        self.reopen()

    def start_forwarder(self, alive_fd: int) -> None:
        """Start the syslog forwarder if stdout_file or stderr_file is "syslog"."""
        spec = self.spec
        standby = spec.log_file == SYSLOG  # a standby's own output goes to syslog as well
        wanted = [fd for fd, path in ((1, spec.stdout_file), (2, spec.stderr_file)) if path == SYSLOG or standby]
        if not wanted:
            return
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        actions: list[tuple[int, ...]] = [(os.POSIX_SPAWN_DUP2, out_read, 0),
                                          (os.POSIX_SPAWN_DUP2, err_read, _STDERR_FD)]
        if alive_fd >= 0:
            actions.append((os.POSIX_SPAWN_DUP2, alive_fd, _ALIVE_FD))
        boot = (f"import sys; sys.path.insert(0, {os.path.dirname(os.path.dirname(os.path.abspath(__file__)))!r}); "
                "from hadctl.outputs import forward; forward()")
        try:
            os.posix_spawn(sys.executable,
                           [sys.executable, "-c", boot, spec.syslog_socket, spec.name, spec.syslog_facility,
                            str(os.getpid()), spec.log_file],
                           dict(spec.environment) or dict(os.environ), file_actions=actions,
                           setsigdef=[lean.SIGTERM, lean.SIGINT, lean.SIGHUP, lean.SIGUSR2], setsigmask=[])
        except OSError as exc:
            for fd in (out_read, out_write, err_read, err_write):
                os.close(fd)
            self.log.error(f"cannot start the syslog forwarder: {exc.strerror}; output goes to "
                           f"{os.devnull if standby else spec.log_file}")
            return
        os.close(out_read)
        os.close(err_read)
        for fd, write_end in ((1, out_write), (2, err_write)):
            if fd in wanted:
                self.pipes[fd] = write_end
                if standby:
                    os.dup2(write_end, fd)
                    self.targets[fd] = SYSLOG
            else:
                os.close(write_end)

    def attach_main(self) -> None:
        """Point fds 1 and 2 at stdout_file and stderr_file (or the forwarder's pipes)."""
        self.catch()
        for fd, path in ((1, self.spec.stdout_file), (2, self.spec.stderr_file)):
            pipe = self.pipes.pop(fd, -1)
            if pipe >= 0 and path == SYSLOG:
                os.dup2(pipe, fd)
                os.close(pipe)
                self.targets[fd] = SYSLOG
                continue
            if pipe >= 0:
                os.close(pipe)  # the standby's own output went there (log_file "syslog"); fd is replaced below
            if path == SYSLOG:
                continue  # the forwarder could not start: stay on log_file (logged then)
            self.targets[fd] = path  # (a reopen-logs tries it again)
            try:
                _attach(path, fd)
            except OSError as exc:
                # a failover must not die on a file it cannot open (logrotate's root 0644
                # create): keep writing where this fd already goes; status names the file
                self.log.error(f"cannot open {'stdout_file' if fd == 1 else 'stderr_file'} {path}: "
                               f"{exc.strerror}; still writing to {_where(fd)}")

    def reopen(self) -> None:
        """Open each output file again by name and put it in place of the old one.
        Never raises: a file that cannot be opened keeps its old fd (and is logged).

        No flush of sys.stdout here: the handler may run inside its flush (a
        reentrant call raises RuntimeError), and what is buffered goes to the new
        file, which is where it belongs."""
        for fd, path in self.targets.items():
            if path == SYSLOG:
                continue
            try:
                _attach(path, fd)
            except OSError as exc:
                self.log.error(f"cannot reopen {path}: {exc.strerror}; still writing to the old file")


def _where(fd: int) -> str:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return f"fd {fd}"


def _attach(path: str, fd: int) -> None:
    new = open_append(path)
    try:
        os.dup2(new, fd)
    finally:
        os.close(new)


# ---------------------------------------------------------------- the forwarder


def forward() -> None:
    """Body of the forwarder: ``-c BOOT SOCKET TAG FACILITY PID FALLBACK``; stdin is
    the stdout pipe, fd 3 the stderr pipe. Returns when both reach EOF."""
    import select

    from .syslogsend import FACILITIES, Sender

    socket_path, tag, facility, pid, fallback = sys.argv[1:6]
    for signum in (lean.SIGTERM, lean.SIGINT, lean.SIGHUP, lean.SIGUSR2):
        lean.set_handler(signum, lean.SIG_IGN)
    code = FACILITIES.get(facility, 3) * 8
    # a line syslogd does not take: appended to log_file; dropped when log_file is syslog too
    sender = Sender(socket_path, f"{tag}[{pid}]".encode(), -1 if fallback == SYSLOG else fallback)
    streams = {0: [b"", code + INFO], _STDERR_FD: [b"", code + ERR]}
    while streams:
        for fd in select.select(list(streams), [], [])[0]:
            chunk = os.read(fd, 65536)
            state = streams[fd]
            data = state[0] + chunk  # type: ignore[operator]
            if chunk:
                *lines, state[0] = data.split(b"\n")
            else:
                lines = [data] if data else []
                del streams[fd]
            for line in lines:
                sender.send(int(state[1]), line)  # type: ignore[call-overload]


# ---------------------------------------------------------------- controller side


def reopen_logs(cfg: ServiceConfig) -> Outcome:
    """Send ``reopen_signal`` to every worker, then wait (REOPEN_TIMEOUT) until each writes
    to its files by their current names, so that postrotate may compress at once.
    NotRunningError (7) when nothing runs."""
    from . import stopping
    from .control import Service
    from .errors import NotRunningError
    from .model import Role

    svc = Service(cfg)
    reports, _stale = svc.slots()
    found = stopping.targets(svc, reports, Role.MAIN) + stopping.targets(svc, reports, Role.STANDBY)
    if not found:
        raise NotRunningError(f"{cfg.name}: nothing is running, no output file to reopen")
    signum = lean.signum(cfg.reopen_signal)
    for _report, target in found:
        target.signal(signum, group=False)
        target.close()
    status = 0
    for report, _target in found:
        files = _files_of(cfg, report.role is Role.MAIN)
        problem = _wait_reopened(report.pid, files) if report.pid is not None else None
        if problem is None:
            svc.say(f"{report.label} (pid {report.pid}) reopened its output files", "OK")
        elif probe_alive(report.pid):
            svc.say(f"{report.label} (pid {report.pid}) did not reopen its output files within "
                    f"{REOPEN_TIMEOUT:g} s of SIG{cfg.reopen_signal}: {problem}", "Failed", ok=False)
            status = 1
    return svc.outcome("reopen-logs", status, svc.slots()[0])


REOPEN_TIMEOUT = 5.0


def probe_alive(pid: int | None) -> bool:
    from .probe import is_alive

    return pid is not None and is_alive(pid)


def _files_of(cfg: ServiceConfig, main: bool) -> dict[int, str]:
    if not main:
        return {} if cfg.log_file == SYSLOG else {1: cfg.log_file, 2: cfg.log_file}
    return {fd: path for fd, path in ((1, cfg.main_stdout), (2, cfg.main_stderr)) if path != SYSLOG}


def _wait_reopened(pid: int, files: dict[int, str], timeout: float = REOPEN_TIMEOUT) -> str | None:
    """None once /proc/PID/fd/N is the file now named by each path; else what was last seen."""
    import time

    deadline = time.monotonic() + timeout
    while True:
        seen = ""
        for fd, path in files.items():
            try:
                if not _same(os.stat(f"/proc/{pid}/fd/{fd}"), path):
                    seen = f"fd {fd} is {os.readlink(f'/proc/{pid}/fd/{fd}')}, not {path}"
                    break
            except PermissionError:  # another user's process: it was signalled, that is all we know
                return None
            except OSError as exc:
                seen = f"cannot see its fd {fd}: {exc.strerror}"
                break
        if not seen:
            return None
        if time.monotonic() > deadline:
            return seen
        time.sleep(0.005)  # the worker runs its handler within milliseconds; nothing to wait on


def _same(found: os.stat_result, path: str) -> bool:
    try:
        there = os.stat(path)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (there.st_dev, there.st_ino)


def unopened(cfg: ServiceConfig, reports: list[SlotReport]) -> list[str]:
    """One line for each output file that a running main of ``reports`` could not open
    (it keeps writing where it wrote before: Outputs.attach_main), for status and start.
    Read from /proc/PID/fd: nothing when that is not ours to see."""
    from .model import Role

    found = []
    for report in reports:
        if report.role is not Role.MAIN or report.pid is None or report.host is not None:
            continue
        for fd, key, path in ((1, "stdout_file", cfg.main_stdout), (2, "stderr_file", cfg.main_stderr)):
            if path == SYSLOG:
                continue
            try:
                if _same(os.stat(f"/proc/{report.pid}/fd/{fd}"), path):
                    continue
                where = os.readlink(f"/proc/{report.pid}/fd/{fd}")
            except OSError:  # gone meanwhile, or another user's process
                continue
            found.append(f"main #{report.slot} (pid {report.pid}): {key} {path} is not open, it writes to {where}; "
                         f"check {_log_name(cfg)} for details")
    return found


def _log_name(cfg: ServiceConfig) -> str:
    """Where hadctl's own log is, for "check ... for details"."""
    return f"syslog (journalctl -t hadctl/{cfg.name})" if cfg.log_file == SYSLOG else cfg.log_file


def get_logrotate(cfg: ServiceConfig) -> str:
    """A logrotate stanza for the service's files, whose postrotate runs reopen-logs."""
    import shlex

    from .initfile import MODULE_SUFFIX, hadctl_path

    command = hadctl_path()
    command = (shlex.quote(command[:-len(MODULE_SUFFIX)]) + MODULE_SUFFIX if command.endswith(MODULE_SUFFIX)
               else shlex.quote(command))

    files = sorted({cfg.log_file, cfg.main_stdout, cfg.main_stderr} - {SYSLOG})
    if not files:
        from .errors import ConfigError

        raise ConfigError(f'{cfg.config_file}: log_file, stdout_file and stderr_file all go to syslog: '
                          "no file to rotate (syslog's own rotation covers them)")
    lines = [f"# logrotate stanza for hadctl service {cfg.name}: hadctl -c {cfg.config_file} get-logrotate",
             "# delaycompress: a line written between the rename and the reopen stays readable",
             " ".join(shlex.quote(f) for f in files) + " {",
             "    daily", "    rotate 14", "    missingok", "    notifempty", "    compress", "    delaycompress"]
    if cfg.identity.uid is not None:
        import grp
        import pwd

        user = cfg.identity.user or str(cfg.identity.uid)
        try:
            gid = cfg.identity.gid if cfg.identity.gid is not None else pwd.getpwnam(user).pw_gid
            group = grp.getgrgid(gid).gr_name
        except KeyError:
            group = str(cfg.identity.gid)
        # The service's user owns the log folder: logrotate must act as that user there.
        lines += [f"    su {user} {group}", f"    create 0644 {user} {group}"]
    lines += ["    sharedscripts", "    postrotate",
              f"        {command} -c {shlex.quote(cfg.config_file)} reopen-logs >/dev/null || true",
              "    endscript", "}"]
    return "\n".join(lines) + "\n"


def logs(cfg: ServiceConfig, follow: bool = False, lines: str | None = None, stderr: bool = False,
         hadctl: bool = False) -> int:
    """Print the last ``lines`` (10) lines of the main's stdout file (``--stderr``: its
    stderr file; ``--hadctl``: log_file); with ``follow``, keep printing what is
    appended, across rotations (reopen by name when the inode changes) and
    truncations. Returns 0; a follow ends with Ctrl-C: 130."""
    from .errors import ConfigError, count_option

    path = cfg.log_file if hadctl else cfg.main_stderr if stderr else cfg.main_stdout
    if path == SYSLOG:
        key = "stderr_file" if stderr and cfg.stderr_file else "stdout_file" if not stderr and cfg.stdout_file \
            else "log_file"
        where = (f"hadctl's lines: journalctl -t hadctl/{cfg.name}" if hadctl
                 else f"the service's lines: journalctl -t {cfg.name}")
        raise ConfigError(f'{cfg.config_file}: {key} is "syslog": read {where} (or /var/log/syslog)')
    count = count_option(lines, 10, "logs -n", "lines")
    out = sys.stdout.buffer
    fd = _open_or_none(path)
    if fd is not None:
        out.write(_tail(fd, count))
        out.flush()
    if not follow:
        if fd is not None:
            os.close(fd)
        return 0
    try:
        return _follow(path, fd, out)
    except KeyboardInterrupt:  # how a follow ends (Ctrl-C): the shell's status, no message
        return 130


def _tail(fd: int, count: int) -> bytes:
    """The last ``count`` lines of ``fd``; leaves the offset at its end."""
    size = os.fstat(fd).st_size
    data, pos = b"", size
    while pos > 0 and data.count(b"\n") <= count:
        step = min(65536, pos)
        pos -= step
        data = os.pread(fd, step, pos) + data
    os.lseek(fd, size, os.SEEK_SET)
    if count == 0:
        return b""
    found = data.split(b"\n")
    tail = found[-count - 1:] if data.endswith(b"\n") else found[-count:]
    return b"\n".join(tail)


def _open_or_none(path: str) -> int | None:
    try:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError as exc:
        from .errors import ActionFailedError

        raise ActionFailedError(f"cannot read {path}: {exc.strerror}") from exc


def _follow(path: str, fd: int | None, out: object) -> int:
    """Print what is appended to ``path``. After a rotation the old file is read to
    its end first, then the new one from its start: nothing between is missed."""
    import select
    import time

    from .watch import IN_CREATE, IN_MOVED_TO, FolderWatch

    watch = FolderWatch(os.path.dirname(path), IN_CREATE | IN_MOVED_TO)
    try:
        while True:
            if fd is not None:
                _copy(fd, out)
                try:
                    now = os.stat(path)
                except FileNotFoundError:
                    now = None
                mine = os.fstat(fd)
                if now is not None and (now.st_dev, now.st_ino) != (mine.st_dev, mine.st_ino):
                    _copy(fd, out)  # the rest of the rotated file
                    os.close(fd)
                    fd = _open_or_none(path)
                    continue
                if now is not None and now.st_size < os.lseek(fd, 0, os.SEEK_CUR):
                    os.lseek(fd, 0, os.SEEK_SET)  # truncated in place (copytruncate)
                    continue
            else:
                fd = _open_or_none(path)
                if fd is not None:
                    continue
            # The folder watch wakes us for a new name; appends are seen within 0.1 s.
            if select.select([watch.fd], [], [], 0.1)[0]:
                watch.names()
            else:
                time.sleep(0)
    finally:
        watch.close()
        if fd is not None:
            os.close(fd)


def _copy(fd: int, out: object) -> None:
    while True:
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        out.write(chunk)  # type: ignore[attr-defined]
    out.flush()  # type: ignore[attr-defined]
