"""The config → worker contract: one typed record, and its framing over the spec pipe.

``config.ServiceConfig.worker_spec()`` builds a ``WorkerSpec``; spawn.py frames it
onto a pipe; the exec'd worker reads it back (``read``). Fields are named like the
TOML keys they come from (``locks.path`` is ``locks_path``); the few that are not
TOML keys say where they come from.

Cheap to import in the worker: a ``hadctl.record`` (not dataclasses), framed as a
marshal'd tuple of the field values (not json). Imports record and lean only.
"""
from __future__ import annotations

import marshal
import os

from .lean import TYPE_CHECKING
from .record import record

if TYPE_CHECKING:
    from typing import Any


@record
class WorkerSpec:
    name: str
    entrypoint: str
    pid_dir: str
    log_file: str
    standby_stop_file: str
    locks_path: str
    locks_standby_path: str
    args: tuple[Any, ...] = ()
    python_path: tuple[str, ...] = ()
    stdout_file: str = ""  # the main's stdout: the TOML key, or log_file when unset
    stderr_file: str = ""  # the main's stderr: likewise
    warmup: str | None = None
    process_name_change: bool = False
    close_fds_on_start: bool = True
    reset_close_on_exec_main_lock_fd: bool = False
    respawn_standby: bool = True
    start_limit_burst: int = 5
    start_limit_interval: float = 10.0
    restart_backoff_max: float = 60.0
    umask: int | None = None
    directory: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    # user and group, resolved by config (None: unchanged)
    user: str | None = None
    uid: int | None = None
    gid: int | None = None
    home: str | None = None
    locks_engine: str = "flock"
    locks_hosts: str | None = None
    locks_root: str = "/hadctl"
    locks_session_timeout: float = 6.0
    locks_fence_grace: float = 0.0
    locks_max_procs: int = 1
    locks_standby_max_procs: int = 1
    locks_interval: float = 1.0
    locks_retries: int | None = None
    nice: int = 0
    reopen_signal: str = "USR2"
    syslog_facility: str = "daemon"
    # not TOML keys (outputs and environment, built by the controller):
    environment: tuple[tuple[str, str], ...] = ()  # environment.build: what every worker starts with
    syslog_socket: str = "/dev/log"  # $HADCTL_SYSLOG_SOCKET of the controller, else /dev/log
    # not TOML keys:
    host_id: str = ""  # lean.host_id() of the controller's host, computed once there
    spawned_by_main: bool = False  # a main's replacement standby: the crash-loop back-off applies
    standby_extra: int = 0  # restart's new standbys try this many slots above standby_max_procs first
    spawn_timeout: float = 0.0  # spawn.spawn_timeout(): a worker still starting then dumps where it hangs, exits
    alive_fd: int = -1  # the spawning main's hold on the alive lock, passed on (spawn_from_worker)
    listen_names: tuple[str, ...] = ()  # the names of ``listen``: the sockets at fds 3, 4, ... (sockets.py)
    # containment, watchdog, recycling and limits (contain.py, watchdog.py):
    service_id: str = ""  # contain.marker: HADCTL_SERVICE, which every process of the service inherits
    cgroup: str = ""  # the service's cgroup v2 folder (contain.cgroup_dir), "" for the marker mode
    kill_mode: str = "group"
    stop_signals: tuple[str, ...] = ("TERM", "TERM", "INT", "KILL")
    signal_timeout: float = 1.0  # ServiceConfig.signal_timeout
    watchdog_timeout: float = 0.0  # 0: no watchdog
    watchdog_signal: str = "ABRT"
    max_rss: int = 0  # 0: unset
    rlimits: tuple[tuple[int, int, int], ...] = ()  # (RLIMIT_*, soft, hard); -1 infinity, -2 hard kept


FIELDS: tuple[str, ...] = getattr(WorkerSpec, "__record_fields__")  # noqa: B009 - unknown to the type checker


def frame(spec: WorkerSpec) -> bytes:
    """The spec as the worker reads it: its length (8 bytes), then the marshal'd field values.

    The worker reads exactly that many bytes rather than up to EOF: a child
    forked by a main while it spawned a replacement may hold the pipe open.
    """
    data = marshal.dumps(tuple(getattr(spec, name) for name in FIELDS))
    return len(data).to_bytes(8, "little") + data


def unframe(data: bytes) -> WorkerSpec:
    """The spec framed by ``frame`` (without its 8-byte length); ValueError if it is not one."""
    values = marshal.loads(data)
    if not isinstance(values, tuple) or len(values) != len(FIELDS):
        raise ValueError(f"not a worker spec: expected {len(FIELDS)} fields")
    return WorkerSpec(**dict(zip(FIELDS, values, strict=False)))


def read(fd: int) -> WorkerSpec:
    """Read one framed spec from ``fd``; raises EOFError if cut short."""
    def exactly(count: int) -> bytes:
        data = b""
        while len(data) < count:
            chunk = os.read(fd, count - len(data))
            if not chunk:
                raise EOFError("the spec pipe closed early")
            data += chunk
        return data

    return unframe(exactly(int.from_bytes(exactly(8), "little")))
