"""The ZooKeeper engine under real network partitions: Linux network namespaces.

Each "host" (a hadctl config with its own pid_dir and ``HADCTL_HOST_ID``, run with
``ip netns exec``) and each ZooKeeper server lives in a namespace of its own, with
its own address on a bridge (tests/zk.py ``Lan``); a partition puts a member's
bridge port down, so its packets vanish without a RST, as when a cable is pulled
beyond a switch. Everything stays inside namespaces this test creates and deletes.

Both hosts' mains write one ledger (tests/services/zk_ledger.py) with
CLOCK_MONOTONIC, which namespaces share (one machine, one clock): from it, the
tests check that no two mains ever ran their function at the same moment.
"""
from __future__ import annotations

import datetime
import itertools
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import HADCTL, pid_alive, wait_until
from test_zookeeper import Host, entered, entries, gone, hosts, last_tick, log_time, show_logs, token_of  # noqa: F401
from zk import Lan, Server, netns_refused

REFUSED = netns_refused()
pytestmark = pytest.mark.skipif(bool(REFUSED), reason=f"no network namespaces here: {REFUSED}")

T = 2.0  # session_timeout of the partition test (as in test_zookeeper.py)
GRACE = T / 4  # the default fence_grace
PORT = 2181  # every server has an address of its own: the standard ports are free there


@pytest.fixture
def lan() -> Any:
    """An empty Lan; every namespace it made is deleted at the end, whatever happened."""
    net = Lan()
    try:
        yield net
    finally:
        net.close()


@pytest.fixture
def zookeeper_ns(request: pytest.FixtureRequest, tmp_path: Path, lan: Lan) -> Any:
    """A standalone ZooKeeper in Lan member "zk" (tickTime 500), stopped at the end."""
    netns = lan.add("zk")
    server = Server(tmp_path / "zookeeper", port=PORT, netns=netns, client_ip=lan.address("zk")).start()
    try:
        server.wait_serving()
        yield server
    finally:
        server.stop()
        show_logs(request, [server.folder / "server.log"])


def on(lan: Lan, name: str, host: Host) -> Host:
    """``host`` made a Lan member: every hadctl command it runs, runs inside its namespace."""
    lan.add(name)
    host.command = [*lan.exec(name), *HADCTL]
    return host


def runs(host: Host) -> dict[int, tuple[float, float]]:
    """Each main's run of its function, from the ledger: pid -> (entered, last line)."""
    spans: dict[int, tuple[float, float]] = {}
    for line in host.ledger_lines():
        pid, moment = int(line[1]), float(line[2])
        first, last = spans.get(pid, (moment, moment))
        spans[pid] = (min(first, moment), max(last, moment))
    return spans


def overlaps(host: Host) -> list[str]:
    """Every pair of mains whose runs overlap in time (the ledger is shared by all hosts)."""
    spans = sorted(runs(host).items(), key=lambda item: item[1][0])
    return [f"pid {later} entered {end - start:.3f} s before pid {pid} stopped"
            for (pid, (_start, end)), (later, (start, _end)) in itertools.pairwise(spans) if start <= end]


def expiries(server: Server) -> list[float]:
    """Wall-clock times at which the server expired a session (from its log)."""
    return [datetime.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S.%f").timestamp()
            for line in (server.folder / "server.log").read_text(errors="replace").splitlines()
            if "Expiring session" in line]


def test_a_host_partitioned_from_zookeeper_fences_its_main_before_the_other_hosts_standby_enters(
        lan, zookeeper_ns, hosts):
    zk = zookeeper_ns
    a = on(lan, "a", hosts("A", zk.address, standbys=0))
    b = on(lan, "b", hosts("B", zk.address))
    a.run("start", check=True)
    b.run("start", check=True)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    wait_until(lambda: entered(a, main), 5, "A's main inside the function")
    assert b.main_slot()["host"] == "A"
    wall = time.time() - time.monotonic()  # monotonic -> wall clock, for the logs' times
    cut = time.monotonic()
    lan.cut("a")
    try:
        wait_until(lambda: gone(main), T + GRACE, "A's main fenced")
        wait_until(lambda: entered(b, standby), T + 3, "B's standby inside the function")
        last_a, first_b = last_tick(a, main), entered(b, standby)
        fenced = log_time(a, "main #1 fenced: ")
        suspended = log_time(a, "ZooKeeper connection suspended")
        expired = [moment for moment in expiries(zk) if moment > cut + wall]
        print(f"\ncut -> A's last tick {last_a - cut:.3f} s, -> A fenced (log) "
              f"{fenced - wall - cut if fenced else float('nan'):.3f} s, -> A's session expired "
              f"{expired[0] - wall - cut if expired else float('nan'):.3f} s, -> B entered {first_b - cut:.3f} s; "
              f"suspended -> fenced {fenced - suspended if fenced and suspended else float('nan'):.3f} s")
        assert fenced is not None, "A's main vanished without saying it fenced itself"
        assert suspended is None or fenced - suspended < GRACE + 0.1, "not fenced within fence_grace"
        # ZooKeeper cannot expire A's session sooner than T after the last reply A read
        # (before the cut): A's user code must have stopped by then.
        assert last_a - cut < T, f"A ran {last_a - cut:.3f} s after the cut"
        assert expired, "ZooKeeper never expired the partitioned main's session"
        assert first_b + wall > expired[0], "B's standby entered before A's session expired"
        assert not overlaps(a), overlaps(a)
        assert token_of(b, standby) > token_of(a, main)
        assert b.main_slot() == {"role": "main", "slot": 1, "running": True, "pid": standby, "stale": [],
                                 "host": "B"}
    finally:
        lan.heal("a")
    # Healed, A sees the slot held by B; its pid file of the fenced main is gone.
    wait_until(lambda: a.main_slot()["host"] == "B", 10, "A's status to show B's main")
    assert not overlaps(a), overlaps(a)


