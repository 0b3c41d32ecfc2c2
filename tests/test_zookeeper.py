"""The ZooKeeper lock engine: main slots shared by hosts, fencing, clear errors.

Real ZooKeeper servers (tests/zk.py), real hadctl processes. Two "hosts" are two
configs on this machine with their own pid_dir and ``HADCTL_HOST_ID``; both mains
write to one ledger (tests/services/zk_ledger.py: enter, a tick every 10 ms, exit),
and CLOCK_MONOTONIC is shared, so the ledger shows who ran user code when.
"""
from __future__ import annotations

import itertools
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import ROOT, Service, failed, pid_alive, wait_until
from zk import Proxy, Server, free_port

T = 2.0  # session_timeout of these tests


class Host(Service):
    """A service config as seen from one host: ``HADCTL_HOST_ID`` set for every command."""

    def __init__(self, folder: Path, host_id: str, **settings: Any) -> None:
        self.host_id = host_id
        super().__init__(folder, **settings)

    def run(self, *args: str, timeout: float = 60, check: bool | int = False) -> Any:
        saved = os.environ.get("HADCTL_HOST_ID")
        os.environ["HADCTL_HOST_ID"] = self.host_id
        try:
            return super().run(*args, timeout=timeout, check=check)
        finally:
            if saved is None:
                del os.environ["HADCTL_HOST_ID"]
            else:
                os.environ["HADCTL_HOST_ID"] = saved

    def main_slot(self, slot: int = 1) -> dict[str, Any]:
        return next(s for s in self.status()["slots"] if s["role"] == "main" and s["slot"] == slot)

    def log_text(self) -> str:
        return self.log_file.read_text() if self.log_file.exists() else ""


def show_logs(request: pytest.FixtureRequest, logs: list[Path]) -> None:
    """After a failed test, print the end of each log (pytest shows it beside the failure)."""
    if not failed(request):
        return
    for path in logs:
        if path.exists():
            print(f"----- {path} (last 120 lines)")
            print("\n".join(path.read_text(errors="replace").splitlines()[-120:]))


