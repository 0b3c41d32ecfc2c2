"""Main slots as ZooKeeper locks (kazoo), so mains and standbys on several hosts share them.

In ZooKeeper, main slot N of service NAME is a kazoo ``Lock`` at ``ROOT/NAME/slot-N``:
each contender creates an ephemeral sequential node ``<uuid>__lock__<seq>`` holding
``"HOST PID"``; the lowest one holds the slot, each other one watches the node just
before it (no polling: ZooKeeper tells the next in line the moment its predecessor
goes). One lock per slot, not a semaphore, because a slot has a number here: the
pid files, ``LOCKS/N.lock``, ``status`` lines and ``hadctl.slot()`` all name it.

On this host, standby slots stay local flock (each host keeps its own warm
standbys), and a process holding ZooKeeper slot N also holds the local flock
``LOCKS/N.lock`` for as long as it is main, so local tooling (status, stop,
restart, reload, which read local locks) sees local mains unchanged. ``status``
asks ZooKeeper too (``ZooKeeperEngine.status_slots``), to show slots held by other hosts.

A main SIGKILLed on this host leaves its node until its session expires; a
standby of the same host frees the slot at once (``Takeover``: the main's local
flock tells it the main is gone). Standbys of other hosts wait for the expiry.

Fencing: a main whose session is SUSPENDED for longer than ``fence_grace``, or
LOST, or whose lock node vanishes, or that heard nothing from the server for
0.85 x session_timeout (a lease: the server cannot expire the session sooner),
ends its own process group (``Fence``: SIGTERM then SIGKILL while the session may
be valid, else SIGKILL at once). The fencing token, the lock node's czxid, grows
with each new holder of a slot (a node created later has a larger zxid); it
reaches the program as ``$HADCTL_FENCING_TOKEN`` and ``hadctl.fencing_token()``.

``ZooKeeperEngine`` is this engine's side of the protocol in locks/engine.py.
Imports kazoo (nowhere else in hadctl does) and, from hadctl, lean, locks.engine,
locks.flock (and probe, to kill a frozen ex-main's group). Only
``engine.worker_engine``/``controller_engine`` import it, for ``engine = "zookeeper"``;
a worker only after the fork (kazoo starts threads).
"""
from __future__ import annotations

import fcntl
import logging
import math
import os
import re
import select
import threading
import time

from kazoo.client import KazooClient
from kazoo.exceptions import CancelledError, KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.protocol.states import EventType, KazooState
from kazoo.recipe.lock import Lock
from kazoo.retry import KazooRetry

from .. import lean
from . import flock
from .engine import Engine, EngineError, GaveUp

if lean.TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

    from ..layout import Layout
    from ..model import SlotReport
    from ..spec import WorkerSpec
    from .engine import Waits

# Breaks a takeover thread's blocking flock. Not USR2 (flock.SlotWaiter's): that is
# reopen_signal's default, which a waiting standby must still be able to receive.
_CANCEL_SIGNAL = lean.signum("RTMIN")
_CONTENDER = re.compile(r"__lock__(-?\d{10})$")


def slot_path(root: str, name: str, slot: int) -> str:
    return f"{root.rstrip('/')}/{name}/slot-{slot}"


class UnreachableError(Exception):
    """No ZooKeeper server of ``hosts`` answered in time."""


class _ToLog(logging.Handler):
    """kazoo's warnings go to hadctl's log, not to the service's stderr."""

    def __init__(self, log: Any) -> None:
        super().__init__(logging.WARNING)
        self.hadctl_log = log
        self.said: dict[str, float] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        now = time.monotonic()
        if now - self.said.get(message, -60.0) < 30.0:
            return  # kazoo repeats itself every retry while a server is down
        self.said[message] = now
        self.hadctl_log.warn(f"zookeeper: {message}")


def _client(hosts: str, session_timeout: float, attempt: float, log: Any) -> KazooClient:
    """A kazoo client that reconnects quickly (every 0.25 s at most while a server is
    down) and never waits longer than ``attempt`` seconds for one server: neither for
    its TCP connection (``_BoundedHandler``) nor for its answer to the handshake
    (``_listed_for_attempts``)."""
    logger = logging.getLogger(f"hadctl.kazoo.{os.getpid()}")
    logger.propagate = False
    if not logger.handlers:
        logger.addHandler(_ToLog(log))
    retry = KazooRetry(max_tries=-1, delay=0.05, backoff=2, max_jitter=0.2, max_delay=0.25)
    listed = _listed_for_attempts(hosts, session_timeout / attempt)
    try:
        return KazooClient(hosts=listed, timeout=session_timeout, connection_retry=retry, logger=logger,
                           handler=_BoundedHandler(attempt))
    except ValueError as exc:  # kazoo parses "host:port,host:port[/chroot]" here
        raise UnreachableError(f"invalid ZooKeeper hosts {hosts!r} (locks.hosts): {exc}") from None


