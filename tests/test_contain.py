"""Containment (issue 14): what a main starts is ended with it, in both modes
(cgroup v2, and the environment marker forced by HADCTL_CGROUP=off); limits."""
from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import pytest

from conftest import pid_alive, wait_until
from hadctl import contain

CGROUP_HERE = bool(contain.cgroup_dir("probe"))
MODES = [
    pytest.param("cgroup", marks=pytest.mark.skipif(not CGROUP_HERE, reason="no writable cgroup v2 here")),
    "marker",
]


@pytest.fixture(params=MODES)
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "marker":
        monkeypatch.setenv("HADCTL_CGROUP", "off")
    else:
        monkeypatch.delenv("HADCTL_CGROUP", raising=False)
    return str(request.param)


def _children(report: Path, old: str = "") -> list[int]:
    text = wait_until(lambda: report.exists() and report.read_text() != old and report.read_text(), 10,
                      "the main to report its children")
    return [int(word) for word in text.split()]


def _leftover_service(service: Any, tmp_path: Path, **settings: Any) -> Any:
    report = tmp_path / "children"
    settings = {"entrypoint": "tests.services.contained:with_leftovers", "kill_timeout": 1, **settings}
    return service(env={"REPORT": str(report)}, **settings), report


def test_failover_ends_the_dead_mains_leftovers_then_stop_ends_the_rest(service: Any, tmp_path: Path,
                                                                         mode: str) -> None:
    svc, report = _leftover_service(service, tmp_path)
    svc.run("start", check=True)
    first = _children(report)  # a Popen child, a forked child, a setsid daemon
    assert all(pid_alive(p) for p in first)
    main = svc.pid_of("main")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: not any(pid_alive(p) for p in first), 10, "the dead main's leftovers to be ended")
    second = _children(report, " ".join(map(str, first)))
    assert svc.pid_of("main") != main
    log = svc.log_file.read_text()
    assert f"of {main}: sleep 300" in log  # logged with pid and command
    # the main and its three children (the replacement standby the new main spawns is
    # born in the main's cgroup and moves into its own as it starts: 5 for a moment)
    def settled() -> dict[str, Any] | None:
        found = svc.status()
        return found if found["containment"]["mains"]["1"]["processes"] == 4 else None

    status = wait_until(settled, 10, "4 processes in the main's tree")
    assert status["containment"]["mode"] == mode
    result = svc.run("stop", check=True)
    assert "1 leftover processes [Stopped]" in result.stdout  # the setsid daemon: its group was not the main's
    assert not any(pid_alive(p) for p in second)
    if mode == "cgroup":
        assert not os.path.exists(status["containment"]["cgroup"])


def test_stop_ends_leftovers_of_a_main_that_died_without_standby(service: Any, tmp_path: Path, mode: str) -> None:
    svc, report = _leftover_service(service, tmp_path, locks={"standby_max_procs": 0})
    svc.run("start", check=True)
    pids = _children(report)
    main = svc.pid_of("main")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: not pid_alive(main), 10, "the main to die")
    status = svc.status()
    assert {item["pid"] for item in status["containment"]["leftovers"]} == set(pids)
    result = svc.run("stop", check=True)
    assert "3 leftover processes [Stopped]" in result.stdout
    assert not any(pid_alive(p) for p in pids)


def test_kill_mode_process_leaves_them(service: Any, tmp_path: Path, mode: str) -> None:
    svc, report = _leftover_service(service, tmp_path, kill_mode="process")
    svc.run("start", check=True)
    first = _children(report)
    os.kill(svc.pid_of("main"), signal.SIGKILL)
    _children(report, " ".join(map(str, first)))  # the promoted main is in its function
    try:
        assert all(pid_alive(p) for p in first)
        result = svc.run("stop", check=True)
        assert 'left running (kill_mode = "process")' in result.stdout
        assert all(pid_alive(p) for p in first)
    finally:
        for pid in first + _children(report):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not any(pid_alive(p) for p in first), 10, "the leftovers to be killed")


