"""Containment: which processes belong to a service, whose they are, and ending them.

Every process a worker starts belongs to its service, even one that called
setsid() and was re-parented to init. Two ways to know it, one per host:

* ``cgroup``: a cgroup v2 folder per service (``BASE/hadctl/<service id>``) and a
  child ``w-PID`` per worker; a worker moves itself into its own child as it
  starts (``join``), so everything it starts is born there and cannot leave
  (moving out needs write access above the service's folder). Used where hadctl
  may create the folder: root, or a delegated subtree named by ``$HADCTL_CGROUP``.
* ``marker``: elsewhere, the environment: every worker starts with
  ``HADCTL_SERVICE=<name>:<config file>`` (``marker``: not tied to pid_dir, so a
  worker is still the service's when pid_dir is changed under it; owner.py finds
  such workers by it), sets ``HADCTL_WORKER=<its pid>`` for what it
  starts, and /proc/PID/environ tells both. A process that clears its
  environment escapes this mode (not the cgroup one).

``$HADCTL_CGROUP``: ``off`` forces the marker mode; an absolute path is the
cgroup v2 folder to make services' folders in (a delegated subtree); unset, the
cgroup2 mount of /proc/self/mounts plus ``/hadctl``.

A process is signalled only through a pidfd opened *first*, after which its
membership is checked once more (``Member.confirm``): a pid that died and was
reused by a stranger meanwhile is never signalled.

*Leftovers* are members whose worker has exited (a dead main's pool, a setsid
daemon it started): ``leftovers`` finds them, ``end`` runs a signal ladder on any
members. The worker imports this module: the standard library's os, and lean,
probe and record only.
"""
from __future__ import annotations

import os
import time

from . import lean, probe

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .config import ServiceConfig

MARKER = "HADCTL_SERVICE"
OWNER = "HADCTL_WORKER"
CGROUP_ENV = "HADCTL_CGROUP"
CGROUP = "cgroup"
MARKER_MODE = "marker"
_WORKER_PREFIX = "w-"
_CONTROLLERS = {"memory_max": "memory", "cpu_max": "cpu", "pids_max": "pids"}
CPU_PERIOD = 100_000  # cpu.max period, microseconds


def marker(name: str, config_file: str) -> str:
    """The value of HADCTL_SERVICE in every process of the service (``config_file``
    absolute, as config.load makes it)."""
    return f"{name}:{config_file}"


def service_id(name: str, pid_dir: str) -> str:
    """The service's cgroup name: its name and a hash of its pid_dir's real path (two
    services may share a name, never a pid_dir)."""
    import zlib

    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:64]
    return f"{safe}-{zlib.crc32(os.path.realpath(pid_dir).encode()):08x}"


# ------------------------------------------------------------ cgroup v2


_MOUNT: list[str | None] = []  # read once per process: status --all asks twice for every service


def cgroup2_mount() -> str | None:
    """Where cgroup v2 is mounted (/proc/self/mounts), or None. Read once per process:
    the services' cgroups (in every worker's spec) lie beneath it, so it cannot move
    under them."""
    if not _MOUNT:
        _MOUNT.append(_find_cgroup2_mount())
    return _MOUNT[0]


def _find_cgroup2_mount() -> str | None:
    try:
        with open("/proc/self/mounts") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) > 2 and fields[2] == "cgroup2":
                    return fields[1]
    except OSError:
        pass
    return None


def cgroup_base() -> str | None:
    """The folder services' cgroups go in, or None for the marker mode (see the docstring)."""
    chosen = os.environ.get(CGROUP_ENV, "")
    if chosen == "off":
        return None
    if chosen.startswith("/"):
        return chosen.rstrip("/") or None
    mount = cgroup2_mount()
    return None if mount is None else os.path.join(mount, "hadctl")


def cgroup_dir(sid: str) -> str:
    """The service's cgroup folder, or "" when none may be made here (marker mode)."""
    base = cgroup_base()
    if base is None:
        return ""
    parent = base if os.path.isdir(base) else os.path.dirname(base)
    if not os.path.exists(os.path.join(parent, "cgroup.procs")) or not os.access(parent, os.W_OK):
        return ""
    return os.path.join(base, sid)


