"""Fast unit tests of the parts the verbs are made of: control.py (Service, preparing
files, stale pid files), slots.py (the read model), stopping.targets, status_code.

Nothing here forks a service: each test lays out pid_dir by hand in tmp_path (lock
files really flocked by this process where a holder is needed) and calls the part.
"""
from __future__ import annotations

import fcntl
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hadctl import actions, config, control, slots, stopping
from hadctl.errors import ConfigError
from hadctl.model import Role, SlotReport
from support import toml_text


def _service(tmp_path: Path, **settings: object) -> control.Service:
    table: dict[str, object] = {"name": "svc", "entrypoint": "tests.services.basic:serve",
                                "pid_dir": str(tmp_path / "run"), "log_file": str(tmp_path / "hadctl.log")}
    table.update(settings)
    path = tmp_path / "svc.toml"
    path.write_text(toml_text(table) + "\n[locks]\nmax_procs = 2\nstandby_max_procs = 1\n")
    return control.Service(config.load(str(path)))


def _laid_out(tmp_path: Path) -> control.Service:
    svc = _service(tmp_path)
    for folder in (svc.layout.pid_dir, svc.layout.lock_path, svc.layout.standby_lock_path):
        os.makedirs(folder, exist_ok=True)
    return svc


def _dead_pid() -> int:
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    return int(proc.stdout)


