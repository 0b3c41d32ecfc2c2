"""The lock-engine protocol: how main slots are taken, waited for, released and seen.

Two implementations: ``flock.FlockEngine`` (this host's ``LOCKS/N.lock`` files)
and ``zookeeper.ZooKeeperEngine`` (kazoo locks shared by several hosts, each
main also holding its local flock; its controller side is
``zookeeper_controller.Controller``). Standby slots are always local flock and
stay in worker.py.

Worker side, in the order a worker uses them:

  start()                      open what the engine needs (a session); after the fork
  take_main(slots)             take the first free main slot now: (slot, fd) or None
  wait_main(slots, waits)      block until one is ours (slot, fd), or None: we must leave
  arm(slot, on_fence)          the main is about to run: fencing on; its token or None
  release_main(slot, fd)       give the slot back (the function returned)
  close()                      end whatever start() opened

Controller side:

  new_holder(slot, old_pid)    (host, pid) when another host has taken the slot, else None
  sees_ready(slot, pid)        can this host see that holder's ready file?
  status_slots(reports)        the local slot reports as the engine sees them, and a problem
  after_stop(pids)             clean up after processes a stop has ended

``waits`` is the worker's side of a wait (``Waits`` below): the code that lets a
signal break a blocking call lives once, in worker.py, and engines call it.

Imports lean only; the worker imports it. kazoo is imported only by
locks/zookeeper*.py: ``worker_engine`` imports locks/zookeeper.py only for
``engine = "zookeeper"``, and ``ZooKeeperController`` imports
locks/zookeeper_controller.py only once ZooKeeper must be asked.
"""
from __future__ import annotations

from ..lean import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from ..config import ServiceConfig
    from ..layout import Layout
    from ..model import SlotReport
    from ..spec import WorkerSpec


class EngineError(Exception):
    """The engine cannot do its part (server unreachable, local lock kept); the message says why."""


class GaveUp(Exception):
    """A standby used up ``locks.retries``; the message says so (the worker logs it and leaves)."""


class Waits:
    """What an engine asks of the waiting worker (implemented by worker.Worker)."""

    watched: bool  # True when the stop file's folder is watched (no need to look on a timer)

    def must_leave(self) -> bool:
        """Asked to leave, or the stop file exists: stop waiting."""
        raise NotImplementedError

    def interrupted(self) -> bool:
        """A signal (leave, or the stop file's folder changed) came since the last look."""
        raise NotImplementedError

    def block(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, which a leave signal or a stop-file event may break: None then."""
        raise NotImplementedError


class Engine:
    """Main slots of one service; see the module docstring for the protocol.

    The controller-side defaults here are the flock engine's (nothing beyond this
    host's locks); the worker-side methods each engine implements.
    """

    def start(self) -> None:
        pass

    def take_main(self, slots: list[int]) -> tuple[int, int] | None:
        raise NotImplementedError

    def wait_main(self, slots: list[int], waits: Waits) -> tuple[int, int] | None:
        raise NotImplementedError

    def arm(self, slot: int, on_fence: Callable[[], None]) -> int | None:
        return None

    def release_main(self, slot: int, fd: int) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def new_holder(self, slot: int, old_pid: int | None) -> tuple[str, int] | None:
        return None

    def sees_ready(self, slot: int, pid: int) -> bool:
        return True

    def status_slots(self, reports: list[SlotReport],
                     is_alive: Callable[[int], bool]) -> tuple[list[SlotReport], str | None]:
        return reports, None

    def after_stop(self, pids: list[int]) -> None:
        pass


def worker_engine(spec: WorkerSpec, layout: Layout, log: Any) -> Engine:
    """The engine a worker uses, from its spec (kazoo is imported only for ZooKeeper)."""
    if spec.locks_engine == "zookeeper":
        from .zookeeper import ZooKeeperEngine

        return ZooKeeperEngine(spec, layout, log)
    from .flock import FlockEngine

    return FlockEngine(spec, layout)


def controller_engine(cfg: ServiceConfig, log: Any) -> Engine:
    """The engine a controller asks about ``cfg``'s main slots (kazoo only for ZooKeeper).

    For flock the controller side is this base class's: this host's locks are all
    there is, and actions read them itself. So a ``status`` builds no worker spec.
    """
    if cfg.locks.engine != "zookeeper":
        return Engine()
    return ZooKeeperController(cfg, log)


class ZooKeeperController(Engine):
    """The controller side of the ZooKeeper engine, which loads kazoo (about 11 MB and
    100 ms) and opens a session only when ZooKeeper must be asked.

    ``status`` first reads this host's locks: a main slot whose local lock a live
    process holds is held by this host (a main holds its local lock for as long as
    it holds the ZooKeeper lock; one that lost the latter fences itself within
    fence_grace). Only when some main slot is not held here does it ask ZooKeeper,
    which alone knows other hosts' holders.
    """

    def __init__(self, cfg: ServiceConfig, log: Any) -> None:
        self.cfg = cfg
        self.log = log
        self._engine: Engine | None = None

    def _zookeeper(self) -> Engine:
        if self._engine is None:
            from ..layout import Layout
            from .zookeeper_controller import Controller

            spec = self.cfg.worker_spec()
            layout = Layout(spec.pid_dir, spec.locks_path, spec.locks_standby_path, spec.standby_stop_file)
            self._engine = Controller(spec, layout, self.log)
        return self._engine

    def new_holder(self, slot: int, old_pid: int | None) -> tuple[str, int] | None:
        return self._zookeeper().new_holder(slot, old_pid)

    def sees_ready(self, slot: int, pid: int) -> bool:
        return self._zookeeper().sees_ready(slot, pid)

    def status_slots(self, reports: list[SlotReport],
                     is_alive: Callable[[int], bool]) -> tuple[list[SlotReport], str | None]:
        from ..lean import host_id
        from ..model import Role
        from ..record import replace

        if all(r.pid is not None and is_alive(r.pid) for r in reports if r.role is Role.MAIN):
            me = host_id()
            return [replace(r, host=me) for r in reports], None
        return self._zookeeper().status_slots(reports, is_alive)

    def after_stop(self, pids: list[int]) -> None:
        if pids:
            self._zookeeper().after_stop(pids)
