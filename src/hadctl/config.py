"""TOML service file -> validated, frozen ``ServiceConfig``.

Owns every key of the contract (SPEC "Configuration"), their types and defaults.
Each refusal is one ``ConfigError`` naming the file, the key and the problem.
Imports errors and record only; tomllib is imported inside ``load`` so that
modules that only need the dataclass stay cheap. Never imported by the worker.
"""
from __future__ import annotations

import grp
import math
import os
import pwd

from . import lean
from .errors import ConfigError
from .record import record

if lean.TYPE_CHECKING:
    from typing import Any, Callable

    from .spec import WorkerSpec

    Check = Callable[[Any], Any]

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


# ---------------------------------------------------------------- validation


class _Refusal(Exception):
    """A value check failed; the message says what was expected."""


def _describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise _Refusal(f"expected a string, got {_describe(value)}")
    if "\x00" in value:
        raise _Refusal("expected a string without NUL characters")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise _Refusal("expected a non-empty string")
    return text


# Printed to terminals and logs, written into pid files and init scripts: a name or
# path with a control character (ESC, CR, a line separator) could rewrite what an
# operator reads, so none is accepted.
_CONTROL = frozenset(chr(c) for c in (*range(32), *range(127, 160), 0x2028, 0x2029))


def _no_control(text: str) -> str:
    bad = next((c for c in text if c in _CONTROL), None)
    if bad is not None:
        raise _Refusal(f"expected no control characters, got {ascii(bad)} in {_describe(text)}")
    return text


def _path(value: Any) -> str:
    return _no_control(_nonempty(value))


def _name(value: Any) -> str:
    text = _no_control(_nonempty(value))
    if "/" in text or len(text) > 200:
        raise _Refusal(f"expected a one-line name without '/', got {_describe(value)}")
    return text


def _entrypoint(value: Any) -> str:
    text = _string(value)
    if not _is_entrypoint(text):
        raise _Refusal(f'expected "package.module:function", got {_describe(value)}')
    return text


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Refusal(f"expected true or false, got {_describe(value)}")
    return value


