"""Slots as exclusive ``flock`` locks on ``<folder>/<slot>.lock`` (HADaemon::Control's layout).

Taking a slot: open the lock file, ``flock(LOCK_EX|LOCK_NB)``, write our pid into it.
Waiting for a slot: a blocking ``flock(LOCK_EX)``, so the kernel wakes us the
moment a holder exits; no polling. With several slots, one thread per slot
(``SlotWaiter``); those calls go through ctypes rather than ``fcntl.flock``
because fcntl.flock retries on EINTR in a thread, and the other waits must be
cancelled once one slot is ours.

Finding a holder: a hinted pid is confirmed through ``/proc/PID/fdinfo``
(which lists the flock held through each fd); when no hint is confirmed, a
shared non-blocking try tells a free slot at once; only a slot held by an
unexpected process needs ``/proc/locks`` (its first read costs 10-18 ms).

``FlockEngine`` is the flock implementation of the lock-engine protocol
(locks/engine.py) for main slots.

Who holds a slot is asked of the file hadctl itself opened (the device and
inode of its own fd), never of a path looked up again; a lock file that is a
link, not a plain file, a hard link or owned by a stranger is *tampered*
(``tampered``, ``HolderProbe.inspect``) and nobody is named as its holder.

Imports lean, safepath and locks.engine from hadctl; the worker uses it. ``_thread``
rather than ``threading``: the worker imports this module, and threading pulls
in enum and friends (about 1 MB of a standby's RSS).
"""
from __future__ import annotations

import _thread
import errno
import fcntl
import os
import stat

from .. import lean
from ..safepath import open_beneath
from .engine import Engine, GaveUp

if lean.TYPE_CHECKING:
    from ..layout import Layout
    from ..spec import WorkerSpec
    from .engine import Waits

# A realtime signal no one else sends: USR2 is reopen_signal's default, and a
# reopen-logs arriving while a standby waits must reach its handler, not ours.
_CANCEL_SIGNAL = lean.SIGRTMIN + 1


def open_lock_file(path: str) -> int:
    """Open (creating) a lock file; the fd is close-on-exec and not inherited.

    Never through a symlink (OSError ELOOP): hadctl makes its lock files itself,
    and a link planted in pid_dir by the service's user must not make a root
    controller create or open files elsewhere.
    """
    return open_beneath(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)


def _open_to_read(path: str) -> int:
    """Open a lock file to look at it: never through a link (safepath walks the
    folders on the way as root) and never blocking (a FIFO planted in its place)."""
    return open_beneath(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)


def tampered(st: os.stat_result, owners: frozenset[int] | None = None) -> str | None:
    """Why the file opened as a lock file is none hadctl or a worker made: not a
    plain file, a second name of another file (a hard link: maybe another
    service's lock, or a root daemon's), or owned by someone outside ``owners``.
    None when it looks like ours."""
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file"
    if st.st_nlink != 1:
        return f"has {st.st_nlink} names (hard links)"
    if owners is not None and st.st_uid not in owners:
        return f"belongs to uid {st.st_uid}, neither root nor the service's user nor the folder's owner"
    return None


def note_holder(fd: int, pid: int) -> None:
    """Write the holder's pid into the lock file (a hint for readers).

    One pwrite, no ftruncate (a promoting standby does this on its way to the
    function): the pid fills the first line, whatever longer text follows it
    from an earlier holder is ignored by readers, which read the first line.
    """
    try:
        os.pwrite(fd, f"{pid}\n".encode(), 0)
    except OSError:
        pass  # a read-only lock file still locks; the pid is only a hint


def _try_lock(path: str, mode: int) -> int | None:
    """Open ``path`` and flock it with ``mode`` without waiting: the fd, or None if refused."""
    fd = open_lock_file(path)
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    return fd


def try_take(path: str, pid: int) -> int | None:
    """Take the slot at ``path`` if it is free: returns the fd holding it, or None."""
    fd = _try_lock(path, fcntl.LOCK_EX)
    if fd is not None:
        note_holder(fd, pid)
    return fd


def hold_shared(path: str) -> int | None:
    """A shared flock on ``path`` (the alive lock), for as long as the fd stays open;
    None when someone holds it exclusively (a stop waiting for the last process)."""
    return _try_lock(path, fcntl.LOCK_SH)


