"""Reliability (issue #6): chaos, PID safety, controllers at once, lock fds, bad input, resource faults.

The invariants these tests hold hadctl to:
1. mutual exclusion: never more than max_procs mains inside the function, never
   more than standby_max_procs standbys;
2. availability: a main that dies while a standby waits is replaced at once;
3. clean stop: when ``stop`` returns 0, no process of the service runs, no pid
   file remains, no slot is held;
4. PID safety: hadctl never signals a process that does not hold the slot its
   pid file names;
5. bad input is refused cleanly: one line on stderr, an LSB status, no
   traceback, nothing spawned, nothing in pid_dir changed.
The long random run is ``make chaos`` (tests/chaos.py); a short one runs here.
"""
from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import chaos
from conftest import HADCTL, ROOT, pid_alive, wait_until
from hadctl.config import INIT_KEYS, LOCKS_KEYS, REQUIRED, TOP_KEYS, all_keys

MARK = "HADCTL_TEST_ID"
CHAOS_OPERATIONS = 35
PARALLEL_ROUNDS = 5
PARALLEL_COMMANDS = 20


# ------------------------------------------------------------------ helpers


def _service_processes(marker: str, exclude: tuple[int, ...] = ()) -> list[int]:
    """Live processes started by this test (they carry its marker), but ``exclude``."""
    return [p for p in chaos.marked_processes(marker, MARK) if p not in exclude]


def _held_slots(svc: Any) -> list[str]:
    """Lock files under pid_dir whose flock someone holds."""
    held = []
    for folder in ("lock", "lock-standby"):
        for lock in sorted((svc.pid_dir / folder).glob("*.lock")):
            fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                held.append(f"{folder}/{lock.name}")
            finally:
                os.close(fd)
    return held


def assert_stopped_clean(svc: Any, marker: str, exclude: tuple[int, ...] = ()) -> None:
    """Invariant 3, checked at once (no waiting): nothing runs, no pid file, no slot held."""
    left = _service_processes(marker, exclude)
    assert not left, f"still running after stop returned 0: {[chaos.describe(p) for p in left]}"
    pid_files = sorted(p.name for p in svc.pid_dir.glob("*.pid"))
    assert not pid_files, f"pid files left after stop: {pid_files}"
    assert not _held_slots(svc)


def assert_one_line(result: subprocess.CompletedProcess[str], statuses: tuple[int, ...]) -> str:
    """A clean refusal: an expected status, one line on stderr, no traceback; returns the line."""
    assert result.returncode in statuses, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {lines}"
    return lines[0]