class _BoundedHandler(SequentialThreadingHandler):  # type: ignore[misc]  # kazoo is untyped
    """kazoo's handler, whose TCP connections give up after ``attempt`` seconds.

    kazoo opens each connection with the whole session timeout as its limit: a
    server cut off without a RST (its SYNs dropped) holds the client that long
    before the next server is tried, which eats a controller's connect budget and
    a reconnecting main's fence_grace. ``create_connection`` is the handler's
    public hook for that call."""

    def __init__(self, attempt: float) -> None:
        super().__init__()
        self.attempt = attempt

    def create_connection(self, *args: Any, **kwargs: Any) -> Any:
        timeout = kwargs.get("timeout")
        kwargs["timeout"] = self.attempt if timeout is None else min(timeout, self.attempt)
        return super().create_connection(*args, **kwargs)


def _attempt_timeout(fence_grace: float) -> float:
    """The longest wait for one server to answer a connection attempt: half the grace
    (so a retry still fits in it), at least 0.5 s (a healthy server answers in ms)."""
    return max(0.5, fence_grace / 2)


def _listed_for_attempts(hosts: str, attempts: float) -> str:
    """``hosts`` with its server list repeated so that one attempt lasts at most
    session_timeout / ``attempts``.

    kazoo, like ZooKeeper's Java client, gives each connection attempt
    session_timeout / (number of servers listed) for the server's answer. A server
    that is starting up accepts connections it then neither serves nor closes
    (ZOOKEEPER-5051: closing them before its database is loaded fails), so one
    unlucky attempt would hang that long: past fence_grace, a main reconnecting to a
    restarted server would fence itself for nothing. Listing each server k times
    cuts every attempt to 1/k of that, through kazoo's public interface.
    """
    servers, slash, chroot = hosts.partition("/")
    count = _server_count(hosts)
    repeat = max(1, min(20, math.ceil(attempts / count)))
    return ",".join([servers] * repeat) + slash + chroot


def _server_count(hosts: str) -> int:
    return len([s for s in hosts.partition("/")[0].split(",") if s.strip()]) or 1


def _connect(client: KazooClient, hosts: str, timeout: float) -> None:
    """Start ``client`` within ``timeout`` seconds, or UnreachableError. On failure the
    client is stopped in a thread of its own: stopping waits for the connection
    attempt under way, which the caller, about to fail, must not wait for."""
    try:
        client.start(timeout=timeout)
    except KazooTimeoutError:
        threading.Thread(target=_stop_quietly, args=(client,), daemon=True, name="kazoo-stop").start()
        raise UnreachableError(f"cannot connect to ZooKeeper at {hosts} within {timeout:g} s") from None


def _stop_quietly(client: KazooClient) -> None:
    try:
        client.stop()
        client.close()
    except Exception:  # a client we gave up on; the process ends its socket anyway
        pass


def _lowest(children: Iterable[str]) -> str | None:
    """The contender node that holds the lock (lowest sequence number), or None."""
    found = [(m.group(1), child) for child in children if (m := _CONTENDER.search(child))]
    return min(found)[1] if found else None


def _parse_holder(data: bytes) -> tuple[str, int | None]:
    """``b"HOST PID"`` -> (HOST, PID); a host name may itself hold spaces."""
    text = data.decode("utf-8", "replace").strip()
    host, _, pid = text.rpartition(" ")
    return (host, int(pid)) if pid.isdigit() else (text, None)


class Holder:
    """The lowest contender node of a slot: who holds it, since when, with which token."""

    __slots__ = ("path", "host", "pid", "czxid", "created")

    def __init__(self, path: str, host: str, pid: int | None, czxid: int, created: float) -> None:
        self.path = path  # the node's full path
        self.host = host
        self.pid = pid
        self.czxid = czxid  # the fencing token
        self.created = created  # the node's ctime, seconds since the epoch (the server's clock)


def read_holder(client: KazooClient, path: str, watch: Callable[[Any], None] | None = None,
                timeout: float | None = None) -> Holder | None:
    """The holder of the lock at ``path`` (None: nobody holds it); ``watch`` is called
    once when the contenders change (kazoo's children watch). With ``timeout``, each
    call waits at most that long (KazooTimeoutError), even while the connection is down."""
    for _attempt in range(5):  # the lowest node may go between listing and reading it
        try:
            children = client.get_children_async(path, watch=watch).get(timeout=timeout)
        except NoNodeError:
            return None
        lowest = _lowest(children)
        if lowest is None:
            return None
        try:
            data, stat = client.get_async(f"{path}/{lowest}").get(timeout=timeout)
        except NoNodeError:
            continue
        host, pid = _parse_holder(data)
        return Holder(f"{path}/{lowest}", host, pid, int(stat.czxid), stat.ctime / 1000.0)
    return None


# ===================================================================== the engine


