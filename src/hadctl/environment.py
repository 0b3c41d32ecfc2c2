"""The defined environment every worker starts from, whoever ran hadctl.

A worker's environment is built here, in the controller, and travels in the
worker's spec (``WorkerSpec.environment``), so that a standby started from an
admin's shell, one started by cron's ``fork`` under ``env -i`` and one a main
spawned after a failover get the same variables. In order, later layers win:

  1. the base: PATH (systemd's default), LANG/LANGUAGE/LC_* from the system's
     default locale (/etc/default/locale, else /etc/locale.conf; none: unset),
     HOME, USER, LOGNAME and SHELL of the service's user (from the passwd
     entry, never from the caller);
  2. variables of the caller named by ``pass_env`` (a name ending in ``*`` is
     a prefix), and by ``$HADCTL_PASS_ENV`` (the same, for test harnesses and
     containers: the caller asks for it explicitly), and ``HADCTL_HOST_ID``
     (hadctl's own, which every hadctl command of a host must set alike);
  3. ``env_file``: files of systemd ``KEY=value`` lines (quotes, backslash
     escapes, comments); a missing file is refused (exit 6) unless its name
     in the config starts with ``-``;
  4. ``env``.

Nothing else of the caller's environment reaches a worker (TZ included: list it
in pass_env, or set it in env; unset means /etc/localtime). ``digest`` hashes an
environment so ``status --json`` can show drift between workers.

Imports config (for the type), errors and the standard library; never imported
by the worker.
"""
from __future__ import annotations

import os
import pwd

from .errors import ConfigError
from .lean import TYPE_CHECKING, read_proc

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

    from .config import ServiceConfig
    from .model import SlotReport

DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
LOCALE_FILES = ("/etc/default/locale", "/etc/locale.conf")
PASS_ENV_VARIABLE = "HADCTL_PASS_ENV"
HOST_ID = "HADCTL_HOST_ID"  # passed when set: every hadctl command of a host must set it alike
# Set per process by hadctl or the listen helper: not part of what a digest compares.
VOLATILE = frozenset(("HADC_lock_fd", "HADCTL_FENCING_TOKEN", "LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES",
                      "HADCTL_WORKER"))  # per process: its own pid, its own slot


def build(cfg: ServiceConfig, caller: Mapping[str, str] | None = None,
          locale_files: Iterable[str] = LOCALE_FILES) -> dict[str, str]:
    """The environment of ``cfg``'s workers; ``caller`` is the controller's (os.environ).

    Raises ConfigError (exit 6) for a missing required env_file or a line it cannot read.
    """
    caller = os.environ if caller is None else caller
    env = base(cfg.identity.uid, locale_files)
    # HADCTL_HOST_ID: hadctl's own setting, required in every hadctl command's environment
    names = [HOST_ID, *cfg.pass_env, *caller.get(PASS_ENV_VARIABLE, "").replace(",", " ").split()]
    env.update(passed(names, caller))
    for path in cfg.env_file:
        env.update(read_env_file(path, cfg.config_file))
    env.update(cfg.env)
    return env


def base(uid: int | None, locale_files: Iterable[str] = LOCALE_FILES) -> dict[str, str]:
    """PATH, the system's default locale, and HOME/USER/LOGNAME/SHELL of ``uid``
    (None: the user running hadctl, as the workers then keep its identity)."""
    env = {"PATH": DEFAULT_PATH}
    env.update(system_locale(locale_files))
    try:
        entry = pwd.getpwuid(os.geteuid() if uid is None else uid)
    except KeyError:  # no passwd entry (a bare uid in a container): nothing to say
        return env
    env.update(HOME=entry.pw_dir, USER=entry.pw_name, LOGNAME=entry.pw_name, SHELL=entry.pw_shell or "/bin/sh")
    return env


def system_locale(files: Iterable[str] = LOCALE_FILES) -> dict[str, str]:
    """LANG, LANGUAGE and LC_* of the first readable system locale file; {} if none."""
    for path in files:
        try:
            with open(path, encoding="utf-8", errors="replace") as handle:
                text = handle.read()
        except OSError:
            continue
        try:
            pairs = parse_env_text(text, path)
        except ConfigError:
            return {}
        return {k: v for k, v in pairs if k in ("LANG", "LANGUAGE") or k.startswith("LC_")}
    return {}


def passed(names: Iterable[str], caller: Mapping[str, str]) -> dict[str, str]:
    """The caller's variables named in ``names``; ``PREFIX*`` takes every name with that prefix."""
    found: dict[str, str] = {}
    for name in names:
        if name.endswith("*"):
            found.update((k, v) for k, v in caller.items() if k.startswith(name[:-1]))
        elif name in caller:
            found[name] = caller[name]
    return found


