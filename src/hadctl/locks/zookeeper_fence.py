"""Fencing: a main that may no longer hold its ZooKeeper slot ends itself first.

A main whose session is SUSPENDED for longer than ``fence_grace``, or LOST, or
whose lock node vanishes, or that heard nothing from the server for 0.85 x
session_timeout (a lease: the server cannot expire the session sooner), ends its
own process group (SIGTERM then SIGKILL while the session may be valid, else
SIGKILL at once). The fencing token, the lock node's czxid, grows with each new
holder of a slot (a node created later has a larger zxid); it reaches the program
as ``$HADCTL_FENCING_TOKEN`` and ``hadctl.fencing_token()``.

Imports kazoo; from hadctl, lean only. Imported by locks/zookeeper.py alone.
"""
from __future__ import annotations

import os
import threading
import time

from kazoo.protocol.states import EventType, KazooState

from .. import lean

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from kazoo.client import KazooClient


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