class ZooKeeperEngine(Engine):
    """Main slots as kazoo locks (see locks/engine.py for the protocol).

    A worker's session opens in ``start`` (after the fork: kazoo starts threads)
    and ends in ``close``; a controller's is opened on first use and shared by
    every engine of that service in the process (``_view``).
    """

    def __init__(self, spec: WorkerSpec, layout: Layout, log: Any) -> None:
        self.spec = spec
        self.layout = layout
        self.log = log
        self.hosts = spec.locks_hosts or ""
        self.pid = os.getpid()
        self.identity = f"{spec.host_id} {self.pid}"
        self.client: KazooClient | None = None
        self.locks: dict[int, Lock] = {}
        self.fence: Fence | None = None

    # ------------------------------------------------------------ worker

    def start(self) -> None:
        """Open the session; EngineError after ``session_timeout`` seconds without a server."""
        spec = self.spec
        try:
            self.client = _client(self.hosts, spec.locks_session_timeout,
                                  _attempt_timeout(spec.locks_fence_grace), self.log)
            _connect(self.client, self.hosts, spec.locks_session_timeout)
        except UnreachableError as exc:
            self.client = None
            raise EngineError(str(exc)) from None

    def _session(self) -> KazooClient:
        if self.client is None:
            raise EngineError("no ZooKeeper session (start() was not called)")
        return self.client

    def lock(self, slot: int) -> Lock:
        if slot not in self.locks:
            client = self._session()
            lock = Lock(client, slot_path(self.spec.locks_root, self.spec.name, slot), self.identity)
            _retry_quickly(lock, client)
            self.locks[slot] = lock
        return self.locks[slot]

    def node_path(self, slot: int) -> str:
        lock = self.locks[slot]
        return f"{lock.path}/{lock.node}"

    def take_main(self, slots: list[int]) -> tuple[int, int] | None:
        """Take the first slot nobody holds or waits for, and its local lock."""
        with _errors(self.hosts):
            for slot in slots:
                if self.lock(slot).acquire(blocking=False):
                    fd = self._take_local_lock(slot)
                    if fd is None:
                        self.release_main(slot, -1)
                        raise EngineError(f"main slot {slot}: its local lock stays held on this host")
                    return slot, fd
        return None

    def wait_main(self, slots: list[int], waits: Waits) -> tuple[int, int] | None:
        """Queue for every slot at once (one thread per slot blocks in kazoo's
        ``Lock.acquire``, woken by a watch), then take the local lock of the slot won.

        The main thread blocks in select() on a pipe the lock threads write to,
        through ``waits.block`` (a leave signal or the stop file breaks it).
        """
        with _errors(self.hosts):
            slot = self._wait(slots, waits)
            if slot is None:
                return None
            fd = self._take_local_lock(slot)
            if fd is None:
                self.release_main(slot, -1)
                return None
            return slot, fd

    def _wait(self, slots: list[int], waits: Waits) -> int | None:
        spec = self.spec
        client = self._session()
        read_fd, write_fd = os.pipe()
        threads = []
        won: int | None = None
        limit = None if spec.locks_retries is None else spec.locks_interval * max(spec.locks_retries, 1)
        deadline = None if limit is None else time.monotonic() + limit
        tick = None if waits.watched else spec.locks_interval  # no dnotify: look at the stop file

        def contend(slot: int) -> None:
            try:
                got = self.lock(slot).acquire(blocking=True)
            except CancelledError:
                return
            except Exception as exc:  # reported to the main thread, which leaves
                self.log.error(f"waiting for main slot {slot} in ZooKeeper failed: {type(exc).__name__}: {exc}")
                got = False
            os.write(write_fd, f"{slot if got else 0}\n".encode())

        for slot in slots:
            self.lock(slot)  # made here, not in the threads: self.locks is not shared-safe

        def reconnected(state: str) -> bool:
            # kazoo can lose the predecessor watch across a reconnection (kazoo issues
            # 151 and 282: a waiting Lock.acquire then hangs after a server restart):
            # on every return to CONNECTED, wake the waits so they look again.
            if state == KazooState.CONNECTED:
                self.log.info("standby: ZooKeeper connection back; looking at the main slots again")
                for lock in list(self.locks.values()):
                    lock.wake_event.set()
                takeover.look_again()
            return False  # stay registered

        client.add_listener(reconnected)
        takeover = Takeover(self, slots)
        try:
            for slot in slots:
                thread = threading.Thread(target=contend, args=(slot,), daemon=True, name=f"slot-{slot}")
                thread.start()
                threads.append(thread)
            while won is None:
                if waits.must_leave():
                    return None
                timeout = tick
                if deadline is not None:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise GaveUp(f"standby gives up after {limit:g} s waiting for a main slot (retries)")
                    timeout = left if timeout is None else min(timeout, left)
                if waits.block(select.select, [read_fd], [], [], timeout):
                    for word in os.read(read_fd, 4096).split():
                        if int(word) == 0:
                            return None  # already logged by the lock thread
                        if won is None:
                            won = int(word)
            return won
        finally:
            takeover.stop()  # before the local lock is taken: none of its threads may hold it then
            client.remove_listener(reconnected)
            self._cancel_others(threads, keep=won)
            os.close(read_fd)
            os.close(write_fd)

    def _cancel_others(self, threads: list[threading.Thread], keep: int | None) -> None:
        """End every other wait, and give back any other slot won at the same moment."""
        for slot, lock in self.locks.items():
            if slot != keep:
                lock.cancel()
        for thread in threads:
            thread.join(2.0)
        for slot, lock in list(self.locks.items()):
            if slot != keep:
                if lock.is_acquired:
                    try:
                        lock.release()
                    except KazooException as exc:
                        self.log.warn(f"cannot give back main slot {slot} in ZooKeeper: {exc!r}")
                del self.locks[slot]

    def _take_local_lock(self, slot: int) -> int | None:
        """Take ``LOCKS/slot.lock`` now that ZooKeeper gave us ``slot``; returns its fd.

        Only an ex-main of this host that lost its ZooKeeper lock can still hold it:
        it fences itself within fence_grace, or at once when it notices its session
        is lost. A frozen one (SIGSTOP) notices nothing, so after fence_grace + 1 s
        it is SIGKILLed with its group, exactly what it would have done itself.
        """
        path = self.layout.lock_file("main", slot)
        fd = flock.try_take(path, self.pid)
        if fd is not None:
            return fd
        grace = self.spec.locks_fence_grace + 1.0
        self.log.warn(f"main slot {slot}: ZooKeeper gave it to us, but {path} is still held on this host; "
                      f"waiting {grace:g} s for that ex-main to fence itself")
        fd = flock.take_control(path, grace)
        if fd is None:
            holder = flock.HolderProbe().holder(path, [])
            if holder is not None and holder != self.pid:
                self.log.error(f"main slot {slot}: pid {holder} holds {path} without its ZooKeeper lock "
                               f"after {grace:g} s (frozen?); killing it and its process group (SIGKILL)")
                _kill_group_of(holder)
            fd = flock.take_control(path, 5.0)
        if fd is None:
            self.log.error(f"main slot {slot}: cannot take {path}; giving the slot back")
            return None
        flock.note_holder(fd, self.pid)
        return fd

    def arm(self, slot: int, on_fence: Callable[[], None]) -> int | None:
        """Fence this main from now on; returns the fencing token (the lock node's czxid)."""
        with _errors(self.hosts):
            self.fence = Fence(self._session(), self.node_path(slot), slot, self.spec.locks_fence_grace,
                               self.spec.locks_session_timeout, self.log, on_fence)
            token = self.fence.arm()
        self.log.info(f"main #{slot} holds {self.node_path(slot)} (fencing token {token})")
        return token

    def release_main(self, slot: int, fd: int) -> None:
        """Disarm the fence, delete our lock node, then free the local lock."""
        if self.fence is not None:
            self.fence.disarm()
        lock = self.locks.get(slot)
        if lock is not None and lock.is_acquired:
            try:
                lock.release()
            except KazooException as exc:  # the session's end (close) frees it anyway
                self.log.warn(f"cannot delete the lock node of main slot {slot}: {exc!r}")
        if fd >= 0:
            flock.release(fd)

    def close(self) -> None:
        """Close the session: ZooKeeper deletes every node of ours at once."""
        if self.fence is not None:
            self.fence.disarm()
        for lock in self.locks.values():
            lock.cancel()
        if self.client is None:
            return
        try:
            self.client.stop()
            self.client.close()
        except Exception as exc:  # leaving anyway; the session expires on its own
            self.log.warn(f"closing the ZooKeeper session: {exc!r}")

    # ------------------------------------------------------------ controller

    def _view(self) -> View:
        """One controller session per process and service, closed when the process exits.

        Connecting waits at most 3 s (or session_timeout), once: a failure is remembered.
        """
        spec = self.spec
        key = f"{self.hosts}/{spec.locks_root}/{spec.name}"
        if key in _unreachable:
            raise _unreachable[key]
        view = _views.get(key)
        if view is None:
            try:
                view = View(spec, self.log, timeout=min(spec.locks_session_timeout, 3.0))
            except UnreachableError as exc:
                _unreachable[key] = exc
                raise
            if not _views:
                import atexit

                atexit.register(_close_views)
            _views[key] = view
        return view

    def new_holder(self, slot: int, old_pid: int | None) -> tuple[str, int] | None:
        """(host, pid) holding ``slot`` when it is another host, else None (restart's hand-over)."""
        try:
            found = self._view().holder(slot)
        except (UnreachableError, KazooException):
            return None
        if found is None or found[0] == self.spec.host_id or found[1] is None:
            return None
        return found[0], found[1]

    def sees_ready(self, slot: int, pid: int) -> bool:
        """Only when ``pid`` holds this host's lock of the slot: another host's ready file is not here."""
        return flock.HolderProbe().holder(self.layout.lock_file("main", slot), [pid]) == pid

    def status_slots(self, reports: list[SlotReport],
                     is_alive: Callable[[int], bool]) -> tuple[list[SlotReport], str | None]:
        """``reports`` (read from this host's locks) with main slots as ZooKeeper sees them.

        A main slot held on another host is running there (``host`` names it; its
        pid is that host's). ``problem`` says why ZooKeeper could not be asked, and
        then the local reports come back as they were.
        """
        from ..model import Role
        from ..record import replace

        me = self.spec.host_id
        try:
            view = self._view()
        except UnreachableError as exc:
            return reports, f"{exc}: slots held by other hosts are unknown"
        try:
            merged = []
            for report in reports:
                if report.role is not Role.MAIN:
                    merged.append(replace(report, host=me))
                    continue
                merged.append(merge(report, view.holder(report.slot), me, is_alive, self.spec.locks_session_timeout))
            return merged, None
        except KazooException as exc:
            return reports, f"cannot read {self.spec.locks_root}/{self.spec.name} in ZooKeeper at {view.hosts}: {exc!r}"

    def after_stop(self, pids: list[int]) -> None:
        """Delete the ZooKeeper nodes of processes of this host that have just exited.

        A main ended by a signal could not close its session, so its lock node would
        keep the slot until the session expires (``session_timeout``); deleting it
        hands the slot over now. Never fails the action: a problem is logged.
        """
        if not pids:
            return
        try:
            view = self._view()
        except UnreachableError as exc:
            self.log.warn(f"{exc}: the lock nodes of pids {pids} go when their sessions expire")
            return
        try:
            for path in view.delete_nodes_of(self.spec.host_id, set(pids)):
                self.log.info(f"deleted {path}, left behind by an exited process")
        except KazooException as exc:
            self.log.warn(f"cannot delete the lock nodes of pids {pids}: {exc!r}")