@pytest.fixture
def zookeeper(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A standalone ZooKeeper on 127.0.0.1 (tickTime 500), stopped at the end."""
    server = Server(tmp_path / "zookeeper").start()
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()
        show_logs(request, [server.folder / "server.log"])


@pytest.fixture
def hosts(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A factory: ``hosts("A", zk_hosts, **locks)``; every host is stopped before ZooKeeper is."""
    made: list[Host] = []
    ledger = tmp_path / "ledger"

    def make(host_id: str, zk_hosts: str, standbys: int = 1, **locks: Any) -> Host:
        folder = tmp_path / f"host-{host_id}"
        folder.mkdir()
        host = Host(folder, host_id, entrypoint="tests.services.zk_ledger:serve", respawn_standby=False,
                    env={"LEDGER": str(ledger)},
                    locks={"engine": "zookeeper", "hosts": zk_hosts, "session_timeout": T,
                           "standby_max_procs": standbys, **locks})
        host.ledger = ledger
        made.append(host)
        return host

    yield make
    show_logs(request, [host.log_file for host in made])
    for host in made:
        host.stop()


def entries(host: Host, event: str = "enter") -> list[list[str]]:
    return [line for line in host.ledger_lines() if line[0] == event]


def entered(host: Host, pid: int) -> float | None:
    times = [float(line[2]) for line in entries(host) if int(line[1]) == pid]
    return times[0] if times else None


def last_tick(host: Host, pid: int) -> float:
    return max(float(line[2]) for line in host.ledger_lines() if int(line[1]) == pid)


def token_of(host: Host, pid: int) -> int:
    line = next(line for line in entries(host) if int(line[1]) == pid)
    assert line[4] == line[5], "hadctl.fencing_token() and $HADCTL_FENCING_TOKEN differ"
    return int(line[4])


def log_time(host: Host, words: str) -> float | None:
    """Wall-clock time of the first log line holding ``words`` (None when there is none)."""
    import datetime

    for line in host.log_text().splitlines():
        if words in line:
            stamp = line[1:line.index("]")]
            return datetime.datetime.strptime(stamp + "0", "%Y-%m-%d %H:%M:%S.%f").timestamp()
    return None


def gone(pid: int) -> bool:
    return not pid_alive(pid)


# ----------------------------------------------------------------- hand-over


def test_stop_on_one_host_hands_the_slot_to_the_other_hosts_standby(zookeeper, hosts):
    a, b = hosts("A", zookeeper.address), hosts("B", zookeeper.address)
    a.run("start", check=True)
    b.run("start", check=True)
    old = a.pid_of("main")
    standby = b.pid_of("standby")
    wait_until(lambda: entered(a, old), 5, "A's main inside the function")
    assert b.main_slot() == {"role": "main", "slot": 1, "running": True, "pid": old, "stale": [], "host": "A"}
    assert f"main #1 (pid {old} on A) [Running]" in b.run("status", check=True).stdout

    a.run("stop", check=True)
    wait_until(lambda: entered(b, standby), 5, "B's standby inside the function")
    exit_a = next(float(line[2]) for line in entries(a, "exit") if int(line[1]) == old)
    handover = entered(b, standby) - exit_a
    assert 0 < handover < 1.0, f"hand-over took {handover:.3f} s (target 0.05 s)"
    assert token_of(b, standby) > token_of(a, old)
    result = a.run("status", check=1)  # the main slot runs (on B); A's standby slot does not
    assert f"main #1 (pid {standby} on B) [Running]" in result.stdout
    assert a.main_slot()["host"] == "B"


def test_stop_frees_the_lock_node_of_a_main_it_had_to_kill(zookeeper, hosts):
    # A main ended by a signal cannot close its session; stop deletes its lock node,
    # so the other host does not wait for the session (6 s here) to expire.
    a = hosts("A", zookeeper.address, standbys=0, session_timeout=6)
    a.write(**{**a.settings, "stop_signals": ["KILL"]})
    b = hosts("B", zookeeper.address, session_timeout=6)
    a.run("start", check=True)
    b.run("start", check=True)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    stopping = time.monotonic()
    a.run("stop", check=True)
    wait_until(lambda: entered(b, standby), 6, "B's standby inside the function")
    assert entered(b, standby) - stopping < 3.0
    assert not entries(a, "exit")  # it was SIGKILLed
    assert "left behind by an exited process" in a.log_text()


def test_two_slots_over_two_hosts(zookeeper, hosts):
    a = hosts("A", zookeeper.address, max_procs=2)
    b = hosts("B", zookeeper.address, max_procs=2, standbys=2)
    a.run("start", check=True)
    b.run("start", check=True)
    mains = sorted(a.holders("main"))
    standbys = set(b.holders("standby"))
    assert len(mains) == 2 and len(standbys) == 2
    assert {s["host"] for s in b.status()["slots"] if s["role"] == "main"} == {"A"}
    a.run("stop", check=True)
    wait_until(lambda: set(b.holders("main")) == standbys, 5, "both of B's standbys promoted")
    slots = [line[6] for line in entries(b) if int(line[1]) in standbys]
    assert sorted(slots) == ["1", "2"]
    assert a.run("status", check=1).stdout.count(" on B) [Running]") == 2


def test_restart_on_one_host_is_rolling(zookeeper, hosts):
    a, b = hosts("A", zookeeper.address), hosts("B", zookeeper.address)
    a.run("start", check=True)
    b.run("start", check=True)
    old = a.pid_of("main")
    result = a.run("restart", check=True)
    assert f"main #1 (pid {old}) replaced by pid" in result.stdout
    new = a.main_slot()["pid"]
    assert new != old and gone(old)
    wait_until(lambda: entered(a, new), 5, "the new main inside the function")
    assert entered(a, new) > float(entries(a, "exit")[0][2])  # never two at once


# ----------------------------------------------------------------- failover


def test_sigkill_of_a_main_fails_over_to_the_other_host_within_the_session_timeout(zookeeper, hosts):
    a, b = hosts("A", zookeeper.address, standbys=0), hosts("B", zookeeper.address)
    a.run("start", check=True)
    b.run("start", check=True)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    killed = time.monotonic()
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: entered(b, standby), T + 3, "B's standby inside the function")
    failover = entered(b, standby) - killed
    assert failover < T + 1.0, f"failover took {failover:.3f} s"
    assert b.main_slot()["pid"] == standby


def overlaps(host: Host) -> list[str]:
    """Every pair of mains whose runs (first to last ledger line) overlap in time."""
    spans: dict[int, tuple[float, float]] = {}
    for line in host.ledger_lines():
        pid, moment = int(line[1]), float(line[2])
        first, last = spans.get(pid, (moment, moment))
        spans[pid] = (min(first, moment), max(last, moment))
    ordered = sorted(spans.items(), key=lambda item: item[1][0])
    return [f"pid {later} entered {end - start:.3f} s before pid {pid} stopped"
            for (pid, (_s, end)), (later, (start, _e)) in itertools.pairwise(ordered) if start <= end]


