"""``hadctl check`` (and ``check --all``): validate a service without starting anything.

Like ``nginx -t``: every problem found, one line each, exit 6 if any, else 0 with a
short summary. What is checked, in order:

  1. the service file, key by key (config.py stops at its first error; here each
     key is validated alone through config's own checks, so every bad key is
     named), required keys, then the checks across keys (config.load);
  2. user and group exist;
  3. env_file files readable and well formed;
  4. folders (pid_dir, lock folders, the folders of the log and output files,
     directory): creatable, not a file, not a symbolic link where hadctl refuses one;
  5. the entrypoint and warmup importable *as the service's user, with the
     service's environment, umask and folder*, in a throw-away subprocess (no
     function is called, no warmup run);
  6. each ``listen`` address bindable (bound and closed at once; skipped while the
     service runs, since its workers hold them);
  7. ``[limits]``: rlimits within what may be set, cgroup v2 controllers present.

Imports config, environment, errors, model, preflight, control (read only) and the standard
library; never click or rich. Starts nothing that outlives it.
"""
from __future__ import annotations

import os
import sys

from .errors import ConfigError, HadctlError
from .lean import TYPE_CHECKING
from .model import Outcome, Step

if TYPE_CHECKING:
    from typing import Any

    from .config import ServiceConfig

IMPORT_TIMEOUT = 60.0
_IMPORT_SCRIPT = """\
import sys
from hadctl.entrypoint import EntrypointError, resolve
sys.path[:0] = sys.argv[3:]
for key, target in (("entrypoint", sys.argv[1]), ("warmup", sys.argv[2])):
    if target:
        try:
            resolve(target)
        except EntrypointError as exc:
            print(f"{key} {target}: {exc} (imported as uid %d)" % __import__("os").getuid())
        except BaseException as exc:
            print(f"{key} {target}: {type(exc).__name__}: {exc}")
"""


def check(path: str) -> Outcome:
    """Every problem of the service file at ``path``; exit status 6 if any."""
    problems, cfg = config_problems(path)
    name = cfg.name if cfg is not None else os.path.basename(path)
    checked = ["config"]
    if cfg is not None:
        problems += env_file_problems(cfg)
        problems += folder_problems(cfg)
        problems += import_problems(cfg)
        problems += listen_problems(cfg)
        problems += limits_problems(cfg)
        checked += ["users", "env_file", "folders", "imports" + (" (as " + (cfg.identity.user or str(cfg.identity.uid))
                    + ")" if cfg.identity.uid is not None else ""), "listen", "limits"]
    steps = [Step(problem, "Failed", False) for problem in problems]
    if not problems:
        steps.append(Step(f"{os.path.abspath(path)}: {', '.join(checked)} checked, no problem", "OK"))
    return Outcome(name, "check", 6 if problems else 0, tuple(steps))


def check_all(folder: str) -> tuple[list[Outcome], int]:
    """``check --all``: every ``*.toml`` of ``folder``; 6 if any has a problem."""
    from .services import config_files

    outcomes = [check(path) for path in config_files(folder)]
    return outcomes, max((o.exit_status for o in outcomes), default=0)


# ---------------------------------------------------------------- 1, 2: the file, users


def config_problems(path: str) -> tuple[list[str], ServiceConfig | None]:
    """Each key's problem, then (if none) what config.load refuses; and the config if it loads."""
    from . import config

    try:
        raw = config._read_toml(os.path.abspath(path))
    except ConfigError as exc:
        return [str(exc)], None
    where = os.path.abspath(path)
    problems: list[str] = []
    tables = {"locks": config.LOCKS_KEYS, "init": config.INIT_KEYS, "limits": config.LIMITS_KEYS}
    for key, value in raw.items():
        if key in tables:
            if not isinstance(value, dict):
                problems.append(f'{where}: key "{key}": expected a table [{key}]')
                continue
            for inner, item in value.items():
                problems += _key_problem(where, f"{key}.", inner, item, tables[key])
        else:
            problems += _key_problem(where, "", key, value, config.TOP_KEYS)
    problems += [f'{where}: missing required key "{key}"' for key in config.REQUIRED if key not in raw]
    problems += _identity_problems(where, raw)
    if problems:
        return problems, None
    try:
        cfg = config.load(path)
    except HadctlError as exc:
        return [str(exc)], None
    from .outputs import RESERVED

    if cfg.reopen_signal in RESERVED:
        problems.append(f'{cfg.config_file}: key "reopen_signal": {cfg.reopen_signal} is a signal the workers '
                        "live by (TERM, INT, KILL, IO, ALRM, PIPE); choose another, such as USR2 or HUP")
    return problems, cfg