class Takeover:
    """Same-host takeover: a standby ends the wait for a dead main of its own host at once.

    A SIGKILLed main cannot close its session, so its lock node would hold the slot
    until ZooKeeper expires the session (``session_timeout``). But on its own host its
    death is known at once: the kernel frees its local flock ``LOCKS/N.lock``.

    So while ZooKeeper names a process of this host (not us) as slot N's holder, one
    thread per slot blocks in ``flock(LOCK_EX)`` on that file (no wake-ups while the
    main lives), and otherwise on a children watch of the slot. When it gets the
    flock, no process of this host is main of N any more; holding it, it reads the
    holder again and, when that node names this host and a process that is gone
    (``owner_gone``: dead, or its pid now names a younger process), deletes the node.
    Then it frees the flock. The next contender in ZooKeeper's line gets the slot,
    with a new node, so a larger czxid (fencing token); if that is us, our local
    flock is free and we are main within milliseconds.

    The local flock decides which of this host's standbys looks: only its holder
    deletes, and a node is deleted only by its full path, never the new holder's.
    The dead main's session lives on in ZooKeeper until it expires, but no process
    is left to speak for it: nothing can re-create the node or act as holder.
    """

    STEP = 0.5  # seconds: the longest wait for one ZooKeeper call while holding the flock

    def __init__(self, engine: ZooKeeperEngine, slots: list[int]) -> None:
        import ctypes

        self.engine = engine
        self.client = engine._session()
        self.me = engine.spec.host_id
        self.stopping = False
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.changed = {slot: threading.Event() for slot in slots}
        self.previous = lean.set_handler(_CANCEL_SIGNAL, _ignore_signal)
        self.threads = [threading.Thread(target=self._watch, args=(slot,), daemon=True, name=f"takeover-{slot}")
                        for slot in slots]
        for thread in self.threads:
            thread.start()

    def look_again(self) -> None:
        """Watches may be lost across a reconnection: look at every slot again."""
        for event in self.changed.values():
            event.set()

    def stop(self) -> None:
        """End every thread (a blocked flock is broken by a signal); returns once they have."""
        self.stopping = True
        self.look_again()
        for thread in self.threads:
            while thread.is_alive():
                if thread.ident is not None:
                    try:
                        lean.pthread_kill(thread.ident, _CANCEL_SIGNAL)
                    except ProcessLookupError:
                        break
                thread.join(0.001)
        lean.set_handler(_CANCEL_SIGNAL, self.previous)

    def _watch(self, slot: int) -> None:
        engine = self.engine
        path = engine.layout.lock_file("main", slot)
        node = slot_path(engine.spec.locks_root, engine.spec.name, slot)
        changed = self.changed[slot]
        fd = flock.open_lock_file(path)
        try:
            while not self.stopping:
                changed.clear()
                if self.stopping:  # stop() set the event just before our clear(): it is lost
                    break
                try:
                    found = read_holder(self.client, node, watch=lambda _event: changed.set())
                except KazooException:
                    changed.wait(0.25)  # no session just now; the reconnection wakes us too
                    continue
                if found is None or found.host != self.me or found.pid == engine.pid:
                    changed.wait()
                    continue
                if self.libc.flock(fd, fcntl.LOCK_EX) != 0:
                    continue  # EINTR: stop() wants us out
                try:
                    deleted = self._take_over(slot, node, path, None if changed.is_set() else found)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
                if not deleted:
                    # The holder lives without the local flock: a new main of this host about
                    # to take it. Look again when the line changes, or soon.
                    changed.wait(0.05)
        except Exception as exc:  # the session's expiry still frees the slot
            engine.log.warn(f"standby: same-host takeover of main slot {slot} stopped: {type(exc).__name__}: {exc}")
        finally:
            os.close(fd)

    def _take_over(self, slot: int, node: str, path: str, found: Holder | None) -> bool:
        """We hold ``path``'s flock: delete the slot's lock node if it names a process of
        this host that is gone. True when deleted.

        ``found`` is the holder read before the wait when the line has not changed
        since (else None: read it again). Even a stale one is safe to act on: a
        node's path is unique and its data never changes, so deleting the node of a
        process that is gone can never remove a live holder's.

        Every call is bounded (``STEP``): a new main of this host waits for the
        flock we hold, and kills its holder after fence_grace + 1 s."""
        if self.client.state != KazooState.CONNECTED:
            return False
        if found is None:
            try:
                found = read_holder(self.client, node, timeout=self.STEP)
            except (KazooException, KazooTimeoutError):
                return False
        if found is None or found.host != self.me or found.pid is None or found.pid == self.engine.pid:
            return False
        if not owner_gone(found.pid, found.created):
            return False
        try:
            self.client.delete_async(found.path).get(timeout=self.STEP)
        except NoNodeError:
            return True  # its session ended meanwhile, or another standby was first
        except (KazooException, KazooTimeoutError):
            return False
        self.engine.log.info(f"main slot {slot}: pid {found.pid} of this host, which held {found.path}, is gone "
                             f"(its local lock {path} is free); deleted its lock node rather than wait "
                             f"{self.engine.spec.locks_session_timeout:g} s for its session to expire")
        return True