@pytest.fixture
def ensemble_ns(request: pytest.FixtureRequest, tmp_path: Path, lan: Lan) -> Any:
    """Three ZooKeeper servers, Lan members zk1..zk3 (server N at 10.231.0.N:2181), serving;
    at the end every cut is healed and every server stopped."""
    names = ["zk1", "zk2", "zk3"]
    for name in names:
        lan.add(name)
    peers = [lan.address(name) for name in names]
    servers = [Server(tmp_path / name, port=PORT, myid=n, ensemble=[(PORT, 2888, 3888)] * 3,
                      netns=lan.netns(name), client_ip=peers[n - 1], peers=peers)
               for n, name in enumerate(names, start=1)]
    try:
        for server in servers:
            server.start()
        for server in servers:
            server.wait_serving(60)
        yield servers
    finally:
        for name in names:
            lan.heal(name)
        for server in servers:
            server.stop()
        show_logs(request, [server.folder / "server.log" for server in servers])


def serving(servers: list[Server], client: str) -> str:
    """The servers (zk1..zk3) that have a connection from Lan address ``client`` (``cons``)."""
    return ",".join(f"zk{n}" for n, server in enumerate(servers, start=1)
                    if f"/{client}:" in server.four_letters("cons")) or "none"


def ensemble_hosts(lan: Lan, servers: list[Server], hosts: Any) -> tuple[Host, Host]:
    """Host A (a main, no standby) and host B (a standby), session 10 s, fence_grace 7 s as
    test_zookeeper's leader test (an election takes about a second; a loaded machine gets
    room); both started, A's main inside its function."""
    addresses = ",".join(server.address for server in servers)
    a = on(lan, "a", hosts("A", addresses, standbys=0, session_timeout=10, fence_grace=7))
    b = on(lan, "b", hosts("B", addresses, session_timeout=10, fence_grace=7))
    a.run("start", check=True)
    b.run("start", check=True)
    wait_until(lambda: entered(a, a.pid_of("main")), 5, "A's main inside the function")
    return a, b


@pytest.mark.parametrize("loss", ["leader killed", "leader cut off", "main's server cut off"])
def test_an_ensemble_losing_a_server_fences_nobody_when_the_quorum_reforms_within_the_grace(
        lan, ensemble_ns, hosts, loss):
    # "main's server": the one A's main is connected to goes silent (the leader or not):
    # the main must notice and move to another server before its lease runs out.
    servers = ensemble_ns
    a, b = ensemble_hosts(lan, servers, hosts)
    main, standby = a.pid_of("main"), b.pid_of("standby")
    on_a, on_b = serving(servers, lan.address("a")), serving(servers, lan.address("b"))
    assert on_a != "none", "A's main has no connection to any server"
    leader = next(n for n, server in enumerate(servers) if server.mode() == "leader")
    lose = leader if loss.startswith("leader") else int(on_a[-1]) - 1
    lost = time.monotonic()
    if loss == "leader killed":
        servers[lose].stop(signal.SIGKILL)  # its sockets are closed: clients learn at once
    else:
        lan.cut(f"zk{lose + 1}")  # silence: clients on it learn when their pings go unanswered
    others = [server for n, server in enumerate(servers) if n != lose]
    wait_until(lambda: any(server.mode() == "leader" for server in others), 15, "a leader among the others")
    quorum = time.monotonic()
    if on_a == f"zk{lose + 1}" or lose == leader:  # its server dropped it, or went silent
        wait_until(lambda: "ZooKeeper connection back within fence_grace" in a.log_text() or not pid_alive(main),
                   15, "A's main reconnected")
    if on_b == f"zk{lose + 1}" or lose == leader:
        wait_until(lambda: "standby: ZooKeeper connection back" in b.log_text(), 15, "B's standby reconnected")
    back = time.monotonic()
    print(f"\nzk{lose + 1} ({'leader' if lose == leader else 'follower'}) {loss.split()[-2]} (A on {on_a}, "
          f"B on {on_b}): leader among the others after {quorum - lost:.3f} s, A and B back after {back - lost:.3f} s")
    assert " fenced: " not in a.log_text() + b.log_text()
    assert pid_alive(main) and pid_alive(standby)
    if loss != "leader killed":  # healed, the lost server rejoins as a follower
        lan.heal(f"zk{lose + 1}")
        wait_until(lambda: servers[lose].mode() == "follower", 30, "the lost server back as a follower")
    assert b.main_slot()["pid"] == main
    assert [int(line[1]) for line in entries(a)] == [main]
    a.run("stop", check=True)
    wait_until(lambda: entered(b, standby), 5, "B's standby inside the function")
    assert not overlaps(a), overlaps(a)
    b.run("stop", check=True)


def test_status_with_one_ensemble_server_cut_off_still_sees_the_other_hosts_main(lan, ensemble_ns, hosts):
    # Two servers of three answer: ZooKeeper serves, and status must say where the main runs.
    servers = ensemble_ns
    a, b = ensemble_hosts(lan, servers, hosts)
    main = a.pid_of("main")
    follower = next(n for n, server in enumerate(servers) if server.mode() == "follower")
    lan.cut(f"zk{follower + 1}")
    answers = []
    for _ in range(3):  # a client tries the servers in a random order: ask more than once
        asked = time.monotonic()
        result = b.run("status")
        answers.append((time.monotonic() - asked, result.returncode, (result.stdout + result.stderr).strip()))
    print("\n" + "\n".join(f"status took {took:.2f} s, exit {code}" for took, code, _ in answers))
    for _took, code, text in answers:
        assert code == 0 and f"main #1 (pid {main} on A) [Running]" in text, text
