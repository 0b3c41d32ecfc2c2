"""Same-host takeover: a standby frees the ZooKeeper slot of a dead main of its own host.

A main SIGKILLed on this host leaves its lock node until its session expires; a
standby of the same host frees the slot at once (``Takeover``: the main's local
flock tells it the main is gone). Standbys of other hosts wait for the expiry.

Imports kazoo (and ctypes, for a flock a signal can break); from hadctl, lean,
locks.flock, locks.zookeeper_session (and probe, lazily). Imported by
locks/zookeeper.py alone.
"""
from __future__ import annotations

import fcntl
import os
import threading

from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError
from kazoo.protocol.states import KazooState

from .. import lean
from . import flock
from .zookeeper_session import Holder, read_holder, slot_path

if lean.TYPE_CHECKING:
    from .zookeeper import ZooKeeperEngine

# Breaks a takeover thread's blocking flock. Not USR2 (flock.SlotWaiter's): that is
# reopen_signal's default, which a waiting standby must still be able to receive.
_CANCEL_SIGNAL = lean.signum("RTMIN")


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
        self.client = engine.session()
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