def _ignore_signal(_signum: int, _frame: object) -> None:
    """Handler of the cancel signal: its only job is to interrupt a blocked flock."""


_BOOT: list[float] = []


def owner_gone(pid: int, created: float) -> bool:
    """True when process ``pid`` of this host, named by a lock node made at ``created``
    (epoch seconds), is gone: dead (a zombie counts), or its pid now names a process
    that started after the node was made (the pid was reused, so the maker is dead).

    Start times come from /proc (``probe.proc_stat``: clock ticks since boot, plus
    the boot time); ``created`` is the server's clock, so 2 s of margin cover
    btime's whole seconds and clock skew: within it a live pid counts as the maker,
    and the slot waits for the session to expire, as before.
    """
    from ..probe import proc_stat

    found = proc_stat(pid)
    if found is None or found.state in ("Z", "X"):
        return True
    if not _BOOT:
        try:
            with open("/proc/stat", "rb") as handle:
                _BOOT.append(next(float(line.split()[1]) for line in handle if line.startswith(b"btime ")))
        except (OSError, StopIteration, ValueError, IndexError):
            return False
    started = _BOOT[0] + found.starttime / os.sysconf("SC_CLK_TCK")
    return started > created + 2.0


class _errors:
    """``with _errors(hosts):`` turns a kazoo failure into EngineError (the worker reports it)."""

    def __init__(self, hosts: str) -> None:
        self.hosts = hosts

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is not None and isinstance(exc, KazooException):
            raise EngineError(f"ZooKeeper at {self.hosts}: {type(exc).__name__} {exc}") from None


