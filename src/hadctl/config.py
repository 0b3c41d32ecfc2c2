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
import _signal  # not signal: its enum costs every command milliseconds

from .errors import ConfigError
from .record import record

TYPE_CHECKING = False  # not typing's: importing typing costs a fast command milliseconds
if TYPE_CHECKING:
    from typing import Any, Callable

    from .spec import WorkerSpec

    Check = Callable[[Any], Any]

DEFAULT_STOP_SIGNALS = ("TERM", "TERM", "INT", "KILL")


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
            host_id=host_id(),
        )


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


def _name(value: Any) -> str:
    text = _nonempty(value)
    if "\n" in text or "/" in text or len(text) > 200:
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


def _integer(minimum: int) -> Check:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Refusal(f"expected an integer >= {minimum}, got {_describe(value)}")
        if value < minimum:
            raise _Refusal(f"expected an integer >= {minimum}, got {value}")
        if value > 10_000:
            raise _Refusal(f"expected an integer <= 10000, got {value}")
        return value
    return check


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


def _plain(value: Any) -> Any:
    if isinstance(value, (str, bool, int, float)):
        return value
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
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


def _signals(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise _Refusal(f'expected a non-empty list of signal names like ["TERM", "KILL"], got {_describe(value)}')
    names = []
    for item in value:
        text = _string(item).upper().removeprefix("SIG")
        if not text.isalnum() or not isinstance(getattr(_signal, "SIG" + text, None), int) \
                or text in ("STOP", "CONT", "CHLD", "IGN", "DFL"):
            raise _Refusal(f"unknown or unusable signal {_describe(item)}")
        names.append(text)
    return tuple(names)


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise _Refusal(f"expected a table of strings, got {_describe(value)}")
    pairs = []
    for key, item in value.items():
        if not key or "=" in key or "\x00" in key:
            raise _Refusal(f"invalid variable name {_describe(key)}")
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise _Refusal(f"variable {key}: expected a string, got {_describe(item)}")
        pairs.append((key, str(item)))
    return tuple(pairs)


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
    "pid_dir": _nonempty,
    "log_file": _nonempty,
    "stdout_file": _nonempty,
    "stderr_file": _nonempty,
    "user": _nonempty,
    "group": _nonempty,
    "uid": _integer(0),
    "gid": _integer(0),
    "umask": _umask,
    "directory": _nonempty,
    "env": _env,
    "process_name_change": _boolean,
    "close_fds_on_start": _boolean,
    "reset_close_on_exec_main_lock_fd": _boolean,
    "stop_signals": _signals,
    "kill_timeout": _seconds(),
    "signal_kill_timeout": _seconds(),
    "stop_file_kill_timeout": _seconds(),
    "main_stop_file": _nonempty,
    "standby_stop_file": _nonempty,
    "main_upgrade_file": _nonempty,
    "upgrade_timeout": _seconds(),
    "quiet": _boolean,
    "kill_mode": _choice("group", "process"),
    "respawn_standby": _boolean,
    "start_limit_burst": _integer(1),
    "start_limit_interval": _seconds(positive=True),
    "restart_backoff_max": _seconds(),
    "warmup": _entrypoint,
    "ready_timeout": _seconds(positive=True),
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
    "path": _nonempty,
    "standby_path": _nonempty,
}
INIT_KEYS: dict[str, Check] = {
    key: _string for key in ("path", "init_config", "init_code", "lsb_start", "lsb_stop", "lsb_sdesc", "lsb_desc")
}
REQUIRED = ("name", "entrypoint", "pid_dir", "log_file")
# HADaemon::Control spellings users will try first, so the error can point the way.
HADC_NAMES = {"program_args": "args", "program": "entrypoint", "ipc_cl_options": "[locks]",
              "type": "engine", "path": "[init] path"}


def all_keys() -> list[str]:
    """Every key the loader accepts, as documented ("locks.max_procs" style for tables)."""
    return (list(TOP_KEYS) + [f"locks.{k}" for k in LOCKS_KEYS] + [f"init.{k}" for k in INIT_KEYS])


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
        # read, and never more than the limit (/dev/zero has no end) (issue #6).
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
    tables = {"locks": LOCKS_KEYS, "init": INIT_KEYS}
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
        if key in top:
            top[key] = _resolve(base, top[key])
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
    if locks.get("engine") == "zookeeper":  # issue #7: say so now rather than in every spawned process
        import importlib.util

        if importlib.util.find_spec("kazoo") is None:
            raise ConfigError(f'{path}: key "locks.engine": "zookeeper" needs kazoo '
                              "(pip install 'hadctl[zookeeper]')")
    if "fence_grace" not in locks:
        locks["fence_grace"] = locks.get("session_timeout", 6.0) / 4
    if locks.get("engine") == "zookeeper" and locks["fence_grace"] >= locks.get("session_timeout", 6.0):
        # issue #7: a main must be fenced before ZooKeeper can give its slot away
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
    return ServiceConfig(config_file=path, locks=LocksConfig(**locks), init=InitConfig(**init), **top)
