"""Operations (issue #3): restart, hard-restart, fork, reload, upgrade, the stop ladder, concurrency."""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import HADCTL, pid_alive, wait_until


def _entered(svc) -> list[int]:
    return [int(line[1]) for line in svc.ledger_lines() if line[0] == "enter"]


def _versioned_module(folder: Path, version: int) -> None:
    # The size changes with the version, so a cached .pyc can never be taken for the new source.
    (folder / "versioned_svc.py").write_text(
        "from tests.services.basic import serve\n"
        f"VERSION = {version}\n"
        "def run():\n"
        "    return serve('version', VERSION)\n")


def _concurrency_over_time(lines: list[list[str]]) -> list[tuple[float, int]]:
    """(time, mains inside the function) after each enter/exit event of the ledger."""
    events = sorted((float(l[2]), 1 if l[0] == "enter" else -1) for l in lines if l[0] in ("enter", "exit"))
    inside, timeline = 0, []
    for moment, delta in events:
        inside += delta
        timeline.append((moment, inside))
    return timeline


def test_restart_keeps_two_of_three_mains_and_loads_new_code(service, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    _versioned_module(code, 1)
    svc = service(entrypoint="versioned_svc:run", locks={"max_procs": 3, "standby_max_procs": 2})
    svc.write(**{**svc.settings, "python_path": svc.settings["python_path"] + [str(code)]})
    svc.run("start", check=True)
    wait_until(lambda: len(_entered(svc)) == 3, 10, "3 mains inside the function")
    old_mains = set(svc.holders("main"))
    _versioned_module(code, 2222)
    result = svc.run("restart", check=True)
    assert result.stdout.count("replaced by pid") == 3, result.stdout
    new_mains = set(svc.holders("main"))
    assert not new_mains & old_mains and len(new_mains) == 3
    lines = svc.ledger_lines()
    versions = {int(l[1]): l[-1] for l in lines if l[0] == "enter"}
    assert all(versions[pid] == "2222" for pid in new_mains), versions
    timeline = _concurrency_over_time(lines)
    first_exit = min(float(l[2]) for l in lines if l[0] == "exit")
    during = [inside for moment, inside in timeline if moment >= first_exit]
    assert min(during) >= 2 and max(inside for _m, inside in timeline) <= 3, timeline
    wait_until(lambda: len(svc.holders("standby")) == 2, 10, "standbys refilled")


def test_restart_when_nothing_runs_is_start(service):
    svc = service()
    result = svc.run("restart", check=True)
    assert "[Started]" in result.stdout
    assert len(svc.holders("main")) == 1 and len(svc.holders("standby")) == 1


def test_restart_stops_at_the_failing_step_and_leaves_mains_running(service, tmp_path):
    code = tmp_path / "code"
    code.mkdir()
    _versioned_module(code, 1)
    svc = service(entrypoint="versioned_svc:run")
    svc.write(**{**svc.settings, "python_path": svc.settings["python_path"] + [str(code)]})
    svc.run("start", check=True)
    main = svc.pid_of("main")
    (code / "versioned_svc.py").write_text("raise ImportError('new code is broken')\n")
    result = svc.run("restart")
    assert result.returncode != 0 and "new code is broken" in result.stderr
    assert svc.holders("main") == [main] and pid_alive(main)


def test_restart_waits_for_ready_when_asked(service):
    svc = service(entrypoint="tests.services.basic:ready_later", ready_timeout=10,
                  env={"LEDGER": "/dev/null", "READY_DELAY": "0.3"})
    svc.run("start", check=True)
    started = time.monotonic()
    result = svc.run("restart", check=True)
    assert time.monotonic() - started >= 0.3 and "replaced by pid" in result.stdout
    svc.write(**{**svc.settings, "env": {"READY_DELAY": "30"}, "ready_timeout": 0.5})
    result = svc.run("restart", check=1)
    assert "did not say ready" in result.stderr


def test_hard_restart_stops_then_starts(service):
    svc = service()
    svc.run("start", check=True)
    before = set(svc.holders("main") + svc.holders("standby"))
    svc.run("hard_restart", check=True)
    after = set(svc.holders("main") + svc.holders("standby"))
    assert len(after) == 2 and not before & after


def test_fork_restores_the_standby_after_a_failover(service):
    svc = service(respawn_standby=False, quiet=True)
    svc.run("start", check=True)
    os.kill(svc.pid_of("main"), signal.SIGKILL)
    wait_until(lambda: svc.run("status").returncode == 1, 5, "the failover")
    result = svc.run("fork", check=True)
    assert result.stdout == ""  # quiet: cron mails nothing when all is well
    assert len(svc.holders("main")) == 1 and len(svc.holders("standby")) == 1
    assert svc.run("fork", check=True).stdout == ""


def test_fork_with_the_stop_file_exits_1_and_spawns_nothing(service):
    svc = service()
    svc.run("start", check=True)
    svc.run("stop", check=True)
    assert (svc.pid_dir / "standby-stop-file").exists()
    result = svc.run("fork", check=1)
    assert "standby stop file" in result.stderr
    assert svc.holders("main") == [] and svc.holders("standby") == []


def test_reload_sends_sighup_to_each_main(service):
    svc = service(locks={"max_procs": 2, "standby_max_procs": 1})
    svc.run("reload", check=7)
    svc.run("start", check=True)
    mains = set(svc.holders("main"))
    svc.run("reload", check=True)
    wait_until(lambda: {int(l[1]) for l in svc.ledger_lines() if l[0] == "hup"} == mains, 5, "both HUPs")


def test_upgrade_touches_the_upgrade_file_and_waits_for_its_removal(service, tmp_path):
    pattern = str(tmp_path / "upgrade-%p")
    svc = service(entrypoint="tests.services.ops:upgrade_aware", main_upgrade_file=pattern, upgrade_timeout=5,
                  env={"UPGRADE_FILE": pattern})
    svc.run("start", check=True)
    main = svc.pid_of("main")
    result = svc.run("upgrade", check=True)
    assert f"main #1 (pid {main}) upgraded" in result.stdout
    assert ["upgraded", str(main)] == svc.ledger_lines()[-1][:2]


def test_a_main_ignoring_term_is_killed_and_stop_still_succeeds(service):
    svc = service(entrypoint="tests.services.basic:ignore_term", kill_timeout=0.2)
    svc.run("start", check=True)
    main = svc.pid_of("main")
    svc.run("stop", check=True)
    assert not pid_alive(main)


def test_main_stop_file_is_honoured_before_signals(service, tmp_path):
    pattern = str(tmp_path / "stop-%p")
    svc = service(entrypoint="tests.services.basic:stop_file_aware", main_stop_file=pattern,
                  stop_file_kill_timeout=20, env={"STOP_FILE": pattern})
    svc.run("start", check=True)
    main = svc.pid_of("main")
    started = time.monotonic()
    svc.run("stop", check=True)
    assert time.monotonic() - started < 10  # it left because of the file, not after the 20 s time-out
    assert ["exit-by-stop-file", str(main)] in [l[:2] for l in svc.ledger_lines()]
    assert not (tmp_path / f"stop-{main}").exists()


def test_stop_waits_for_a_slow_main_and_returns_when_it_is_gone(service, tmp_path):
    svc = service(entrypoint="tests.services.ops:slow_exit", kill_timeout=5,
                  env={"EXIT_DELAY": "0.3"})
    svc.run("start", check=True)
    started = time.monotonic()
    svc.run("stop", check=True)
    took = time.monotonic() - started
    assert 0.3 <= took < 5, took  # waited for the exit as an event, not for the 5 s step


def test_kill_mode_group_ends_the_main_s_children_and_process_mode_keeps_them(service, tmp_path):
    for mode, child_survives in (("group", False), ("process", True)):
        report = tmp_path / f"child-{mode}"
        svc = service(entrypoint="tests.services.basic:with_child", kill_mode=mode,
                      env={"REPORT": str(report), "LEDGER": str(tmp_path / f"ledger-{mode}")})
        svc.run("start", check=True)
        wait_until(report.exists, 5, "the child's pid")
        child = int(report.read_text())
        svc.run("stop", check=True)
        assert pid_alive(child) == child_survives
        if child_survives:
            os.kill(child, signal.SIGKILL)


def _run_many(svc, actions: list[str]) -> list[subprocess.CompletedProcess[str]]:
    procs = [subprocess.Popen([*HADCTL, "-c", str(svc.config), action], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for action in actions]
    results = []
    for proc, action in zip(procs, actions, strict=False):
        out, err = proc.communicate(timeout=120)
        results.append(subprocess.CompletedProcess([action], proc.returncode, out, err))
    return results


def test_ten_starts_and_ten_forks_at_once_give_exact_counts(service):
    svc = service(locks={"max_procs": 2, "standby_max_procs": 2})
    results = _run_many(svc, ["start"] * 10 + ["fork"] * 10)
    assert all(r.returncode == 0 for r in results), [(r.args, r.returncode, r.stderr) for r in results]
    assert len(svc.holders("main")) == 2 and len(svc.holders("standby")) == 2
    inside = _concurrency_over_time(svc.ledger_lines())
    assert max(n for _t, n in inside) <= 2


def test_a_stop_racing_ten_forks_leaves_nothing_running(service):
    svc = service()
    svc.run("start", check=True)
    results = _run_many(svc, ["fork"] * 5 + ["stop"] + ["fork"] * 5)
    stop = results[5]
    assert stop.returncode == 0, stop.stderr
    assert svc.holders("main") == [] and svc.holders("standby") == []
    assert not list(svc.pid_dir.glob("*.pid"))


def test_upgrade_without_a_main_exits_1(service, tmp_path):
    svc = service(main_upgrade_file=str(tmp_path / "upgrade-%p"))
    result = svc.run("upgrade", check=1)
    assert "no main is running" in result.stderr


@pytest.mark.parametrize("linger, kill_timeout", [(1.5, 3), (30, 0.5)])
def test_stop_returns_only_once_a_main_that_returned_has_exited(service, no_leftovers, linger, kill_timeout):
    """A main gives its slot back as its function returns, then may take a while to exit
    (atexit handlers, a thread that outlives the function): stop must not say 0 while it
    is still there, and ends it (TERM, KILL) if it takes longer than the stop ladder's step."""
    svc = service(entrypoint="tests.services.basic:linger", respawn_standby=False, kill_timeout=kill_timeout,
                  env={"LINGER": str(linger)}, locks={"standby_max_procs": 0})
    svc.run("start", check=True)
    wait_until(lambda: _entered(svc), 5, "the main inside its function")
    main = _entered(svc)[0]
    wait_until(lambda: svc.run("status").returncode == 3, 5, "the main to give its slot back")
    assert pid_alive(main)  # returned, slot free, still exiting
    stopped = svc.run("stop", check=True)
    assert not pid_alive(main), stopped.stdout  # gone when stop returns
    assert ("holds no slot but has not exited" in svc.log_file.read_text()) == (linger > kill_timeout)