def _retry_quickly(lock: Lock, client: KazooClient) -> None:
    """kazoo's own retry of a lock backs off up to 60 s while a server is down: far
    too long for a standby that must take over once the ensemble is back. kazoo has
    no public way to set it; ``Lock._retry`` is what ``Lock.acquire`` copies
    (tests/test_zookeeper.py fails if that name moves)."""
    lock._retry = KazooRetry(max_tries=None, delay=0.05, backoff=2, max_jitter=0.2, max_delay=0.5,
                             sleep_func=client.handler.sleep_func)


def _kill_group_of(pid: int) -> None:
    from ..probe import proc_stat

    found = proc_stat(pid)
    pgid = found.pgid if found is not None else 0
    if pgid > 1 and pgid != os.getpgrp():
        try:
            os.killpg(pgid, lean.SIGKILL)
        except OSError:
            pass
    try:
        os.kill(pid, lean.SIGKILL)
    except OSError:
        pass

class Fence:
    """Ends a main that may no longer hold its slot, before another host runs it.

    SUSPENDED (no answer from any server): a timer of ``grace`` seconds, cancelled
    when the same session reconnects; LOST (session expired or closed) or our lock
    node deleted: at once. And a lease, because kazoo may notice a silent partition
    only 2/3 of the session timeout late: every reply read from the server (a ping's,
    a request's) means the server heard from us, so it cannot expire the session
    sooner than session_timeout after that; when nothing came back for ``LEASE`` x
    session_timeout, the main is fenced, whatever kazoo's state says. (The replies
    are observed by wrapping kazoo's ``ConnectionHandler._read_header``; a kazoo
    without it leaves the lease off, and says so in the log.)

    Fencing ends the main's own process group (it is in its own group, see
    spawn.py); nothing is cleaned up but the pid file. While the session may still
    be valid in ZooKeeper (fence_grace over, or the lease), the program is told
    first: SIGTERM to the group, then SIGKILL ``TOLD`` x session_timeout later, but
    never later than ``LAST`` x session_timeout after the last reply read, so the
    group is gone before the server could expire the session and give the slot
    away. When the slot may already be another's (session lost, our node deleted),
    SIGKILL at once.
    """

    LEASE = 0.85  # of session_timeout; the rest covers the round trip and the kill
    TOLD = 0.1  # of session_timeout: from SIGTERM to SIGKILL at most
    LAST = 0.95  # of session_timeout after the last reply: SIGKILL by then whatever happens

    def __init__(self, client: KazooClient, node_path: str, slot: int, grace: float, session_timeout: float,
                 log: Any, forget_pid_file: Callable[[], None]) -> None:
        self.client = client
        self.node_path = node_path
        self.slot = slot
        self.grace = grace
        self.lease = session_timeout * self.LEASE
        self.session_timeout = session_timeout
        self.log = log
        self.forget_pid_file = forget_pid_file
        self.armed = False
        self.pgid = os.getpgrp()
        self.timer: threading.Timer | None = None
        self.guard = threading.Lock()
        self.heard = time.monotonic()
        self.stopped = threading.Event()

    def arm(self) -> int:
        """Start watching; returns the lock node's czxid (the fencing token)."""
        self.armed = True
        leased = self._observe_replies()
        self.client.add_listener(self._on_state)
        stat = self.client.exists(self.node_path, watch=self._on_node)
        self.heard = time.monotonic()
        if stat is None:
            self.fire("our lock node is gone before the program started")
        if self.client.state != KazooState.CONNECTED:
            self._on_state(self.client.state)
        if leased:
            threading.Thread(target=self._keep_lease, daemon=True, name="hadctl-lease").start()
        return int(stat.czxid)

    def disarm(self) -> None:
        with self.guard:
            self.armed = False
            self.stopped.set()
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None

    def _observe_replies(self) -> bool:
        connection: Any = getattr(self.client, "_connection", None)
        read_header = getattr(connection, "_read_header", None)
        if read_header is None:
            self.log.warn("this kazoo has no ConnectionHandler._read_header: no lease, only fence_grace fences")
            return False

        def observed(*args: Any, **kwargs: Any) -> Any:
            header, buffer, offset = read_header(*args, **kwargs)
            if header.xid != -1:  # not a watch event (WATCH_XID): a reply to something we sent
                self.heard = time.monotonic()
            return header, buffer, offset

        connection._read_header = observed
        return True

    def _keep_lease(self) -> None:
        """Sleeps until the lease would run out (about once per lease while replies come)."""
        while True:
            left = self.heard + self.lease - time.monotonic()
            if left <= 0:
                self.fire(f"nothing heard from ZooKeeper for {self.lease:g} s ({self.LEASE:g} x session_timeout)",
                          tell=True)
                return
            if self.stopped.wait(left):
                return

    def _on_state(self, state: str) -> bool:
        """kazoo listener (connection thread; must not block). True removes it."""
        if not self.armed:
            return True
        if state == KazooState.LOST:
            self.fire("ZooKeeper session lost (expired or closed)")
        elif state == KazooState.SUSPENDED:
            with self.guard:
                if self.timer is None and self.armed:
                    self.log.warn(f"main #{self.slot}: ZooKeeper connection suspended; fenced in {self.grace:g} s "
                                  "unless it comes back")
                    self.timer = threading.Timer(self.grace, self._grace_over)
                    self.timer.daemon = True
                    self.timer.start()
        elif state == KazooState.CONNECTED:
            with self.guard:
                if self.timer is not None:
                    self.timer.cancel()
                    self.timer = None
                    self.log.info(f"main #{self.slot}: ZooKeeper connection back within fence_grace")
            # kazoo dropped our watch on SUSPENDED: set it again, and make sure the node is there.
            self.client.exists_async(self.node_path, watch=self._on_node).rawlink(self._check_node)
        return False

    def _check_node(self, result: Any) -> None:
        try:
            stat = result.get_nowait()
        except Exception:  # lost again meanwhile: the state listener decides
            return
        if stat is None:
            self.fire("our lock node was deleted")

    def _on_node(self, event: Any) -> None:
        if event.type == EventType.DELETED:
            self.fire("our lock node was deleted")

    def _grace_over(self) -> None:
        with self.guard:
            self.timer = None
            if not self.armed or self.client.state == KazooState.CONNECTED:
                return
        self.fire(f"no ZooKeeper server answered for {self.grace:g} s (fence_grace)", tell=True)

    def fire(self, reason: str, tell: bool = False) -> None:
        """End our process group, then ourselves: never returns while armed. With
        ``tell``, SIGTERM first and SIGKILL at the bound (see the class docstring)."""
        with self.guard:
            if not self.armed:
                return
            self.armed = False
        now = time.monotonic()
        kill_at = min(now + self.TOLD * self.session_timeout, self.heard + self.LAST * self.session_timeout)
        told = tell and kill_at - now > 0.005
        then = f"SIGTERM to process group {self.pgid}, SIGKILL in {kill_at - now:.3f} s" if told else \
            f"SIGKILL to process group {self.pgid}"
        self.log.error(f"main #{self.slot} fenced: {reason}; {then}")
        self.forget_pid_file()
        if told:
            try:
                os.killpg(self.pgid, lean.SIGTERM)
            except OSError:
                pass
            time.sleep(max(0.0, kill_at - time.monotonic()))  # the program's time to wind down
        try:
            os.killpg(self.pgid, lean.SIGKILL)
        except OSError:
            pass
        os.kill(os.getpid(), lean.SIGKILL)



