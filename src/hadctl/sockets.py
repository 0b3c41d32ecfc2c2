"""The listening sockets of ``listen``: found or bound by the controller, held by the workers.

Every worker, main and standby, holds every listening socket from birth at fds
3, 4, ... in config order (spawn.py puts them there; the worker announces them in
``LISTEN_FDS``/``LISTEN_PID``/``LISTEN_FDNAMES``). No resident process holds them:
the workers hold them among themselves. A controller that spawns workers gets the
sockets, in this order of preference (``for_workers``):

1. from its own start by systemd (socket activation: ``LISTEN_PID`` is our pid),
   matched by name (``LISTEN_FDNAMES``), else by position;
2. from a live worker of the service, with ``pidfd_getfd(2)`` (the controller is
   root or the service's user): *the same* kernel socket, so its accept queue and
   its clients never notice that workers came and went. Each fd got so is checked
   to be a listening stream socket bound to the expected address;
3. only when no worker holds it, bound anew, before privileges are dropped (so
   ``user = "nobody"`` may serve port 80). A unix socket's folder is opened without
   following links; a path left by a dead run is replaced only when nothing accepts
   on it; the socket file gets ``listen_mode`` and the service's user and group.

An address already in use by another program is refused naming the pid that holds
it (``ActionFailedError``, 1); a permission refused is ``NotPermittedError`` (4).
Nothing is spawned before every socket is in hand.

``status_lines`` tells which worker holds which socket, from /proc alone.

Imports config, errors, model and probe (socket and ctypes from the standard
library). Imported by the controller only when ``listen`` is set; never by the worker.
"""
from __future__ import annotations

import errno
import os
import socket
import stat

from . import probe
from .errors import ActionFailedError, NotPermittedError
from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from .config import ListenAddress, ServiceConfig
    from .control import Service
    from .model import SlotReport, Step

FIRST_FD = 3  # systemd's SD_LISTEN_FDS_START: the first listening socket's fd in a worker
SYS_PIDFD_GETFD = 438  # the same number on every architecture (asm-generic/unistd.h)
_FAMILIES = {"inet": socket.AF_INET, "inet6": socket.AF_INET6, "unix": socket.AF_UNIX}


def for_workers(svc: Service) -> tuple[int, ...]:
    """The fds, in config order, that new workers of ``svc`` get as 3, 4, ...

    Found once per action and kept open until the controller exits. Raises
    ActionFailedError (address in use, a bad path) or NotPermittedError."""
    held = svc.listen_sockets
    if held is None:
        pids = [r.pid for r in svc.slots()[0] + svc.extra_slots() if r.pid is not None]
        held = svc.listen_sockets = acquire(svc.cfg, pids)
        for address, sock in zip(svc.cfg.listen, held, strict=True):
            svc.log.trace(f"listen {address.address}: fd {sock.fileno()} (socket:[{os.fstat(sock.fileno()).st_ino}])")
    return tuple(sock.fileno() for sock in held)


def for_this_process(cfg: ServiceConfig) -> None:
    """``foreground``: the sockets of ``listen`` (from systemd, else bound anew) at fds
    3, 4, ... of this process, inheritable, announced in LISTEN_FDS / LISTEN_PID /
    LISTEN_FDNAMES as a worker's are: ``hadctl.listen_sockets()`` and ``--fd 3``
    servers work the same. Those fds are taken, whatever the caller left there (as
    systemd does). Raises as ``acquire``."""
    import fcntl

    held = acquire(cfg, [])
    count = len(held)
    # out of the way first: a socket may sit at the fd another one must take
    high = [fcntl.fcntl(sock.fileno(), fcntl.F_DUPFD_CLOEXEC, FIRST_FD + count) for sock in held]
    for sock in held:
        sock.close()
    for index, fd in enumerate(high):
        os.dup2(fd, FIRST_FD + index, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(count), LISTEN_PID=str(os.getpid()),
                      LISTEN_FDNAMES=":".join(address.name for address in cfg.listen))


def acquire(cfg: ServiceConfig, pids: list[int]) -> list[socket.socket]:
    """One listening socket per address of ``cfg.listen``: from systemd, from a live
    worker among ``pids``, else bound anew (see the module's docstring)."""
    found: list[socket.socket | None] = list(_from_systemd(cfg.listen))
    if None in found and pids:
        wanted = [(i, a) for i, a in enumerate(cfg.listen) if found[i] is None]
        for i, sock in _from_workers(wanted, pids).items():
            found[i] = sock
    bound: list[socket.socket] = []
    try:
        for i, address in enumerate(cfg.listen):
            if found[i] is None:
                found[i] = bind(cfg, address)
                bound.append(found[i])  # type: ignore[arg-type]
    except BaseException:
        for sock in bound + [s for s in found if s is not None and s not in bound]:
            sock.close()
        raise
    return [s for s in found if s is not None]