def _snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """Every entry under ``folder``: kind, size, mtime (to prove nothing changed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        st_ = path.lstat()
        kind = "dir" if path.is_dir() and not path.is_symlink() else "file"
        found[str(path.relative_to(folder))] = (kind, st_.st_size if kind == "file" else 0, st_.st_mtime_ns)
    return found


def _ledger_events(path: Path, event: str) -> list[int]:
    if not path.exists():
        return []
    return [int(line.split()[1]) for line in path.read_text().splitlines() if line.split()[0] == event]


class Bystanders:
    """Processes that belong to no service: a signal recorder and a plain sleep, plus a dead pid."""

    def __init__(self, folder: Path) -> None:
        self.record = folder / "bystander-signals"
        env = {k: v for k, v in os.environ.items() if k != MARK}  # not ours: killed by close()
        self.recorder = subprocess.Popen([sys.executable, "-m", "tests.services.bystander", str(self.record)],
                                         cwd=ROOT, env=env)
        self.sleep = subprocess.Popen(["sleep", "600"], env=env)
        dead = subprocess.Popen(["true"])
        dead.wait()
        self.dead = dead.pid
        wait_until(lambda: self.record.exists() and "ready" in self.record.read_text(), 10, "the bystander's handlers")

    def signals(self) -> list[str]:
        return [w for w in self.record.read_text().split() if w != "ready"]

    def assert_untouched(self) -> None:
        assert self.recorder.poll() is None and self.sleep.poll() is None, "a bystander died"
        assert self.signals() == [], f"the bystander received {self.signals()}"

    def close(self) -> None:
        for proc in (self.recorder, self.sleep):
            proc.kill()
            proc.wait()


@pytest.fixture
def bystanders(tmp_path: Path) -> Any:
    folder = tmp_path / "bystanders"
    folder.mkdir()
    found = Bystanders(folder)
    yield found
    found.close()


@pytest.fixture
def own_signals() -> Any:
    """Signals this test process receives while the test runs (hadctl must send none)."""
    got: list[str] = []

    def record(signum: int, _frame: object) -> None:
        got.append(signal.Signals(signum).name)

    watched = (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT)
    previous = {s: signal.signal(s, record) for s in watched}
    yield got
    for signum, handler in previous.items():
        signal.signal(signum, handler)


# ------------------------------------------------------------------ 1. chaos, short


def test_short_chaos_run_keeps_every_invariant(tmp_path):
    seed = int(os.environ.get("HADCTL_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    result = chaos.run_chaos(CHAOS_OPERATIONS, seed, tmp_path / "chaos")
    summary = chaos.report(result)
    assert result.operations == CHAOS_OPERATIONS, summary
    assert result.violations == [] and result.leftovers == 0, \
        f"{summary}\nreplay: python tests/chaos.py --operations {CHAOS_OPERATIONS} --seed {seed}"
    assert result.failovers > 0, summary  # the availability check did look at failovers


# ------------------------------------------------------------------ 2. PID safety

JUNK_KINDS = ["pid 1", "our own pid", "a live sleep", "a signal recorder", "a dead pid", "empty", "text",
              "negative", "huge", "symlink", "directory", "fifo"]


def _drop_junk(path: Path, kind: str, by: Bystanders) -> None:
    contents = {
        "pid 1": "1\n", "our own pid": f"{os.getpid()}\n", "a live sleep": f"{by.sleep.pid}\n",
        "a signal recorder": f"{by.recorder.pid}\n", "a dead pid": f"{by.dead}\n", "empty": "",
        "text": "hello world\n", "negative": "-42\n", "huge": "123456789012345678901234567890\n",
    }
    if kind == "symlink":  # to a file that names a live process; only the link may go
        target = path.parent.parent / f"target-of-{path.name}"
        target.write_text(f"{by.recorder.pid}\n")
        path.symlink_to(target)
    elif kind == "directory":
        path.mkdir()
    elif kind == "fifo":  # a reader that opened it without O_NONBLOCK would block for ever
        os.mkfifo(path)
    else:
        path.write_text(contents[kind])


@pytest.mark.parametrize("kind", JUNK_KINDS)
def test_junk_pid_files_are_stale_never_signalled_and_cleaned(service, bystanders, own_signals, no_leftovers, kind):
    svc = service()
    svc.pid_dir.mkdir()
    names = ("main-1.pid", "standby-1.pid")
    for name in names:
        _drop_junk(svc.pid_dir / name, kind, bystanders)
    status = svc.run("status", check=3)
    for label, name in (("main #1", "main-1.pid"), ("standby #1", "standby-1.pid")):
        line = next(line for line in status.stdout.splitlines() if line.startswith(f"svc : {label}"))
        assert line.endswith("[Not Running]") and "stale" in line and name in line, status.stdout
    assert all(not s["running"] and s["stale"] for s in svc.status()["slots"])
    svc.run("reload", check=7)
    stopped = svc.run("stop", check=True)
    for name in names:
        assert f"removed stale {name}" in stopped.stdout, stopped.stdout
    assert_stopped_clean(svc, no_leftovers)
    # The same junk before start (or restart, which starts when no main runs): cleaned, then running.
    action = "start" if JUNK_KINDS.index(kind) % 2 == 0 else "restart"
    for name in names:
        _drop_junk(svc.pid_dir / name, kind, bystanders)
    started = svc.run(action, check=True)
    for name in names:
        assert f"removed stale {name}" in started.stdout, started.stdout
    assert len(svc.holders("main")) == 1 and len(svc.holders("standby")) == 1
    svc.run("stop", check=True)
    assert_stopped_clean(svc, no_leftovers)
    bystanders.assert_untouched()
    assert own_signals == []
    assert all(t.exists() for t in svc.folder.glob("target-of-*"))  # a symlink's target is left alone


def test_junk_next_to_a_running_service_is_never_signalled(service, bystanders, own_signals, no_leftovers):
    other = service(name="other")  # another service: its processes are hadctl workers too
    other.run("start", check=True)
    other_pids = (other.pid_of("main"), other.pid_of("standby"))
    svc = service(locks={"max_procs": 2, "standby_max_procs": 1})
    svc.run("start", check=True)
    mains, standby = sorted(svc.holders("main")), svc.holders("standby")[0]
    (svc.pid_dir / "main-1.pid").write_text(f"{bystanders.recorder.pid}\n")
    (svc.pid_dir / "main-2.pid").write_text(f"{standby}\n")  # a process of ours, holding another slot
    (svc.pid_dir / "standby-1.pid").write_text("1\n")
    for pid in (*other_pids, bystanders.recorder.pid, bystanders.sleep.pid, os.getpid()):
        (svc.pid_dir / f"unknown-{pid}.pid").write_text(f"{pid}\n")
    status = svc.run("status", check=True)  # the locks say every slot is held
    assert status.stdout.count("[Running]") == 3 and status.stdout.count("stale") == 3, status.stdout
    assert sorted(s["pid"] for s in svc.status()["slots"] if s["role"] == "main") == mains
    svc.run("reload", check=True)
    wait_until(lambda: sorted(_ledger_events(svc.ledger, "hup")) == mains, 5, "SIGHUP to each main")
    (svc.pid_dir / "hadctl-backoff.pid").write_text(f"{other_pids[1]}\n1.000\n")  # "a standby backing off"
    svc.run("fork", check=True)  # a fork cuts a back-off short: not another service's standby's
    svc.run("restart", check=True)
    assert not set(svc.holders("main")) & set(mains)
    svc.run("stop", check=True)
    assert_stopped_clean(svc, no_leftovers, exclude=other_pids)
    assert all(pid_alive(p) for p in other_pids)
    assert other.holders("main") == [other_pids[0]] and other.holders("standby") == [other_pids[1]]
    assert _ledger_events(other.ledger, "exit") == [] and _ledger_events(other.ledger, "hup") == []
    bystanders.assert_untouched()
    assert own_signals == []


@pytest.mark.parametrize("action", ["stop", "restart"])
def test_a_sigstopped_main_runs_its_term_handler_on_stop_and_restart(service, no_leftovers, action):
    """Issue 12, item 13: SIGCONT follows each stop signal, so a stopped main handles
    TERM (drains) instead of waiting out kill_timeout for a KILL it cannot handle."""
    svc = service(entrypoint="tests.services.contained:beating", kill_timeout=30,
                  locks={"max_procs": 1, "standby_max_procs": 1})
    svc.run("start", check=True)
    main = svc.pid_of("main")
    wait_until(lambda: main in _ledger_events(svc.ledger, "enter"), 10, "the main inside its function")
    os.kill(main, signal.SIGSTOP)
    wait_until(lambda: chaos.state_of(main) == "T", 5, "the main to be stopped")
    svc.run(action, check=True, timeout=20)  # without SIGCONT: 30 s, then KILL and no exit line
    assert main in _ledger_events(svc.ledger, "exit"), svc.ledger.read_text()
    if action == "stop":
        assert_stopped_clean(svc, no_leftovers)


@pytest.mark.parametrize("content", ["empty", "not empty"])
def test_a_folder_in_place_of_the_main_pid_file_does_not_stop_a_failover(service, no_leftovers, content):
    """A promoted standby renames its pid file to main-1.pid: junk in the way must not
    kill it (it did: every promoted standby died, a crash loop with no main)."""
    svc = service()
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    (svc.pid_dir / "main-1.pid").unlink()
    (svc.pid_dir / "main-1.pid").mkdir()
    if content == "not empty":
        (svc.pid_dir / "main-1.pid" / "something").write_text("x")
    killed_at = time.monotonic()
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: standby in _ledger_events(svc.ledger, "enter"), 5, "the standby inside the function")
    entered = next(float(line.split()[2]) for line in svc.ledger.read_text().splitlines()
                   if line.startswith(f"enter {standby} "))
    assert entered - killed_at < 1.0
    wait_until(lambda: len(svc.holders("standby")) == 1, 10, "the replacement standby")
    assert svc.holders("main") == [standby] and pid_alive(standby)
    stopped = svc.run("stop", check=True)
    assert _service_processes(no_leftovers) == [] and not _held_slots(svc)
    if content == "empty":
        assert not list(svc.pid_dir.glob("*.pid"))
    else:  # hadctl removes no folder with something in it; it says so
        assert "cannot remove stale" in stopped.stderr + stopped.stdout


def test_stopped_processes_block_neither_failover_nor_stop(service, no_leftovers):
    """SIGSTOP one standby: the other takes a dead main's slot at once. SIGSTOP the
    new main: stop still ends everything (KILL reaches a stopped process)."""
    svc = service(kill_timeout=0.3, respawn_standby=False, locks={"max_procs": 1, "standby_max_procs": 2})
    svc.run("start", check=True)
    main = svc.holders("main")[0]
    frozen, waiting = svc.holders("standby")
    os.kill(frozen, signal.SIGSTOP)
    wait_until(lambda: chaos.state_of(frozen) == "T", 5, "the standby to be stopped")
    killed_at = time.monotonic()
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: waiting in _ledger_events(svc.ledger, "enter"), 5, "the running standby inside the function")
    entered = next(float(line.split()[2]) for line in svc.ledger.read_text().splitlines()
                   if line.startswith(f"enter {waiting} "))
    assert entered - killed_at < 1.0
    os.kill(waiting, signal.SIGSTOP)
    wait_until(lambda: chaos.state_of(waiting) == "T", 5, "the main to be stopped")
    stopped = svc.run("stop", check=True)
    assert f"pid {waiting}" in stopped.stdout and f"pid {frozen}" in stopped.stdout, stopped.stdout
    assert_stopped_clean(svc, no_leftovers)


_LOOK_ALIKE = "import signal  # hadctl.worker look-alike\nsignal.pause()\n"
_PARENT = ("import fcntl, os, subprocess, sys, signal\n"
           "fd = os.open(sys.argv[1], os.O_RDONLY)  # a main has its lock file open\n"
           "alive = os.open(sys.argv[3], os.O_RDONLY)  # and holds the alive lock, shared from birth\n"
           "fcntl.flock(alive, fcntl.LOCK_SH)\n"
           "child = subprocess.Popen([sys.executable, '-c', sys.argv[2]], pass_fds=[alive])\n"
           "os.close(alive)  # the child's hold is the one left, as a replacement standby's once its main is gone\n"
           "print(child.pid, flush=True)\n"
           "signal.pause()\n")


def test_a_starting_worker_is_told_from_a_look_alike(service, no_leftovers):
    """unknown-PID.pid names a starting worker; a main names its replacement standby
    there at once, before it runs any of hadctl, and the standby shares the main's
    hold on the alive lock from birth. stop must end such a process of this service,
    yet never one that only looks like a worker (named in pid_dir, holding nothing),
    whose pid file it removes as stale."""
    svc = service(kill_timeout=0.5)
    svc.run("start", check=True)
    parent = subprocess.Popen([sys.executable, "-c", _PARENT, str(svc.pid_dir / "lock" / "1.lock"), _LOOK_ALIKE,
                               str(svc.pid_dir / "hadctl-alive.lock")], stdout=subprocess.PIPE, text=True)
    look_alike = subprocess.Popen([sys.executable, "-c", _LOOK_ALIKE])
    try:
        ours = int(parent.stdout.readline())
        for pid in (ours, look_alike.pid):
            (svc.pid_dir / f"unknown-{pid}.pid").write_text(f"{pid}\n")
        stopped = svc.run("stop", check=True)
        assert not pid_alive(ours), stopped.stdout
        assert look_alike.poll() is None and f"removed stale unknown-{look_alike.pid}.pid" in stopped.stdout
        assert _service_processes(no_leftovers, exclude=(parent.pid, look_alike.pid)) == []
        assert not list(svc.pid_dir.glob("*.pid"))
    finally:
        for proc in (parent, look_alike):
            proc.kill()
            proc.wait()


_SLOW_STARTER = ("import os, sys, time  # hadctl.worker look-alike, slow to start\n"
                 "time.sleep(0.3)  # the interpreter is still starting: no sign yet of its service\n"
                 "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)  # as a worker watches pid_dir\n"
                 "sys.exit(0 if os.path.exists(os.path.join(sys.argv[1], 'standby-stop-file')) else 3)\n")


def test_stop_waits_for_a_replacement_standby_still_starting(service, no_leftovers):
    """A main that is stopped may have just spawned its replacement standby, named in
    pid_dir (unknown-PID.pid) at once; its main gone, only its hold on the alive lock
    (shared with its main from birth) shows it is ours. stop must not return 0 while
    it runs, and gives it signal_kill_timeout to leave on seeing the stop file."""
    svc = service(kill_timeout=2)
    svc.run("start", check=True)
    alive = os.open(svc.pid_dir / "hadctl-alive.lock", os.O_RDONLY)
    fcntl.flock(alive, fcntl.LOCK_SH)  # as its main's, which it inherits
    try:
        starter = subprocess.Popen([sys.executable, "-c", _SLOW_STARTER, str(svc.pid_dir)], start_new_session=True,
                                   pass_fds=[alive])
    finally:
        os.close(alive)
    try:
        (svc.pid_dir / f"unknown-{starter.pid}.pid").write_text(f"{starter.pid}\n")
        svc.run("stop", check=True)
        assert_stopped_clean(svc, no_leftovers)
        assert starter.wait(timeout=10) == 0  # it left by itself, seeing the stop file
    finally:
        starter.kill()
        starter.wait()


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_junk_in_place_of_the_standby_stop_file_neither_hangs_nor_escapes(service, tmp_path, no_leftovers, kind):
    """stop touches PID_DIR/standby-stop-file: a FIFO there made it hang for ever, and a
    symlink made it (root) create the link's target wherever that pointed."""
    svc = service()
    svc.run("start", check=True)
    outside = tmp_path / "created-through-a-link"
    stop_file = svc.pid_dir / "standby-stop-file"
    if kind == "symlink":
        stop_file.symlink_to(outside)
    else:
        os.mkfifo(stop_file)
    svc.run("stop", timeout=20, check=True)
    assert_stopped_clean(svc, no_leftovers)
    assert not outside.exists()
    assert stop_file.exists() and not stop_file.is_symlink()


