"""Availability without any attacker (issue 12, items 4, 5, 6 and 9): the crash-loop
limit counts only unexpected deaths of mains, a killed controller leaves nothing that
makes the next start or fork refuse, a restart with broken new code leaves the
service as it found it, and a worker whose import hangs is ended by its controller."""
from __future__ import annotations

import os
import signal

import pytest

from conftest import pid_alive, wait_until  # noqa: F401 - pid_alive: used by later tests


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


def test_issue12_a_real_crash_loop_still_backs_off(service):
    svc = service(entrypoint="tests.services.basic:crash", start_limit_burst=3, start_limit_interval=30,
                  restart_backoff_max=30)
    svc.run("start")
    wait_until(lambda: (svc.pid_dir / "hadctl-backoff.pid").exists(), 15, "a standby in back-off")
    assert "crash loop: 3 unexpected deaths" in svc.log_file.read_text()
    svc.run("stop", check=True)
