"""Make a detached process that runs the hadctl worker (see worker.py).

The recipe, in the order it runs (APUE §13.3, "Coding Rules" for daemons):

  parent:      _fork_and_read_report   fork; reap the child (which tells the
                                       worker's pid on a pipe); move the worker
                                       into its cgroup; feed the spec
  child:       _become_session_leader, _fork_again_and_leave
  grandchild:  _stdio_to_log, _set_rlimits, _drop_privileges, _set_umask,
               _set_nice, _chdir, _reset_signals, _listen_fds_at_3, _close_fds,
               _exec_worker

The parent moves the worker into its cgroup (``_join_cgroup``) while the worker
execs and starts its interpreter: the first move into a cgroup waits for the
kernel (an RCU grace period, 4-25 ms here), and the worker, which does nothing
before it has read its spec, waits for it only if it is quicker.

The grandchild execs a fresh interpreter (the worker), so a standby carries
none of the controller's memory (click, rich, tomllib). The spec goes to it as
framed by spec.py. The worker tells how it ended up on the report pipe, one line
written by ``format_report`` and read by ``parse_report``: ``standby 2 PID``,
``main 1 PID``, ``noslot PID``, ``stopfile PID``, ``import-error PID MESSAGE`` or
``error PID MESSAGE``; the parent reads it against a deadline, never sleeping.
A worker that has not reported by the spawn timeout (``spawn_timeout``) writes a
faulthandler traceback there instead and exits; ``collect`` names the import that
hung (hung.py), and hung.end_unreported ends whatever such workers started.

A forked child never returns into its caller: its body ends in ``os._exit()``
and a failure goes to the report pipe, never to logging.
Imports contain, errors, layout, lean, log, record and spec only (and the standard library).
The worker imports it at its start, for the replacement standby a promoted main
spawns and for the report protocol: so lean's signal calls, not ``signal`` (whose
enum costs a promoting standby milliseconds to import).
"""
from __future__ import annotations

import fcntl
import os
import select
import sys
import time

from . import contain, lean
from .errors import ActionFailedError
from .layout import write_pid_file
from .log import SYSLOG, open_append
from .record import replace
from .spec import WorkerSpec, frame

HADCTL_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BOOT = (f"import sys; sys.path.insert(0, {HADCTL_DIR!r}); "
        "from hadctl.worker import main; main()")
_ALIVE_FD = 4  # where a standby spawned by a main finds the main's alive lock fd
_LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES")  # ours, if systemd started us: not theirs
_OWNER_SHIM = f'{contain.OWNER}=$$; export {contain.OWNER}; exec "$0" -c "$1" -1 "$2"'
_RESET_SIGNALS = ("HUP", "INT", "QUIT", "TERM", "USR1", "USR2", "PIPE", "CHLD", "TTIN", "TTOU", "TSTP")


_IN_FLIGHT: set[int] = set()  # fds made for a spawn under way, which a fork meanwhile must not keep


def _close_in_flight() -> None:
    """In a child forked (by the main's own code) while spawn_from_worker ran in the
    settling thread: the copy of the alive lock's fd must not live on there, or that
    child would hold the alive lock, pass for a worker, and outlive its main unseen."""
    for fd in list(_IN_FLIGHT):
        try:
            os.close(fd)
        except OSError:
            pass
    _IN_FLIGHT.clear()


os.register_at_fork(after_in_child=_close_in_flight)


# The report protocol: one line per spawned process, "KIND [SLOT] PID [MESSAGE]".
MAIN = "main"  # took main slot SLOT and runs the function
STANDBY = "standby"  # took standby slot SLOT and waits for a main slot
NOSLOT = "noslot"  # every slot was taken: left
STOPFILE = "stopfile"  # a stop is under way (the standby stop file exists): left
IMPORT_ERROR = "import-error"  # the entrypoint or warmup cannot be imported: left
ERROR = "error"  # anything else that went wrong: left; MESSAGE says what
KINDS = (MAIN, STANDBY, NOSLOT, STOPFILE, IMPORT_ERROR, ERROR)
_WITH_SLOT = (MAIN, STANDBY)


class Report:
    """What one spawned process said about itself."""

    __slots__ = ("kind", "pid", "slot", "message", "detail")

    def __init__(self, kind: str, pid: int | None, slot: int | None = None, message: str = "",
                 detail: str = "") -> None:
        self.kind = kind
        self.pid = pid
        self.slot = slot
        self.message = message
        self.detail = detail  # more for the log: the traceback of a worker that hung starting

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Report) and (self.kind, self.pid, self.slot, self.message) == \
            (other.kind, other.pid, other.slot, other.message)

    def __repr__(self) -> str:
        return f"Report({self.kind!r}, pid={self.pid}, slot={self.slot}, {self.message!r})"