def mode(cgroup: str) -> str:
    """``cgroup`` when the service's cgroup folder exists, else ``marker``."""
    return CGROUP if cgroup and os.path.isdir(cgroup) else MARKER_MODE


def make_cgroup(cgroup: str, uid: int | None, gid: int | None) -> str:
    """Create the service's cgroup folder (and the base above it); given to the
    service's user (cgroup.procs, cgroup.threads, cgroup.subtree_control: a delegated
    subtree) so an unprivileged worker can make and join its own child. Returns the
    mode in force; OSError is left to the caller."""
    if not cgroup:
        return MARKER_MODE
    base = os.path.dirname(cgroup)
    if not os.path.isdir(base):
        os.mkdir(base, 0o755)
    if not os.path.isdir(cgroup):
        os.mkdir(cgroup, 0o755)
    if uid is not None and os.geteuid() == 0:
        for name in ("", "cgroup.procs", "cgroup.threads", "cgroup.subtree_control"):
            os.chown(os.path.join(cgroup, name), uid, -1 if gid is None else gid, follow_symlinks=False)
    return CGROUP


def join(cgroup: str, pid: int) -> bool:
    """Move ``pid`` (this worker) into its own child ``w-PID`` of the service's cgroup;
    False when it cannot (no folder, not permitted): the marker still tracks it."""
    if not cgroup:
        return False
    mine = os.path.join(cgroup, f"{_WORKER_PREFIX}{pid}")
    try:
        os.mkdir(mine)
    except FileExistsError:
        pass
    except OSError:
        return False
    try:
        fd = os.open(os.path.join(mine, "cgroup.procs"), os.O_WRONLY)
        try:
            os.write(fd, str(pid).encode())
        finally:
            os.close(fd)
    except OSError:
        return False
    return True


def apply_limits(cgroup: str, memory_max: int | None, cpu_max: float | None, pids_max: int | None) -> list[str]:
    """Write the cgroup limits that are set; returns one problem per limit that cannot
    be applied (no cgroup, or its controller is not enabled here), [] when all are."""
    wanted = {key: value for key, value in (("memory_max", memory_max), ("cpu_max", cpu_max),
                                           ("pids_max", pids_max)) if value is not None}
    if not wanted:
        return []
    if not cgroup or not os.path.isdir(cgroup):
        return [f"[limits] {key}: no cgroup v2 folder may be made for this service here "
                f"(marker mode); the limit cannot be applied" for key in wanted]
    base = os.path.dirname(cgroup)
    available = _read(os.path.join(base, "cgroup.controllers")).split()
    problems = []
    for key, value in wanted.items():
        controller = _CONTROLLERS[key]
        if controller not in available:
            problems.append(f"[limits] {key}: the cgroup v2 {controller} controller is not available in {base}")
            continue
        try:
            _write(os.path.join(base, "cgroup.subtree_control"), f"+{controller}")
            if key == "memory_max":
                _write(os.path.join(cgroup, "memory.max"), str(value))
            elif key == "cpu_max":
                _write(os.path.join(cgroup, "cpu.max"), f"{int(float(value) * CPU_PERIOD)} {CPU_PERIOD}")
            else:
                _write(os.path.join(cgroup, "pids.max"), str(value))
        except OSError as exc:
            problems.append(f"[limits] {key}: cannot set it in {cgroup}: {exc.strerror}")
    return problems


def remove_empty(cgroup: str) -> None:
    """Remove the service's empty worker children (their workers and leftovers are gone)."""
    for name in probe.listdir(cgroup):
        if name.startswith(_WORKER_PREFIX):
            try:
                os.rmdir(os.path.join(cgroup, name))
            except OSError:
                pass  # still populated, or already gone


def remove_cgroup(cgroup: str) -> None:
    """Remove the service's cgroup folder once nothing lives in it (after a stop)."""
    if cgroup and os.path.isdir(cgroup):
        remove_empty(cgroup)
        try:
            os.rmdir(cgroup)
        except OSError:
            pass