def _integer(minimum: int, maximum: int = 10_000) -> Check:
    """An integer in [minimum, maximum]; the default cap suits counts of slots and
    processes, ids and limits pass their own."""
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Refusal(f"expected an integer >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise _Refusal(f"expected an integer >= {minimum}, got {value}")
        if value > maximum:
            raise _Refusal(f"expected an integer <= {maximum}, got {value}")
        return value
    return check


ID_MAX = 2**32 - 2  # (uid_t)-1 means "unchanged" to setuid/chown
_UNITS = {"": 1, "K": 1024, "M": 1024**2, "G": 1024**3, "T": 1024**4}


def _bytes(value: Any) -> int:
    """A size: an integer of bytes or a string like "512M" (K, M, G, T: powers of 1024)."""
    if isinstance(value, int) and not isinstance(value, bool) and 0 < value < 2**63:
        return value
    if isinstance(value, str):
        text = value.strip().upper().removesuffix("B")
        number, unit = (text[:-1], text[-1]) if text[-1:] in _UNITS else (text, "")
        if number.isdigit() and 0 < int(number) * _UNITS[unit] < 2**63:
            return int(number) * _UNITS[unit]
    raise _Refusal(f'expected a size like "512M" or a number of bytes > 0, got {_describe(value)}')


RLIMIT_INFINITY = -1


def _rlimit(value: Any) -> int:
    """An rlimit: a whole number >= 0, or "infinity" (RLIMIT_INFINITY)."""
    if value == "infinity":
        return RLIMIT_INFINITY
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise _Refusal(f'expected a whole number >= 0 or "infinity", got {_describe(value)}')


def _cpu_max(value: Any) -> float:
    """A share of one CPU: "50%", "200%" (two CPUs)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1]
        if number.replace(".", "", 1).isdigit() and 0 < float(number) <= 100_000:
            return float(number) / 100
    raise _Refusal(f'expected a share of a CPU like "50%", got {_describe(value)}')


def _seconds(positive: bool = False) -> Check:
    bound = "> 0" if positive else ">= 0"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _Refusal(f"expected a number of seconds {bound}, got {_describe(value)}")
        number = float(value)
        if math.isnan(number) or number in (float("inf"), float("-inf")) or number > 86400 * 365:
            raise _Refusal(f"expected a finite number of seconds, got {_describe(value)}")
        if number < 0 or (positive and number == 0):
            raise _Refusal(f"expected a number of seconds {bound}, got {_describe(value)}")
        return number
    return check


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Refusal(f"expected a list of strings, got {_describe(value)}")
    return tuple(_string(item) for item in value)


MAX_DEPTH = 32  # of lists and tables in args: deeper is a mistake, and would overflow a stack


def _plain(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise _Refusal(f"lists and tables nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (str, bool, int, float)):
        if isinstance(value, str) and "\x00" in value:
            raise _Refusal("expected strings without NUL characters")
        return value
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    raise _Refusal(f"expected strings, numbers, booleans, lists or tables, got {_describe(value)}")


def _args(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise _Refusal(f"expected a list, got {_describe(value)}")
    return tuple(_plain(item) for item in value)


def _umask(value: Any) -> int:
    if isinstance(value, bool):
        raise _Refusal(f'expected an octal string like "022", got {_describe(value)}')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _is_octal(value.strip()):
        number = int(value.strip().removeprefix("0o"), 8)
    else:
        raise _Refusal(f'expected an octal string like "022", got {_describe(value)}')
    if not 0 <= number <= 0o777:
        raise _Refusal(f"expected a umask between 000 and 777 (octal), got {oct(number)}")
    return number


def _is_octal(text: str) -> bool:
    """``022``, ``0022``, ``0o22``: up to 4 octal digits, after an optional ``0`` or ``0o``
    (str methods, not re: re and the enum it imports cost every command milliseconds)."""
    digits = text[2:] if text.startswith("0o") else text[1:] if len(text) == 5 and text[0] == "0" else text
    return 1 <= len(digits) <= 4 and all(c in "01234567" for c in digits)


def _is_entrypoint(text: str) -> bool:
    """``package.module:function``: dotted Python names on both sides of one colon."""
    module, colon, function = text.partition(":")
    return bool(colon) and all(part.isidentifier() for part in module.split(".") + function.split("."))


def _signal_name(value: Any) -> str:
    """A signal by name ("TERM" or "SIGTERM"), stored without "SIG"; STOP, CONT and
    CHLD cannot stop or wake anything and are refused."""
    text = _string(value).upper().removeprefix("SIG")
    try:
        lean.signum(text)
    except ValueError:
        raise _Refusal(f"unknown or unusable signal {_describe(value)}") from None
    if not text.isalnum() or text in ("STOP", "CONT", "CHLD"):
        raise _Refusal(f"unknown or unusable signal {_describe(value)}")
    return text


def _signals(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Refusal(f'expected a non-empty list of signal names like ["TERM", "KILL"], got {_describe(value)}')
    return tuple(_signal_name(item) for item in value)


def _variable_name(key: Any) -> str:
    if not isinstance(key, str) or not key or "=" in key or any(c in _CONTROL for c in key) or key[0].isdigit():
        raise _Refusal(f"invalid variable name {_describe(key)}")
    return key


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise _Refusal(f"expected a list of variable names, got {_describe(value)}")
    return tuple(_variable_name(item) for item in value)


def _paths(value: Any) -> tuple[str, ...]:
    """One path or a list of paths (env_file: a leading "-" marks an optional file)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise _Refusal(f"expected a path or a list of paths, got {_describe(value)}")
    return tuple(_path(item) for item in items)


FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "ftp", *(f"local{n}" for n in range(8)))


def _listen(value: Any) -> tuple[ListenAddress, ...]:
    if not isinstance(value, list):
        raise _Refusal(f'expected a list of addresses like ["127.0.0.1:8080", "unix:/run/x.sock"], '
                       f"got {_describe(value)}")
    found = []
    for number, item in enumerate(value):
        name = f"listen{number}" if number else "listen"
        if isinstance(item, dict):
            unknown = set(item) - {"address", "name"}
            if unknown or "address" not in item:
                raise _Refusal(f"expected a table {{ address = ..., name = ... }}, got {_describe(item)}")
            name = _variable_name(_string(item.get("name", name)))
            if ":" in name:
                raise _Refusal(f"a socket name may not contain ':', got {_describe(name)}")
            item = item["address"]
        found.append(parse_address(_no_control(_nonempty(item)), name))
    addresses = [a.address for a in found]
    names = [a.name for a in found]
    for seen in (addresses, names):
        twice = next((x for x in seen if seen.count(x) > 1), None)
        if twice is not None:
            raise _Refusal(f"{twice!r} is listed twice")
    return tuple(found)


