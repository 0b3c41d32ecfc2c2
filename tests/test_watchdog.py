"""The watchdog and max_rss (issue 14): a main that stops beating, or grows past
max_rss, is replaced by the standby that waits for its slot; never two mains."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import pid_alive, wait_until
from hadctl import watchdog


def _entered(svc: Any) -> list[list[str]]:
    return [line for line in svc.ledger_lines() if line[0] == "enter"]


@pytest.mark.parametrize("hang", ["busy", "deadlock", "stop"])
def test_hung_main_is_replaced_by_the_standby(service: Any, hang: str) -> None:
    svc = service(entrypoint="tests.services.contained:hangs", watchdog_timeout=0.5, kill_timeout=1,
                  env={"HANG": hang, "HEALTHY": "0.3"}, locks={"standby_max_procs": 1})
    svc.run("start", check=True)
    hung = svc.pid_of("main")
    wait_until(lambda: len(_entered(svc)) >= 2, 15, "a second main to enter")
    # The kernel gives the slot only when the hung main's lock is freed by its death:
    # the new main's entry is proof the old one was gone.
    assert not pid_alive(hung)
    events = svc.ledger_lines()
    assert [e[0] for e in events][:3] == ["enter", "hang", "enter"], events
    assert int(events[0][1]) == hung and int(events[2][1]) != hung
    log = svc.log_file.read_text()
    assert f"(pid {hung}) silent for" in log and "hung, replaced" in log
    status = svc.run("status").stdout
    assert f"main #1: pid {hung} hung, replaced [Replaced]" in status
    svc.run("stop", check=True)


def test_a_beating_main_is_left_alone(service: Any) -> None:
    svc = service(entrypoint="tests.services.contained:beating", watchdog_timeout=0.3,
                  env={"BEAT": "0.02"})
    svc.run("start", check=True)
    main = svc.pid_of("main")
    # 10 beats a line, 0.02 s a beat: 20 lines are 4 s, thirteen watchdog timeouts
    wait_until(lambda: sum(1 for line in svc.ledger_lines() if line[0] == "beat") >= 20, 30, "20 beat lines")
    assert svc.pid_of("main") == main and len(_entered(svc)) == 1
    assert "hung" not in svc.log_file.read_text()
    svc.run("stop", check=True)


def test_fork_replaces_a_hung_main_without_standby(service: Any) -> None:
    svc = service(entrypoint="tests.services.contained:hangs", watchdog_timeout=0.3, kill_timeout=0.5,
                  env={"HANG": "stop", "HEALTHY": "0.1"}, locks={"standby_max_procs": 0})
    svc.run("start", check=True)
    hung = svc.pid_of("main")
    wait_until(lambda: [e[0] for e in svc.ledger_lines()] == ["enter", "hang"], 10, "the main to hang")

    def silent() -> bool:
        beat = watchdog.read_beat(str(svc.pid_dir), 1)
        return beat is not None and (time.monotonic_ns() - beat[0]) / 1e9 > 0.3

    wait_until(silent, 10, "the main to be silent for longer than watchdog_timeout")
    result = svc.run("fork", check=True)
    assert "main #1: hung" in result.stdout and "[Replaced]" in result.stdout
    assert not pid_alive(hung)
    wait_until(lambda: len(_entered(svc)) == 2, 10, "a new main to enter")
    svc.run("stop", check=True)


def test_max_rss_recycles_with_no_second_main(service: Any) -> None:
    svc = service(entrypoint="tests.services.contained:grows", max_rss="120M", kill_timeout=2,
                  env={"GROW": str(8 << 20), "HEALTHY": "0.2"}, locks={"interval": 0.1})
    svc.run("start", check=True)
    first = svc.pid_of("main")
    wait_until(lambda: len(_entered(svc)) >= 2, 30, "the standby to replace the growing main")
    events = svc.ledger_lines()
    old_exit = next(e for e in events if e[0] == "exit" and int(e[1]) == first)
    new_enter = _entered(svc)[1]
    assert float(old_exit[2]) <= float(new_enter[2]), events  # it drained; never two mains
    assert "over max_rss" in svc.log_file.read_text()
    assert "over max_rss, replaced" in svc.run("status").stdout
    svc.run("stop", check=True)


def test_watchdog_signal_and_rate_documented_in_man_page() -> None:
    man = (Path(__file__).resolve().parent.parent / "man" / "hadctl.1").read_text()
    assert "hadctl.alive()" in man.replace("\\", "")
    assert "2 wake-ups per watchdog_timeout" in man.replace("\\-", "-")


def test_sigstopped_main_is_sent_cont_with_the_watchdog_signal(service: Any, tmp_path: Path) -> None:
    """A stopped main cannot die of ABRT until it runs: the watchdog sends CONT with it,
    so the replacement does not wait for the KILL after kill_timeout."""
    svc = service(entrypoint="tests.services.contained:hangs", watchdog_timeout=0.3, kill_timeout=30,
                  env={"HANG": "stop", "HEALTHY": "0.1", "ONCE": str(tmp_path / "hung-once")})
    svc.run("start", check=True)
    hung = svc.pid_of("main")
    wait_until(lambda: len(_entered(svc)) >= 2, 15, "a second main long before kill_timeout")
    assert not pid_alive(hung)
    svc.run("stop", check=True)




def test_a_watcher_never_sees_a_new_main_beside_an_old_beat(tmp_path: Path, monkeypatch: Any) -> None:
    """start_beats makes two stores (beat, pid) into a file that may hold the last main's
    final beat, or zeros: every state between them must read as no beat or a fresh one,
    never as this main silent since long ago (a standby would replace it at once; CI saw
    a starting main replaced within 2 ms). The mapping is recorded: the race is two stores."""
    import mmap

    states: list[bytes] = []

    class Recorded(bytearray):
        def __setitem__(self, key: Any, value: Any) -> None:
            super().__setitem__(key, value)
            path.write_bytes(bytes(self))
            states.append(bytes(self))

    def recorded_mmap(fd: int, size: int) -> Recorded:
        return Recorded(os.pread(fd, size, 0))

    monkeypatch.setattr(mmap, "mmap", recorded_mmap)
    path = Path(watchdog.beat_file(str(tmp_path), 1))
    stale = 1  # the monotonic clock's first nanosecond: long ago
    for before in (b"\0" * 16, stale.to_bytes(8, "little") + (4242).to_bytes(8, "little")):
        path.write_bytes(before)
        states.clear()
        assert watchdog.start_beats(str(tmp_path), 1, os.getpid()) is not None
        assert len(states) == 2
        for state in states:
            path.write_bytes(state)
            beat = watchdog.read_beat(str(tmp_path), 1)
            if beat is not None and beat[1] == os.getpid():
                assert time.monotonic_ns() - beat[0] < 10 * 10**9, state
    path.write_bytes(b"\0" * 16)
    assert watchdog.read_beat(str(tmp_path), 1) is None


def test_max_rss_recycles_a_listen_service_with_no_failed_request(service: Any) -> None:
    """Issue 14: a main over max_rss is replaced as restart replaces one slot: TERM, it
    finishes the request in hand, the standby accepts from the same socket; a client
    sees no failed request of any kind across three recycles."""
    from test_listen import Clients, _free_port

    port = _free_port()
    svc = service(entrypoint="tests.services.http:serve_growing", listen=[f"127.0.0.1:{port}"], max_rss="120M",
                  kill_timeout=5, start_limit_burst=30, env={"GROW": str(8 << 20)}, locks={"interval": 0.1})
    svc.run("start", check=True)
    with Clients(("127.0.0.1", port)) as clients:
        wait_until(lambda: svc.log_file.read_text().count("over max_rss") >= 3, 60, "three recycles")
        wait_until(lambda: clients.served_more_than(20), 10, "the clients served after them")
        served, errors = clients.take()
    assert errors == [], f"{len(errors)} failed of {served + len(errors)}: {errors[:5]}"
    svc.run("stop", check=True)