# ------------------------------------------------------------ from systemd


def _from_systemd(listen: tuple[ListenAddress, ...]) -> list[socket.socket | None]:
    """The sockets systemd passed to this very process (LISTEN_PID is ours), matched to
    ``listen`` by name when LISTEN_FDNAMES names them, else by position."""
    found: list[socket.socket | None] = [None] * len(listen)
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return found
    try:
        count = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        return found
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")[:count]
    # by name when each of ours is there once (a socket unit per name); else by position
    # (one unit: every fd carries the unit's name)
    by_name = all(names.count(a.name) == 1 for a in listen)
    for i, address in enumerate(listen):
        fd = FIRST_FD + (names.index(address.name) if by_name else i)
        if fd >= FIRST_FD + count:
            continue
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            continue
        sock.set_inheritable(False)  # the controller's own children must not keep it
        found[i] = sock
    return found


# ------------------------------------------------------------ from a live worker


def _from_workers(wanted: list[tuple[int, ListenAddress]], pids: list[int]) -> dict[int, socket.socket]:
    """``pidfd_getfd`` the listening sockets a live worker holds at fds 3, 4, ... and
    keep those bound to a wanted address: {index in listen: socket}."""
    found: dict[int, socket.socket] = {}
    expected = {i: _sockname(a) for i, a in wanted}
    for pid in pids:
        if len(found) == len(wanted):
            break
        try:
            pidfd = os.pidfd_open(pid)
        except OSError:
            continue
        try:
            for fd in _socket_fds(pid):
                try:
                    got = _pidfd_getfd(pidfd, fd)
                except OSError:
                    break  # gone, or not ours to take: another worker may do
                try:
                    sock = socket.socket(fileno=got)
                except OSError:  # no longer a socket: the fd was reused meanwhile
                    os.close(got)
                    break
                index = next((i for i, name in expected.items() if i not in found and _is_listening_on(sock, name)),
                             None)
                if index is None:
                    sock.close()
                else:
                    found[index] = sock
        finally:
            os.close(pidfd)
    return found


def _socket_fds(pid: int) -> list[int]:
    """The fds 3, 4, ... of ``pid`` that are sockets, up to the first that is not."""
    targets = probe.fd_targets(pid)
    fds = []
    fd = FIRST_FD
    while targets.get(str(fd), "").startswith("socket:"):
        fds.append(fd)
        fd += 1
    return fds