# ------------------------------------------------------------ members


class Member:
    """One process of the service: ``owner`` is the worker it belongs to (itself for a
    worker, or a process whose worker could not be told)."""

    __slots__ = ("pid", "owner")

    def __init__(self, pid: int, owner: int) -> None:
        self.pid = pid
        self.owner = owner

    def __repr__(self) -> str:
        return f"Member({self.pid}, owner={self.owner})"


class Finder:
    """Finds the members of one service, in the mode in force."""

    def __init__(self, sid: str, cgroup: str, environs: dict[int, bytes] | None = None) -> None:
        self.sid = sid
        self.environs = environs  # pid -> /proc/PID/environ, shared by the services of one status --all
        self.cgroup = cgroup if mode(cgroup) == CGROUP else ""
        self.mode = CGROUP if self.cgroup else MARKER_MODE
        self._needle = f"{MARKER}={sid}\0".encode()
        # the cgroup as /proc/PID/cgroup names it: relative to the cgroup2 mount
        self._line = "0::" + self.cgroup[len(cgroup2_mount() or ""):] if self.cgroup else ""

    def members(self, mine: set[int] | None = None) -> list[Member]:
        """Every live process of the service (zombies are gone already), but this
        process and its ancestors (a controller run from inside the service; ``mine``:
        them, when the caller has them already)."""
        mine = _self_and_ancestors() if mine is None else mine
        found = self._cgroup_members() if self.cgroup else self._marker_members()
        return [m for m in found if m.pid not in mine and probe.is_alive(m.pid)]

    def _cgroup_members(self) -> list[Member]:
        found: list[Member] = []
        for name, folder in _subfolders(self.cgroup):
            owner = int(name[len(_WORKER_PREFIX):]) if name.startswith(_WORKER_PREFIX) and \
                name[len(_WORKER_PREFIX):].isdigit() else 0
            found.extend(Member(pid, owner or pid) for pid in _procs_below(folder))
        found.extend(Member(pid, pid) for pid in _ints(_read(os.path.join(self.cgroup, "cgroup.procs"))))
        return found

    def _marker_members(self) -> list[Member]:
        found = []
        for name in os.listdir("/proc"):
            if name.isdigit():
                owner = self._owner_by_marker(int(name))
                if owner is not None:
                    found.append(Member(int(name), owner))
        return found

    def _owner_by_marker(self, pid: int, cached: bool = True) -> int | None:
        data = self.environs.get(pid) if cached and self.environs is not None else None
        if data is None:
            try:
                data = b"\0" + lean.read_proc(f"/proc/{pid}/environ")
            except OSError:
                data = b""
            if self.environs is not None:
                self.environs[pid] = data
        if b"\0" + self._needle not in data:
            return None
        start = data.find(f"\0{OWNER}=".encode())
        if start < 0:
            return pid
        value = data[start + len(OWNER) + 2:data.find(b"\0", start + 1)]
        return int(value) if value.isdigit() else pid

    def is_member(self, pid: int) -> bool:
        """Checked once more after a pidfd is open on ``pid``: still of this service."""
        if self.cgroup:
            text = _read(f"/proc/{pid}/cgroup")
            return any(line == self._line or line.startswith(self._line + "/") for line in text.splitlines())
        return self._owner_by_marker(pid, cached=False) is not None

    def leftovers(self, workers: set[int] | None = None) -> list[Member]:
        """Members whose worker has exited: what a dead main left behind. Processes
        that are workers (``workers``: the alive lock's holders; owners that still
        live) are never leftovers."""
        found = []
        for member in self.members():
            if member.owner == member.pid or (workers is not None and member.pid in workers):
                continue
            if probe.is_alive(member.owner):
                continue
            found.append(member)
        return found

    def tree(self, pid: int) -> list[int]:
        """``pid`` (a worker) and the members it owns."""
        return [pid] + [m.pid for m in self.members() if m.owner == pid and m.pid != pid]


def _procs_below(folder: str) -> list[int]:
    pids = _ints(_read(os.path.join(folder, "cgroup.procs")))
    for name, below in _subfolders(folder):
        if not name.startswith("."):
            pids += _procs_below(below)
    return pids


