"""The frozen records a service file becomes: ``ServiceConfig`` and its tables.

Owns the defaults of every key (SPEC "Configuration") and what the controller
derives from them (the worker spec, the rlimits). config.py fills these records;
configkeys.py checks each value first. Imports lean and record only (os for the
worker spec's environment); environment, contain and spec inside ``worker_spec``.
"""
from __future__ import annotations

import os

from . import lean
from .record import record

if lean.TYPE_CHECKING:
    from typing import Any

    from .spec import WorkerSpec

DEFAULT_STOP_SIGNALS = ("TERM", "TERM", "INT", "KILL")
SYSLOG = "syslog"  # stdout_file / stderr_file: lines go to the local syslog socket


@record
class LocksConfig:
    engine: str = "flock"
    hosts: str | None = None
    root: str = "/hadctl"
    session_timeout: float = 6.0
    fence_grace: float | None = None
    max_procs: int = 1
    standby_max_procs: int = 1
    interval: float = 1.0
    retries: int | None = None
    path: str = ""
    standby_path: str = ""


@record
class InitConfig:
    path: str | None = None
    init_config: str | None = None
    init_code: str | None = None
    lsb_start: str = "$remote_fs $syslog"
    lsb_stop: str = "$remote_fs $syslog"
    lsb_sdesc: str | None = None
    lsb_desc: str | None = None


@record
class ListenAddress:
    """One listening socket of ``listen``: ``kind`` is "inet", "inet6" or "unix"; ``host``
    is "" for every address ("*:80"); ``path`` only for unix sockets."""

    address: str
    name: str
    kind: str
    host: str = ""
    port: int = 0
    path: str = ""


@record
class LimitsConfig:
    """``[limits]``: rlimits of every worker (None = the documented default, see
    DEFAULT_RLIMITS) and cgroup v2 limits of the service (None = unset)."""

    nofile: int | None = None
    nproc: int | None = None
    core: int | None = None
    memlock: int | None = None
    # "as" is a Python keyword: the TOML key as, the field address_space
    address_space: int | None = None
    memory_max: int | None = None
    cpu_max: float | None = None
    pids_max: int | None = None


@record
class Identity:
    """Who the spawned processes run as; None fields mean 'unchanged'."""

    uid: int | None = None
    gid: int | None = None
    user: str | None = None
    home: str | None = None


