"""Availability without an attacker (issue 12, items 7, 8, 10, 11 and 14): an output
file the service user cannot open, an output file that is a terminal or a pipe, a
read-only pid_dir, no inodes left, and a low open-file limit. Each must cost no
failover, no slot and no hung controller, and say what is wrong in one line.
"""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from conftest import pid_alive
from support import wait_until

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (user = nobody, mounts); CI runs as root")

NOBODY = 65534


def _one_line(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr


def _for_nobody(folder: Path) -> None:
    """nobody may reach the test's folders (the service writes its ledger there)."""
    for path in (folder, *folder.parents):
        if path == Path("/") or str(path) == "/tmp":
            break
        path.chmod(path.stat().st_mode | 0o011)
    folder.chmod(0o777)


# ------------------------------------------------------------------ 7. an output file nobody can open


@as_root
@pytest.mark.parametrize("rooted", ["stdout_file", "stdout_file and log_file"])
def test_an_output_file_the_user_cannot_open_costs_no_failover_and_no_slot(service, tmp_path, rooted):
    """logrotate's ``create 0644 root root`` made stdout_file (and log_file) root's:
    before, the promoted standby could not open it and exited, with no replacement
    (one failover took the service down). Now it keeps the fd it had, its replacement
    standby gets the spawner's output when log_file cannot be opened, and status
    names the file."""
    _for_nobody(tmp_path)
    out = tmp_path / "s0" / "out.log"
    svc = service(user="nobody", stdout_file=str(out))
    _for_nobody(svc.folder)
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    for path in (out, svc.log_file) if "log_file" in rooted else (out,):
        os.chown(path, 0, 0)
        path.chmod(0o644)
    os.kill(main, 9)
    wait_until(lambda: svc.holders("main") == [standby], 10, "the standby to take over")
    wait_until(lambda: [p for p in svc.holders("standby") if p != standby], 10, "a new standby")
    status = svc.run("status")
    assert status.returncode == 0, status.stdout
    assert f"stdout_file {out}" in status.stdout and "[Output]" in status.stdout, status.stdout
    assert pid_alive(standby)
    if "log_file" not in rooted:  # (else the worker's log line had nowhere to go)
        assert f"cannot open stdout_file {out}" in svc.log_file.read_text()
    svc.run("stop", check=True)
    started = svc.run("start", check=True)
    assert f"stdout_file {out} is not open" in started.stderr and "[Output]" in started.stderr, started
    assert len(svc.holders("main")) == 1 and len(svc.holders("standby")) == 1


# ------------------------------------------------------------------ 8. a terminal or a pipe as output file


@pytest.mark.parametrize("key", ["log_file", "stdout_file", "stderr_file"])
@pytest.mark.parametrize("target", ["/dev/stdout", "/proc/self/fd/1", "a terminal"])
def test_an_output_file_that_is_a_terminal_or_the_callers_stdout_is_refused(service, no_leftovers, key, target):
    """``log_file = "/dev/stdout"`` tied every worker to the controller's stdout:
    ``out=$(hadctl start)`` never returned. Now start, fork, restart and check refuse
    it (exit 6, one line), before anything runs; the caller's pipe is never held."""
    from support import marked_processes

    leader, follower = os.openpty()
    try:
        path = os.ttyname(follower) if target == "a terminal" else target
        svc = service(**{key: path})
        for action in ("start", "fork", "restart", "check"):
            # out=$(hadctl start): stdout is a pipe, read to its end
            result = subprocess.run([*svc.command, "-c", str(svc.config), action], capture_output=True,
                                    text=True, timeout=30)
            _one_line(result)
            assert result.returncode == 6, (action, result)
            assert f'"{key}"' in result.stderr + result.stdout and path in result.stderr + result.stdout, result
        assert marked_processes("HADCTL_TEST_ID", no_leftovers) == []
    finally:
        os.close(leader)
        os.close(follower)


def test_dev_null_stays_a_valid_output_file(service):
    svc = service(stdout_file="/dev/null", stderr_file="/dev/null")
    result = subprocess.run([*svc.command, "-c", str(svc.config), "start"], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result
    assert len(svc.holders("main")) == 1


# ------------------------------------------------------------------ 14. a low open-file limit


def _under_ulimit(svc, limit: str, action: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", f'ulimit {limit} || exit 99; exec "$@"', "sh", *svc.command, "-c",
                           str(svc.config), action], capture_output=True, text=True, timeout=60)


def test_a_pool_that_cannot_fit_the_open_file_limit_is_refused_before_anything_starts(service, no_leftovers):
    """``ulimit -n 16`` and 6+6 slots: before, "internal error: OSError: [Errno 24]" and 14
    processes left running. Now one line naming the limit, exit 1, nothing started or made."""
    from support import marked_processes

    svc = service(locks={"max_procs": 6, "standby_max_procs": 6})
    for action in ("start", "fork", "check"):
        result = _under_ulimit(svc, "-n 16", action)
        _one_line(result)
        assert result.returncode == (6 if action == "check" else 1), result
        assert "open-file limit of 16" in result.stderr + result.stdout, result
    assert marked_processes("HADCTL_TEST_ID", no_leftovers) == []
    assert not svc.pid_dir.exists()


def test_workers_get_their_open_file_limit_from_the_config_not_the_controller(service):
    """A caller with a soft limit of 16 (its hard one high) starts 6+6 slots: hadctl
    raises its own soft limit for the pipes it holds, and every worker gets
    ``[limits] nofile``, not the caller's 16."""
    svc = service(locks={"max_procs": 6, "standby_max_procs": 6}, limits={"nofile": 2048})
    result = _under_ulimit(svc, "-Sn 16", "start")
    assert result.returncode == 0, result
    pids = svc.holders("main") + svc.holders("standby")
    assert len(pids) == 12
    for pid in pids:
        line = next(x for x in Path(f"/proc/{pid}/limits").read_text().splitlines() if x.startswith("Max open files"))
        assert line.split()[3:5] == ["2048", "2048"], line


# ------------------------------------------------------------------ 11. no inode, no space left


class Tmpfs:
    """A small tmpfs mounted at ``path`` for one test (unmounted by ``close``)."""

    def __init__(self, path: Path, options: str) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)], check=True)

    def fill_inodes(self) -> int:
        """Make empty files until no inode is left; returns how many were made."""
        made = 0
        while True:
            try:
                (self.path / f"filler-{made}").touch()
            except OSError:
                return made
            made += 1

    def free(self) -> None:
        for path in self.path.glob("filler*"):
            path.unlink()

    def close(self) -> None:
        result = subprocess.run(["umount", str(self.path)], capture_output=True)
        if result.returncode != 0:
            subprocess.run(["umount", "-l", str(self.path)], check=True)