def read_env_file(entry: str, config_file: str = "") -> list[tuple[str, str]]:
    """The pairs of one ``env_file`` entry (a leading ``-``: the file may be missing)."""
    optional = entry.startswith("-")
    path = entry[1:] if optional else entry
    where = f"{config_file}: " if config_file else ""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read(1_000_001)
    except FileNotFoundError:
        if optional:
            return []
        raise ConfigError(f'{where}key "env_file": {path}: no such file (prefix it with "-" if it may be missing)') \
            from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f'{where}key "env_file": cannot read {path}: {reason}') from None
    return parse_env_text(text, path)


def parse_env_text(text: str, path: str) -> list[tuple[str, str]]:
    """systemd's EnvironmentFile syntax: ``KEY=value`` lines; ``#`` and ``;`` start
    comment lines; values may be 'single quoted' (literal) or "double quoted"
    (backslash escapes \\" \\\\ \\$ \\`, and newlines inside); a backslash at the end
    of a line continues it; an ``export`` before a key is allowed (shell files).
    ConfigError names the file and line of anything else."""
    pairs: list[tuple[str, str]] = []
    i, line_no, n = 0, 1, len(text)
    while i < n:
        start_line = line_no
        end = text.find("\n", i)
        end = n if end < 0 else end
        stripped = text[i:end].strip()
        if not stripped or stripped[0] in "#;":
            i, line_no = end + 1, line_no + 1
            continue
        eq = text.find("=", i, end)
        if eq < 0:
            raise ConfigError(f"{path}:{start_line}: expected KEY=value, got {text[i:end].strip()[:40]!r}")
        key = text[i:eq].strip()
        if key.startswith("export "):
            key = key[len("export "):].strip()
        if not key or not all(c.isalnum() or c == "_" for c in key) or key[0].isdigit():
            raise ConfigError(f"{path}:{start_line}: invalid variable name {key[:40]!r}")
        value, i, line_no = _value(text, eq + 1, line_no, path)
        pairs.append((key, value))
    return pairs


def _value(text: str, i: int, line_no: int, path: str) -> tuple[str, int, int]:
    """One value starting at ``i``; returns it, the index after its line, the next line number."""
    n = len(text)
    while i < n and text[i] in " \t":
        i += 1
    out: list[str] = []
    start_line = line_no
    quote = ""
    pending_space = ""
    while i < n:
        c = text[i]
        if quote == "'":
            if c == "'":
                quote = ""
            else:
                line_no += c == "\n"
                out.append(c)
        elif quote == '"':
            if c == '"':
                quote = ""
            elif c == "\\" and i + 1 < n and text[i + 1] in '"\\$`':
                out.append(text[i + 1])
                i += 1
            elif c == "\\" and i + 1 < n and text[i + 1] == "\n":
                i += 1
                line_no += 1
            else:
                line_no += c == "\n"
                out.append(c)
        elif c == "\n":
            break
        elif c == "\\" and i + 1 < n:
            if text[i + 1] == "\n":
                line_no += 1
            else:
                out.append(pending_space + text[i + 1])
                pending_space = ""
            i += 1
        elif c in "'\"":
            out.append(pending_space)
            pending_space = ""
            quote = c
        elif c in " \t":
            pending_space += c
        else:
            out.append(pending_space + c)
            pending_space = ""
        i += 1
    if quote:
        raise ConfigError(f"{path}:{start_line}: unterminated {quote} quote")
    return "".join(out), i + 1, line_no + 1


def digest(env: Mapping[str, str]) -> str:
    """A short hash of an environment (sorted, VOLATILE names left out): equal
    environments give equal digests, whatever their order."""
    try:  # the C module under hashlib: hashlib itself costs status ~10 ms to import
        from _sha256 import sha256  # type: ignore[import-not-found,unused-ignore]
    except ImportError:  # Python >= 3.12
        from _sha2 import sha256  # type: ignore[import-not-found,no-redef,unused-ignore]

    data = "\0".join(f"{k}={v}" for k, v in sorted(env.items()) if k not in VOLATILE)
    found: str = sha256(data.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return found


def of_process(pid: int) -> dict[str, str] | None:
    """The environment process ``pid`` was started with (/proc/PID/environ), None if unreadable."""
    try:
        data = read_proc(f"/proc/{pid}/environ")
    except OSError:
        return None
    env: dict[str, str] = {}
    for item in data.split(b"\0"):
        key, eq, value = item.partition(b"=")
        if eq:
            env[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
    return env


def process_digest(pid: int | None) -> str | None:
    """``digest`` of the environment ``pid`` started with; None when it cannot be read."""
    env = of_process(pid) if pid is not None else None
    return None if env is None else digest(env)


def slot_digests(reports: Iterable[SlotReport]) -> dict[str, str | None]:
    """``{"main-1": digest, ...}`` for each running slot of this host (status --json);
    None where the environment cannot be read (another user's process)."""
    return {f"{r.role.value}-{r.slot}": process_digest(r.pid) for r in reports if r.running and r.host is None}