@pytest.mark.skipif(os.geteuid() != 0, reason="the rule is for root controllers; chown needs root (CI is root)")
@pytest.mark.parametrize("planted, status", [("hadctl.log", 4), ("hadctl.lock", 4), ("lock/1.lock", 1)])
def test_links_planted_in_a_pid_dir_its_user_owns_are_never_followed_by_root(service, tmp_path, no_leftovers,
                                                                            planted, status):
    """pid_dir belongs to the service's user, who could swap hadctl's files there for links
    to /etc/passwd: a root controller must neither create nor append to their targets."""
    svc = service()
    svc.write(**{**svc.settings, "log_file": str(svc.pid_dir / "hadctl.log")})
    svc.run("start", check=True)
    svc.run("stop", check=True)
    for path in [svc.pid_dir, *svc.pid_dir.rglob("*")]:
        os.chown(path, 65534, 65534)  # nobody, as _prepare leaves it for user = "nobody"
    target = tmp_path / "target-of-the-link"
    link = svc.pid_dir / planted
    link.unlink()
    link.symlink_to(target)
    result = svc.run("start")
    assert result.returncode == status and "Traceback" not in result.stderr, result.stderr
    assert str(link) in result.stderr.splitlines()[0], result.stderr  # then, for 1: "check LOG for details"
    for action in ("status", "stop", "fork"):
        svc.run(action)
    assert not target.exists(), f"root wrote {target} through {link}"
    assert _service_processes(no_leftovers) == []
    link.unlink()
    svc.run("start", check=True)
    svc.run("stop", check=True)
    assert_stopped_clean(svc, no_leftovers)


# ------------------------------------------------------------------ 3. controllers at once