@pytest.fixture
def tmpfs(tmp_path):
    mounted: list[Tmpfs] = []

    def mount(path: Path, options: str) -> Tmpfs:
        mounted.append(Tmpfs(path, options))
        return mounted[-1]

    yield mount
    for item in mounted:
        item.close()


@as_root
def test_a_stop_that_cannot_make_its_stop_file_exits_1_and_says_fork_will_start_again(service, tmpfs):
    """Out of inodes, stop exited 0 without the stop file, and cron's next fork restarted
    what it had just stopped. Now it still stops everything, but exits 1 and says so."""
    svc = service()
    mount = tmpfs(svc.pid_dir, "size=1m,nr_inodes=64")
    try:
        svc.run("start", check=True)
        main, standby = svc.pid_of("main"), svc.pid_of("standby")
        assert mount.fill_inodes() > 0
        result = svc.run("stop")
        _one_line(result)
        assert result.returncode == 1, result
        assert "cannot create standby stop file" in result.stderr and "fork" in result.stderr, result.stderr
        assert "will start svc again" in result.stderr, result.stderr
        wait_until(lambda: not pid_alive(main) and not pid_alive(standby), 10, "the workers to exit")
    finally:
        mount.free()
        svc.stop()


@as_root
def test_temporary_pid_files_of_failed_spawns_are_cleaned_by_the_next_controller(service, tmp_path, tmpfs):
    """No space left: a spawn's write-then-rename of its pid file left ``*.pid.PID.tmp``
    files for ever. A failed write now removes its own; the next controller removes
    those whose PID is gone (a writer killed before its rename; a link among them as
    a name, never what it points to), and keeps one whose writer lives."""
    svc = service()
    tmpfs(svc.pid_dir, "size=64k,nr_inodes=1000")
    outside = tmp_path / "outside.pid"
    outside.write_text("keep me\n")
    dead = subprocess.Popen(["true"])
    dead.wait()
    try:
        svc.run("start", check=True)
        svc.run("stop", check=True)
        fd = os.open(svc.pid_dir / "filler", os.O_WRONLY | os.O_CREAT)
        try:  # every block taken: writes fail, opens succeed
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        failed = svc.run("start")
        assert failed.returncode != 0, failed
        assert sorted(svc.pid_dir.glob("*.tmp")) == []  # each failed write removed its own
        (svc.pid_dir / "filler").unlink()
        # what a spawn killed between the write and the rename leaves
        (svc.pid_dir / f"unknown-{dead.pid}.pid.{dead.pid}.tmp").write_text(f"{dead.pid}\n")
        (svc.pid_dir / f"main-1.pid.{dead.pid}.tmp").symlink_to(outside)
        (svc.pid_dir / f"standby-1.pid.{os.getpid()}.tmp").write_text("")  # its writer lives: kept
        svc.run("start", check=True)
        assert sorted(p.name for p in svc.pid_dir.glob("*.tmp")) == [f"standby-1.pid.{os.getpid()}.tmp"]
        assert outside.read_text() == "keep me\n"
    finally:
        svc.stop()