LONG = 20.0  # the longest session this server allows: a takeover that waited for it would show


def test_sigkill_of_a_main_is_taken_over_by_a_standby_of_its_own_host_without_waiting_for_the_session(
        zookeeper, hosts):
    # Two standbys on A (the local flock decides which one looks) and one on B, queued last.
    a = hosts("A", zookeeper.address, standbys=2, session_timeout=LONG)
    b = hosts("B", zookeeper.address, session_timeout=LONG)
    a.run("start", check=True)
    b.run("start", check=True)
    first = a.pid_of("main")
    standbys = set(a.holders("standby"))
    remote = b.pid_of("standby")
    wait_until(lambda: entered(a, first), 5, "A's main inside the function")
    os.kill(first, signal.SIGKILL)
    # A standby on the same host enters long before the dead main's session could expire.
    wait_until(lambda: [p for p in standbys if entered(a, p)], LONG / 4, "one of A's standbys inside the function")
    second = next(p for p in standbys if entered(a, p))
    assert f"pid {first} of this host, which held " in a.log_text()
    assert a.main_slot()["pid"] == second and b.main_slot()["host"] == "A"
    assert token_of(a, second) > token_of(a, first)
    # Again: A's last standby takes over from the second main the same way.
    (third,) = standbys - {second}
    os.kill(second, signal.SIGKILL)
    wait_until(lambda: entered(a, third), LONG / 4, "A's other standby inside the function")
    assert token_of(a, third) > token_of(a, second)
    assert not entered(b, remote), "B's standby entered although A's standbys were first in line"
    assert pid_alive(remote) and b.pid_of("standby") == remote
    assert not overlaps(a), overlaps(a)
    assert [int(line[1]) for line in entries(a)] == [first, second, third]


def test_a_standby_of_another_host_first_in_line_enters_once_the_dead_mains_own_host_frees_the_slot(
        zookeeper, hosts):
    # B's standby queued before A's: A's standby sees its host's main die and deletes the
    # dead main's node; the slot goes to the next in line, B's standby, without the wait.
    a = hosts("A", zookeeper.address, standbys=0, session_timeout=LONG)
    b = hosts("B", zookeeper.address, session_timeout=LONG)
    a.run("start", check=True)
    b.run("start", check=True)
    main, remote = a.pid_of("main"), b.pid_of("standby")
    a.write(**{**a.settings, "locks": {**a.settings["locks"], "standby_max_procs": 1}})
    a.run("start", check=True)
    local = a.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: entered(b, remote), LONG / 4, "B's standby inside the function")
    assert pid_alive(local) and not entered(a, local)
    assert a.main_slot()["host"] == "B"
    assert token_of(b, remote) > token_of(a, main)
    assert not overlaps(a), overlaps(a)


def test_a_frozen_main_is_replaced_and_fenced_when_it_thaws(zookeeper, hosts):
    a, b = hosts("A", zookeeper.address, standbys=0), hosts("B", zookeeper.address)
    a.run("start", check=True)
    b.run("start", check=True)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    os.kill(main, signal.SIGSTOP)
    try:
        wait_until(lambda: entered(b, standby), T + 3, "B's standby inside the function")
        assert pid_alive(main)  # still there, frozen, its slot given away
    finally:
        thawed = time.monotonic()
        os.kill(main, signal.SIGCONT)
    wait_until(lambda: gone(main), 0.5 + 1.0, "the thawed main fenced")  # fence_grace (T/4) of noticing
    assert "main #1 fenced: " in a.log_text()  # session lost, or its lock node deleted: the first one seen
    after_thaw = [line for line in a.ledger_lines() if int(line[1]) == main and float(line[2]) > thawed]
    assert len(after_thaw) <= 20, f"the thawed main ran {len(after_thaw)} ticks"  # what fencing tokens are for
    assert token_of(b, standby) > token_of(a, main)


def test_a_frozen_main_is_killed_by_its_own_hosts_standby(zookeeper, hosts):
    a = hosts("A", zookeeper.address)
    a.run("start", check=True)
    main, standby = a.pid_of("main"), a.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "the main inside the function")
    os.kill(main, signal.SIGSTOP)
    wait_until(lambda: entered(a, standby), T + 0.5 + 4, "the standby inside the function")
    assert gone(main), "the frozen ex-main still holds its local lock"
    assert f"pid {main} holds" in a.log_text() and "killing it" in a.log_text()
    assert a.main_slot()["pid"] == standby


