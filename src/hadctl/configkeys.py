"""Every key of a service file: its check, and the tables the loader walks.

A check takes the TOML value and returns the clean one, or raises ``Refusal``
saying what was expected; config.py adds the file and the key to make it one
``ConfigError`` line. check.py walks the same tables to list every problem.
Imports lean and configtypes only (``ListenAddress``).
"""
from __future__ import annotations

import math
import os

from . import lean
from .configtypes import ListenAddress

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    Check = Callable[[Any], Any]


class Refusal(Exception):
    """A value check failed; the message says what was expected."""


def describe(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _string(value: Any) -> str:
    if not isinstance(value, str):
        raise Refusal(f"expected a string, got {describe(value)}")
    if "\x00" in value:
        raise Refusal("expected a string without NUL characters")
    return value


def _nonempty(value: Any) -> str:
    text = _string(value)
    if not text.strip():
        raise Refusal("expected a non-empty string")
    return text


# Printed to terminals and logs, written into pid files and init scripts: a name or
# path with a control character (ESC, CR, a line separator) could rewrite what an
# operator reads, so none is accepted.
_CONTROL = frozenset(chr(c) for c in (*range(32), *range(127, 160), 0x2028, 0x2029))


def _no_control(text: str) -> str:
    bad = next((c for c in text if c in _CONTROL), None)
    if bad is not None:
        raise Refusal(f"expected no control characters, got {bad!a} in {describe(text)}")
    return text


def _path(value: Any) -> str:
    return _no_control(_nonempty(value))


def _name(value: Any) -> str:
    text = _no_control(_nonempty(value))
    if "/" in text or len(text) > 200:
        raise Refusal(f"expected a one-line name without '/', got {describe(value)}")
    return text


def _entrypoint(value: Any) -> str:
    text = _string(value)
    if not _is_entrypoint(text):
        raise Refusal(f'expected "package.module:function", got {describe(value)}')
    return text


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Refusal(f"expected true or false, got {describe(value)}")
    return value


def _integer(minimum: int, maximum: int = 10_000) -> Check:
    """An integer in [minimum, maximum]; the default cap suits counts of slots and
    processes, ids and limits pass their own."""
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Refusal(f"expected an integer >= {minimum}, got {describe(value)}")
        if value < minimum:
            raise Refusal(f"expected an integer >= {minimum}, got {value}")
        if value > maximum:
            raise Refusal(f"expected an integer <= {maximum}, got {value}")
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
    raise Refusal(f'expected a size like "512M" or a number of bytes > 0, got {describe(value)}')


RLIMIT_INFINITY = -1


def _rlimit(value: Any) -> int:
    """An rlimit: a whole number >= 0, or "infinity" (RLIMIT_INFINITY)."""
    if value == "infinity":
        return RLIMIT_INFINITY
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**63:
        return value
    raise Refusal(f'expected a whole number >= 0 or "infinity", got {describe(value)}')


def _cpu_max(value: Any) -> float:
    """A share of one CPU: "50%", "200%" (two CPUs)."""
    if isinstance(value, str) and value.strip().endswith("%"):
        number = value.strip()[:-1]
        if number.replace(".", "", 1).isdigit() and 0 < float(number) <= 100_000:
            return float(number) / 100
    raise Refusal(f'expected a share of a CPU like "50%", got {describe(value)}')


def _seconds(positive: bool = False) -> Check:
    bound = "> 0" if positive else ">= 0"

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise Refusal(f"expected a number of seconds {bound}, got {describe(value)}")
        number = float(value)
        if math.isnan(number) or number in (float("inf"), float("-inf")) or number > 86400 * 365:
            raise Refusal(f"expected a finite number of seconds, got {describe(value)}")
        if number < 0 or (positive and number == 0):
            raise Refusal(f"expected a number of seconds {bound}, got {describe(value)}")
        return number
    return check


def _string_list(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Refusal(f"expected a list of strings, got {describe(value)}")
    return tuple(_string(item) for item in value)


MAX_DEPTH = 32  # of lists and tables in args: deeper is a mistake, and would overflow a stack


def _plain(value: Any, depth: int = 0) -> Any:
    if depth > MAX_DEPTH:
        raise Refusal(f"lists and tables nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, (str, bool, int, float)):
        if isinstance(value, str) and "\x00" in value:
            raise Refusal("expected strings without NUL characters")
        return value
    if isinstance(value, list):
        return [_plain(item, depth + 1) for item in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    raise Refusal(f"expected strings, numbers, booleans, lists or tables, got {describe(value)}")


def _args(value: Any) -> tuple[Any, ...]:
    if not isinstance(value, list):
        raise Refusal(f"expected a list, got {describe(value)}")
    return tuple(_plain(item) for item in value)


def _umask(value: Any) -> int:
    if isinstance(value, bool):
        raise Refusal(f'expected an octal string like "022", got {describe(value)}')
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and _is_octal(value.strip()):
        number = int(value.strip().removeprefix("0o"), 8)
    else:
        raise Refusal(f'expected an octal string like "022", got {describe(value)}')
    if not 0 <= number <= 0o777:
        raise Refusal(f"expected a umask between 000 and 777 (octal), got {oct(number)}")
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
        raise Refusal(f"unknown or unusable signal {describe(value)}") from None
    if not text.isalnum() or text in ("STOP", "CONT", "CHLD"):
        raise Refusal(f"unknown or unusable signal {describe(value)}")
    return text


def _signals(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not value:
        raise Refusal(f'expected a non-empty list of signal names like ["TERM", "KILL"], got {describe(value)}')
    return tuple(_signal_name(item) for item in value)


def _variable_name(key: Any) -> str:
    if not isinstance(key, str) or not key or "=" in key or any(c in _CONTROL for c in key) or key[0].isdigit():
        raise Refusal(f"invalid variable name {describe(key)}")
    return key


def _names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list):
        raise Refusal(f"expected a list of variable names, got {describe(value)}")
    return tuple(_variable_name(item) for item in value)


def _paths(value: Any) -> tuple[str, ...]:
    """One path or a list of paths (env_file: a leading "-" marks an optional file)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise Refusal(f"expected a path or a list of paths, got {describe(value)}")
    return tuple(_path(item) for item in items)


FACILITIES = ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv",
              "ftp", *(f"local{n}" for n in range(8)))


def _listen(value: Any) -> tuple[ListenAddress, ...]:
    if not isinstance(value, list):
        raise Refusal(f'expected a list of addresses like ["127.0.0.1:8080", "unix:/run/x.sock"], '
                       f"got {describe(value)}")
    found = []
    for number, item in enumerate(value):
        name = f"listen{number}" if number else "listen"
        if isinstance(item, dict):
            unknown = set(item) - {"address", "name"}
            if unknown or "address" not in item:
                raise Refusal(f"expected a table {{ address = ..., name = ... }}, got {describe(item)}")
            name = _variable_name(_string(item.get("name", name)))
            if ":" in name:
                raise Refusal(f"a socket name may not contain ':', got {describe(name)}")
            item = item["address"]
        found.append(parse_address(_no_control(_nonempty(item)), name))
    addresses = [a.address for a in found]
    names = [a.name for a in found]
    for seen in (addresses, names):
        twice = next((x for x in seen if seen.count(x) > 1), None)
        if twice is not None:
            raise Refusal(f"{twice!r} is listed twice")
    return tuple(found)


def parse_address(text: str, name: str) -> ListenAddress:
    """``HOST:PORT``, ``[V6]:PORT``, ``*:PORT``, ``unix:/path`` → ListenAddress."""
    if text.startswith("unix:"):
        path = text[len("unix:"):]
        if not path.startswith("/") or len(path.encode()) > 107:
            raise Refusal(f"expected unix:/absolute/path (at most 107 bytes), got {describe(text)}")
        return ListenAddress(text, name, "unix", path=os.path.normpath(path))
    host, colon, port = text.rpartition(":")
    if not colon or not port.isdigit() or not 0 < int(port) < 65536:
        raise Refusal(f'expected "HOST:PORT", "[::1]:PORT", "*:PORT" or "unix:/path", got {describe(text)}')
    kind = "inet"
    if host.startswith("[") and host.endswith("]"):
        host, kind = host[1:-1], "inet6"
        if ":" not in host:
            raise Refusal(f"expected an IPv6 address in brackets, got {describe(text)}")
    elif host in ("*", ""):
        host = ""
    elif ":" in host:
        raise Refusal(f"put an IPv6 address in brackets ([::1]:PORT), got {describe(text)}")
    return ListenAddress(text, name, kind, host, int(port))


def _env(value: Any) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, dict):
        raise Refusal(f"expected a table of strings, got {describe(value)}")
    pairs = []
    for key, item in value.items():
        _variable_name(key)
        if isinstance(item, bool) or not isinstance(item, (str, int, float)):
            raise Refusal(f"variable {key}: expected a string, got {describe(item)}")
        if "\x00" in str(item):
            raise Refusal(f"variable {key}: a value cannot hold a NUL character")
        pairs.append((key, str(item)))
    return tuple(pairs)


def _nice(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not -20 <= value <= 19:
        raise Refusal(f"expected an integer from -20 to 19, got {describe(value)}")
    return value


def _choice(*allowed: str) -> Check:
    def check(value: Any) -> str:
        if value not in allowed:
            options = ", ".join(f'"{a}"' for a in allowed)
            raise Refusal(f"expected one of {options}, got {describe(value)}")
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
