"""The controller side of the ZooKeeper engine: status, restart and stop over ZooKeeper.

A controller (``hadctl status``, ``restart``, ``stop``) opens one short session
per process and service (``View``), shared and closed at exit: it reads who holds
each main slot (``merge`` folds that into this host's slot reports), and deletes
the lock nodes of this host's processes a stop has just ended.

Imports kazoo; from hadctl, locks.engine, locks.flock, locks.zookeeper_session
(and model, record, lazily). Imported only by ``engine.ZooKeeperController``, once
ZooKeeper must be asked.
"""
from __future__ import annotations

from kazoo.exceptions import KazooException, NoNodeError

from .. import lean
from . import flock
from .engine import Engine
from .zookeeper_session import (
    UnreachableError,
    attempt_timeout,
    connect,
    new_client,
    parse_holder,
    read_holder,
    server_count,
    slot_path,
)

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..layout import Layout
    from ..model import SlotReport
    from ..spec import WorkerSpec


class View:
    """A controller's short ZooKeeper session: who holds which main slot."""

    def __init__(self, spec: WorkerSpec, log: Any, timeout: float | None = None) -> None:
        self.spec = spec
        self.hosts = spec.locks_hosts or ""
        budget = spec.locks_session_timeout if timeout is None else timeout
        # Every server gets its try within the budget: a silent one costs its share only.
        attempt = min(attempt_timeout(spec.locks_fence_grace), max(0.25, 0.8 * budget / server_count(self.hosts)))
        self.client = new_client(self.hosts, spec.locks_session_timeout, attempt, log)
        connect(self.client, self.hosts, budget)

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
                    if parse_holder(data) in {(host, pid) for pid in pids}:
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


class Controller(Engine):
    """The controller half of the engine protocol for ZooKeeper (see locks/engine.py)."""

    def __init__(self, spec: WorkerSpec, layout: Layout, log: Any) -> None:
        self.spec = spec
        self.layout = layout
        self.log = log
        self.hosts = spec.locks_hosts or ""

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