def test_a_host_cut_off_from_zookeeper_fences_its_main_before_the_other_host_takes_over(zookeeper, hosts):
    proxy = Proxy(zookeeper.port)
    try:
        a, b = hosts("A", proxy.address, standbys=0), hosts("B", zookeeper.address)
        a.run("start", check=True)
        b.run("start", check=True)
        main, standby = a.pid_of("main"), b.pid_of("standby")
        wait_until(lambda: entered(a, main), 5, "A's main inside the function")
        cut = time.monotonic()
        proxy.cut()  # silent: no RST, A notices only when its pings go unanswered
        wait_until(lambda: gone(main), T + 0.5, "A's main fenced")
        wait_until(lambda: entered(b, standby), T + 3, "B's standby inside the function")
        last_a, first_b = last_tick(a, main), entered(b, standby)
        fenced = log_time(a, "main #1 fenced: ")  # fence_grace after SUSPENDED, or the lease, first
        assert fenced is not None
        suspended = log_time(a, "ZooKeeper connection suspended")
        assert suspended is None or fenced - suspended < 0.5 + 0.1  # within fence_grace (T/4)
        # A's user code stops at the latest 0.85 T after the last reply it read from the server,
        # before ZooKeeper can expire its session (T after that) and give the slot away.
        assert last_a - cut < 0.85 * T + 0.15, f"A ran {last_a - cut:.3f} s after the cut"
        # Fenced while its session may still live: told first (SIGTERM), so the function returned.
        assert "SIGTERM to process group" in a.log_text()
        assert [int(line[1]) for line in entries(a, "exit")] == [main]
        assert last_a < first_b, f"overlap: A ticked {last_a - first_b:.3f} s after B entered"
        assert token_of(b, standby) > token_of(a, main)
    finally:
        proxy.close()


# ----------------------------------------------------------------- riding it out


def test_zookeeper_restarted_within_the_grace_fences_nobody(zookeeper, hosts):
    # A restart takes ~0.5 s here when the machine is quiet, but over 4 s with both cores
    # busy (the JVM starting): a fence_grace of 7 s (session 10 s, the most this server
    # allows at tickTime 500; an 8.5 s lease) rides it out; the defaults (6 s, 1.5 s) ride
    # out a quiet restart. With T = 2 s it would fence, rightly.
    a = hosts("A", zookeeper.address, standbys=0, session_timeout=10, fence_grace=7)
    b = hosts("B", zookeeper.address, session_timeout=10, fence_grace=7)
    a.run("start", check=True)
    b.run("start", check=True)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    zookeeper.stop()
    zookeeper.start().wait_serving()
    wait_until(lambda: "ZooKeeper connection back within fence_grace" in a.log_text(), 15, "A's main reconnected")
    wait_until(lambda: "standby: ZooKeeper connection back" in b.log_text(), 15, "B's standby reconnected")
    assert pid_alive(main) and pid_alive(standby)
    assert " fenced: " not in a.log_text() + b.log_text()
    assert b.main_slot()["pid"] == main
    assert [int(line[1]) for line in entries(a)] == [main]
    a.run("stop", check=True)  # B's standby still waits in line
    wait_until(lambda: entered(b, standby), 5, "B's standby inside the function")


