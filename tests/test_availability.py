"""Availability without any attacker (issue 12, items 4, 5, 6 and 9): the crash-loop
limit counts only unexpected deaths of mains, a killed controller leaves nothing that
makes the next start or fork refuse, a restart with broken new code leaves the
service as it found it, and a worker whose import hangs is ended by its controller."""
from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from conftest import pid_alive, wait_until
from support import marked_processes


def _pool(svc) -> dict[tuple[str, int], int]:
    return {(s["role"], s["slot"]): s["pid"] for s in svc.status()["slots"] if s["running"]}


def _whole(svc, mains: int, standbys: int) -> bool:
    pool = _pool(svc)
    return all(("main", n) in pool for n in range(1, mains + 1)) and \
        all(("standby", n) in pool for n in range(1, standbys + 1))


# ------------------------------------------------------------ item 4: the crash-loop limit


@pytest.mark.parametrize("mains", [10, 20])
def test_issue12_restart_of_many_mains_fills_every_slot(service, mains):
    svc = service(locks={"max_procs": mains, "standby_max_procs": 1})
    svc.run("start", check=True)
    before = _pool(svc)
    result = svc.run("restart", check=True)
    assert "Failed" not in result.stdout
    after = _pool(svc)
    assert sorted(k for k in after if k[0] == "main") == [("main", n) for n in range(1, mains + 1)]
    assert all(after[("main", n)] != before[("main", n)] for n in range(1, mains + 1))
    wait_until(lambda: _whole(svc, mains, 1), 10, "the standby slot refilled")
    assert "crash loop" not in svc.log_file.read_text()
    svc.run("restart", check=True)  # and once more at once: a restart is no crash
    assert "crash loop" not in svc.log_file.read_text()


def test_issue12_a_clean_start_of_six_mains_counts_no_death(service):
    svc = service(start_limit_burst=2, locks={"max_procs": 6, "standby_max_procs": 1})
    svc.run("start", check=True)
    svc.run("status", check=0)
    deaths = svc.pid_dir / "hadctl-starts"
    assert not deaths.exists() or not deaths.read_text().split()
    # a main's death now is the first of a run: its replacement standby comes at once
    standby = svc.pid_of("standby")
    os.kill(svc.pid_of("main", 6), signal.SIGKILL)
    wait_until(lambda: _whole(svc, 6, 1) and _pool(svc)[("standby", 1)] != standby, 10,
               "the failover and a new standby")
    assert "crash loop" not in svc.log_file.read_text()
    assert not (svc.pid_dir / "hadctl-backoff.pid").exists()


def test_issue12_watchdog_replacements_are_hand_overs_not_deaths(service):
    # Every main hangs soon and the watching standby replaces it: asked for, so its
    # replacement standby never backs off, even with a burst of 1.
    svc = service(entrypoint="tests.services.contained:hangs", watchdog_timeout=0.3, kill_timeout=0.5,
                  start_limit_burst=1, start_limit_interval=60, env={"HANG": "stop", "HEALTHY": "0.1"})
    svc.run("start", check=True)
    wait_until(lambda: sum(1 for line in svc.ledger_lines() if line[0] == "enter") >= 4, 20,
               "three replacements by the watchdog")
    assert "crash loop" not in svc.log_file.read_text()
    svc.run("stop", check=True)


def test_issue12_a_real_crash_loop_still_backs_off(service):
    svc = service(entrypoint="tests.services.basic:crash", start_limit_burst=3, start_limit_interval=30,
                  restart_backoff_max=30)
    svc.run("start")
    wait_until(lambda: (svc.pid_dir / "hadctl-backoff.pid").exists(), 15, "a standby in back-off")
    assert "crash loop: 3 unexpected deaths" in svc.log_file.read_text()
    svc.run("stop", check=True)


# ------------------------------------------------------------ item 6: a restart with broken new code


@pytest.mark.parametrize("standbys", [1, 2])
def test_issue12_a_restart_with_broken_new_code_leaves_the_service_as_it_was(service, standbys):
    svc = service(entrypoint="tests.services.avail:serve", locks={"max_procs": 2, "standby_max_procs": standbys})
    svc.run("start", check=True)
    before = _pool(svc)
    svc.write(**{**svc.settings, "env": {"AVAIL_IMPORT": "fail"}})
    result = svc.run("restart", check=1)
    assert "the old mains and standbys still run" in result.stdout + result.stderr, result
    assert _pool(svc) == before
    svc.run("status", check=0)
    svc.run("fork", check=0)  # nothing to do: the pool is whole
    assert _pool(svc) == before
    svc.write(**{**svc.settings, "env": {}})  # fixed: the next restart goes through
    svc.run("restart", check=True)
    after = _pool(svc)
    assert sorted(after) == sorted(before) and not set(after.values()) & set(before.values())


# ------------------------------------------------------------ item 5: a controller killed mid-restart


def test_issue12_a_restart_killed_beside_a_stopped_standby_leaves_what_fork_repairs(service):
    # The standby is stopped and deaf to TERM and the stop file (SIGCONT alone does
    # not make it leave), so a restart stays at its standbys for signal_kill_timeout.
    svc = service(entrypoint="tests.services.avail:serve", warmup="tests.services.avail:deaf")
    svc.run("start", check=True)
    standby = svc.pid_of("standby")
    os.kill(standby, signal.SIGSTOP)
    try:
        restart = subprocess.Popen([*svc.command, "-c", str(svc.config), "restart"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            restart.wait(timeout=0.4)
        except subprocess.TimeoutExpired:
            restart.kill()
            restart.wait()
        svc.run("fork", check=0)
        assert not (svc.pid_dir / "standby-stop-file").exists()
        wait_until(lambda: _whole(svc, 1, 1), 10, "fork to restore the pool")
        svc.run("status", check=0)
        # the new standby the killed restart left above standby_max_procs is ended too
        assert sorted(_pool(svc)) == [("main", 1), ("standby", 1)], _pool(svc)
    finally:
        if pid_alive(standby):
            os.kill(standby, signal.SIGCONT)


# ------------------------------------------------------------ item 9: a worker whose import hangs


def test_issue12_workers_whose_import_hangs_are_ended_and_named(service, monkeypatch, no_leftovers):
    monkeypatch.setenv("HADCTL_SPAWN_TIMEOUT", "1")
    svc = service(entrypoint="tests.services.avail:serve", env={"AVAIL_IMPORT": "hang"})
    began = time.monotonic()
    result = svc.run("start", check=1)
    assert time.monotonic() - began < 5, "start waited far longer than the spawn timeout"
    assert "no report within 1 s: the import of tests.services.avail hung" in result.stdout + result.stderr, result
    log = svc.log_file.read_text()
    assert "_wait_for_a_server_that_never_answers" in log  # where it hangs, from faulthandler
    wait_until(lambda: not marked_processes("HADCTL_TEST_ID", no_leftovers), 5, "no worker left")
    for _ in range(3):  # cron's fork every minute must not pile them up
        svc.run("fork", check=1)
        wait_until(lambda: not marked_processes("HADCTL_TEST_ID", no_leftovers), 5, "no worker left after fork")


def test_issue12_a_spawn_timeout_that_is_no_number_is_refused(service, monkeypatch):
    svc = service()
    monkeypatch.setenv("HADCTL_SPAWN_TIMEOUT", "soon")
    result = svc.run("start", check=6)
    assert result.stderr.count("\n") == 1 and "HADCTL_SPAWN_TIMEOUT" in result.stderr, result.stderr
    assert not marked_processes("HADCTL_TEST_ID", os.environ["HADCTL_TEST_ID"])