def parse_address(text: str, name: str) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT``, ``*:PORT``, ``unix:/path`` → ListenAddress."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or len(path.encode()) > 107:
            raise _Refusal(f"expected unix:/absolute/path (at most 107 bytes), got {_describe(text)}")
        return ListenAddress(text, name, "unix", path=os.path.normpath(path))
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise _Refusal(f'expected "HOST:PORT", "[::1]:PORT", "*:PORT" or "unix:/path", got {_describe(text)}')
    kind = "inet"
    if host.startswith("[") and host.endswith("]"):
        host, kind = host[1:-1], "inet6"
        if ":" not in host:
            raise _Refusal(f"expected an IPv6 address in brackets, got {_describe(text)}")
    elif host in ("*", ""):
        host = ""
    elif ":" in host:
        raise _Refusal(f"put an IPv6 address in brackets ([::1]:PORT), got {_describe(text)}")
    return ListenAddress(text, name, kind, host, int(port))


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _Refusal(f"expected a table of strings, got {_describe(value)}")
    pairs = []
    for key, item in value.items():
        _variable_name(key)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Refusal(f"variable {key}: expected a string, got {_describe(item)}")
        if "\x00" in str(item):
            raise _Refusal(f"variable {key}: a value cannot hold a NUL character")
        pairs.append((key, str(item)))
    return tuple(pairs)