def test_twenty_controllers_at_once_leave_a_coherent_state(service, no_leftovers):
    """Batches of start/fork/restart/stop released at the same moment.

    Controllers take turns on the control lock, so the state after a batch is
    that left by the last of them to change it. The standby stop file tells
    which: it exists exactly when that last one was a stop (start and restart
    remove it, fork never touches it). Then nothing may run; else every slot
    is held by exactly one process, and no other process of the service lives.
    """
    seed = int(os.environ.get("HADCTL_CHAOS_SEED") or random.SystemRandom().randrange(1 << 32))
    rng = random.Random(seed)
    svc = service(kill_timeout=1, start_limit_burst=10000, locks={"max_procs": 2, "standby_max_procs": 2})
    env = dict(os.environ)
    stop_times: list[tuple[float, float]] = []
    for number in range(PARALLEL_ROUNDS):
        with_stop = number % 2 == 1
        weights = {"start": 3, "fork": 3, "restart": 1, "stop": 1 if with_stop else 0}  # a restart costs most
        actions = rng.choices(list(weights), list(weights.values()), k=PARALLEL_COMMANDS)
        where = f"seed {seed}, round {number}: {actions}"
        if not with_stop and (svc.pid_dir / "standby-stop-file").exists():
            svc.run("start", check=True)  # else a fork that comes first rightly refuses
        began = time.monotonic()
        results = chaos.run_together([["-c", str(svc.config), a] for a in actions], env)
        if "stop" in actions:
            stop_times.append((began, time.monotonic()))
        for action, result in zip(actions, results, strict=False):
            allowed = {0, 1} if action == "fork" and with_stop else {0}
            assert result.returncode in allowed and "Traceback" not in result.stderr, \
                f"{where}\n{action} exited {result.returncode}: {result.stdout}{result.stderr}"
            if result.returncode == 1:
                assert "standby stop file" in result.stderr, f"{where}\n{result.stderr}"
        if (svc.pid_dir / "standby-stop-file").exists():
            assert "stop" in actions, where
            assert_stopped_clean(svc, no_leftovers)
        else:
            _assert_exactly_full(svc, no_leftovers, where)
        if number % 3 == 2:  # a lone stop after the batch
            began = time.monotonic()
            svc.run("stop", check=True)
            stop_times.append((began, time.monotonic()))
            assert_stopped_clean(svc, no_leftovers)
    began = time.monotonic()
    svc.run("stop", check=True)
    stop_times.append((began, time.monotonic()))
    assert_stopped_clean(svc, no_leftovers)
    events = chaos.read_ledger(svc.ledger)
    assert events, "no main ever entered the function"
    intervals = chaos.main_intervals(events, [], stop_times)
    assert all(end != float("inf") for _start, end in intervals.values()), intervals
    assert chaos.check_exclusion(intervals, 2) == []


def _assert_exactly_full(svc: Any, marker: str, where: str) -> None:
    data = svc.status()
    holders = {(s["role"], s["slot"]): s["pid"] for s in data["slots"]}
    assert data["exit_status"] == 0 and len(set(holders.values())) == 4, f"{where}\n{data}"
    for (role, slot), pid in holders.items():
        assert svc.pid_of(role, slot) == pid, f"{where}\n{role}-{slot}.pid does not name {pid}"
    # Workers that found every slot taken leave by themselves: only the holders stay.
    wait_until(lambda: sorted(_service_processes(marker)) == sorted(holders.values()), 10,
               f"only the 4 holders to run ({where})")
    assert not list(svc.pid_dir.glob("unknown-*.pid"))


# ------------------------------------------------------------------ 4. the main's lock fd


def test_children_of_a_sigkilled_main_do_not_keep_its_slot(service, tmp_path):
    report = tmp_path / "children"
    ledger = tmp_path / "ledger"
    svc = service(entrypoint="tests.services.basic:with_children_everywhere", respawn_standby=False,
                  kill_mode="process",  # they must outlive the failover to show none keeps the slot
                  env={"REPORT": str(report), "LEDGER": str(ledger)})
    svc.run("start", check=True)
    wait_until(report.exists, 10, "the children's pids")
    children = [int(word) for word in report.read_text().split()]
    try:
        main, standby = svc.pid_of("main"), svc.pid_of("standby")
        folders = {"main": str(svc.pid_dir / "lock"), "standby": str(svc.pid_dir / "lock-standby")}
        # A forked child holds the inherited fd until it runs its first instructions (the
        # at-fork handler closes it); a child not scheduled yet still has it (seen under load).
        wait_until(lambda: chaos.lock_holders(children, folders) == {"main": set(), "standby": set()}, 5,
                   "the children to close the lock fd they inherited")
        killed_at = time.monotonic()
        os.kill(main, signal.SIGKILL)
        wait_until(lambda: standby in _ledger_events(ledger, "enter"), 5, "the standby inside the function")
        entered = next(float(line.split()[2]) for line in ledger.read_text().splitlines()
                       if line.startswith(f"enter {standby} "))
        assert entered - killed_at < 1.0, f"the standby took {entered - killed_at:.3f} s"
        assert svc.holders("main") == [standby]
        assert all(pid_alive(child) for child in children)  # alive, yet none kept the slot
        svc.write(**{**svc.settings, "kill_mode": "group"})  # so that the final stop ends the new main's children
    finally:
        for child in children:
            try:
                os.kill(child, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_stop_with_kill_mode_group_ends_every_child_of_the_main(service, tmp_path, no_leftovers):
    report = tmp_path / "children"
    svc = service(entrypoint="tests.services.basic:with_children_everywhere",
                  env={"REPORT": str(report), "LEDGER": str(tmp_path / "ledger")})
    svc.run("start", check=True)
    wait_until(report.exists, 10, "the children's pids")
    svc.run("stop", check=True)
    assert_stopped_clean(svc, no_leftovers)


# ------------------------------------------------------------------ 5. bad input

DATETIME = "1979-05-27T07:32:00Z"
INLINE_TABLE = "{ nested = true }"
# Per key, one more value of a type it never accepts (beyond the date-time, refused everywhere).
STRING_KEYS = {"name", "entrypoint", "pid_dir", "log_file", "stdout_file", "stderr_file", "user", "group",
               "directory", "main_stop_file", "standby_stop_file", "main_upgrade_file", "warmup", "kill_mode",
               "locks.engine", "locks.hosts", "locks.root", "locks.path", "locks.standby_path"}
WRONG_TYPE = {
    **{key: "42" for key in STRING_KEYS}, **{f"init.{key}": "42" for key in INIT_KEYS},
    "args": '"not a list"', "python_path": "[1, 2]", "env": '["A=1"]', "umask": "true",
    "stop_signals": '"TERM"', "process_name_change": '"yes"', "close_fds_on_start": "1",
    "reset_close_on_exec_main_lock_fd": '"no"', "quiet": "0", "respawn_standby": '"true"',
    "uid": '"0"', "gid": "0.5", "start_limit_burst": "2.5", "locks.max_procs": '"2"',
    "locks.standby_max_procs": "1.0", "locks.retries": "true",
    **{key: '"1s"' for key in ("kill_timeout", "signal_kill_timeout", "stop_file_kill_timeout", "upgrade_timeout",
                               "start_limit_interval", "restart_backoff_max", "ready_timeout",
                               "locks.session_timeout", "locks.fence_grace", "locks.interval",
                               "watchdog_timeout")},
    "listen": '"127.0.0.1:80"', "listen_backlog": '"8"', "listen_mode": "1.5", "watchdog_signal": "6",
    "max_rss": "true", "env_file": "3", "pass_env": '"HOME"', "reopen_signal": "12", "syslog_facility": "3",
    **{f"limits.{key}": "1.5" for key in ("nofile", "nproc", "core", "memlock", "as", "memory_max", "pids_max")},
    "limits.cpu_max": "0.5",
}


def _good_lines(folder: Path) -> list[str]:
    return ['name = "svc"', 'entrypoint = "tests.services.basic:serve"', f'python_path = ["{ROOT}"]',
            f'pid_dir = "{folder / "run"}"', f'log_file = "{folder / "hadctl.log"}"']


def _config_with(folder: Path, key: str, value: str) -> str:
    """The good config with ``key`` ("locks.max_procs" style) set to the TOML ``value``."""
    table, _, name = key.rpartition(".")
    lines = [line for line in _good_lines(folder) if not line.startswith(f"{name} =") or table]
    if table:
        return "\n".join(lines) + f"\n[{table}]\n{name} = {value}\n"
    return "\n".join(lines) + f"\n{name} = {value}\n"


def _refusal_cases() -> list[tuple[str, str]]:
    keys = all_keys()
    # a date-time is refused everywhere; an inline table is tried where tables are near
    return [(key, value) for key in keys
            for value in (DATETIME, WRONG_TYPE.get(key, INLINE_TABLE), INLINE_TABLE if key in ("args", "env") else None)
            if value is not None]


def _run_in(folder: Path, config: Path, *args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HADCTL, "-c", str(config), *args], capture_output=True, text=True, timeout=timeout,
                          cwd=folder)