def format_report(kind: str, pid: int, slot: int | None = None, message: str = "") -> str:
    """One report line (no newline): ``main 1 PID``, ``error PID MESSAGE`` ...

    ``slot`` is given exactly for main and standby. A message is one line:
    newlines become spaces.
    """
    if kind not in KINDS or (slot is not None) != (kind in _WITH_SLOT):
        raise ValueError(f"bad report: {kind!r} slot={slot!r}")
    words = [kind] + ([str(slot)] if slot is not None else []) + [str(pid)]
    if message:
        words.append(message.replace("\n", " "))
    return " ".join(words)


def parse_report(line: str) -> Report:
    """The report ``format_report`` wrote; a line that is not one becomes an ``error`` report saying so."""
    words = line.rstrip("\n").split(" ", 3 if line.startswith(_WITH_SLOT) else 2)
    kind = words[0]
    try:
        if kind in _WITH_SLOT:
            return Report(kind, int(words[2]), int(words[1]), words[3] if len(words) > 3 else "")
        if kind in KINDS:
            return Report(kind, int(words[1]), None, words[2] if len(words) > 2 else "")
    except (ValueError, IndexError):
        pass
    return Report(ERROR, None, None, f"unreadable report {line!r}")


def write_report(fd: int, kind: str, pid: int, slot: int | None = None, message: str = "") -> bool:
    """Write one report line to ``fd``; False when the reader went away (no error)."""
    try:
        os.write(fd, (format_report(kind, pid, slot, message) + "\n").encode("utf-8", "replace"))
    except OSError:
        return False
    return True


class Spawned:
    """A process on its way; ``report_fd`` gives its one-line report, ``pid`` is the
    worker's (None if the fork failed before it was made)."""

    __slots__ = ("report_fd", "buffer", "pid")

    def __init__(self, report_fd: int, pid: int | None = None) -> None:
        self.report_fd = report_fd
        self.buffer = b""
        self.pid = pid


HUNG = "Timeout ("  # how faulthandler.dump_traceback_later's text begins (worker.py, hung.py)


def worker_environment(spec: WorkerSpec) -> dict[str, str]:
    """The environment the worker starts with: the one the controller built
    (environment.py), never the caller's own, plus the service's marker
    (contain.MARKER). systemd's LISTEN_* are set by the worker itself, for its own
    pid; the owner mark (contain.OWNER) by the exec that makes it."""
    env = {k: v for k, v in dict(spec.environment).items() if k not in _LISTEN_VARIABLES and k != contain.OWNER}
    env[contain.MARKER] = spec.service_id
    return env


def spawn(spec: WorkerSpec, env: dict[str, str], listen_fds: tuple[int, ...] = ()) -> Spawned:
    """Start one detached worker for ``spec`` (ServiceConfig.worker_spec()); it holds
    ``listen_fds`` (sockets.for_workers) at fds 3, 4, ..."""
    return _fork_and_read_report(spec, env, listen_fds)


def collect(spawned: list[Spawned], timeout: float, roots: tuple[str, ...] = ()) -> list[Report]:
    """Read each spawned process's report, waiting at most ``timeout`` seconds in all,
    and a grace second more for a worker that hung starting: at ``timeout`` it writes
    where it hangs (faulthandler) on its report pipe and exits (worker.py), and that
    text becomes its report's ``detail``, its message naming the import that hung
    (a dotted name, relative to the first of ``roots``, python_path, that holds it)."""
    deadline = time.monotonic() + timeout + max(1.0, timeout / 10)
    reports: dict[int, Report] = {}
    waiting = {s.report_fd: s for s in spawned}
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            break
        readable, _, _ = select.select(list(waiting), [], [], left)
        for fd in readable:
            item = waiting[fd]
            chunk = os.read(fd, 65536)
            item.buffer += chunk
            if item.buffer.startswith(HUNG.encode()) and chunk:
                continue  # the traceback of a hung worker: read it to its end
            if b"\n" in item.buffer or not chunk:
                reports[fd] = _report_of(item, timeout, roots)
                del waiting[fd]
    for fd, item in waiting.items():
        reports[fd] = _report_of(item, timeout, roots) if item.buffer.startswith(HUNG.encode()) else \
            Report(ERROR, item.pid, None, f"no report within {timeout:g} s")
    for item in spawned:
        os.close(item.report_fd)
    return [reports[item.report_fd] for item in spawned]