def _nice(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -20 <= value <= 19:
        raise _Refusal(f"expected an integer from -20 to 19, got {_describe(value)}")
    return value


def _choice(*allowed: str) -> Check:
    def check(value: Any) -> str:
        if value not in allowed:
            options = ", ".join(f'"{a}"' for a in allowed)
            raise _Refusal(f"expected one of {options}, got {_describe(value)}")
        return str(value)
    return check


TOP_KEYS: dict[str, Check] = {
    "name": _name,
    "entrypoint": _entrypoint,
    "args": _args,
    "python_path": _string_list,
    "pid_dir": _path,
    "log_file": _path,
    "stdout_file": _path,
    "stderr_file": _path,
    "user": _name,
    "group": _name,
    "uid": _integer(0, ID_MAX),
    "gid": _integer(0, ID_MAX),
    "umask": _umask,
    "directory": _path,
    "env": _env,
    "process_name_change": _boolean,
    "close_fds_on_start": _boolean,
    "reset_close_on_exec_main_lock_fd": _boolean,
    "stop_signals": _signals,
    "kill_timeout": _seconds(),
    "signal_kill_timeout": _seconds(),
    "stop_file_kill_timeout": _seconds(),
    "main_stop_file": _path,
    "standby_stop_file": _path,
    "main_upgrade_file": _path,
    "upgrade_timeout": _seconds(),
    "quiet": _boolean,
    "kill_mode": _choice("group", "process"),
    "respawn_standby": _boolean,
    "start_limit_burst": _integer(1),
    "start_limit_interval": _seconds(positive=True),
    "restart_backoff_max": _seconds(),
    "warmup": _entrypoint,
    "ready_timeout": _seconds(positive=True),
    "listen": _listen,
    "listen_backlog": _integer(1, 65535),
    "listen_mode": _umask,
    "watchdog_timeout": _seconds(positive=True),
    "watchdog_signal": _signal_name,
    "max_rss": _bytes,
    "env_file": _paths,
    "pass_env": _names,
    "reopen_signal": _signal_name,
    "syslog_facility": _choice(*FACILITIES),
    "nice": _nice,
}
LOCKS_KEYS: dict[str, Check] = {
    "engine": _choice("flock", "zookeeper"),
    "hosts": _nonempty,
    "root": _nonempty,
    "session_timeout": _seconds(positive=True),
    "fence_grace": _seconds(),
    "max_procs": _integer(1),
    "standby_max_procs": _integer(0),
    "interval": _seconds(positive=True),
    "retries": _integer(0),
    "path": _path,
    "standby_path": _path,
}
INIT_KEYS: dict[str, Check] = {
    key: _string for key in ("path", "init_config", "init_code", "lsb_start", "lsb_stop", "lsb_sdesc", "lsb_desc")
}
LIMITS_KEYS: dict[str, Check] = {
    "nofile": _rlimit, "nproc": _rlimit, "core": _rlimit, "memlock": _rlimit, "as": _rlimit,
    "memory_max": _bytes, "cpu_max": _cpu_max, "pids_max": _integer(1, 4_194_304),
}
REQUIRED = ("name", "entrypoint", "pid_dir", "log_file")
# HADaemon::Control spellings users will try first, so the error can point the way.
HADC_NAMES = {"program_args": "args", "program": "entrypoint", "ipc_cl_options": "[locks]",
              "type": "engine", "path": "[init] path"}


def all_keys() -> list[str]:
    """Every key the loader accepts, as documented ("locks.max_procs" style for tables)."""
    return (list(TOP_KEYS) + [f"locks.{k}" for k in LOCKS_KEYS] + [f"init.{k}" for k in INIT_KEYS]
            + [f"limits.{k}" for k in LIMITS_KEYS])


def _unknown(where: str, key: str, known: list[str]) -> str:
    hint = HADC_NAMES.get(key)
    if hint is None:
        import difflib

        close = difflib.get_close_matches(key, known, n=1)
        hint = close[0] if close else None
    suggestion = f' (did you mean "{hint}"?)' if hint else ""
    return f'unknown key "{where}{key}"{suggestion}'


def _validate_table(path: str, where: str, table: dict[str, Any], keys: dict[str, Check]) -> dict[str, Any]:
    clean: dict[str, Any] = {}
    for key, value in table.items():
        check = keys.get(key)
        if check is None:
            raise ConfigError(f"{path}: {_unknown(where, key, list(keys))}")
        try:
            clean[key] = check(value)
        except _Refusal as refusal:
            raise ConfigError(f'{path}: key "{where}{key}": {refusal}') from None
    return clean


def _read_toml(path: str) -> dict[str, Any]:
    import stat

    try:
        # O_NONBLOCK: a FIFO given as the file must not block us; only a regular file is
        # read, and never more than the limit (/dev/zero has no end).
        with open(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC), "rb") as handle:
            info = os.fstat(handle.fileno())
            if stat.S_ISDIR(info.st_mode):
                raise IsADirectoryError
            if not stat.S_ISREG(info.st_mode):
                raise ConfigError(f"{path}: is not a regular file")
            if info.st_size > 1_000_000:
                raise ConfigError(f"{path}: file is {info.st_size} bytes, larger than a service file can be (1 MB)")
            data = handle.read(1_000_001)
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a service file") from None
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except PermissionError:
        raise ConfigError(f"{path}: cannot read: permission denied") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text (line {line})") from None
    from . import parsecache

    cached = parsecache.lookup(path, data)
    if cached is not None:
        return cached
    try:
        import tomllib
    except ModuleNotFoundError:  # Python < 3.11
        import tomli as tomllib  # type: ignore[no-redef]
    try:
        parsed = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None
    except RecursionError:  # the parser recurses once per nested array or inline table
        raise ConfigError(f"{path}: invalid TOML: arrays or tables nested too deep") from None
    parsecache.store(path, data, parsed)
    return parsed


def _resolve(base: str, value: str) -> str:
    return os.path.normpath(os.path.join(base, os.path.expanduser(value)))


def _identity(path: str, top: dict[str, Any]) -> Identity:
    """Names win over numbers; a uid without gid takes the user's primary group."""
    uid = top.get("uid")
    gid = top.get("gid")
    user_name = None
    home = None
    if "user" in top:
        try:
            entry = pwd.getpwnam(top["user"])
        except KeyError:
            raise ConfigError(f'{path}: key "user": unknown user {top["user"]!r}') from None
        uid, user_name, home = entry.pw_uid, entry.pw_name, entry.pw_dir
        if "group" not in top and "gid" not in top:
            gid = entry.pw_gid
    elif uid is not None:
        try:
            entry = pwd.getpwuid(uid)
            user_name, home = entry.pw_name, entry.pw_dir
            if gid is None:
                gid = entry.pw_gid
        except KeyError:
            if gid is None:
                raise ConfigError(f'{path}: key "uid": uid {uid} has no passwd entry, so set "gid" too') from None
    if "group" in top:
        try:
            gid = grp.getgrnam(top["group"]).gr_gid
        except KeyError:
            raise ConfigError(f'{path}: key "group": unknown group {top["group"]!r}') from None
    if uid is None and gid is None:
        return Identity()
    return Identity(uid=uid, gid=gid, user=user_name, home=home)