def _subfolders(folder: str) -> list[tuple[str, str]]:
    """(name, path) of the child cgroups of ``folder``; [] when it cannot be listed.
    The file type comes with the listing (scandir): a cgroup folder holds some thirty
    interface files, and a stat of each cost status --all most of its time."""
    try:
        with os.scandir(folder) as entries:
            return [(entry.name, entry.path) for entry in entries if _is_dir(entry)]
    except OSError:
        return []


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()
    except OSError:
        return False


def _self_and_ancestors() -> set[int]:
    found = set()
    pid = os.getpid()
    while pid > 1 and pid not in found:
        found.add(pid)
        stat = probe.proc_stat(pid)
        pid = stat.ppid if stat is not None else 0
    return found


# ------------------------------------------------------------ ending them


def command(pid: int) -> str:
    """The command line of ``pid`` for a log line (``?`` when gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            words = handle.read().rstrip(b"\0").split(b"\0")
    except OSError:
        return "?"
    return " ".join(w.decode("utf-8", "replace") for w in words)[:200] or "?"


def end(finder: Finder, members: list[Member], ladder: tuple[str, ...], timeout: float,
        say: Callable[[str], None] | None = None) -> list[int]:
    """Run the signal ``ladder`` on ``members``: each signal to those still alive, then
    wait up to ``timeout`` for their exits (on pidfds). Each pid is opened as a pidfd
    first and then confirmed a member, so a recycled pid is never signalled. With the
    cgroup mode the last step (KILL) is also written to cgroup.kill of the dead
    workers' children. Returns the pids that survived."""
    targets: list[tuple[int, int]] = []
    for member in members:
        try:
            pidfd = os.pidfd_open(member.pid)
        except OSError:
            continue  # gone already
        if not finder.is_member(member.pid):
            os.close(pidfd)
            continue
        targets.append((member.pid, pidfd))
    try:
        for number, name in enumerate(ladder):
            if not targets:
                break
            signum = lean.signum(name)
            if say is not None:
                say(f"SIG{name} to {len(targets)} processes: {' '.join(str(p) for p, _f in targets)}")
            for _pid, pidfd in targets:
                try:
                    lean.pidfd_send_signal(pidfd, signum)
                    if signum not in (lean.SIGKILL, lean.SIGCONT):
                        lean.pidfd_send_signal(pidfd, lean.SIGCONT)  # a stopped process must run to die
                except ProcessLookupError:
                    pass
            wait = timeout if number < len(ladder) - 1 else max(timeout, 1.0)
            left = set(probe.wait_for_exit([f for _p, f in targets], time.monotonic() + wait))
            for _pid, pidfd in targets:
                if pidfd not in left:
                    os.close(pidfd)
            targets = [(p, f) for p, f in targets if f in left]
        return [p for p, _f in targets]
    finally:
        for _pid, pidfd in targets:
            os.close(pidfd)


def sweep(finder: Finder, alive_lock: str, ladder: tuple[str, ...], timeout: float, log: Any, who: str) -> int:
    """End the leftovers of exited workers (``Finder.leftovers``; never a holder of the
    service's alive lock, which only workers hold), logged with pids and commands as
    ended by ``who``; then remove the emptied cgroup children. Returns how many survived."""
    found = finder.leftovers()
    if found:
        from .locks.flock import holders_of

        workers = set(holders_of(alive_lock))
        found = [m for m in found if m.pid not in workers]
    if found:
        log.warn(f"{who}: ending {len(found)} leftover processes of exited workers: "
                 + "; ".join(f"pid {m.pid} of {m.owner}: {command(m.pid)}" for m in found))
        survivors = end(finder, found, ladder, timeout, log.trace)
        if survivors:
            log.error(f"leftover processes survived {'/'.join(ladder)}: " + " ".join(map(str, survivors)))
    if finder.cgroup:
        remove_empty(finder.cgroup)
    return len(survivors) if found else 0


# ------------------------------------------------------------ figures


