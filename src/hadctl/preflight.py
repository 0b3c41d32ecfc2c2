"""What must hold before the first fork, beyond the folders (control.check_paths):
output files that are files, folders on a writable file system, and a pool of
slots that fits the open-file limit.

Both refuse with one line before anything is spawned, for start, fork, restart
(through control.prepare) and for check. Imports config and errors (inside
functions: resource, stat); never click or rich.
"""
from __future__ import annotations

import os

from .errors import ActionFailedError
from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ServiceConfig


def not_a_file(path: str) -> str | None:
    """Why ``path`` can be no log or output file, or None. Every worker holds its output
    files for its whole life: a terminal, a pipe or the controller's own stdout (/dev/stdout,
    /proc/self/fd/N) would tie the service to whoever ran hadctl (``out=$(hadctl start)``
    never returns; closing the terminal ends the service), and opening a FIFO blocks."""
    import stat

    name = path
    for _hop in range(40):  # the links at the end of the path, as the kernel follows them
        if name.startswith(("/proc/", "/dev/fd/")):
            return "names a file descriptor of whoever opens it (like /dev/stdout), not a file"
        if not os.path.islink(name):
            break
        name = os.path.join(os.path.dirname(name), os.readlink(name))
    if os.path.realpath(path).startswith("/proc/"):
        return "names a file descriptor of whoever opens it (like /dev/stdout), not a file"
    try:
        info = os.stat(path)  # a stat opens nothing: a FIFO does not block it
    except OSError:
        return None  # missing (made later), or what opening it will tell
    if stat.S_ISFIFO(info.st_mode) or stat.S_ISSOCK(info.st_mode):
        return "is a FIFO or a socket, not a file"
    if stat.S_ISCHR(info.st_mode) and info.st_rdev != os.stat(os.devnull).st_rdev:
        return f"is a terminal or another character device, not a file (of those, only {os.devnull} is allowed)"
    if stat.S_ISBLK(info.st_mode):
        return "is a block device, not a file"
    return None


def read_only(path: str) -> bool:
    """True when ``path`` lies on a file system mounted read-only (a disk error
    remounts one so): no worker could take a slot or write its output there."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except OSError:
        return False


# What hadctl itself keeps open, beyond what is open when the check runs: for the
# controller, a report pipe per process spawned, four pipes during a fork and a few
# files read meanwhile; for a worker, stdio, its locks, the alive lock, the folder
# watch, the report pipe, a replacement's spawn, plus one lock per main slot waited on.
_CONTROLLER_SPARE = 10
_WORKER_BASE = 16


def check_open_files(cfg: ServiceConfig) -> str | None:
    """Refuse, before the first fork, a pool that cannot fit the open-file limit
    (RLIMIT_NOFILE): the controller holds a pipe per process it spawns, and each
    worker gets the nofile of ``[limits]`` (by default 4096 capped by the caller's
    hard limit, which is then said: the line returned). The controller's soft limit
    is first raised to its hard one. ActionFailedError (1) naming both numbers."""
    import resource

    from .config import DEFAULT_RLIMITS

    count = cfg.locks.max_procs + cfg.locks.standby_max_procs
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = len(os.listdir("/proc/self/fd")) + count + len(cfg.listen) + _CONTROLLER_SPARE
    if soft != resource.RLIM_INFINITY and soft < need and soft < hard:
        soft = hard if hard == resource.RLIM_INFINITY else min(hard, max(need, 1024))
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    if soft != resource.RLIM_INFINITY and soft < need:
        raise ActionFailedError(f"{cfg.name}: cannot start {count} processes with an open-file limit of {soft} "
                                f"(ulimit -n): hadctl needs {need} for them; raise it, or lower the slot counts")
    worker_soft, why = _worker_nofile(cfg, hard)
    worker_need = _WORKER_BASE + cfg.locks.max_procs + len(cfg.listen)
    if worker_soft is not None and worker_soft < worker_need:
        raise ActionFailedError(f"{cfg.name}: workers would get an open-file limit of {worker_soft} ({why}); "
                                f"a standby waiting on {cfg.locks.max_procs} main slots needs {worker_need}: "
                                'set [limits] nofile, or raise "ulimit -Hn"')
    default = DEFAULT_RLIMITS["nofile"][0]
    if worker_soft is not None and cfg.limits.nofile is None and worker_soft < default:
        return f"workers get an open-file limit of {worker_soft} ({why}), not {default}"
    return None


def _worker_nofile(cfg: ServiceConfig, hard: int) -> tuple[int | None, str]:
    """The soft nofile a worker will have (spawn._set_rlimits; None: unlimited) and why."""
    import resource

    from .config import rlimits

    for number, soft, wanted_hard in rlimits(cfg.limits):
        if number != resource.RLIMIT_NOFILE:
            continue
        if wanted_hard == -2:
            why = 'the hard limit of whoever ran hadctl, "ulimit -Hn"; [limits] nofile is unset'
            top = hard
        else:
            why = "[limits] nofile"
            top = resource.RLIM_INFINITY if wanted_hard == -1 else wanted_hard
        value = resource.RLIM_INFINITY if soft == -1 else soft
        if top != resource.RLIM_INFINITY:
            value = min(value, top) if value != resource.RLIM_INFINITY else top
        return (None if value == resource.RLIM_INFINITY else value), why
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0], "the limit of whoever ran hadctl"