def _key_problem(path: str, where: str, key: str, value: Any, keys: dict[str, Any]) -> list[str]:
    from .config import _validate_table

    try:
        _validate_table(path, where, {key: value}, keys)
    except ConfigError as exc:
        return [str(exc)]
    return []


def _identity_problems(path: str, raw: dict[str, Any]) -> list[str]:
    import grp
    import pwd

    problems = []
    user, group = raw.get("user"), raw.get("group")
    if isinstance(user, str):
        try:
            pwd.getpwnam(user)
        except KeyError:
            problems.append(f'{path}: key "user": unknown user {user!r}')
    if isinstance(group, str):
        try:
            grp.getgrnam(group)
        except KeyError:
            problems.append(f'{path}: key "group": unknown group {group!r}')
    return problems


# ---------------------------------------------------------------- 3, 4: env files, folders


def env_file_problems(cfg: ServiceConfig) -> list[str]:
    from .environment import read_env_file

    problems = []
    for entry in cfg.env_file:
        try:
            read_env_file(entry, cfg.config_file)
        except ConfigError as exc:
            problems.append(str(exc))
    return problems


def folder_problems(cfg: ServiceConfig) -> list[str]:
    """What control.prepare would refuse, for every folder and file at once."""
    import stat

    from . import safepath
    from .config import SYSLOG
    from .preflight import not_a_file, read_only

    problems = []
    items: list[tuple[str, str | None, bool]] = [
        ("pid_dir", cfg.pid_dir, True), ("locks.path", cfg.locks.path, True),
        ("locks.standby_path", cfg.locks.standby_path, True), ("log_file", cfg.log_file, False),
        ("stdout_file", cfg.stdout_file, False), ("stderr_file", cfg.stderr_file, False)]
    for key, path, folder in items:
        if path is None or path == SYSLOG:
            continue
        existing = path
        while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
            existing = os.path.dirname(existing)
        prefix = f'{cfg.config_file}: key "{key}": {path}'
        try:
            safepath.check_walk(path)  # as root: a link on the way that the service user could plant
        except OSError as exc:
            problems.append(f"{prefix}: {exc.filename} is {exc.strerror}: not followed as root")
            continue
        if read_only(existing):
            problems.append(f"{prefix}: {existing} is on a read-only file system")
        elif existing == path:
            info = os.lstat(path)
            if folder and stat.S_ISLNK(info.st_mode):
                problems.append(f"{prefix} is a symbolic link (hadctl wants the folder itself)")
            elif folder != os.path.isdir(path):
                problems.append(f"{prefix} {'is not a directory' if folder else 'is a directory'}")
            elif not folder and not_a_file(path) is not None:
                problems.append(f"{prefix} {not_a_file(path)}")
            elif not os.access(path, os.W_OK):
                problems.append(f"{prefix}: cannot write (permission denied)")
        elif not os.path.isdir(existing):
            problems.append(f"{prefix}: cannot be created: {existing} is not a directory")
        elif not os.access(existing, os.W_OK | os.X_OK):
            problems.append(f"{prefix}: cannot be created: no permission to write in {existing}")
    return problems


# ---------------------------------------------------------------- 5: imports


def import_problems(cfg: ServiceConfig) -> list[str]:
    """Import the entrypoint and warmup in a throw-away interpreter that runs as the
    service will: its user and groups, environment, umask and folder."""
    import subprocess

    from .environment import build

    try:
        env = build(cfg)
    except ConfigError:
        return []  # env_file_problems named it
    hadctl_dir = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    options: dict[str, Any] = {}
    ident = cfg.identity
    if ident.uid is not None and ident.uid != os.geteuid():
        options["user"] = ident.uid
    if ident.gid is not None and ident.gid != os.getegid():
        options["group"] = ident.gid
        if ident.user is not None and os.geteuid() == 0:
            options["extra_groups"] = os.getgrouplist(ident.user, ident.gid)
    try:
        result = subprocess.run([sys.executable, "-c", _IMPORT_SCRIPT, cfg.entrypoint, cfg.warmup or "",
                                 *cfg.python_path, hadctl_dir],
                                env=env, cwd=cfg.directory or "/", umask=0o022 if cfg.umask is None else cfg.umask,
                                capture_output=True, text=True, timeout=IMPORT_TIMEOUT, check=False, **options)
    except subprocess.TimeoutExpired:
        return [f"importing {cfg.entrypoint} took more than {IMPORT_TIMEOUT:g} s"]
    except OSError as exc:
        return [f"cannot run {sys.executable} as the service's user: {exc.strerror}"]
    problems = [line for line in result.stdout.splitlines() if line.strip()]
    if result.returncode != 0 and not problems:
        last = (result.stderr.strip().splitlines() or ["no message"])[-1]
        problems.append(f"importing {cfg.entrypoint} failed (exit {result.returncode}): {last}")
    return problems