@record
class ServiceConfig:
    config_file: str
    name: str
    entrypoint: str
    pid_dir: str
    log_file: str
    args: tuple[Any, ...] = ()
    python_path: tuple[str, ...] = ()
    stdout_file: str | None = None
    stderr_file: str | None = None
    user: str | None = None
    group: str | None = None
    uid: int | None = None
    gid: int | None = None
    identity: Identity = Identity()
    umask: int | None = None
    directory: str | None = None
    env: tuple[tuple[str, str], ...] = ()
    process_name_change: bool = False
    close_fds_on_start: bool = True
    reset_close_on_exec_main_lock_fd: bool = False
    stop_signals: tuple[str, ...] = DEFAULT_STOP_SIGNALS
    kill_timeout: float = 1.0
    signal_kill_timeout: float | None = None
    stop_file_kill_timeout: float | None = None
    main_stop_file: str | None = None
    standby_stop_file: str = ""
    main_upgrade_file: str | None = None
    upgrade_timeout: float | None = None
    quiet: bool = False
    kill_mode: str = "group"
    respawn_standby: bool = True
    start_limit_burst: int = 5
    start_limit_interval: float = 10.0
    restart_backoff_max: float = 60.0
    warmup: str | None = None
    ready_timeout: float | None = None
    locks: LocksConfig = LocksConfig()
    init: InitConfig = InitConfig()
    listen: tuple[ListenAddress, ...] = ()
    listen_backlog: int | None = None
    listen_mode: int = 0o660
    watchdog_timeout: float | None = None
    watchdog_signal: str = "ABRT"
    max_rss: int | None = None
    limits: LimitsConfig = LimitsConfig()
    env_file: tuple[str, ...] = ()
    pass_env: tuple[str, ...] = ()
    reopen_signal: str = "USR2"
    syslog_facility: str = "daemon"
    nice: int = 0

    @property
    def signal_timeout(self) -> float:
        return self.kill_timeout if self.signal_kill_timeout is None else self.signal_kill_timeout

    @property
    def stop_file_timeout(self) -> float:
        return self.kill_timeout if self.stop_file_kill_timeout is None else self.stop_file_kill_timeout

    @property
    def main_stdout(self) -> str:
        return self.stdout_file or self.log_file

    @property
    def main_stderr(self) -> str:
        return self.stderr_file or self.log_file

    def worker_spec(self) -> WorkerSpec:
        """What a spawned worker needs (spec.py); the host id is computed here, once."""
        from .environment import build as build_environment
        from .lean import host_id
        from .spec import WorkerSpec

        locks = self.locks
        return WorkerSpec(
            name=self.name,
            entrypoint=self.entrypoint,
            pid_dir=self.pid_dir,
            log_file=self.log_file,
            standby_stop_file=self.standby_stop_file,
            locks_path=locks.path,
            locks_standby_path=locks.standby_path,
            args=tuple(self.args),
            python_path=tuple(self.python_path),
            stdout_file=self.main_stdout,
            stderr_file=self.main_stderr,
            warmup=self.warmup,
            process_name_change=self.process_name_change,
            close_fds_on_start=self.close_fds_on_start,
            reset_close_on_exec_main_lock_fd=self.reset_close_on_exec_main_lock_fd,
            respawn_standby=self.respawn_standby,
            start_limit_burst=self.start_limit_burst,
            start_limit_interval=self.start_limit_interval,
            restart_backoff_max=self.restart_backoff_max,
            umask=self.umask,
            directory=self.directory,
            env=tuple(self.env),
            user=self.identity.user,
            uid=self.identity.uid,
            gid=self.identity.gid,
            home=self.identity.home,
            locks_engine=locks.engine,
            locks_hosts=locks.hosts,
            locks_root=locks.root,
            locks_session_timeout=locks.session_timeout,
            locks_fence_grace=locks.fence_grace or 0.0,
            locks_max_procs=locks.max_procs,
            locks_standby_max_procs=locks.standby_max_procs,
            locks_interval=locks.interval,
            locks_retries=locks.retries,
            listen_names=tuple(a.name for a in self.listen),
            host_id=host_id(),
            nice=self.nice,
            reopen_signal=self.reopen_signal,
            syslog_facility=self.syslog_facility,
            environment=tuple(build_environment(self).items()),
            syslog_socket=os.environ.get("HADCTL_SYSLOG_SOCKET") or "/dev/log",
            **self._contain_fields(),
        )

    def _contain_fields(self) -> dict[str, Any]:
        """The worker spec's containment, watchdog and limits fields (contain.py)."""
        from . import contain

        return {"service_id": contain.marker(self.name, self.config_file),
                "cgroup": contain.cgroup_dir(contain.service_id(self.name, self.pid_dir)), "kill_mode": self.kill_mode,
                "stop_signals": tuple(self.stop_signals), "signal_timeout": self.signal_timeout,
                "watchdog_timeout": self.watchdog_timeout or 0.0, "watchdog_signal": self.watchdog_signal,
                "max_rss": self.max_rss or 0, "rlimits": rlimits(self.limits)}


# The rlimits every worker gets when [limits] leaves them unset: the same whoever ran
# hadctl. nofile: soft 4096 (the hard limit kept, the soft capped by it); core: 0
# (a watchdog's ABRT leaves no core unless asked); nproc, memlock, as: inherited.
DEFAULT_RLIMITS = {"nofile": (4096, -2), "core": (0, 0)}
_RLIMIT_NAMES = {"nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "core": "RLIMIT_CORE",
                 "memlock": "RLIMIT_MEMLOCK", "address_space": "RLIMIT_AS"}


def rlimits(limits: LimitsConfig) -> tuple[tuple[int, int, int], ...]:
    """(RLIMIT_*, soft, hard) for each rlimit a worker gets: the [limits] value as both
    soft and hard, else DEFAULT_RLIMITS (-1 infinity, -2 the inherited hard limit)."""
    import resource

    found = []
    for key, constant in _RLIMIT_NAMES.items():
        value = getattr(limits, key)
        pair = (value, value) if value is not None else DEFAULT_RLIMITS.get(key)
        if pair is not None:
            found.append((int(getattr(resource, constant)), pair[0], pair[1]))
    return tuple(found)