def test_every_key_with_a_wrong_type_is_refused_with_6_and_one_line(tmp_path, no_leftovers):
    assert set(WRONG_TYPE) - set(all_keys()) == set(), "WRONG_TYPE names a key the loader does not know"
    cases = _refusal_cases()

    def one(index_case: tuple[int, tuple[str, str]]) -> str | None:
        index, (key, value) = index_case
        folder = tmp_path / f"case{index}"
        (folder / "run").mkdir(parents=True)
        (folder / "run" / "keep").write_text("x")
        config = folder / "svc.toml"
        config.write_text(_config_with(folder, key, value))
        before = _snapshot(folder)
        result = _run_in(folder, config, "start")
        problems = []
        if result.returncode != 6 or "Traceback" in result.stderr or len(result.stderr.strip().splitlines()) != 1:
            problems.append(f"exit {result.returncode}, stderr {result.stderr!r}")
        elif f'key "{key}"' not in result.stderr or str(config) not in result.stderr:
            problems.append(f"the message does not name the file and the key: {result.stderr!r}")
        if _snapshot(folder) != before:
            problems.append("the folder changed")
        return f"{key} = {value}: {'; '.join(problems)}" if problems else None

    with ThreadPoolExecutor(4) as pool:
        failures = [f for f in pool.map(one, enumerate(cases)) if f]
    assert failures == [], "\n".join(failures)
    assert _service_processes(no_leftovers) == []


BAD_FILES: list[tuple[str, str, str]] = [
    # (what, TOML text after the good lines or "!" + whole text, words expected in the message)
    ("max_procs zero", "[locks]\nmax_procs = 0", 'key "locks.max_procs"'),
    ("max_procs negative", "[locks]\nmax_procs = -1", 'key "locks.max_procs"'),
    ("max_procs huge", "[locks]\nmax_procs = 100000", 'key "locks.max_procs"'),
    ("standby_max_procs negative", "[locks]\nstandby_max_procs = -2", 'key "locks.standby_max_procs"'),
    ("retries negative", "[locks]\nretries = -1", 'key "locks.retries"'),
    ("interval zero", "[locks]\ninterval = 0", 'key "locks.interval"'),
    ("start_limit_burst zero", "start_limit_burst = 0", 'key "start_limit_burst"'),
    ("kill_timeout negative", "kill_timeout = -1", 'key "kill_timeout"'),
    ("kill_timeout infinite", "kill_timeout = inf", 'key "kill_timeout"'),
    ("kill_timeout nan", "kill_timeout = nan", 'key "kill_timeout"'),
    ("umask too big", 'umask = "1777"', 'key "umask"'),
    ("unknown signal", 'stop_signals = ["TERM", "BOGUS"]', 'key "stop_signals"'),
    ("empty stop_signals", "stop_signals = []", 'key "stop_signals"'),
    ("unknown top key", "bogus = 1", 'unknown key "bogus"'),
    ("unknown locks key", "[locks]\nbogus = 1", 'unknown key "locks.bogus"'),
    ("unknown init key", "[init]\nbogus = 1", 'unknown key "init.bogus"'),
    ("unknown table", "[bogus]\nx = 1", '"bogus"'),
    ("locks not a table", "locks = 3", 'key "locks"'),
    ("unknown user", 'user = "no-such-user-xyz"', "unknown user"),
    ("unknown group", 'group = "no-such-group-xyz"', "unknown group"),
    ("uid without passwd entry nor gid", "uid = 3999999", 'key "uid"'),
    ("entrypoint without colon", '!name = "svc"\nentrypoint = "tests.services.basic"\npid_dir = "r"\nlog_file = "l"',
     'key "entrypoint"'),
    ("entrypoint path", '!name = "svc"\nentrypoint = "tests/services/basic.py:serve"\npid_dir = "r"\nlog_file = "l"',
     'key "entrypoint"'),
    ("entrypoint two colons", '!name = "svc"\nentrypoint = "a:b:c"\npid_dir = "r"\nlog_file = "l"', 'key "entrypoint"'),
    ("name with a slash", '!name = "a/b"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"', 'key "name"'),
    # names and paths are printed and written: no control characters in them (ESC, CR, U+2028)
    *[(f"name with {what}", f'!name = "a{char}b"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"', 'key "name"')
      for what, char in (("ESC", "\\u001b"), ("CR", "\\r"), ("U+2028", "\\u2028"))],
    ("stdout_file with a newline", 'stdout_file = "a\\nb"', 'key "stdout_file"'),
    ("user with ESC", 'user = "a\\u001b"', 'key "user"'),
    ("uid beyond 2^32-2", "uid = 4294967295", 'key "uid"'),
    ("gid negative", "gid = -1", 'key "gid"'),
    ("args nested 500 deep", "args = " + "[" * 500 + "]" * 500, "nested too deep"),
    ("args nested 40 deep", "args = " + "[" * 40 + "]" * 40, 'key "args"'),
    ("NUL in an env value", 'env = { A = "x\\u0000y" }', 'key "env"'),
    ("ESC in an env name", 'env = { "A\\u001b" = "x" }', 'key "env"'),
    ("NUL in args", 'args = ["x\\u0000"]', 'key "args"'),
    ("listen without port", 'listen = ["127.0.0.1"]', 'key "listen"'),
    ("listen port out of range", 'listen = ["127.0.0.1:65536"]', 'key "listen"'),
    ("listen v6 without brackets", 'listen = ["::1:80"]', 'key "listen"'),
    ("listen relative unix path", 'listen = ["unix:run/x.sock"]', 'key "listen"'),
    ("listen twice", 'listen = ["*:80", "*:80"]', 'key "listen"'),
    ("watchdog_signal STOP", 'watchdog_signal = "STOP"', 'key "watchdog_signal"'),
    ("max_rss bad unit", 'max_rss = "12X"', 'key "max_rss"'),
    ("cpu_max without %", '[limits]\ncpu_max = "50"', 'key "limits.cpu_max"'),
    ("unknown limit", '[limits]\nstack = 1', 'unknown key "limits.stack"'),
    ("pass_env bad name", 'pass_env = ["A=B"]', 'key "pass_env"'),
    ("unknown facility", 'syslog_facility = "local9"', 'key "syslog_facility"'),
    ("directory missing", 'directory = "/nonexistent/folder"', 'key "directory"'),
    ("duplicate key", '!name = "a"\nname = "b"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"', "invalid TOML"),
    ("unclosed string", '!name = "svc\nentrypoint = "a:b"', "invalid TOML"),
    ("no value", "!name =\n", "invalid TOML"),
    ("empty file", "!", 'missing required key "name"'),
    *[(f"missing {key}", "!" + "\n".join(f'{k} = "a:b"' for k in REQUIRED if k != key), f'missing required key "{key}"')
      for key in REQUIRED],
]