def test_leader_of_an_ensemble_killed_fails_nothing_over(tmp_path, hosts):
    ports = [(free_port(), free_port(), free_port()) for _ in range(3)]
    servers = [Server(tmp_path / f"zk{n}", port=ports[n - 1][0], myid=n, ensemble=ports) for n in (1, 2, 3)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_serving(60)
        addresses = ",".join(s.address for s in servers)
        # A new leader is elected and clients are back in ~0.65 s here: more than T/4 of T = 2 s,
        # less than the defaults' fence_grace (1.5 s); 7 s here leaves room for a loaded machine.
        a = hosts("A", addresses, standbys=0, session_timeout=10, fence_grace=7)
        b = hosts("B", addresses, session_timeout=10, fence_grace=7)
        a.run("start", check=True)
        b.run("start", check=True)
        main, standby = a.pid_of("main"), b.pid_of("standby")
        wait_until(lambda: entered(a, main), 5, "A's main inside the function")
        leader = next(s for s in servers if s.mode() == "leader")
        leader.stop(signal.SIGKILL)
        wait_until(lambda: any(s.mode() == "leader" for s in servers if s is not leader), 10, "a new leader")
        wait_until(lambda: "ZooKeeper connection back within fence_grace" in a.log_text(), 15,
                   "A's main reconnected")
        wait_until(lambda: "standby: ZooKeeper connection back" in b.log_text(), 15, "B's standby reconnected")
        assert pid_alive(main) and pid_alive(standby)
        assert " fenced: " not in a.log_text() + b.log_text()
        assert b.main_slot()["pid"] == main
        a.run("stop", check=True)
        wait_until(lambda: entered(b, standby), 5, "B's standby inside the function")
        b.run("stop", check=True)
    finally:
        for server in servers:
            server.stop()


# ----------------------------------------------------------------- status


def test_status_asks_zookeeper_only_for_main_slots_this_host_does_not_hold(zookeeper, hosts):
    # The server frozen (SIGSTOP: it answers nothing): A holds its main slot locally, so its
    # status needs no ZooKeeper; B cannot know who holds the slot: Unknown, LSB status 4.
    a = hosts("A", zookeeper.address, standbys=1, session_timeout=10, fence_grace=7)
    b = hosts("B", zookeeper.address, standbys=1, session_timeout=10, fence_grace=7)
    a.run("start", check=True)
    b.run("start", check=True)
    main = a.pid_of("main")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    assert b.main_slot()["host"] == "A"
    zookeeper.process.send_signal(signal.SIGSTOP)
    try:
        mine = a.run("status", "--json", check=True)
        assert '"host": "A"' in mine.stdout and f'"pid": {main}' in mine.stdout
        theirs = b.run("status", check=4)
    finally:
        zookeeper.process.send_signal(signal.SIGCONT)
    assert "main #1 [Unknown]" in theirs.stdout + theirs.stderr
    assert "[Not Running]" not in theirs.stdout + theirs.stderr  # B's standby runs; its main slot is unknown
    assert "cannot connect to ZooKeeper" in theirs.stdout + theirs.stderr
    wait_until(lambda: b.main_slot()["host"] == "A", 10, "B's status to see A's main again")
    assert " fenced: " not in a.log_text()


# ----------------------------------------------------------------- errors


def test_start_without_a_reachable_zookeeper_fails_clearly_and_leaves_nothing(hosts):
    address = f"127.0.0.1:{free_port()}"
    a = hosts("A", address)
    result = a.run("start", check=1)
    assert f"cannot start: cannot connect to ZooKeeper at {address} within {T:g} s [Failed]" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not list(a.pid_dir.glob("*.pid"))
    status = a.run("status", check=4)
    assert f"cannot connect to ZooKeeper at {address}" in status.stderr + status.stdout


def test_fence_grace_must_be_shorter_than_the_session_timeout(hosts):
    a = hosts("A", "127.0.0.1:1", fence_grace=T)
    result = a.run("status", check=6)
    assert 'key "locks.fence_grace": must be less than locks.session_timeout' in result.stderr


def test_the_flock_worker_does_not_load_kazoo():
    import subprocess
    import sys

    code = ("import sys; import hadctl.worker, hadctl.actions, hadctl.config; "
            "print(any(m == 'kazoo' or m.startswith('kazoo.') for m in sys.modules))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.stdout.strip() == "False"


def test_the_private_kazoo_names_hadctl_relies_on_are_still_there():
    """kazoo has no public way to set a lock's retry or to observe every reply; hadctl
    sets ``Lock._retry`` (copied by ``Lock.acquire``) and wraps
    ``ConnectionHandler._read_header`` (the fencing lease). A kazoo that renames
    either must fail here, not silently in production."""
    import inspect

    from kazoo.client import KazooClient
    from kazoo.protocol.connection import ConnectionHandler
    from kazoo.recipe.lock import Lock
    from kazoo.retry import KazooRetry

    from hadctl.locks.zookeeper_session import retry_quickly

    client = KazooClient(hosts="127.0.0.1:1")  # never started: no connection is made
    lock = Lock(client, "/hadctl/x/slot-1", "host 1")
    assert isinstance(lock._retry, KazooRetry)
    retry_quickly(lock, client)
    assert lock._retry.max_delay == 0.5
    assert "self._retry.copy()" in inspect.getsource(Lock.acquire)
    assert callable(getattr(ConnectionHandler, "_read_header", None))
    assert isinstance(client._connection, ConnectionHandler)


def test_a_lock_nodes_owner_is_gone_when_dead_or_when_its_pid_is_younger_than_the_node():
    import subprocess
    import sys

    from hadctl.locks.zookeeper_takeover import owner_gone

    now = time.time()
    assert not owner_gone(os.getpid(), now)  # alive, started before the node was made
    assert owner_gone(os.getpid(), now - 10 * 365 * 86400)  # this pid's process is younger: reused
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert owner_gone(child.pid, now)  # dead (reaped)
