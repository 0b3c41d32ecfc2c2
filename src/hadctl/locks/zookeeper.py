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
asks ZooKeeper too (locks/zookeeper_controller.py), to show slots held by other hosts.

This module is the worker's side (``ZooKeeperEngine``: take, wait, arm, release);
its parts live beside it, each importing kazoo:

  zookeeper_session.py     the kazoo client, its connection, who holds a slot
  zookeeper_fence.py       ``Fence``: a main that may have lost its slot ends itself
  zookeeper_takeover.py    ``Takeover``: a standby frees a dead same-host main's slot
  zookeeper_controller.py  the controller side: status, restart and stop over ZooKeeper

Imports kazoo and, from hadctl, lean, locks.engine, locks.flock, those parts (and
probe, to kill a frozen ex-main's group). Only ``engine.worker_engine`` imports
it, for ``engine = "zookeeper"``, after the fork (kazoo starts threads).
"""
from __future__ import annotations

import os
import select
import threading
import time

from kazoo.exceptions import CancelledError, KazooException
from kazoo.protocol.states import KazooState
from kazoo.recipe.lock import Lock

from .. import lean
from . import flock
from .engine import Engine, EngineError, GaveUp
from .zookeeper_fence import Fence
from .zookeeper_session import (
    UnreachableError,
    attempt_timeout,
    connect,
    errors_of,
    new_client,
    retry_quickly,
    slot_path,
)
from .zookeeper_takeover import Takeover

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kazoo.client import KazooClient

    from ..layout import Layout
    from ..spec import WorkerSpec
    from .engine import Waits


class ZooKeeperEngine(Engine):
    """Main slots as kazoo locks (see locks/engine.py for the protocol).

    A worker's session opens in ``start`` (after the fork: kazoo starts threads)
    and ends in ``close``. The controller side is zookeeper_controller.Controller.
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
            self.client = new_client(self.hosts, spec.locks_session_timeout,
                                  attempt_timeout(spec.locks_fence_grace), self.log)
            connect(self.client, self.hosts, spec.locks_session_timeout)
        except UnreachableError as exc:
            self.client = None
            raise EngineError(str(exc)) from None

    def session(self) -> KazooClient:
        if self.client is None:
            raise EngineError("no ZooKeeper session (start() was not called)")
        return self.client

    def lock(self, slot: int) -> Lock:
        if slot not in self.locks:
            client = self.session()
            lock = Lock(client, slot_path(self.spec.locks_root, self.spec.name, slot), self.identity)
            retry_quickly(lock, client)
            self.locks[slot] = lock
        return self.locks[slot]

    def node_path(self, slot: int) -> str:
        lock = self.locks[slot]
        return f"{lock.path}/{lock.node}"

    def take_main(self, slots: list[int]) -> tuple[int, int] | None:
        """Take the first slot nobody holds or waits for, and its local lock."""
        with errors_of(self.hosts):
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
        with errors_of(self.hosts):
            slot = self._wait(slots, waits)
            if slot is None:
                return None
            fd = self._take_local_lock(slot)
            if fd is None:
                self.release_main(slot, -1)
                return None
            return slot, fd

    def _wait(self, slots: list[int], waits: Waits) -> int | None:
        """Queue for every slot in threads (``_contend``) while a ``Takeover`` watches for
        dead same-host mains; the slot won, or None: leave. Every other wait is ended."""
        client = self.session()
        read_fd, write_fd = os.pipe()
        threads: list[threading.Thread] = []
        won: list[int] = []
        for slot in slots:
            self.lock(slot)  # made here, not in the threads: self.locks is not shared-safe
        takeover = Takeover(self, slots)
        reconnected = self._on_reconnection(takeover)
        client.add_listener(reconnected)
        try:
            for slot in slots:
                thread = threading.Thread(target=self._contend, args=(slot, write_fd), daemon=True,
                                          name=f"slot-{slot}")
                thread.start()
                threads.append(thread)
            return self._first_won(read_fd, waits, won)
        finally:
            takeover.stop()  # before the local lock is taken: none of its threads may hold it then
            client.remove_listener(reconnected)
            self._cancel_others(threads, keep=won[0] if won else None)
            os.close(read_fd)
            os.close(write_fd)

    def _contend(self, slot: int, write_fd: int) -> None:
        """A lock thread: block in kazoo's ``Lock.acquire``; write the slot won (0: failed)."""
        try:
            got = self.lock(slot).acquire(blocking=True)
        except CancelledError:
            return
        except Exception as exc:  # reported to the main thread, which leaves
            self.log.error(f"waiting for main slot {slot} in ZooKeeper failed: {type(exc).__name__}: {exc}")
            got = False
        os.write(write_fd, f"{slot if got else 0}\n".encode())

    def _on_reconnection(self, takeover: Takeover) -> Callable[[str], bool]:
        """A kazoo listener that wakes every wait when the connection comes back.

        kazoo can lose the predecessor watch across a reconnection (kazoo issues 151
        and 282: a waiting Lock.acquire then hangs after a server restart)."""
        def reconnected(state: str) -> bool:
            if state == KazooState.CONNECTED:
                self.log.info("standby: ZooKeeper connection back; looking at the main slots again")
                for lock in list(self.locks.values()):
                    lock.wake_event.set()
                takeover.look_again()
            return False  # stay registered

        return reconnected

    def _first_won(self, read_fd: int, waits: Waits, won: list[int]) -> int | None:
        """Block on the lock threads' pipe until one wins (appended to ``won``), a lock
        thread fails or we must leave (None); GaveUp once ``locks.retries`` are used up."""
        spec = self.spec
        limit = None if spec.locks_retries is None else spec.locks_interval * max(spec.locks_retries, 1)
        deadline = None if limit is None else time.monotonic() + limit
        tick = None if waits.watched else spec.locks_interval  # no dnotify: look at the stop file
        while not won:
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
                    if not won:
                        won.append(int(word))
        return won[0]

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
        with errors_of(self.hosts):
            self.fence = Fence(self.session(), self.node_path(slot), slot, self.spec.locks_fence_grace,
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