@pytest.mark.parametrize("what, text, words", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_service_file_is_refused_with_6_one_line_and_nothing_changed(tmp_path, no_leftovers, what, text, words):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "keep").write_text("x")
    config = tmp_path / "svc.toml"
    body = text[1:] if text.startswith("!") else "\n".join(_good_lines(tmp_path)) + "\n" + text + "\n"
    config.write_text(body)
    before = _snapshot(tmp_path)
    for action in ("start", "status", "stop", "restart", "fork"):
        line = assert_one_line(_run_in(tmp_path, config, action), (6,))
        assert words in line and str(config) in line, line
    assert _snapshot(tmp_path) == before
    assert _service_processes(no_leftovers) == []


@pytest.mark.parametrize("what, content", [
    ("binary garbage", bytes(range(256)) * 8),
    ("not UTF-8", b'name = "\xff\xfe"\n'),
    ("10 MB", b"# " + b"x" * (10 * 1024 * 1024) + b"\n"),
    ("NUL bytes", b"\0" * 100),
])
def test_garbage_service_file_is_refused_with_6_and_one_line(tmp_path, no_leftovers, what, content):
    config = tmp_path / "svc.toml"
    config.write_bytes(content)
    for action in ("start", "status"):
        line = assert_one_line(_run_in(tmp_path, config, action), (6,))
        assert str(config) in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.toml"]
    assert _service_processes(no_leftovers) == []


def test_special_files_as_service_file_are_refused_at_once(tmp_path, no_leftovers):
    fifo = tmp_path / "fifo.toml"
    os.mkfifo(fifo)
    for path in (fifo, Path("/dev/zero"), Path("/dev/urandom"), tmp_path):
        result = _run_in(tmp_path, path, "status", timeout=20)
        if result.returncode == 2:  # click's usage error: usage, then the reason
            assert "is a directory" in result.stderr and "Traceback" not in result.stderr, result.stderr
        else:
            line = assert_one_line(result, (6,))
            assert str(path) in line, line


@pytest.mark.parametrize("what, make", [
    ("pid_dir under a regular file", lambda f: {"pid_dir": str(f / "file" / "run")}),
    ("pid_dir is a regular file", lambda f: {"pid_dir": str(f / "file")}),
    ("log_file is a folder", lambda f: {"log_file": str(f / "folder")}),
    ("log_file under a regular file", lambda f: {"log_file": str(f / "file" / "log")}),
    ("stdout_file under a regular file", lambda f: {"stdout_file": str(f / "file" / "out")}),
    ("locks.path under a regular file", lambda f: {"locks": {"path": str(f / "file" / "lock")}}),
    ("log_file is a FIFO", lambda f: {"log_file": str(f / "fifo")}),  # opening it would block for ever
    ("stderr_file is a FIFO", lambda f: {"stderr_file": str(f / "fifo")}),
])
def test_unusable_paths_are_refused_before_anything_runs(service, tmp_path, no_leftovers, what, make):
    (tmp_path / "file").write_text("a regular file\n")
    (tmp_path / "folder").mkdir()
    os.mkfifo(tmp_path / "fifo")
    svc = service(**make(tmp_path))
    before = _snapshot(tmp_path)
    for action in ("start", "restart", "fork", "hard-restart"):
        line = assert_one_line(svc.run(action, timeout=20), (6,))
        assert str(tmp_path) in line, line
    assert _snapshot(tmp_path) == before
    assert _service_processes(no_leftovers) == []


@pytest.fixture
def immutable(tmp_path):
    """chattr +i on paths (even root may not write there); undone at teardown."""
    assert os.geteuid() == 0 and shutil.which("chattr"), "chattr +i needs root and e2fsprogs (CI runs as root)"
    done: list[Path] = []

    def make(path: Path) -> Path:
        subprocess.run(["chattr", "+i", str(path)], check=True)
        done.append(path)
        return path

    yield make
    for path in reversed(done):
        subprocess.run(["chattr", "-i", str(path)], check=True)


@pytest.mark.parametrize("what", ["pid_dir", "log_file"])
def test_unwritable_pid_dir_or_log_file_is_refused_with_4(service, immutable, no_leftovers, what):
    svc = service()
    svc.pid_dir.mkdir()
    svc.log_file.write_text("")
    immutable(svc.pid_dir if what == "pid_dir" else svc.log_file)
    before = _snapshot(svc.folder)
    for action in ("start", "restart", "fork"):
        line = assert_one_line(svc.run(action), (4,))
        assert str(svc.pid_dir if what == "pid_dir" else svc.log_file) in line, line
    assert _snapshot(svc.folder) == before
    assert _service_processes(no_leftovers) == []


def test_a_user_who_may_not_write_pid_dir_is_refused_with_4(no_leftovers):
    assert os.geteuid() == 0 and shutil.which("runuser"), "becoming nobody needs root and runuser (CI runs as root)"
    folder = Path(tempfile.mkdtemp(prefix="hadctl-nobody-"))
    try:
        folder.chmod(0o755)
        (folder / "run").mkdir(mode=0o755)
        config = folder / "svc.toml"
        config.write_text("\n".join(_good_lines(folder)) + "\n")
        config.chmod(0o644)
        before = _snapshot(folder)
        for action in ("start", "fork"):
            result = subprocess.run(["runuser", "-u", "nobody", "--", *HADCTL, "-c", str(config), action],
                                    capture_output=True, text=True, timeout=30, cwd="/")
            line = assert_one_line(result, (4,))
            assert str(folder / "run") in line, line
        config.chmod(0o600)  # a service file nobody may not read
        result = subprocess.run(["runuser", "-u", "nobody", "--", *HADCTL, "-c", str(config), "status"],
                                capture_output=True, text=True, timeout=30, cwd="/")
        assert result.returncode in (2, 6) and "Traceback" not in result.stderr, result  # click says usage, 2
        assert "not readable" in result.stderr or "permission denied" in assert_one_line(result, (6,)), result.stderr
        assert _snapshot(folder) == before
        assert _service_processes(no_leftovers) == []
    finally:
        shutil.rmtree(folder)


@pytest.mark.parametrize("entrypoint, words", [
    ("tests.services.broken:serve", "broken on purpose"),
    ("tests.services.basic:NOT_CALLABLE", "not callable"),
    ("tests.services.no_such_module:serve", "No module named"),
])
def test_an_entrypoint_that_cannot_run_is_refused_with_5_and_leaves_nothing(service, no_leftovers, entrypoint, words):
    svc = service(entrypoint=entrypoint, locks={"max_procs": 2, "standby_max_procs": 2})
    result = svc.run("start", check=5)
    assert "Traceback" not in result.stdout + result.stderr
    failed = [line for line in result.stderr.splitlines() if "check " not in line or "for details" not in line]
    assert len(failed) == 1 and words in failed[0], result.stderr  # plus at most "check LOG for details"
    wait_until(lambda: not _service_processes(no_leftovers), 10, "the refused workers to leave")
    assert not list(svc.pid_dir.glob("*.pid")) and not _held_slots(svc)