def test_stop_exits_1_naming_a_leftover_that_survives(service: Any, tmp_path: Path, mode: str) -> None:
    svc, report = _leftover_service(service, tmp_path, stop_signals=["TERM"], kill_timeout=0.3,
                                    entrypoint="tests.services.contained:with_stubborn_child")
    svc.run("start", check=True)
    (stubborn,) = _children(report)
    try:
        result = svc.run("stop", check=1)
        assert f"leftover pid {stubborn}" in result.stderr and "survived TERM" in result.stderr
    finally:
        os.kill(stubborn, signal.SIGKILL)
        wait_until(lambda: not pid_alive(stubborn), 10, "the stubborn child to die")


def test_rlimits_in_main_and_standby(service: Any, tmp_path: Path) -> None:
    import resource

    nproc = resource.getrlimit(resource.RLIMIT_NPROC)[1]  # raising a hard limit needs CAP_SYS_RESOURCE
    svc = service()
    text = svc.config.read_text() + f"\n[limits]\nnofile = 1234\nnproc = {nproc}\n"
    svc.config.write_text(text)
    svc.run("start", check=True)
    for role in ("main", "standby"):
        limits = Path(f"/proc/{svc.pid_of(role)}/limits").read_text()
        assert [line.split()[-3:] for line in limits.splitlines() if line.startswith("Max open files")] == \
            [["1234", "1234", "files"]], limits
        assert [line.split()[-3:] for line in limits.splitlines() if line.startswith("Max processes")] == \
            [[str(nproc), str(nproc), "processes"]]
        assert [line.split()[-3:] for line in limits.splitlines() if line.startswith("Max core file size")] == \
            [["0", "0", "bytes"]]  # the documented default


def _controller_here(name: str) -> bool:
    base = contain.cgroup_base()
    if base is None or not CGROUP_HERE:
        return False
    folder = base if os.path.isdir(base) else os.path.dirname(base)
    try:
        return name in Path(folder, "cgroup.controllers").read_text().split()
    except OSError:
        return False


def test_cgroup_limit_refused_where_its_controller_is_missing(service: Any) -> None:
    if _controller_here("memory"):
        pytest.skip("this machine has the memory controller: the refusal path cannot be reached")
    svc = service()
    svc.config.write_text(svc.config.read_text() + '\n[limits]\nmemory_max = "256M"\n')
    result = svc.run("start", check=6)
    assert "memory_max" in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (svc.pid_dir / "main-1.pid").exists()


def test_cgroup_limit_applied_where_its_controller_exists(service: Any) -> None:
    if not _controller_here("pids"):
        pytest.skip("no cgroup v2 pids controller on this machine")
    svc = service()
    svc.config.write_text(svc.config.read_text() + "\n[limits]\npids_max = 64\n")
    svc.run("start", check=True)
    folder = svc.status()["containment"]["cgroup"]
    assert Path(folder, "pids.max").read_text().strip() == "64"


def test_systemd_unit_maps_limits(service: Any) -> None:
    svc = service()
    svc.config.write_text(svc.config.read_text() +
                          '\n[limits]\nnofile = 4096\nmemory_max = "1G"\ncpu_max = "50%"\npids_max = 100\n')
    unit = svc.run("get-systemd-unit", check=True).stdout
    for line in ("LimitNOFILE=4096", f"MemoryMax={1 << 30}", "CPUQuota=50%", "TasksMax=100"):
        assert line in unit.splitlines()


def test_restart_ends_what_the_replaced_main_started(service: Any, tmp_path: Path, mode: str) -> None:
    svc, report = _leftover_service(service, tmp_path)
    svc.run("start", check=True)
    first = _children(report)
    svc.run("restart", check=True)
    # restart has waited for the old main's exit, then ended what it left (the setsid daemon)
    assert not any(pid_alive(p) for p in first)
    second = _children(report, " ".join(map(str, first)))
    svc.run("stop", check=True)
    assert not any(pid_alive(p) for p in second)