def _pidfd_getfd(pidfd: int, fd: int) -> int:
    """A copy of fd ``fd`` of the process behind ``pidfd`` (close-on-exec); OSError."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    got = libc.syscall(SYS_PIDFD_GETFD, pidfd, fd, 0)
    if got < 0:
        number = ctypes.get_errno()
        raise OSError(number, os.strerror(number))
    return int(got)


def _sockname(address: ListenAddress) -> tuple[int, object]:
    """(family, the address getsockname() gives once bound) for ``address``."""
    family = _FAMILIES[address.kind]
    if address.kind == "unix":
        return family, address.path
    host = address.host or ("0.0.0.0" if family == socket.AF_INET else "::")
    try:
        info = socket.getaddrinfo(host, address.port, family, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except OSError:
        return family, (host, address.port)
    return family, (socket.inet_pton(family, str(info[0][4][0])), address.port)


def _is_listening_on(sock: socket.socket, expected: tuple[int, object]) -> bool:
    """``sock`` is a listening stream socket bound to ``expected`` (``_sockname``)."""
    family, name = expected
    try:
        if sock.family != family or sock.type != socket.SOCK_STREAM or \
                not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        got = sock.getsockname()
    except OSError:
        return False
    if family == socket.AF_UNIX:
        return bool(got == name)
    return (socket.inet_pton(family, got[0]), got[1]) == name


# ------------------------------------------------------------ bound anew


def bind(cfg: ServiceConfig, address: ListenAddress) -> socket.socket:
    """A new listening socket on ``address``, with ``listen_backlog`` (default somaxconn)."""
    sock = socket.socket(_FAMILIES[address.kind], socket.SOCK_STREAM)
    try:
        if address.kind == "unix":
            _bind_unix(cfg, address, sock)
        else:
            # a restart after a stop must not wait out TIME_WAIT connections
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if address.kind == "inet6":
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind((address.host or "0.0.0.0", address.port))
            except OSError as exc:
                raise _refusal(address, exc) from None
        sock.listen(cfg.listen_backlog or _somaxconn())
    except BaseException:
        sock.close()
        raise
    return sock


def _somaxconn() -> int:
    try:
        with open("/proc/sys/net/core/somaxconn") as handle:
            return int(handle.read())
    except (OSError, ValueError):
        return socket.SOMAXCONN


def _refusal(address: ListenAddress, exc: OSError) -> Exception:
    """Our error for a failed bind: who holds the address, when /proc shows it."""
    what = f"cannot listen on {address.address}"
    if exc.errno in (errno.EACCES, errno.EPERM):
        return NotPermittedError(f"{what}: {exc.strerror}")
    if exc.errno == errno.EADDRINUSE and address.kind != "unix":
        holders = holders_of_port(address.port, address.kind)
        if holders:
            return ActionFailedError(f"{what}: address already in use by " +
                                     ", ".join(f"pid {pid} ({_comm(pid)})" for pid in holders))
        return ActionFailedError(f"{what}: address already in use (by a process this user cannot see)")
    return ActionFailedError(f"{what}: {exc.strerror}")


def _bind_unix(cfg: ServiceConfig, address: ListenAddress, sock: socket.socket) -> None:
    """Bind ``sock`` at ``address.path``: its folder opened without following a link
    (the service's user may write there), a socket left by a dead run replaced when
    nothing accepts on it, then mode ``listen_mode`` and the service's owner."""
    folder, name = os.path.split(address.path)
    what = f"cannot listen on {address.address}"
    folder_fd = _open_folder(folder, what)
    try:
        try:
            found = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
        except FileNotFoundError:
            found = None
        if found is not None:
            if not stat.S_ISSOCK(found.st_mode):
                raise ActionFailedError(f"{what}: {address.path} exists and is not a socket")
            if _accepts(address.path):
                raise ActionFailedError(f"{what}: a process accepts connections on {address.path}")
            os.unlink(name, dir_fd=folder_fd)  # left by a dead run: nothing accepts on it
        previous = os.umask(0o777 & ~cfg.listen_mode)  # the file is made with listen_mode, never wider
        try:
            sock.bind(address.path)
        except OSError as exc:
            raise _refusal(address, exc) from None
        finally:
            os.umask(previous)
        ident = cfg.identity
        if os.geteuid() == 0 and (ident.uid is not None or ident.gid is not None):
            made = os.stat(name, dir_fd=folder_fd, follow_symlinks=False)
            if stat.S_ISSOCK(made.st_mode):  # never a file swapped in since, nor through a link
                os.chown(name, -1 if ident.uid is None else ident.uid, -1 if ident.gid is None else ident.gid,
                         dir_fd=folder_fd, follow_symlinks=False)
    finally:
        os.close(folder_fd)


def _open_folder(folder: str, what: str) -> int:
    """An O_PATH fd on ``folder``, opened one component at a time, following no link."""
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    walked = ""
    try:
        for part in folder.strip("/").split("/"):
            if not part:
                continue
            walked += "/" + part
            try:
                new = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except FileNotFoundError:
                raise ActionFailedError(f"{what}: folder {walked} does not exist") from None
            except NotADirectoryError:
                kind = "a symbolic link (never followed)" if os.path.islink(walked) else "not a directory"
                raise ActionFailedError(f"{what}: {walked} is {kind}") from None
            except PermissionError:
                raise NotPermittedError(f"{what}: cannot open {walked}: Permission denied") from None
            os.close(fd)
            fd = new
    except BaseException:
        os.close(fd)
        raise
    return fd


def _accepts(path: str) -> bool:
    """Something accepts connections on the unix socket at ``path``."""
    probe_sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe_sock.settimeout(1.0)
        probe_sock.connect(path)
        return True
    except OSError as exc:
        # refused: nobody listens; EAGAIN: a full accept queue is a live listener
        return exc.errno == errno.EAGAIN
    finally:
        probe_sock.close()


# ------------------------------------------------------------ who holds what (/proc)


def holders_of_port(port: int, kind: str) -> list[int]:
    """Pids holding a listening TCP socket on ``port`` (IPv4 and IPv6), as far as
    /proc shows them to us."""
    inodes = {inode for inode, (_kind, _host, p) in _listening_tcp().items() if p == port}
    return sorted(pid for pid, held in _socket_inodes_by_pid(inodes).items() if held)


def _listening_tcp() -> dict[int, tuple[str, str, int]]:
    """Listening TCP sockets of this network namespace: inode -> (kind, host hex, port)."""
    found: dict[int, tuple[str, str, int]] = {}
    for kind, path in (("inet", "/proc/net/tcp"), ("inet6", "/proc/net/tcp6")):
        try:
            with open(path) as handle:
                lines = handle.readlines()[1:]
        except OSError:
            continue
        for row in lines:
            fields = row.split()
            if len(fields) > 9 and fields[3] == "0A":  # TCP_LISTEN
                host, _, port = fields[1].partition(":")
                found[int(fields[9])] = (kind, host, int(port, 16))
    return found


def _listening_unix() -> dict[int, str]:
    """Listening unix stream sockets bound to a path: inode -> path."""
    found: dict[int, str] = {}
    try:
        with open("/proc/net/unix") as handle:
            lines = handle.readlines()[1:]
    except OSError:
        return found
    for row in lines:
        fields = row.split()
        # Flags 00010000 is __SO_ACCEPTCON; St 01 unconnected; a path is the 8th field
        if len(fields) >= 8 and fields[3] == "00010000" and fields[7].startswith("/"):
            found[int(fields[6])] = fields[7]
    return found


def _socket_inodes_by_pid(inodes: set[int], pids: list[int] | None = None) -> dict[int, set[int]]:
    """For each pid (default: every process we can see), which of ``inodes`` it holds."""
    found: dict[int, set[int]] = {}
    if not inodes:
        return found
    for pid in pids if pids is not None else [int(n) for n in probe.listdir("/proc") if n.isdigit()]:
        held = {int(t[8:-1]) for t in probe.fd_targets(pid).values() if t.startswith("socket:[")} & inodes
        if held:
            found[pid] = held
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as handle:
            return handle.read().strip()
    except OSError:
        return "?"


def _hex_host(address: ListenAddress) -> set[str]:
    """How /proc/net/tcp{,6} spells ``address``'s host (numeric hosts only; empty when
    the host is a name, matched then by port alone)."""
    family = _FAMILIES[address.kind]
    host = address.host or ("0.0.0.0" if family == socket.AF_INET else "::")
    try:
        packed = socket.inet_pton(family, host)
    except OSError:
        return set()
    # /proc prints each 32-bit word in host order (little-endian here)
    words = [packed[i:i + 4] for i in range(0, len(packed), 4)]
    return {"".join(w[::-1].hex().upper() for w in words)}


def listening(cfg: ServiceConfig, reports: list[SlotReport]) -> list[dict[str, object]]:
    """For each address of ``cfg.listen``: its name, address, socket inodes and the
    pids of the running workers (``reports``) that hold it. /proc alone: no fd is taken."""
    pids = [r.pid for r in reports if r.pid is not None]
    tcp = _listening_tcp() if any(a.kind != "unix" for a in cfg.listen) else {}
    unix = _listening_unix() if any(a.kind == "unix" for a in cfg.listen) else {}
    held = _socket_inodes_by_pid(set(tcp) | set(unix), pids)
    found: list[dict[str, object]] = []
    for address in cfg.listen:
        if address.kind == "unix":
            inodes = {i for i, path in unix.items() if path == address.path}
        else:
            hosts = _hex_host(address)
            inodes = {i for i, (kind, host, port) in tcp.items()
                      if kind == address.kind and port == address.port and (not hosts or host in hosts)}
        holders = sorted(pid for pid, mine in held.items() if mine & inodes)
        found.append({"name": address.name, "address": address.address,
                      "inodes": sorted(i for i in inodes if any(i in mine for mine in held.values())),
                      "pids": holders})
    return found


def status(cfg: ServiceConfig, reports: list[SlotReport]) -> tuple[list[Step], list[dict[str, object]]]:
    """``status``'s lines and JSON for the sockets: one per address, with who holds it."""
    from .model import Step

    found = listening(cfg, reports)
    steps = []
    for item in found:
        what = f"{item['name']} {item['address']}"
        pids = item["pids"]
        if isinstance(pids, list) and pids:
            inodes = ", ".join(f"socket:[{i}]" for i in item["inodes"])  # type: ignore[attr-defined]
            steps.append(Step(f"{what} ({inodes}) held by pid {', '.join(map(str, pids))}", "Listening"))
        else:
            steps.append(Step(what, "Not Listening", False))
    return steps, found
