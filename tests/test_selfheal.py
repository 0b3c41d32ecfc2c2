"""Self-healing (issue #8): standby respawn, crash-loop back-off, warm-up hook."""
from __future__ import annotations

import itertools
import os
import signal
import subprocess

from conftest import pid_alive, wait_until


def _one_standby_ready(svc, not_pid: int | None = None) -> bool:
    data = svc.status()
    mains = [s for s in data["slots"] if s["role"] == "main" and s["running"]]
    standbys = [s for s in data["slots"] if s["role"] == "standby" and s["running"]]
    return data["exit_status"] == 0 and len(mains) == 1 and len(standbys) == 1 and standbys[0]["pid"] != not_pid


def test_twenty_failovers_without_fork_keep_the_pool_whole(service):
    svc = service(start_limit_burst=100)
    svc.run("start", check=True)
    for round_ in range(20):
        main, standby = svc.pid_of("main"), svc.pid_of("standby")
        os.kill(main, signal.SIGKILL)
        wait_until(lambda: svc.holders("main") == [standby] and _one_standby_ready(svc, standby), 5,
                   f"failover {round_ + 1}: standby promoted and a new standby waiting")
    svc.run("status", check=True)
    entered = [int(l[1]) for l in svc.ledger_lines() if l[0] == "enter"]
    assert len(entered) == 21 and len(set(entered)) == 21


def test_respawn_standby_false_leaves_the_standby_slot_to_fork(service):
    svc = service(respawn_standby=False)
    svc.run("start", check=True)
    standby = svc.pid_of("standby")
    os.kill(svc.pid_of("main"), signal.SIGKILL)
    wait_until(lambda: svc.holders("main") == [standby], 5, "the failover")
    svc.run("status", check=1)


def _starts(svc) -> list[float]:
    return [float(l[2]) for l in svc.ledger_lines() if l[0] == "enter"]


def test_a_crash_loop_backs_off_and_stop_ends_it(service):
    svc = service(entrypoint="tests.services.basic:crash", start_limit_burst=3, start_limit_interval=5,
                  restart_backoff_max=0.4)
    svc.run("start")
    # 3 quick promotions, then one attempt every 0.4 s at most (1 s capped at 0.4).
    wait_until(lambda: len(_starts(svc)) >= 7, 15, "seven attempts")
    starts = _starts(svc)
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert all(gap < 0.35 for gap in gaps[:2]), gaps        # the burst: no waiting
    assert all(gap >= 0.38 for gap in gaps[3:6]), gaps      # then spaced out
    assert "crash loop" in svc.log_file.read_text()
    wait_until(lambda: "Back-off" in svc.run("status").stdout, 5, "status to show the back-off")
    data = svc.status()
    assert data["backoff"]["pid"] and data["backoff"]["delay"] == 0.4
    svc.run("stop", check=True)
    assert not any(pid_alive(p) for p in [data["backoff"]["pid"]])
    assert not (svc.pid_dir / "hadctl-backoff.pid").exists()


def test_back_off_resets_after_a_stable_main(service, tmp_path):
    # Start 1 serves; killing it starts a crash loop (starts 2-5 crash), start 6 serves again.
    svc = service(entrypoint="tests.services.ops:crash_then_serve", start_limit_burst=2,
                  start_limit_interval=0.5, restart_backoff_max=0.3,
                  env={"COUNTER": str(tmp_path / "counter"), "CRASH_FROM": "2", "CRASH_TO": "5"})
    svc.run("start", check=True)
    os.kill(svc.pid_of("main"), signal.SIGKILL)
    wait_until(lambda: len(_starts(svc)) >= 6 and _one_standby_ready(svc), 20,
               "the crash loop to end in a stable main with a standby")
    assert "crash loop" in svc.log_file.read_text()
    main = svc.holders("main")[0]
    ticks = os.sysconf("SC_CLK_TCK")

    def uptime() -> float:
        with open(f"/proc/{main}/stat") as handle:
            start = int(handle.read().rsplit(")", 1)[1].split()[19]) / ticks
        with open("/proc/uptime") as handle:
            return float(handle.read().split()[0]) - start

    wait_until(lambda: uptime() > 0.8, 5, "the main to be up longer than start_limit_interval")
    standby = svc.holders("standby")[0]
    os.kill(main, signal.SIGKILL)
    # The back-off is reset: the promoted standby's replacement comes at once.
    wait_until(lambda: _one_standby_ready(svc, standby), 2, "a new standby without back-off")
    assert "Back-off" not in svc.run("status").stdout


def test_fork_by_hand_cuts_a_back_off_short(service):
    svc = service(entrypoint="tests.services.basic:crash", start_limit_burst=2, start_limit_interval=60,
                  restart_backoff_max=60)
    svc.run("start")
    wait_until(lambda: (svc.pid_dir / "hadctl-backoff.pid").exists(), 10, "a standby in back-off")
    waiting = int((svc.pid_dir / "hadctl-backoff.pid").read_text().split()[0])
    before = len(_starts(svc))
    result = svc.run("fork")
    assert "cut short" in result.stdout
    assert not pid_alive(waiting)
    wait_until(lambda: len(_starts(svc)) > before, 5, "an attempt right after fork")


def test_warmup_runs_once_per_standby_and_reaches_the_entrypoint(service, tmp_path):
    report = tmp_path / "report"
    svc = service(entrypoint="tests.services.basic:report_env", warmup="tests.services.basic:warm",
                  respawn_standby=False, env={"REPORT": str(report)})
    svc.run("start", check=True)
    wait_until(report.exists, 5, "the main's report")
    standby = svc.pid_of("standby")
    lines = svc.ledger_lines()
    assert sorted(int(l[1]) for l in lines if l[0] == "warmup") == sorted([svc.pid_of("main"), standby])
    facts = dict(line.split("=", 1) for line in report.read_text().splitlines())
    assert facts["warmup"] == repr({"model": "loaded", "pid": svc.pid_of("main")})
    report.unlink()
    os.kill(svc.pid_of("main"), signal.SIGKILL)
    wait_until(report.exists, 5, "the promoted standby's report")
    facts = dict(line.split("=", 1) for line in report.read_text().splitlines())
    assert facts["warmup"] == repr({"model": "loaded", "pid": standby})
    warmups = [int(l[1]) for l in svc.ledger_lines() if l[0] == "warmup"]
    assert warmups.count(standby) == 1  # once, before it waited; not again on promotion


def test_a_failing_warmup_is_reported_by_start(service):
    svc = service(warmup="tests.services.basic:bad_warmup")
    result = svc.run("start", check=1)
    assert "no model here" in result.stderr and "Traceback" not in result.stderr
    assert svc.holders("main") == [] and svc.holders("standby") == []


def test_stop_racing_a_respawn_ends_with_nothing_running(service):
    svc = service(start_limit_burst=100)
    for _ in range(5):
        svc.run("start", check=True)
        main = svc.pid_of("main")
        stopper = subprocess.Popen([*__import__("conftest").HADCTL, "-c", str(svc.config), "stop"])
        os.kill(main, signal.SIGKILL)
        assert stopper.wait(60) == 0
        assert svc.holders("main") == [] and svc.holders("standby") == []
        wait_until(lambda: not any(pid_alive(int(p.name[8:-4])) for p in svc.pid_dir.glob("unknown-*.pid")),
                   5, "no starting worker left")