def holders_of(path: str) -> list[int]:
    """Every process holding a flock on the file hadctl opens at ``path`` (a /proc walk)."""
    try:
        fd = _open_to_read(path)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if tampered(st) is not None:
        return []
    key = _file_key(st.st_dev, st.st_ino)
    return [int(name) for name in os.listdir("/proc") if name.isdigit() and holds(int(name), key)]


def take_first_free(slots: list[tuple[int, str]], pid: int) -> tuple[int, int] | None:
    """Try ``(slot, path)`` pairs in order; returns ``(slot, fd)`` of the first free one."""
    for slot, path in slots:
        fd = try_take(path, pid)
        if fd is not None:
            return slot, fd
    return None


def release(fd: int) -> None:
    """Free the slot: unlock explicitly (children may share the open file), then close."""
    try:
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class SlotWaiter:
    """Blocks in the kernel on several slots at once; the first one taken wins.

    One thread per slot blocks in ``flock(LOCK_EX)`` (through ctypes, so that a
    signal can interrupt it); ``fd`` becomes readable when a slot was taken and
    ``taken()`` returns ``(slot, fd)``. ``cancel()`` ends every other wait, so
    no thread is left when user code runs and no second slot is ever kept.
    With a single main slot the worker blocks in its own thread instead.
    """

    def __init__(self, slots: list[tuple[int, str]]) -> None:
        import ctypes

        self._libc = ctypes.CDLL(None, use_errno=True)
        self._get_errno = ctypes.get_errno
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        self._cancelled = False
        self._previous_handler = lean.set_handler(_CANCEL_SIGNAL, _ignore)
        self._waits: list[tuple[int, int, _thread.LockType]] = []  # slot, fd, "done" lock
        self._idents: list[int] = []
        for slot, path in slots:
            done = _thread.allocate_lock()
            done.acquire()
            self._waits.append((slot, open_lock_file(path), done))
        for slot, fd, done in self._waits:
            self._idents.append(_thread.start_new_thread(self._wait_one, (slot, fd, done)))

    @property
    def fd(self) -> int:
        return self._read

    def _wait_one(self, slot: int, fd: int, done: _thread.LockType) -> None:
        try:
            while not self._cancelled:
                if self._libc.flock(fd, fcntl.LOCK_EX) == 0:
                    os.write(self._write, f"{slot}\n".encode())
                    return
                if self._get_errno() != errno.EINTR:
                    os.write(self._write, b"0\n")
                    return
        finally:
            done.release()

    def taken(self) -> tuple[int, int] | None:
        """The first slot taken as ``(slot, fd)``, or None (nothing yet, or an error)."""
        try:
            data = os.read(self._read, 4096)
        except BlockingIOError:
            return None
        for word in data.split():
            for slot, fd, _done in self._waits:
                if slot == int(word):
                    return slot, fd
        return None

    def cancel(self, keep: int | None = None) -> None:
        """Stop every wait; release any slot taken except the fd ``keep``."""
        self._cancelled = True
        for (_slot, _fd, done), ident in zip(self._waits, self._idents, strict=False):
            while not done.acquire(blocking=False):
                try:
                    lean.pthread_kill(ident, _CANCEL_SIGNAL)
                except ProcessLookupError:
                    break
                if done.acquire(timeout=0.001):
                    break
        lean.set_handler(_CANCEL_SIGNAL, self._previous_handler)
        for _slot, fd, _done in self._waits:
            if fd == keep:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_UN)
            finally:
                os.close(fd)
        os.close(self._read)
        os.close(self._write)
        self._waits = []


def _ignore(_signum: int, _frame: object) -> None:
    """Handler of the cancel signal: its only job is to interrupt a blocked flock."""


# ------------------------------------------------------------- the engine