# ================================================================ controllers


class View:
    """A controller's short ZooKeeper session: who holds which main slot."""

    def __init__(self, spec: WorkerSpec, log: Any, timeout: float | None = None) -> None:
        self.spec = spec
        self.hosts = spec.locks_hosts or ""
        budget = spec.locks_session_timeout if timeout is None else timeout
        # Every server gets its try within the budget: a silent one costs its share only.
        attempt = min(_attempt_timeout(spec.locks_fence_grace), max(0.25, 0.8 * budget / _server_count(self.hosts)))
        self.client = _client(self.hosts, spec.locks_session_timeout, attempt, log)
        _connect(self.client, self.hosts, budget)

    def path(self, slot: int) -> str:
        return slot_path(self.spec.locks_root, self.spec.name, slot)

    def holder(self, slot: int) -> tuple[str, int | None, int] | None:
        """(host, pid, czxid) of the slot's holder, or None when nobody holds it."""
        found = read_holder(self.client, self.path(slot))
        return None if found is None else (found.host, found.pid, found.czxid)

    def delete_nodes_of(self, host: str, pids: set[int]) -> list[str]:
        """Delete every contender node (any slot) whose data names ``host`` and one of ``pids``."""
        deleted = []
        for slot in range(1, self.spec.locks_max_procs + 1):
            try:
                children = self.client.get_children(self.path(slot))
            except NoNodeError:
                continue
            for child in children:
                path = f"{self.path(slot)}/{child}"
                try:
                    data, _stat = self.client.get(path)
                    if _parse_holder(data) in {(host, pid) for pid in pids}:
                        self.client.delete(path)
                        deleted.append(path)
                except NoNodeError:
                    continue
        return deleted

    def close(self) -> None:
        self.client.stop()
        self.client.close()