@pytest.mark.parametrize("argv, statuses, words", [
    (["start"], (2,), "-c/--config"),
    (["-c", "{config}", "dance"], (2,), "No such command"),
    (["-c"], (2,), "requires an argument"),
    (["-c", "{config}", "start", "now"], (2,), "unexpected extra argument"),
    (["-c", "{config}", "status", "--bogus"], (2,), "No such option"),
    (["--bogus"], (2,), "No such option"),
    (["-c", "{missing}", "start"], (6,), "no such file"),
    (["-c", "{missing}", "status"], (6,), "no such file"),
])
def test_bad_command_lines_exit_2_or_6_with_usage_or_one_line(tmp_path, no_leftovers, argv, statuses, words):
    config = tmp_path / "svc.toml"
    config.write_text("\n".join(_good_lines(tmp_path)) + "\n")
    argv = [a.format(config=config, missing=tmp_path / "missing.toml") for a in argv]
    result = subprocess.run([*HADCTL, *argv], capture_output=True, text=True, timeout=30)
    assert result.returncode in statuses, result
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr
    if result.returncode != 2:
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["svc.toml"]



@pytest.mark.parametrize("argv", [["status"], ["status", "--json"], ["--help"]])
def test_output_to_a_closed_pipe_is_no_internal_error(service, no_leftovers, argv):
    """hadctl status | head -1: the reader goes away; hadctl says nothing more, exits 1."""
    svc = service()
    read, write = os.pipe()
    os.close(read)
    try:
        result = subprocess.run([*HADCTL, *(["-c", str(svc.config)] if argv != ["--help"] else []), *argv],
                                stdout=write, stderr=subprocess.PIPE, text=True, timeout=30)
    finally:
        os.close(write)
    assert result.returncode == 1 and result.stderr == "", result.stderr
    assert "internal error" not in (svc.log_file.read_text() if svc.log_file.exists() else "")

# ---- property: any TOML document gives a valid start or a clean refusal

_SCALAR = st.one_of(
    st.text(st.characters(blacklist_categories=("Cs",)), max_size=12).map(json.dumps),
    st.integers(-3, 3).map(str), st.integers(-10**20, 10**20).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(lambda x: "nan" if x != x else repr(x)),
    st.booleans().map(lambda b: "true" if b else "false"),
    st.just(DATETIME), st.just("07:32:00"), st.just("1979-05-27"),
)
_ANY = st.one_of(_SCALAR, st.lists(_SCALAR, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"),
                 st.dictionaries(st.sampled_from(["a", "b", "TERM", "x-y"]), _SCALAR, max_size=2).map(
                     lambda d: "{ " + ", ".join(f"{json.dumps(k)} = {v}" for k, v in d.items()) + " }"))
# Values that are valid and safe here (small counts, short timeouts, signals that end serve).
_VALID: dict[str, st.SearchStrategy[str]] = {
    "name": st.sampled_from(['"svc"', '"svc-2.x"']), "args": st.sampled_from(["[]", '["a", 1, { b = [true] }]']),
    "umask": st.sampled_from(['"022"', "18", '"0o077"']), "env": st.sampled_from(["{}", '{ A = "1", B = 2 }']),
    "stop_signals": st.sampled_from(['["TERM", "KILL"]', '["SIGINT", "KILL"]']),
    "kill_timeout": st.sampled_from(["0.5", "1"]), "signal_kill_timeout": st.sampled_from(["0", "0.5"]),
    "stop_file_kill_timeout": st.just("0.5"), "upgrade_timeout": st.just("1"), "ready_timeout": st.just("5"),
    "kill_mode": st.sampled_from(['"group"', '"process"']), "process_name_change": st.sampled_from(["true", "false"]),
    "close_fds_on_start": st.sampled_from(["true", "false"]), "respawn_standby": st.sampled_from(["true", "false"]),
    "reset_close_on_exec_main_lock_fd": st.sampled_from(["true", "false"]), "quiet": st.sampled_from(["true", "false"]),
    "start_limit_burst": st.sampled_from(["1", "5"]), "start_limit_interval": st.just("10"),
    "restart_backoff_max": st.just("5"), "user": st.just('"root"'), "group": st.just('"root"'), "uid": st.just("0"),
    "gid": st.just("0"), "warmup": st.just('"tests.services.basic:warm"'),
    "stdout_file": st.just('"{folder}/out.log"'), "stderr_file": st.just('"{folder}/err.log"'),
    "directory": st.just('"{folder}"'), "standby_stop_file": st.just('"{folder}/no-standbys"'),
    "main_upgrade_file": st.just('"{folder}/upgrade-%p"'),
    "locks.engine": st.just('"flock"'), "locks.hosts": st.just('"zk1:2181"'), "locks.root": st.just('"/x"'),
    "locks.session_timeout": st.just("6"), "locks.fence_grace": st.just("1"),
    "locks.max_procs": st.sampled_from(["1", "2"]), "locks.standby_max_procs": st.sampled_from(["0", "1", "2"]),
    "locks.interval": st.sampled_from(["0.5", "1"]), "locks.retries": st.sampled_from(["3", "100"]),
    "locks.path": st.just('"{folder}/main-locks"'), "locks.standby_path": st.just('"{folder}/standby-locks"'),
    **{f"init.{key}": st.just('"text"') for key in INIT_KEYS},
}
# Keys whose random values could be valid yet unsafe here (many processes, long waits,
# other users, other folders): they get only values of a wrong type.
_DANGEROUS = {"locks.max_procs", "locks.standby_max_procs", "stop_signals", "user", "uid", "group", "gid",
              "kill_timeout", "signal_kill_timeout", "stop_file_kill_timeout", "main_stop_file", "ready_timeout",
              "warmup", "directory", "python_path", "env", "locks.engine", "locks.hosts", "pid_dir", "log_file",
              "stdout_file", "stderr_file", "standby_stop_file", "locks.path", "locks.standby_path",
              "main_upgrade_file", "name", "entrypoint", "locks.interval", "locks.retries",
              # sockets, a watchdog, memory and rlimits, the environment: valid values change
              # what a worker may do here (bind ports, be killed early), so wrong types only
              "listen", "listen_backlog", "listen_mode", "watchdog_timeout", "watchdog_signal", "max_rss",
              "env_file", "pass_env", "reopen_signal", "syslog_facility"}


@st.composite
def _documents(draw: Any) -> dict[str, str]:
    """key ("locks.x" style) -> TOML value text ("required" for the usual value of a required key).

    Half of the documents hold only valid values, a quarter one wrong value
    among valid ones, a quarter random values for any key.
    """
    every = list(TOP_KEYS) + [f"locks.{k}" for k in LOCKS_KEYS] + [f"init.{k}" for k in INIT_KEYS]
    mode = draw(st.sampled_from(["valid", "valid", "one wrong", "random"]))

    def wrong(key: str) -> str:
        if key in _DANGEROUS:
            return draw(st.sampled_from([DATETIME, INLINE_TABLE, "[[1]]" if key != "stop_signals" else "3"]))
        return draw(_ANY)

    doc: dict[str, str] = {}
    for key in every:
        if key in REQUIRED and (mode != "random" or draw(st.integers(0, 9)) > 0):
            doc[key] = "required"
        elif draw(st.integers(0, 3)) == 0:
            doc[key] = draw(_VALID[key]) if key in _VALID and (mode != "random" or draw(st.booleans())) else wrong(key)
        if key in doc and doc[key] != "required" and key not in _VALID and mode != "random":
            del doc[key]  # no valid value known for it here
    if mode == "one wrong":
        doc[draw(st.sampled_from(every))] = wrong(draw(st.sampled_from(every)))
    if mode != "valid" and draw(st.integers(0, 4)) == 0:
        doc[draw(st.sampled_from(["bogus", "locks.bogus", "init.bogus", "program_args"]))] = "1"
    return doc


def _render(doc: dict[str, str], folder: Path) -> str:
    required = {"name": '"svc"', "entrypoint": '"tests.services.basic:serve"', "pid_dir": f'"{folder / "run"}"',
                "log_file": f'"{folder / "hadctl.log"}"'}
    top = [f"python_path = {json.dumps([str(ROOT)])}"] if "python_path" not in doc else []
    tables: dict[str, list[str]] = {"locks": [], "init": []}
    for key, value in doc.items():
        value = required.get(key, value) if value == "required" else value.replace("{folder}", str(folder))
        table, _, name = key.rpartition(".")
        (tables[table] if table else top).append(f"{name} = {value}")
    text = "\n".join(top) + "\n"
    for table, lines in tables.items():
        if lines:
            text += f"[{table}]\n" + "\n".join(lines) + "\n"
    return text


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(doc=_documents())
def test_any_service_file_starts_cleanly_or_is_refused_with_one_line(tmp_path, no_leftovers, doc):
    folder = Path(tempfile.mkdtemp(dir=tmp_path))
    config = folder / "svc.toml"
    config.write_text(_render(doc, folder))
    status = _run_in(folder, config, "status")
    assert "Traceback" not in status.stdout + status.stderr, status.stderr
    event(f"status exits {status.returncode}")
    if status.returncode in (4, 5, 6):
        assert_one_line(status, (4, 5, 6))
        assert _snapshot(folder).keys() == {"svc.toml"}
        return
    assert status.returncode == 3, (status.returncode, status.stdout, status.stderr)
    start = _run_in(folder, config, "start")
    event(f"start exits {start.returncode}")
    try:
        assert "Traceback" not in start.stdout + start.stderr, start.stderr
        if start.returncode == 5:
            assert "cannot" in start.stderr
        elif start.returncode != 0:
            assert_one_line(start, (4, 6))
    finally:
        stop = _run_in(folder, config, "stop")
    assert stop.returncode == 0 and "Traceback" not in stop.stderr, (stop.stdout, stop.stderr)
    wait_until(lambda: not _service_processes(no_leftovers), 10, "the service to be gone")


# ------------------------------------------------------------------ 6. resource faults


def test_log_file_deleted_then_unwritable_while_running(service, immutable, no_leftovers):
    svc = service(respawn_standby=True)
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    svc.log_file.unlink()
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: svc.holders("main") == [standby], 5, "the failover with the log file gone")
    wait_until(lambda: len(svc.holders("standby")) == 1, 10, "the replacement standby")
    assert svc.log_file.exists()  # the workers write it anew
    svc.run("fork", check=True)
    svc.log_file.write_text("")
    immutable(svc.log_file)
    line = assert_one_line(svc.run("fork"), (4,))
    assert str(svc.log_file) in line
    assert svc.run("status", check=True).returncode == 0
    stopped = svc.run("stop", check=True)
    assert "[Stopped]" in stopped.stdout
    assert_stopped_clean(svc, no_leftovers)