# ------------------------------------------------------------------ 10. a read-only pid_dir


@as_root
def test_stop_and_reload_work_in_a_read_only_pid_dir_and_restart_says_why_it_cannot(service):
    """A disk error remounted pid_dir read-only: stop, restart and reload exited 6
    "cannot take lock ... Read-only file system" and everything kept running. Now the
    control lock is flocked through a read-only fd: reload signals the mains, stop
    ends every worker (exit 1: no stop file could be made, said in one line), and
    restart, which could start nothing there, refuses before stopping anything."""
    svc = service(locks={"max_procs": 2, "standby_max_procs": 2})
    svc.run("start", check=True)
    workers = svc.holders("main") + svc.holders("standby")
    assert len(workers) == 4
    # a read-only bind mount over pid_dir: the workers' open files stay writable below it
    subprocess.run(["mount", "--bind", str(svc.pid_dir), str(svc.pid_dir)], check=True)
    mounted = True
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(svc.pid_dir)], check=True)

        reload = svc.run("reload")
        assert reload.returncode == 0, reload
        wait_until(lambda: sum(line[0] == "hup" for line in svc.ledger_lines()) == 2, 10, "both mains to get HUP")

        restart = svc.run("restart")
        _one_line(restart)
        assert restart.returncode == 1 and "Read-only file system" in restart.stderr, restart
        assert sorted(svc.holders("main") + svc.holders("standby")) == sorted(workers)
        check = svc.run("check")
        assert check.returncode == 6 and "read-only file system" in check.stdout + check.stderr, check

        stop = svc.run("stop")
        _one_line(stop)
        assert stop.returncode == 1, stop
        assert "cannot create standby stop file" in stop.stderr and "Read-only file system" in stop.stderr, stop
        assert "cannot take lock" not in stop.stderr
        wait_until(lambda: not any(pid_alive(p) for p in workers), 10, "every worker to exit")
        assert svc.holders("main") + svc.holders("standby") == []
        assert "Traceback" not in svc.log_file.read_text()  # the workers left cleanly, their pid files kept
        subprocess.run(["umount", str(svc.pid_dir)], check=True)
        mounted = False
        svc.run("stop", check=True)  # writable again: what the read-only stop left is cleaned
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(svc.pid_dir)], check=True)
        svc.stop()