def _report_of(item: Spawned, timeout: float, roots: tuple[str, ...]) -> Report:
    """The report in ``item``'s buffer: its line, the traceback of a worker that hung, or
    nothing (it exited without a word)."""
    text = item.buffer.decode("utf-8", "replace")
    if text.startswith(HUNG):
        from .hung import hung_at

        return Report(ERROR, item.pid, None, f"no report within {timeout:g} s: {hung_at(text, roots)}", text)
    line = text.split("\n", 1)[0]
    if not line:
        return Report(ERROR, item.pid, None, "the process exited without reporting its role")
    return parse_report(line)


# ---------------------------------------------------------------- parent


def _fork_and_read_report(spec: WorkerSpec, env: dict[str, str], listen_fds: tuple[int, ...] = ()) -> Spawned:
    """Fork the child, hand the spec to the future worker through a pipe, reap the child.

    The spec travels as spec.frame makes it (marshal: no import cost for the worker). The child
    exits as soon as it has forked the grandchild, so waiting for it is short and
    leaves no zombie behind.
    """
    report_read, report_write = os.pipe()
    spec_read, spec_write = os.pipe()
    pid_read, pid_write = os.pipe()  # the child writes the worker's pid there (for end_unreported)
    payload = frame(spec)
    try:
        pid = os.fork()
    except OSError as exc:
        for fd in (report_read, report_write, spec_read, spec_write, pid_read, pid_write):
            os.close(fd)
        raise ActionFailedError(f"cannot fork: {exc.strerror}") from exc
    if pid == 0:
        _run_child(spec, env, report_write, spec_read, (report_read, spec_write, pid_read), listen_fds, pid_write)
    for fd in (report_write, spec_read, pid_write):
        os.close(fd)
    worker = None
    try:
        os.waitpid(pid, 0)
        try:
            text = os.read(pid_read, 32).strip()  # written before the child exited (or nothing: EOF)
        finally:
            os.close(pid_read)
        worker = int(text) if text.isdigit() else None
        if worker is not None:
            _join_cgroup(spec.cgroup, worker)  # before the spec: the worker waits for it to do anything
        while payload:
            payload = payload[os.write(spec_write, payload):]
    except BrokenPipeError:
        pass  # the grandchild died first; its report pipe tells why
    finally:
        os.close(spec_write)
    return Spawned(report_read, worker)


# ---------------------------------------------------------------- child


def _run_child(spec: WorkerSpec, env: dict[str, str], report_fd: int, spec_fd: int,
               parent_fds: tuple[int, ...], listen_fds: tuple[int, ...] = (), pid_fd: int = -1) -> None:
    """Body of the forked child: never returns, always ends in os._exit()."""
    try:
        for fd in parent_fds:
            os.close(fd)
        _become_session_leader()
        _fork_again_and_leave(pid_fd)
        _run_grandchild(spec, env, report_fd, spec_fd, listen_fds)
    except BaseException as exc:
        write_report(report_fd, ERROR, os.getpid(), message=_describe(exc))
    finally:
        os._exit(127)


def _become_session_leader() -> None:
    """setsid(): leave the controller's session and terminal.

    Without it, a Ctrl-C or hangup in the shell that ran hadctl would reach the
    service. APUE §13.3 rule 3.
    """
    os.setsid()


def _fork_again_and_leave(pid_fd: int = -1) -> None:
    """Fork once more and let the session leader exit, telling the parent the
    grandchild's pid on ``pid_fd`` (so it can end a worker that never reports).

    The grandchild is not a session leader, so it can never acquire a
    controlling terminal by opening one; it is reparented to init.
    APUE §13.3 (the second fork, System V advice).
    """
    pid = os.fork()
    if pid != 0:
        if pid_fd >= 0:
            os.write(pid_fd, f"{pid}\n".encode())
        os._exit(0)
    if pid_fd >= 0:
        os.close(pid_fd)


# ---------------------------------------------------------------- grandchild


def _run_grandchild(spec: WorkerSpec, env: dict[str, str], report_fd: int, spec_fd: int,
                    listen_fds: tuple[int, ...] = ()) -> None:
    _stdio_to_log(os.devnull if spec.log_file == SYSLOG else spec.log_file)  # syslog: the forwarder's, later
    _set_rlimits(spec.rlimits)
    _drop_privileges(spec.uid, spec.gid, spec.user)
    _set_umask(spec.umask)
    _set_nice(spec.nice)
    _chdir(spec.directory)
    _reset_signals()
    report_fd, spec_fd = _listen_fds_at_3(listen_fds, (report_fd, spec_fd))
    _close_fds(spec.close_fds_on_start, keep=(report_fd, spec_fd, *range(3, 3 + len(listen_fds))))
    _exec_worker(env, report_fd, spec_fd)