def test_log_file_replaced_by_a_folder_while_running(service, no_leftovers):
    svc = service()
    svc.run("start", check=True)
    svc.log_file.unlink()
    svc.log_file.mkdir()
    line = assert_one_line(svc.run("restart"), (6,))
    assert str(svc.log_file) in line
    assert len(svc.holders("main")) == 1
    svc.run("stop", check=True)
    assert_stopped_clean(svc, no_leftovers)


def test_pid_dir_removed_while_running(service, no_leftovers):
    """The locks lived in pid_dir: its processes now hold deleted lock files.
    hadctl must neither start a second set of mains beside them nor say
    "stopped" while they run; stop finds them by their deleted lock files."""
    svc = service(locks={"max_procs": 2, "standby_max_procs": 1})
    svc.run("start", check=True)
    running = sorted(svc.holders("main") + svc.holders("standby"))
    shutil.rmtree(svc.pid_dir)
    status = svc.run("status")
    assert "Traceback" not in status.stderr
    assert status.returncode in (0, 1), status.stdout  # they still run
    for action in ("start", "fork", "restart", "hard-restart"):
        result = svc.run(action)
        assert result.returncode != 0 and "Traceback" not in result.stderr, (action, result.stdout, result.stderr)
        assert sorted(_service_processes(no_leftovers)) == running, f"{action} started more processes"
    svc.run("reload", check=True)  # the mains are found through their deleted lock files
    wait_until(lambda: len(_ledger_events(svc.ledger, "hup")) == 2, 5, "both mains to get SIGHUP")
    stopped = svc.run("stop", check=True)
    assert not any(pid_alive(p) for p in running), stopped.stdout
    assert _service_processes(no_leftovers) == []
    assert len(_ledger_events(svc.ledger, "exit")) == 2  # the mains were stopped, not killed
    svc.run("start", check=True)
    assert len(svc.holders("main")) == 2


@pytest.mark.parametrize("deleted", ["lock/1.lock", "lock-standby/1.lock"])
def test_a_lock_file_deleted_under_its_holder_lets_no_second_process_in(service, no_leftovers, deleted):
    """A cleaner of old files removed one lock file (its folder stays): a fresh file
    would let a second main (or standby) in beside the holder of the deleted one."""
    svc = service(respawn_standby=False)
    svc.run("start", check=True)
    running = {"main": svc.pid_of("main"), "standby": svc.pid_of("standby")}
    holder = running["main" if deleted.startswith("lock/") else "standby"]
    (svc.pid_dir / deleted).unlink()
    status = svc.run("status", check=True)
    assert f"(pid {holder}) (stale: holds a deleted lock file) [Running]" in status.stdout, status.stdout
    for action in ("start", "fork", "restart"):
        result = svc.run(action)
        assert result.returncode == 1 and "Traceback" not in result.stderr, (action, result.stdout, result.stderr)
        assert "whose lock files were deleted" in result.stderr, result.stderr
        assert sorted(_service_processes(no_leftovers)) == sorted(running.values()), f"{action} started more"
    stopped = svc.run("stop", check=True)
    assert f"(pid {holder}) [Stopped]" in stopped.stdout, stopped.stdout
    assert_stopped_clean(svc, no_leftovers)
    svc.run("start", check=True)
    assert len(svc.holders("main")) == 1 and len(svc.holders("standby")) == 1


def test_stop_after_max_procs_was_lowered_ends_every_main(service, no_leftovers):
    """main #3 of the old config still holds lock/3.lock: stop must not leave it running."""
    svc = service(locks={"max_procs": 3, "standby_max_procs": 1})
    svc.run("start", check=True)
    third = svc.pid_of("main", 3)
    svc.write(**{**svc.settings, "locks": {"max_procs": 2, "standby_max_procs": 1}})
    status = svc.run("status", check=True)
    assert f"main #3 (pid {third})" in status.stdout and "beyond max_procs = 2" in status.stdout, status.stdout
    stopped = svc.run("stop", check=True)
    assert f"main #3 (pid {third}) [Stopped]" in stopped.stdout, stopped.stdout
    assert_stopped_clean(svc, no_leftovers)