def load(path: str) -> ServiceConfig:
    """Read and validate the service file at ``path``.

    Returns a frozen ServiceConfig with every path absolute. Raises ConfigError
    (exit 6) with one line naming the file, the key and the problem.
    """
    path = os.path.abspath(path)
    raw = _read_toml(path)
    tables = {"locks": LOCKS_KEYS, "init": INIT_KEYS, "limits": LIMITS_KEYS}
    top_raw = {k: v for k, v in raw.items() if k not in tables}
    top = _validate_table(path, "", top_raw, TOP_KEYS)
    sections: dict[str, dict[str, Any]] = {}
    for table_name, keys in tables.items():
        value = raw.get(table_name, {})
        if not isinstance(value, dict):
            raise ConfigError(f'{path}: key "{table_name}": expected a table [{table_name}], got {_describe(value)}')
        sections[table_name] = _validate_table(path, f"{table_name}.", value, keys)
    for key in REQUIRED:
        if key not in top:
            raise ConfigError(f'{path}: missing required key "{key}"')

    base = os.path.dirname(path)
    pid_dir = _resolve(base, top["pid_dir"])
    for key in ("log_file", "stdout_file", "stderr_file", "directory", "main_stop_file",
                "standby_stop_file", "main_upgrade_file"):
        if key in top and not (key in ("stdout_file", "stderr_file") and top[key] == SYSLOG):
            top[key] = _resolve(base, top[key])
    if "env_file" in top:
        top["env_file"] = tuple(("-" if p.startswith("-") else "") + _resolve(base, p.removeprefix("-"))
                                for p in top["env_file"])
    if top.get("watchdog_timeout") is not None and top["watchdog_timeout"] < 0.05:
        raise ConfigError(f'{path}: key "watchdog_timeout": expected at least 0.05 s, got {top["watchdog_timeout"]:g}')
    if "python_path" in top:
        top["python_path"] = tuple(_resolve(base, p) for p in top["python_path"])
    if "directory" in top and not os.path.isdir(top["directory"]):
        raise ConfigError(f'{path}: key "directory": {top["directory"]} is not a directory')

    locks = sections["locks"]
    locks["path"] = _resolve(base, locks["path"]) if "path" in locks else os.path.join(pid_dir, "lock")
    locks["standby_path"] = (_resolve(base, locks["standby_path"]) if "standby_path" in locks
                             else os.path.join(pid_dir, "lock-standby"))
    if locks.get("engine") == "zookeeper" and "hosts" not in locks:
        raise ConfigError(f'{path}: key "locks.hosts": required when engine is "zookeeper"')
    if locks.get("engine") == "zookeeper":  # say so now rather than in every spawned process
        import importlib.util

        if importlib.util.find_spec("kazoo") is None:
            raise ConfigError(f'{path}: key "locks.engine": "zookeeper" needs kazoo '
                              "(pip install 'hadctl[zookeeper]')")
    if "fence_grace" not in locks:
        locks["fence_grace"] = locks.get("session_timeout", 6.0) / 4
    if locks.get("engine") == "zookeeper" and locks["fence_grace"] >= locks.get("session_timeout", 6.0):
        # a main must be fenced before ZooKeeper can give its slot away
        raise ConfigError(f'{path}: key "locks.fence_grace": must be less than locks.session_timeout '
                          f'({locks.get("session_timeout", 6.0):g} s), got {locks["fence_grace"]:g}')
    if locks["path"] == locks["standby_path"]:
        raise ConfigError(f'{path}: key "locks.standby_path": must differ from locks.path')

    init = sections["init"]
    if "init_config" in init:
        init["init_config"] = _resolve(base, init["init_config"])

    top["identity"] = _identity(path, top)
    top.setdefault("standby_stop_file", os.path.join(pid_dir, "standby-stop-file"))
    top["pid_dir"] = pid_dir
    limits = sections["limits"]
    if "as" in limits:
        limits["address_space"] = limits.pop("as")
    return ServiceConfig(config_file=path, locks=LocksConfig(**locks), init=InitConfig(**init),
                         limits=LimitsConfig(**limits), **top)
