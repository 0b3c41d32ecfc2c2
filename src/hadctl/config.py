"""TOML service file -> validated, frozen ``ServiceConfig``.

Owns reading the file (a regular file, at most 1 MB, UTF-8; tomllib through
parsecache's cache) and loading: each table checked key by key (configkeys.py),
paths resolved against the file's folder, cross-key rules, the identity looked
up, the records filled (configtypes.py). Each refusal is one ``ConfigError``
naming the file, the key and the problem. The records, the key tables and their
checks are re-exported here: ``from hadctl.config import X`` works for all.
Imports errors, configtypes, configkeys; tomllib is imported inside ``load`` so
that modules that only need the records stay cheap. Never imported by the worker.
"""
from __future__ import annotations

import grp
import os
import pwd

from . import lean
from .configkeys import (
    FACILITIES,
    HADC_NAMES,
    ID_MAX,
    INIT_KEYS,
    LIMITS_KEYS,
    LOCKS_KEYS,
    MAX_DEPTH,
    REQUIRED,
    RLIMIT_INFINITY,
    TOP_KEYS,
    Refusal,
    all_keys,
    describe,
    parse_address,
)
from .configtypes import (
    DEFAULT_RLIMITS,
    DEFAULT_STOP_SIGNALS,
    SYSLOG,
    Identity,
    InitConfig,
    LimitsConfig,
    ListenAddress,
    LocksConfig,
    ServiceConfig,
    rlimits,
)
from .errors import ConfigError

if lean.TYPE_CHECKING:
    from typing import Any

    from .configkeys import Check

__all__ = ["DEFAULT_RLIMITS", "DEFAULT_STOP_SIGNALS", "FACILITIES", "HADC_NAMES", "ID_MAX", "INIT_KEYS",
           "LIMITS_KEYS", "LOCKS_KEYS", "MAX_DEPTH", "REQUIRED", "RLIMIT_INFINITY", "SYSLOG", "TOP_KEYS",
           "ConfigError", "Identity", "InitConfig", "LimitsConfig", "ListenAddress", "LocksConfig",
           "ServiceConfig", "all_keys", "load", "parse_address", "rlimits"]


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
        except Refusal as refusal:
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
    top, sections = _validate(path, _read_toml(path))
    base = os.path.dirname(path)
    pid_dir = _resolve(base, top["pid_dir"])
    _resolve_top(path, base, top)
    locks = _locks(path, base, pid_dir, sections["locks"])
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


def _validate(path: str, raw: dict[str, Any]) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Every key checked: the top-level keys, and each table's (locks, init, limits)."""
    tables = {"locks": LOCKS_KEYS, "init": INIT_KEYS, "limits": LIMITS_KEYS}
    top_raw = {k: v for k, v in raw.items() if k not in tables}
    top = _validate_table(path, "", top_raw, TOP_KEYS)
    sections: dict[str, dict[str, Any]] = {}
    for table_name, keys in tables.items():
        value = raw.get(table_name, {})
        if not isinstance(value, dict):
            raise ConfigError(f'{path}: key "{table_name}": expected a table [{table_name}], got {describe(value)}')
        sections[table_name] = _validate_table(path, f"{table_name}.", value, keys)
    for key in REQUIRED:
        if key not in top:
            raise ConfigError(f'{path}: missing required key "{key}"')
    return top, sections


def _resolve_top(path: str, base: str, top: dict[str, Any]) -> None:
    """Top-level paths made absolute (against the file's folder), and the rules between them."""
    for key in ("log_file", "stdout_file", "stderr_file", "directory", "main_stop_file",
                "standby_stop_file", "main_upgrade_file"):
        if key in top and not (key in ("log_file", "stdout_file", "stderr_file") and top[key] == SYSLOG):
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


def _locks(path: str, base: str, pid_dir: str, locks: dict[str, Any]) -> dict[str, Any]:
    """``[locks]`` with its paths and fence_grace filled in, checked as a whole."""
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
    return locks