class FlockEngine(Engine):
    """Main slots as this host's ``LOCKS/N.lock`` (see locks/engine.py for the protocol)."""

    def __init__(self, spec: WorkerSpec, layout: Layout) -> None:
        self.layout = layout
        self.interval = spec.locks_interval
        self.retries = spec.locks_retries
        self.pid = os.getpid()

    def _paths(self, slots: list[int]) -> list[tuple[int, str]]:
        return [(slot, self.layout.lock_file("main", slot)) for slot in slots]

    def take_main(self, slots: list[int]) -> tuple[int, int] | None:
        return take_first_free(self._paths(slots), self.pid)

    def release_main(self, slot: int, fd: int) -> None:
        release(fd)

    def wait_main(self, slots: list[int], waits: Waits) -> tuple[int, int] | None:
        """With one slot, a blocking flock in this thread; with several, a SlotWaiter.
        Wakes on its own only without a stop-file watch, or to count ``retries``."""
        mains = self._paths(slots)
        ticking = not waits.watched or self.retries is not None
        if ticking:
            lean.set_timer(self.interval, self.interval)
        waiter = SlotWaiter(mains) if len(mains) > 1 else None
        single_fd = open_lock_file(mains[0][1]) if waiter is None else -1
        taken = None
        tries = 0
        try:
            while True:
                if waits.must_leave():
                    return None
                if waiter is None:
                    taken = waits.block(self._lock_single, mains[0][0], single_fd)
                else:
                    taken = waiter.taken() if waits.block(_wait_readable, waiter.fd) else None
                if taken is not None:
                    note_holder(taken[1], self.pid)
                    return taken
                if self.retries is not None and not waits.interrupted():
                    tries += 1
                    if tries > self.retries:
                        raise GaveUp(f"standby gives up after {self.retries} tries for a main slot")
        finally:
            if ticking:
                lean.set_timer(0)
            if waiter is not None:
                waiter.cancel(keep=taken[1] if taken else None)
            elif taken is None:
                os.close(single_fd)

    @staticmethod
    def _lock_single(slot: int, fd: int) -> tuple[int, int]:
        fcntl.flock(fd, fcntl.LOCK_EX)
        return slot, fd


def _wait_readable(fd: int) -> bool:
    import select

    return bool(select.select([fd], [], [])[0])


# ------------------------------------------------------------- who holds it


def lock_file_pid(path: str) -> int | None:
    """The pid a holder wrote into the lock file, if any (a hint only)."""
    try:
        fd = _open_to_read(path)
    except OSError:
        return None
    try:
        return _pid_in(fd)
    finally:
        os.close(fd)


def _pid_in(fd: int) -> int | None:
    """The pid written on the first line of the open lock file ``fd``, if any."""
    try:
        text = os.pread(fd, 32, 0).split(b"\n", 1)[0].strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and 1 < int(text) <= 4194304 else None  # layout.PID_MAX


def _file_key(dev: int, ino: int) -> tuple[int, int, int]:
    return os.major(dev), os.minor(dev), ino


def _parse_lock_line(line: str) -> tuple[tuple[int, int, int], int] | None:
    """'1: FLOCK  ADVISORY  WRITE 4065 fe:00:2148810 0 EOF' -> ((0xfe, 0, ino), 4065)."""
    fields = line.split()
    if len(fields) < 6 or fields[1] != "FLOCK":
        return None  # POSIX/OFD locks, or '->' waiters, are not flock holders
    try:
        major, minor, ino = fields[5].split(":")
        return (int(major, 16), int(minor, 16), int(ino)), int(fields[4])
    except ValueError:
        return None


def holds(pid: int, key: tuple[int, int, int]) -> bool:
    """True when process ``pid`` holds a flock on the file ``key`` through one of its fds."""
    folder = f"/proc/{pid}/fdinfo"
    try:
        names = os.listdir(folder)
    except OSError:
        return False  # gone, a zombie (no fds left), or not ours to read
    wanted = f"ino:\t{key[2]}\n"
    for name in names:
        try:
            text = lean.read_proc(f"{folder}/{name}").decode("ascii", "replace")
        except OSError:
            continue
        if wanted not in text:
            continue
        for line in text.splitlines():
            if line.startswith("lock:"):
                parsed = _parse_lock_line(line[5:])
                if parsed is not None and parsed[0] == key:
                    return True
    return False


def _is_free(fd: int) -> bool:
    """True when nobody holds the flock of the file open as ``fd`` (our own open file,
    fresh and of no one else): a shared, non-blocking try, undone when ``fd`` closes.

    Much cheaper than reading /proc/locks (10-18 ms the first time in a
    process). It holds a shared lock for a few microseconds when the slot is
    free: a worker's non-blocking try at that very moment would see the slot
    taken, and a waiting standby is woken a few microseconds later; both are
    harmless (the worker takes another slot or waits).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        return False
    return True


def _search_holder(key: tuple[int, int, int]) -> int | None:
    """The process holding the flock on file ``key``, by reading every process's fdinfo."""
    for name in os.listdir("/proc"):
        if name.isdigit() and holds(int(name), key):
            return int(name)
    return None


