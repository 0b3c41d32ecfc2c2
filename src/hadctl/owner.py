"""Which service a pid_dir belongs to, and finding a service's workers wherever
they run.

Nothing in a pid_dir's lock and pid files says whose they are: two services
pointed at one pid_dir by mistake would see, and stop, each other's processes.
``start`` (through control.prepare) writes ``PID_DIR/hadctl-owner``: the
service's name, then its config file; every action (control.Service) refuses a
pid_dir that names another service (ConfigError, exit 6, naming both). The
name decides: the same service whose config file moved is let in, and start
records the new path. A pid_dir with no owner file (new, or HADaemon::Control's)
is anyone's until start claims it.

Every worker carries ``HADCTL_SERVICE=<name>:<config file>`` in its environment
(``marker``; set by control when it spawns, inherited by the standbys a main
spawns), which /proc/PID/environ shows for its whole life. So a pid_dir changed
in the config while the service runs is found (``workers_elsewhere``): the
workers with this marker that use another pid_dir, which start refuses to
double and status and stop report.

Imports errors, lean, probe and safepath from hadctl; never click or rich.
"""
from __future__ import annotations

import errno
import os

from . import lean, probe
from .errors import ConfigError
from .lean import TYPE_CHECKING
from .safepath import open_beneath

if TYPE_CHECKING:
    from .config import ServiceConfig

OWNER_FILE = "hadctl-owner"
VARIABLE = "HADCTL_SERVICE"  # contain.MARKER: one marker for both uses
_ALIVE_LOCK = "hadctl-alive.lock"  # layout.alive_lock's name: every worker holds it open for its life


def owner_path(cfg: ServiceConfig) -> str:
    return os.path.join(cfg.pid_dir, OWNER_FILE)


def read_owner(path: str) -> tuple[str, str] | None:
    """``(name, config file)`` recorded in the owner file at ``path``; None when
    there is none (or it cannot be read: it decides nothing then)."""
    try:
        fd = open_beneath(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        data = os.read(fd, 8192).decode("utf-8", "replace")
    except OSError:
        return None
    finally:
        os.close(fd)
    lines = data.split("\n")
    if not lines[0]:
        return None
    return lines[0], lines[1] if len(lines) > 1 else ""


def check(cfg: ServiceConfig) -> None:
    """Refuse a pid_dir recorded as another service's: ConfigError (exit 6)."""
    found = read_owner(owner_path(cfg))
    if found is not None and found[0] != cfg.name:
        raise ConfigError(f'{cfg.config_file}: key "pid_dir": {cfg.pid_dir} belongs to service {found[0]} '
                          f"({found[1] or 'config file unknown'}), not to {cfg.name}; "
                          "give each service its own pid_dir")


def claim(cfg: ServiceConfig, owner: tuple[int, int] | None = None) -> None:
    """Record ``cfg``'s service as the owner of its pid_dir (after ``check``), if not
    yet recorded as it is. Write-then-rename, so a reader never sees half a file;
    ``owner`` (uid, gid) gets the file, as it gets the folders start makes.
    Raises OSError."""
    config = os.path.abspath(cfg.config_file)
    if read_owner(owner_path(cfg)) == (cfg.name, config):
        return
    path = owner_path(cfg)
    temporary = f"{path}.{os.getpid()}.tmp"
    fd = open_beneath(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, f"{cfg.name}\n{config}\n".encode())
        if owner is not None:
            os.fchown(fd, owner[0], owner[1])
    finally:
        os.close(fd)
    # both names in pid_dir, whose folders on the way prepare has just walked
    os.replace(temporary, path)


def marker(cfg: ServiceConfig) -> str:
    """The value of HADCTL_SERVICE in every worker of ``cfg``'s service (contain.marker)."""
    from .contain import marker as service_marker

    return service_marker(cfg.name, os.path.abspath(cfg.config_file))


def workers_elsewhere(cfg: ServiceConfig) -> dict[int, str]:
    """Live workers of ``cfg``'s service that use another pid_dir (it was changed in
    the config while they ran): pid -> the pid_dir they use ("" when unknown).
    As root every process is seen; otherwise only this user's own."""
    ours = os.path.realpath(cfg.pid_dir)
    found: dict[int, str] = {}
    for pid in _marked().get(marker(cfg), ()):
        if not probe.is_worker(pid, cfg.name):
            continue
        targets = [target.removesuffix(" (deleted)") for target in probe.fd_targets(pid).values()]
        folders = {os.path.dirname(target) for target in targets if os.path.basename(target) == _ALIVE_LOCK}
        if ours not in folders:
            found[pid] = ", ".join(sorted(folders))
    return found


_MARKED: list[dict[str, list[int]]] = []  # read once per controller: status --all asks for every service


def _marked() -> dict[str, list[int]]:
    """Every process carrying a HADCTL_SERVICE marker: marker -> pids (a walk over
    /proc/*/environ, which shows a process's environment as it started)."""
    if _MARKED:
        return _MARKED[0]
    prefix = f"{VARIABLE}=".encode()
    table: dict[str, list[int]] = {}
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == me:
            continue
        try:
            data = lean.read_proc(f"/proc/{name}/environ")
        except OSError as exc:
            if exc.errno not in (errno.ENOENT, errno.EACCES, errno.ESRCH, errno.EPERM):
                raise
            continue  # gone, or not ours to read
        at = data.find(b"\0" + prefix)
        if at < 0 and not data.startswith(prefix):
            continue
        value = data[at + 1 if at >= 0 else 0:].split(b"\0", 1)[0][len(prefix):]
        table.setdefault(value.decode("utf-8", "replace"), []).append(int(name))
    _MARKED.append(table)
    return table