def _read(path: str) -> str:
    try:
        return lean.read_proc(path).decode()
    except OSError:
        return ""


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_NOFOLLOW)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def _ints(text: str) -> list[int]:
    return [int(word) for word in text.split() if word.isdigit()]


def figures(pids: list[int]) -> dict[str, float]:
    """Summed figures of ``pids`` (a main and its descendants): ``rss`` bytes, ``cpu``
    seconds (user + system), ``processes``; and ``uptime`` seconds of the first."""
    ticks = os.sysconf("SC_CLK_TCK")
    page = os.sysconf("SC_PAGE_SIZE")
    rss = cpu = 0.0
    count = 0
    uptime = 0.0
    for index, pid in enumerate(pids):
        stat = probe.proc_stat(pid)
        if stat is None:
            continue
        count += 1
        rss += stat.rss_pages * page
        cpu += (stat.utime + stat.stime) / ticks
        if index == 0:
            try:
                since_boot = float(_read("/proc/uptime").split()[0])
            except (ValueError, IndexError):
                since_boot = 0.0
            uptime = max(0.0, since_boot - stat.starttime / ticks)
    return {"uptime": round(uptime, 2), "rss": int(rss), "cpu": round(cpu, 2), "processes": count}


def tree_rss(pids: list[int]) -> int:
    """Resident bytes of ``pids`` together."""
    page = os.sysconf("SC_PAGE_SIZE")
    total = 0
    for pid in pids:
        stat = probe.proc_stat(pid)
        if stat is not None:
            total += stat.rss_pages * page
    return total


# ------------------------------------------------------------ the controller's side


def prepare_for(cfg: ServiceConfig) -> str:
    """Before the first spawn: make the service's cgroup (where hadctl may) and apply
    ``[limits]`` memory_max, cpu_max, pids_max. Returns the mode in force; raises
    ConfigError (6) naming each cgroup limit that is set but cannot be applied here."""
    from .errors import ConfigError

    sid = service_id(cfg.name, cfg.pid_dir)
    cgroup = cgroup_dir(sid)
    try:
        found = make_cgroup(cgroup, cfg.identity.uid, cfg.identity.gid)
    except OSError:
        found, cgroup = MARKER_MODE, ""
    limits = cfg.limits
    problems = apply_limits(cgroup, limits.memory_max, limits.cpu_max, limits.pids_max)
    if problems:
        remove_cgroup(cgroup)  # bad input leaves state as it was (unless something runs in it)
        raise ConfigError(f"{cfg.config_file}: " + "; ".join(problems))
    return found


_STATUS_ENVIRONS: dict[int, bytes] = {}  # a controller is short-lived: one read of each environ per command
_STATUS_ANCESTORS: list[set[int]] = []  # ...and one walk up its own ancestors


def finder_for(cfg: ServiceConfig, environs: dict[int, bytes] | None = None) -> Finder:
    return Finder(marker(cfg.name, cfg.config_file), cgroup_dir(service_id(cfg.name, cfg.pid_dir)), environs)


def status_facts(cfg: ServiceConfig, mains: list[tuple[int, int]]) -> dict[str, object]:
    """What status shows of the containment: the mode, per main (``mains``: slot, pid)
    its figures with its descendants, and the leftovers (members of no live worker)."""
    finder = finder_for(cfg, _STATUS_ENVIRONS)
    if not _STATUS_ANCESTORS:
        _STATUS_ANCESTORS.append(_self_and_ancestors())
    members = finder.members(_STATUS_ANCESTORS[0]) if mains or os.path.isdir(cfg.pid_dir) else []
    slots = {}
    for slot, pid in mains:
        tree = [pid] + [m.pid for m in members if m.owner == pid and m.pid != pid]
        slots[str(slot)] = figures(tree)
    workers = {m.pid for m in members if m.owner == m.pid}
    leftovers = [{"pid": m.pid, "owner": m.owner, "command": command(m.pid)} for m in members
                 if m.pid not in workers and m.owner not in workers and not probe.is_alive(m.owner)]
    return {"mode": finder.mode, "cgroup": finder.cgroup or None, "mains": slots, "leftovers": leftovers}