# ---------------------------------------------------------------- 6, 7: listen, limits


def listen_problems(cfg: ServiceConfig) -> list[str]:
    """Bind each address and close it at once; skipped while any worker runs (it holds them)."""
    import socket

    if not cfg.listen or _service_runs(cfg):
        return []
    problems = []
    for address in cfg.listen:
        if address.kind == "unix":
            problem = _unix_problem(address.path)
            if problem:
                problems.append(f"listen {address.address}: {problem}")
            continue
        family = socket.AF_INET6 if address.kind == "inet6" else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.host, address.port))
        except OSError as exc:
            problems.append(f"listen {address.address}: cannot bind: {exc.strerror}")
        finally:
            sock.close()
    return problems


def _unix_problem(path: str) -> str:
    import socket
    import stat

    folder = os.path.dirname(path)
    if not os.path.isdir(folder):
        return f"folder {folder} does not exist"
    if not os.path.lexists(path):
        return "" if os.access(folder, os.W_OK | os.X_OK) else f"no permission to create a socket in {folder}"
    if not stat.S_ISSOCK(os.lstat(path).st_mode):
        return f"{path} exists and is not a socket"
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
        return f"{path} is in use by another process"
    except OSError:
        return ""  # a stale socket: hadctl replaces it
    finally:
        probe.close()


def _service_runs(cfg: ServiceConfig) -> bool:
    if not os.path.isdir(cfg.pid_dir):
        return False
    from .control import Service

    try:
        return any(r.running for r in Service(cfg).slots()[0])
    except (OSError, HadctlError):
        return False


_RLIMITS = {"nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC", "core": "RLIMIT_CORE",
            "memlock": "RLIMIT_MEMLOCK", "address_space": "RLIMIT_AS"}


def limits_problems(cfg: ServiceConfig) -> list[str]:
    """An rlimit above the hard limit (not root) or above fs.nr_open (nofile); a pool of
    slots that cannot fit the open-file limit; a cgroup limit without its cgroup v2
    controller."""
    import resource

    from .config import RLIMIT_INFINITY

    problems = []
    limits = cfg.limits
    for field, name in _RLIMITS.items():
        value = getattr(limits, field)
        if value is None:
            continue
        key = "as" if field == "address_space" else field
        wanted = resource.RLIM_INFINITY if value == RLIMIT_INFINITY else value
        _soft, hard = resource.getrlimit(getattr(resource, name))
        if os.geteuid() != 0 and hard != resource.RLIM_INFINITY and (wanted == resource.RLIM_INFINITY or wanted > hard):
            problems.append(f'{cfg.config_file}: key "limits.{key}": {value} is above the hard limit {hard} '
                            "and hadctl does not run as root")
        if field == "nofile":
            nr_open = _read_int("/proc/sys/fs/nr_open")
            if nr_open is not None and (wanted == resource.RLIM_INFINITY or wanted > nr_open):
                problems.append(f'{cfg.config_file}: key "limits.nofile": {value} is above fs.nr_open ({nr_open})')
    from .errors import ActionFailedError
    from .preflight import check_open_files

    try:
        check_open_files(cfg)  # the pool against the open-file limit, as start checks it
    except ActionFailedError as exc:
        problems.append(str(exc))
    wanted_controllers = [c for c, v in (("memory", limits.memory_max), ("cpu", limits.cpu_max),
                                         ("pids", limits.pids_max)) if v is not None]
    if wanted_controllers:
        try:
            with open("/sys/fs/cgroup/cgroup.controllers") as handle:
                available = handle.read().split()
        except OSError:
            available = []
        for controller in wanted_controllers:
            if controller not in available:
                key = {"memory": "memory_max", "cpu": "cpu_max", "pids": "pids_max"}[controller]
                problems.append(f'{cfg.config_file}: key "limits.{key}": the cgroup v2 controller "{controller}" '
                                "is not available on this host")
    return problems


def _read_int(path: str) -> int | None:
    try:
        with open(path) as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return None