_views: dict[str, View] = {}
_unreachable: dict[str, UnreachableError] = {}


def _close_views() -> None:
    for view in _views.values():
        try:
            view.close()
        except Exception:  # exiting; the session ends with us anyway
            pass
    _views.clear()


def merge(report: SlotReport, found: tuple[str, int | None, int] | None, me: str,
          is_alive: Callable[[int], bool], session_timeout: float) -> SlotReport:
    """One local main-slot report merged with ``found``, ZooKeeper's (host, pid, czxid)
    of the slot's holder (None: nobody holds it); ``me`` is this host's id."""
    from ..record import replace

    local = report.pid
    notes = list(report.stale)
    if found is None:
        if local is None:
            return report
        notes.append(f"pid {local} holds this host's lock but no ZooKeeper lock: it is being fenced")
        return replace(report, host=me, stale=tuple(notes))
    host, pid, _czxid = found
    if host == me:
        if pid == local:
            return replace(report, host=me)
        if local is not None:
            notes.append(f"pid {local} of this host still holds its lock; ZooKeeper gives the slot to pid {pid}")
        if pid is not None and is_alive(pid):
            return replace(report, pid=pid, host=me, stale=tuple(notes))
        notes.append(f"ZooKeeper still names pid {pid} of this host, which is gone; "
                     f"the slot frees when its session expires (within {session_timeout:g} s)")
        return replace(report, pid=local, host=me if local is not None else None, stale=tuple(notes))
    if local is not None:
        notes.append(f"pid {local} of this host still holds its lock, but ZooKeeper gives the slot to {host}: "
                     "it is being fenced")
    return replace(report, pid=pid, host=host, stale=tuple(notes))