def holds_path(pid: int, path: str, owners: frozenset[int] | None = None) -> bool:
    """True when ``pid`` holds the flock on the file hadctl opens at ``path`` (which
    must look like a lock file hadctl made: see ``tampered``). The file is
    identified by the fd opened here, never by a path looked up again."""
    try:
        fd = _open_to_read(path)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    return tampered(st, owners) is None and holds(pid, _file_key(st.st_dev, st.st_ino))


class HolderProbe:
    """Finds who holds a slot's lock; reads /proc/locks at most once per probe."""

    def __init__(self) -> None:
        self._table: dict[tuple[int, int, int], int] | None = None

    def _proc_locks(self) -> dict[tuple[int, int, int], int]:
        if self._table is None:
            table: dict[tuple[int, int, int], int] = {}
            try:
                with open("/proc/locks", encoding="ascii", errors="replace") as handle:
                    for line in handle:
                        parsed = _parse_lock_line(line)
                        if parsed is not None:
                            table[parsed[0]] = parsed[1]
            except OSError:
                pass
            self._table = table
        return self._table

    def holder(self, path: str, hints: list[int | None]) -> int | None:
        """The pid holding ``path``'s flock, or None when the slot is free (or its
        lock file is tampered with: see ``inspect``)."""
        return self.inspect(path, hints)[0]

    def inspect(self, path: str, hints: list[int | None],
                owners: frozenset[int] | None = None) -> tuple[int | None, str | None]:
        """``(holder, None)``: the pid holding the flock of the file hadctl opens at
        ``path`` (None when free or missing); or ``(None, why)`` when that file is
        a symbolic link or fails ``tampered``, so that nothing is ever signalled
        through it. A holder holds *the file opened here* (same device and
        inode as this fd), never whatever a path names when looked up again."""
        try:
            fd = _open_to_read(path)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                if getattr(exc, "final", True):
                    return None, "is a symbolic link"
                return None, f"lies beyond the symbolic link {exc.filename}"
            return None, None  # missing, or not ours to read: nobody we can name holds it
        try:
            st = os.fstat(fd)
            problem = tampered(st, owners)
            if problem is not None:
                return None, problem
            key = _file_key(st.st_dev, st.st_ino)
            for pid in dict.fromkeys([_pid_in(fd), *hints]):
                if pid is not None and holds(pid, key):
                    return pid, None
            if _is_free(fd):
                return None, None
        finally:
            os.close(fd)
        listed = self._proc_locks().get(key)
        if listed is None or holds(listed, key):
            return listed, None
        # /proc/locks names whoever took the lock; a child that inherited it (a main's
        # fork that kept the fd) holds it now. Find that process; else show the listed
        # pid, which callers re-check (holds_path) before they would ever signal it.
        return _search_holder(key) or listed, None

    def forget(self) -> None:
        """Drop the cached /proc/locks table (state has changed)."""
        self._table = None

    def every_holder(self) -> dict[tuple[int, int, int], int]:
        """Every flock on the host: file key -> holder pid (from /proc/locks)."""
        return dict(self._proc_locks())


# ------------------------------------------------------------- controllers


class _TimedOut(Exception):
    pass


def _alarm(_signum: int, _frame: object) -> None:
    raise _TimedOut


def take_control(path: str, timeout: float) -> int | None:
    """Take the controllers' lock at ``path``, waiting at most ``timeout`` seconds.

    Returns the fd (keep it open for the action's life) or None on time-out.
    The wait is a blocking flock interrupted by a timer signal, not a poll.
    On a read-only file system (a disk error remounted it) the existing file is
    flocked through a read-only fd: stop and reload must still work there.
    """
    try:
        fd = open_lock_file(path)
    except OSError as exc:
        if exc.errno != errno.EROFS:
            raise
        fd = _open_to_read(path)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return fd
    except BlockingIOError:
        pass
    previous = lean.set_handler(lean.SIGALRM, _alarm)
    try:
        lean.set_timer(max(timeout, 0.001))
        fcntl.flock(fd, fcntl.LOCK_EX)
        return fd
    except _TimedOut:
        os.close(fd)
        return None
    finally:
        lean.set_timer(0)
        lean.set_handler(lean.SIGALRM, previous)

