"""A kazoo session for hadctl: the client, its connection, and who holds a slot's lock.

In ZooKeeper, main slot N of service NAME is a kazoo ``Lock`` at ``ROOT/NAME/slot-N``:
each contender creates an ephemeral sequential node ``<uuid>__lock__<seq>`` holding
``"HOST PID"``; the lowest one holds the slot (``read_holder``).

Owns: the client that reconnects quickly and bounds each connection attempt, the
connection with a deadline, kazoo failures as ``EngineError``, a lock's quick retry.
Imports kazoo; from hadctl, lean and locks.engine. Imported only by the other
locks/zookeeper*.py modules, so only for ``engine = "zookeeper"``.
"""
from __future__ import annotations

import logging
import math
import os
import re
import threading
import time

from kazoo.client import KazooClient
from kazoo.exceptions import KazooException, NoNodeError
from kazoo.handlers.threading import KazooTimeoutError, SequentialThreadingHandler
from kazoo.recipe.lock import Lock
from kazoo.retry import KazooRetry

from .. import lean
from .engine import EngineError

if lean.TYPE_CHECKING:
    from collections.abc import Callable, Iterable
    from typing import Any

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


def new_client(hosts: str, session_timeout: float, attempt: float, log: Any) -> KazooClient:
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


def attempt_timeout(fence_grace: float) -> float:
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
    count = server_count(hosts)
    repeat = max(1, min(20, math.ceil(attempts / count)))
    return ",".join([servers] * repeat) + slash + chroot


def server_count(hosts: str) -> int:
    return len([s for s in hosts.partition("/")[0].split(",") if s.strip()]) or 1


def connect(client: KazooClient, hosts: str, timeout: float) -> None:
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


def parse_holder(data: bytes) -> tuple[str, int | None]:
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
        host, pid = parse_holder(data)
        return Holder(f"{path}/{lowest}", host, pid, int(stat.czxid), stat.ctime / 1000.0)
    return None



class errors_of:
    """``with errors_of(hosts):`` turns a kazoo failure into EngineError (the worker reports it)."""

    def __init__(self, hosts: str) -> None:
        self.hosts = hosts

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is not None and isinstance(exc, KazooException):
            raise EngineError(f"ZooKeeper at {self.hosts}: {type(exc).__name__} {exc}") from None


def retry_quickly(lock: Lock, client: KazooClient) -> None:
    """kazoo's own retry of a lock backs off up to 60 s while a server is down: far
    too long for a standby that must take over once the ensemble is back. kazoo has
    no public way to set it; ``Lock._retry`` is what ``Lock.acquire`` copies
    (tests/test_zookeeper.py fails if that name moves)."""
    lock._retry = KazooRetry(max_tries=None, delay=0.05, backoff=2, max_jitter=0.2, max_delay=0.5,
                             sleep_func=client.handler.sleep_func)