def _stdio_to_log(log_file: str) -> None:
    """stdin from /dev/null; stdout and stderr appended to ``log_file``.

    Opened before privileges drop, so a root-owned log still receives output.
    Without it a write to a closed terminal kills the service (EIO/SIGPIPE).
    """
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    try:
        log = open_append(log_file)
    except OSError:  # (no inode left, read-only...): a worker without its log beats no worker
        log = os.open(os.devnull, os.O_WRONLY)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.close(log)


def _join_cgroup(cgroup: str, worker: int) -> None:
    """Move ``worker`` into its own child of the service's cgroup v2 folder (contain.join).

    Done by the controller, which may write the cgroup.procs of the common ancestor
    (the worker, its privileges dropped, may not), before the worker has its spec:
    it starts nothing before. Without it, what the worker starts can only be told by
    the marker, which a process that clears its environment loses.
    """
    contain.join(cgroup, worker)


def _set_rlimits(rlimits: tuple[tuple[int, int, int], ...]) -> None:
    """setrlimit, soft and hard, for each of ``[limits]`` (config.rlimits): the same
    limits whoever ran hadctl. Before privileges drop: only root may raise a hard
    limit. -1 is infinity; a hard of -2 keeps the inherited one (the soft is capped
    by it). Without it a service inherits the ulimits of the shell that started it.
    """
    import resource

    for number, soft, hard in rlimits:
        current_hard = resource.getrlimit(number)[1]
        hard = current_hard if hard == -2 else (resource.RLIM_INFINITY if hard == -1 else hard)
        soft = resource.RLIM_INFINITY if soft == -1 else soft
        if hard != resource.RLIM_INFINITY and (soft == resource.RLIM_INFINITY or soft > hard):
            soft = hard
        resource.setrlimit(number, (soft, hard))


def _drop_privileges(uid: int | None, gid: int | None, user: str | None) -> None:
    """initgroups, setgid, then setuid: in that order, or the later calls are refused.

    Supplementary groups come from the user's entry (initgroups), else are
    cleared. python-daemon's change_process_owner does the same.
    """
    if gid is not None and gid != os.getgid():
        if user is not None:
            os.initgroups(user, gid)
        else:
            os.setgroups([gid])
        os.setgid(gid)
    if uid is not None and uid != os.getuid():
        if user is not None and gid is None:
            os.initgroups(user, os.getgid())
        os.setuid(uid)


DEFAULT_UMASK = 0o022


def _set_umask(umask: int | None) -> None:
    """Apply the configured umask (022 when unset), so files the service creates
    get the same modes whoever ran hadctl (cron's umask is not a person's)."""
    os.umask(DEFAULT_UMASK if umask is None else umask)


def _set_nice(nice: int) -> None:
    """Set the configured nice value (0 when unset) rather than keep the caller's.

    Lowering it needs CAP_SYS_NICE: without it the service keeps the caller's
    value, and says so on stderr (the log), rather than not start.
    """
    try:
        if os.getpriority(os.PRIO_PROCESS, 0) != nice:
            os.setpriority(os.PRIO_PROCESS, 0, nice)
    except OSError as exc:
        os.write(2, f"hadctl: cannot set nice {nice}: {exc.strerror}\n".encode())


def _chdir(directory: str | None) -> None:
    """chdir to ``directory`` when configured (HADaemon::Control's ``directory``)."""
    if directory is not None:
        os.chdir(directory)


def _reset_signals() -> None:
    """Default dispositions and an empty mask, whatever the controller had.

    Ignored signals survive exec: a controller run under nohup would otherwise
    give a service that cannot be reloaded with SIGHUP.
    """
    for name in _RESET_SIGNALS:
        lean.set_handler(lean.signum(name), lean.SIG_DFL)
    lean.unblock_all()


def _listen_fds_at_3(listen_fds: tuple[int, ...], pipes: tuple[int, int]) -> tuple[int, int]:
    """Put the listening sockets at fds 3, 4, ... in config order, inheritable; returns
    where the two pipes went (above them).

    systemd's convention (sd_listen_fds(3)): code written for socket activation finds
    them there. The pipes are moved first, or a socket's dup2 would replace one.
    """
    if not listen_fds:
        return pipes
    above = 3 + len(listen_fds)
    moved = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, above) for fd in (*listen_fds, *pipes)]
    for number, fd in enumerate(moved[:len(listen_fds)], start=3):
        os.dup2(fd, number)
        os.close(fd)
    return moved[-2], moved[-1]