def _hold(path: str) -> int:
    """Hold the flock on ``path`` in this process, as a slot's holder does."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


@pytest.mark.parametrize(("running", "expected"), [((True, True, True), 0), ((False, False, False), 3),
                                                   ((True, False, True), 1), ((), 0)])
def test_status_code_is_lsb_from_the_slots(running, expected):
    reports = [SlotReport(Role.MAIN, slot, 100 + slot if up else None) for slot, up in enumerate(running, 1)]
    assert actions.status_code(reports) == expected


def test_a_service_never_started_reads_as_free_slots_and_status_3(tmp_path):
    svc = _service(tmp_path)
    reports, stale = svc.slots()
    assert [(r.label, r.running) for r in reports] == [("main #1", False), ("main #2", False), ("standby #1", False)]
    assert stale == [] and svc.lock_file_missing()
    outcome = actions.status(svc.cfg)
    assert outcome.exit_status == 3 and [s.result for s in outcome.steps] == ["Not Running"] * 3


def test_the_lock_names_the_holder_and_a_pid_file_that_disagrees_is_stale(tmp_path):
    svc = _laid_out(tmp_path)
    fd = _hold(svc.layout.lock_file("main", 2))
    try:
        Path(svc.layout.pid_file("main", 2)).write_text(f"{os.getpid()}\n")
        Path(svc.layout.pid_file("main", 1)).write_text(f"{os.getpid()}\n")  # holds no lock of main #1
        Path(svc.layout.pid_file("standby", 1)).write_text("abc\n")
        reports, stale = svc.slots()
        assert [(r.label, r.pid) for r in reports] == [("main #1", None), ("main #2", os.getpid()),
                                                       ("standby #1", None)]
        assert sorted(item.why for item in stale) == [
            f"main-1.pid names pid {os.getpid()}, which does not hold main slot 1",
            "standby-1.pid holds 'abc', not a pid"]
        assert reports[0].stale == (f"main-1.pid names pid {os.getpid()}, which does not hold main slot 1",)
        assert reports[1].stale == () and reports[2].stale == ("standby-1.pid holds 'abc', not a pid",)
    finally:
        os.close(fd)


def test_clean_stale_removes_stale_files_but_keeps_one_a_new_holder_just_wrote(tmp_path):
    svc = _laid_out(tmp_path)
    dead = _dead_pid()
    Path(svc.layout.pid_file("main", 1)).write_text(f"{dead}\n")
    Path(svc.layout.pid_file("standby", 1)).write_text(f"{dead}\n")
    Path(svc.layout.unknown_pid_file(dead)).write_text(f"{dead}\n")
    _reports, stale = svc.slots()
    Path(svc.layout.pid_file("standby", 1)).write_text(f"{os.getpid()}\n")  # a new holder renamed its own meanwhile
    control.clean_stale(svc, stale)
    assert sorted(os.listdir(svc.layout.pid_dir)) == ["lock", "lock-standby", "standby-1.pid"]
    said = [step.what for step in svc.steps]
    assert any(what.startswith("removed stale main-1.pid") for what in said), said
    assert any(what.startswith(f"removed stale unknown-{dead}.pid (unknown-{dead}.pid names no running process)")
               for what in said), said
    assert all(step.ok for step in svc.steps)


def test_an_unknown_pid_file_naming_a_process_not_of_this_service_is_stale(tmp_path):
    svc = _laid_out(tmp_path)
    Path(svc.layout.unknown_pid_file(os.getpid())).write_text(f"{os.getpid()}\n")  # pytest: no worker of svc
    assert slots.unknown_pid_files(svc.layout) == []  # alive: without the name, nothing to judge by
    found = slots.unknown_pid_files(svc.layout, "svc")
    assert [item.pid for item in found] == [os.getpid()] and "no starting worker of svc" in found[0].why


def test_targets_skips_a_pid_that_does_not_hold_its_slot(tmp_path):
    svc = _laid_out(tmp_path)
    Path(svc.layout.lock_file("main", 1)).write_text("")  # a lock file this process does not hold
    reports = [SlotReport(Role.MAIN, 1, os.getpid())]
    assert stopping.targets(svc, reports, Role.MAIN) == []
    assert "no longer holds main #1: not signalled" in Path(svc.cfg.log_file).read_text()


def test_targets_opens_a_pidfd_on_the_holder(tmp_path):
    svc = _laid_out(tmp_path)
    fd = _hold(svc.layout.lock_file("main", 1))
    try:
        found = stopping.targets(svc, [SlotReport(Role.MAIN, 1, os.getpid()), SlotReport(Role.STANDBY, 1, None)],
                                 Role.MAIN)
        assert [(report.slot, target.pid) for report, target in found] == [(1, os.getpid())]
        for _report, target in found:
            target.close()
    finally:
        os.close(fd)


def test_touch_replaces_a_planted_symlink_and_never_follows_it(tmp_path):
    outside = tmp_path / "outside"
    link = tmp_path / "stop-file"
    link.symlink_to(outside)
    control.touch(str(link))
    assert link.is_file() and not link.is_symlink() and not outside.exists()


def test_touch_does_not_block_on_a_fifo(tmp_path):
    fifo = tmp_path / "stop-file"
    os.mkfifo(fifo)
    control.touch(str(fifo))  # returns at once: nobody reads it, yet it exists
    assert fifo.exists()


@pytest.mark.parametrize("junk", ["pid_dir is a file", "log_file is a fifo", "log_file is a folder"])
def test_check_paths_refuses_before_anything_is_made(tmp_path, junk):
    if junk == "pid_dir is a file":
        (tmp_path / "run").write_text("")
        expected = "is not a directory"
    elif junk == "log_file is a fifo":
        os.mkfifo(tmp_path / "hadctl.log")
        expected = "is a FIFO or a socket"
    else:
        (tmp_path / "hadctl.log").mkdir()
        expected = "is a directory"
    svc = _service(tmp_path)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ConfigError, match=expected):
        control.prepare(svc)
    assert sorted(os.listdir(tmp_path)) == before


def test_prepare_makes_the_folders_and_log_file(tmp_path):
    svc = _service(tmp_path)
    control.prepare(svc)
    assert os.path.isdir(svc.layout.lock_path) and os.path.isdir(svc.layout.standby_lock_path)
    assert os.path.isfile(svc.cfg.log_file)


def test_say_records_a_line_and_logs_it(tmp_path):
    svc = _laid_out(tmp_path)
    svc.say("main #1 (pid 5)", "Stopped")
    svc.say("standby #1 (pid 6) survived TERM and KILL", "Failed", ok=False)
    outcome = svc.outcome("stop", 1)
    assert [(s.result, s.ok) for s in outcome.steps] == [("Stopped", True), ("Failed", False)]
    log = Path(svc.cfg.log_file).read_text()
    assert "[INFO] main #1 (pid 5) [Stopped]" in log and "[ERROR] standby #1" in log


_HOLDER = ("import fcntl, os, signal, sys\n"
           "fd = os.open(sys.argv[1], os.O_RDONLY)\n"
           "fcntl.flock(fd, fcntl.LOCK_SH)\n"
           "print('held', flush=True)\n"
           "signal.pause()\n")


def test_a_symlink_swapped_in_for_the_alive_lock_during_stop_steers_no_signal(tmp_path, monkeypatch):
    """pid_dir is the service user's: while stop waits for the alive lock, that user may
    swap it for a link to a file some other process holds. The holders signalled are
    those of the file stop opened, never the link's target's."""
    svc = _laid_out(tmp_path)
    outside = tmp_path / "someone-elses.lock"
    outside.write_text("")
    Path(svc.layout.alive_lock).write_text("")
    procs = [subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True)
             for path in (svc.layout.alive_lock, outside)]
    worker, bystander = procs
    try:
        assert all(proc.stdout.readline() == "held\n" for proc in procs)
        real = control.flock.take_control

        def take_then_swap(path: str, timeout: float) -> int | None:
            fd = real(path, 0.05)  # times out: the worker holds it shared
            if fd is None and not os.path.islink(path):
                os.rename(path, path + ".old")
                os.symlink(outside, path)
            return fd

        monkeypatch.setattr(stopping.flock, "take_control", take_then_swap)
        assert stopping.wait_for_the_last(svc) == 1  # the link itself is never opened (ELOOP): a failed line
        assert worker.wait(timeout=10) == -15  # the holder of the real alive lock got TERM
        assert bystander.poll() is None  # the link's target's holder got nothing
    finally:
        for proc in procs:
            proc.kill()
            proc.wait()