def _close_fds(close: bool, keep: tuple[int, ...]) -> None:
    """Close every inherited fd but 0, 1, 2, the two pipes and the listening sockets (close_fds_on_start).

    Without it a standby shares the controller's open files and sockets with
    the main, which is how one crash corrupts the other's connection
    (HADaemon::Control, close_fds_on_start).
    """
    for fd in keep:
        os.set_inheritable(fd, True)
    if not close:
        return
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, os.sysconf("SC_OPEN_MAX") if os.sysconf("SC_OPEN_MAX") < 1 << 20 else 1 << 16)


def _exec_worker(env: dict[str, str], report_fd: int, spec_fd: int) -> None:
    """Replace this process with a fresh interpreter running hadctl.worker, its own
    pid as contain.OWNER in its environment: /proc/PID/environ of what it forks
    without exec shows the original block, so that is where the owner must be."""
    env = {**env, contain.OWNER: str(os.getpid())}
    os.execve(sys.executable, [sys.executable, "-c", BOOT, str(report_fd), str(spec_fd)], env)


# ---------------------------------------------------------------- from a main


def spawn_from_worker(spec: WorkerSpec, close: tuple[int, ...] = (), alive_fd: int = -1) -> int:
    """Start a standby from a promoted main, without delaying the main.

    posix_spawn (vfork-fast) with setsid: the new process already has the
    worker's identity, umask and folder, so only stdio and the spec pipe are
    set up, and the fds in ``close`` are closed in it (the main lock fd, when
    reset_close_on_exec_main_lock_fd made it inheritable: a standby holding its
    main's lock would wait for itself). Nobody reads its report. Returns its pid.

    ``alive_fd``, the main's hold on the service's alive lock, is passed on at fd 4
    (``alive_fd`` in its spec): the new process holds it from its first instant, so
    a stop waits for it even if the main dies before naming it in pid_dir.

    The main's listening sockets, inheritable at fds 3, 4, ... (``listen_names``),
    stay where they are; the spec pipe and the alive lock go just above them.
    """
    listening = len(spec.listen_names)
    spec_fd = 3 + listening
    spec_read, spec_write = os.pipe()
    try:
        log = open_append(os.devnull if spec.log_file == SYSLOG else spec.log_file)  # syslog: outputs.py
    except OSError:  # (a log_file its user may not open): the output of its spawner, not no standby
        log = os.dup(2)
    alive_copy = -1
    try:
        actions = [
            (os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
            (os.POSIX_SPAWN_DUP2, log, 1),
            (os.POSIX_SPAWN_DUP2, log, 2),
            (os.POSIX_SPAWN_DUP2, spec_read, spec_fd),
        ] + [(os.POSIX_SPAWN_CLOSE, fd) for fd in close if fd > spec_fd]
        if alive_fd >= 0:
            # a copy above the spec pipe first: were it there, the spec pipe's dup2 would replace it
            alive_copy = fcntl.fcntl(alive_fd, fcntl.F_DUPFD_CLOEXEC, 10 + listening)
            _IN_FLIGHT.add(alive_copy)
            actions.append((os.POSIX_SPAWN_DUP2, alive_copy, _ALIVE_FD + listening))  # after the closes: it may be one
            spec = replace(spec, alive_fd=_ALIVE_FD + listening)
        env = worker_environment(spec)
        # Through sh, whose $$ is the pid the worker will have: its owner mark (contain.OWNER)
        # must be in the environment it is exec'd with (see _exec_worker).
        # (sh exports a PWD of its own: unset, unless the service's environment has one)
        shim = _OWNER_SHIM if "PWD" in env else "unset PWD; " + _OWNER_SHIM
        pid = os.posix_spawn("/bin/sh", ["sh", "-c", shim, sys.executable, BOOT, str(spec_fd)], env,
                             file_actions=actions, setsid=True,
                             setsigdef=[lean.signum(n) for n in _RESET_SIGNALS],
                             setsigmask=[])
        # Name it at once in pid_dir (it does so itself only once Python is up), so a
        # stop racing this spawn sees it and waits for it to leave.
        try:
            write_pid_file(os.path.join(spec.pid_dir, f"unknown-{pid}.pid"), pid)
        except OSError:
            pass  # it will try itself, and report what is wrong with pid_dir
        os.write(spec_write, frame(spec))
    finally:
        _IN_FLIGHT.discard(alive_copy)
        for fd in (spec_read, spec_write, log, alive_copy):
            if fd >= 0:
                os.close(fd)
    return pid


def _describe(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" {exc.filename}" if exc.filename else ""
        return f"{exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"
