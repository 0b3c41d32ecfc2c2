#!/usr/bin/env python3
"""Chaos run for hadctl (issue #6): random faults against one service, then proofs.

A seeded random sequence of operations against a service with max_procs = 2
and standby_max_procs = 2: SIGKILL a main, SIGKILL a standby, SIGSTOP then
SIGCONT a standby (sometimes killing a main meanwhile), ``restart``, ``fork``,
``stop`` + ``start``, three controllers at once, junk dropped in pid_dir, a
controller (start, stop, restart or fork) SIGKILLed after 5-200 ms.
Every main appends ``enter``/``exit`` lines with time.monotonic() to a ledger
(tests/services/basic.py:serve); chaos notes the time of each SIGKILL just
before sending it. Then the checker proves:

1. mutual exclusion: never more than 2 mains inside the function (ledger +
   kill times); never more than 2 holders of main locks nor of standby locks
   (sampled from /proc after every operation, deleted lock files included);
2. availability: a main that died while a standby was waiting is replaced
   inside the function within AVAILABILITY_BOUND (deaths during a deliberate
   stop do not count); the longest such gap is reported;
3. clean stop: after every ``stop`` that returned 0, no process of the
   service runs, no pid file remains, no slot is held;
4. PID safety: a bystander whose pid chaos writes into pid files never gets a
   signal, and neither does chaos itself (its pid goes there too);
5. killed controllers: only a killed ``stop`` may leave the standby stop file,
   and the next ``start`` (after a stop) or ``fork`` exits 0 and restores a
   whole pool (every main and standby slot held, none above them);
and every command exits as documented, without a traceback.

    python tests/chaos.py --operations 1000 [--seed S] [--folder DIR]

The seed is printed first, so a failing run can be replayed with --seed (the
timing of real processes differs from run to run, so a replay is close, not
exact). FOLDER/journal lists what chaos did and when, beside the ledger and
hadctl's log. From pytest: ``run_chaos(operations, seed, folder) -> Result``.
"""
from __future__ import annotations

import argparse
import fcntl
import os
import random
import select
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT / "src") not in sys.path:  # run as a script: find hadctl and the test services
    sys.path[:0] = [str(ROOT / "src"), str(ROOT)]

import support  # noqa: E402 - tests/support.py (this file's folder)
from hadctl.layout import Layout  # noqa: E402
from hadctl.model import Role  # noqa: E402
from hadctl.slots import read_slots  # noqa: E402
from support import describe  # noqa: E402

MAX_PROCS = 2
STANDBY_MAX_PROCS = 2
AVAILABILITY_BOUND = 1.0  # seconds; the target is milliseconds, this bound proves "at once"
MARKER_VARIABLE = "HADCTL_CHAOS_ID"
COMMAND_TIMEOUT = 120.0
LOCK_SAMPLE_GRACE = 0.5  # seconds a surplus of lock holders may last (see Chaos.sample_locks)
WEIGHTS = {
    "kill-main": 20, "kill-standby": 12, "stop-standby": 10, "restart": 10, "fork": 12,
    "stop-start": 6, "together": 8, "junk": 10, "kill-controller": 10,
}
KILL_AFTER = (0.005, 0.2)  # seconds after which a controller is SIGKILLed (kill-controller)
REPAIR_TIMEOUT = 10.0  # seconds the pool may take to be whole after the repairing start or fork


# ------------------------------------------------------------------ processes


def marked_processes(marker: str, variable: str = MARKER_VARIABLE) -> list[int]:
    """Live (non-zombie) processes whose environment holds ``variable=marker``."""
    return support.marked_processes(variable, marker)


def state_of(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            return handle.read().rsplit(b")", 1)[1].split()[0].decode()
    except OSError:
        return "gone"


def lock_holders(pids: list[int], folders: dict[str, str],
                 details: dict[int, list[str]] | None = None) -> dict[str, set[int]]:
    """Which of ``pids`` hold a flock on a file in each folder (deleted files too)."""
    holders: dict[str, set[int]] = {role: set() for role in folders}
    for pid in pids:
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            for role, folder in folders.items():
                if target.startswith(folder + os.sep):
                    try:
                        with open(f"/proc/{pid}/fdinfo/{fd}") as handle:
                            info = handle.read()
                    except OSError:
                        continue
                    if any(line.startswith("lock:") and "FLOCK" in line and "->" not in line
                           for line in info.splitlines()):
                        holders[role].add(pid)
                        if details is not None:
                            details.setdefault(pid, []).append(f"fd {fd} -> {target}")
    return holders


def is_held(lock: Path) -> bool:
    """Someone holds a flock on ``lock`` (tried without waiting, released at once)."""
    try:
        fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def wait_for(predicate: Callable[[], object], timeout: float, step: float = 0.005) -> object:
    """Poll ``predicate`` until truthy or ``timeout``; returns its last value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(step)  # the poll step of a wait with a deadline


# ------------------------------------------------------------------ controllers at once

_GATE = (
    "import os, sys\n"
    "from hadctl.entry import run\n"
    "fd = int(os.environ.pop('HADCTL_GATE_FD'))\n"
    "os.write(fd, b'.')\n"
    "os.close(fd)\n"
    "os.read(0, 1)\n"
    "run(sys.argv[1:])\n"
)


def run_together(argvs: list[list[str]], env: dict[str, str],
                 timeout: float = COMMAND_TIMEOUT) -> list[subprocess.CompletedProcess[str]]:
    """Run several ``hadctl ARGV`` at the same moment; returns their results in order.

    Each controller imports hadctl, says so on a pipe, then blocks reading a
    shared gate pipe; closing the gate's write end releases all at once.
    """
    gate_read, gate_write = os.pipe()
    ready_read, ready_write = os.pipe()
    procs = []
    try:
        procs.extend(subprocess.Popen(
            [sys.executable, "-c", _GATE, *argv], stdin=gate_read, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True, env={**env, "HADCTL_GATE_FD": str(ready_write)},
            pass_fds=(ready_write,)) for argv in argvs)
    finally:
        os.close(gate_read)
        os.close(ready_write)
    seen = 0
    deadline = time.monotonic() + timeout
    while seen < len(procs) and time.monotonic() < deadline:
        if select.select([ready_read], [], [], max(0.0, deadline - time.monotonic()))[0]:
            data = os.read(ready_read, 256)
            if not data:
                break
            seen += len(data)
    os.close(ready_read)
    os.close(gate_write)
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=timeout)
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return results


# ------------------------------------------------------------------ ledger checks


@dataclass
class Kill:
    """A SIGKILL chaos sent, noted just before sending it."""

    pid: int
    when: float
    covered: bool  # a standby (not SIGSTOPped) held a standby slot just before
    role: str = "main"  # the slot chaos saw it hold: "main" or "standby" (a standby may be promoted meanwhile)


@dataclass
class Result:
    operations: int
    seed: int
    violations: list[str] = field(default_factory=list)
    longest_gap: float = 0.0  # death of a covered main -> next main inside
    longest_no_main: float = 0.0  # no main inside at all, outside stops, after a covered death
    failovers: int = 0
    gaps: list[tuple[float, str]] = field(default_factory=list)  # (seconds, "sigkill" or "restart")
    leftovers: int = 0
    duration: float = 0.0
    counts: dict[str, int] = field(default_factory=dict)
    commands: int = 0

    @property
    def ok(self) -> bool:
        return not self.violations and self.leftovers == 0


def read_ledger(path: Path) -> list[tuple[str, int, float]]:
    if not path.exists():
        return []
    events = []
    for line in path.read_text().splitlines():
        words = line.split()
        if len(words) >= 3 and words[0] in ("enter", "exit"):
            events.append((words[0], int(words[1]), float(words[2])))
    return events


def main_intervals(events: list[tuple[str, int, float]], kills: list[Kill],
                   stops: list[tuple[float, float]]) -> dict[int, tuple[float, float]]:
    """pid -> (entered, ended) of every main that entered the function.

    The end is its ``exit`` line, else the time chaos noted just before its
    SIGKILL, else the end of the first stop (that returned 0) after it entered.
    """
    entered = {pid: t for kind, pid, t in events if kind == "enter"}
    exited = {pid: t for kind, pid, t in events if kind == "exit"}
    killed = {k.pid: k.when for k in kills}
    intervals = {}
    for pid, start in entered.items():
        ends = [t for t in (exited.get(pid), killed.get(pid)) if t is not None and t >= start]
        if not ends:
            ends = [end for _begin, end in stops if end > start][:1]
        intervals[pid] = (start, min(ends) if ends else float("inf"))
    return intervals


def check_exclusion(intervals: dict[int, tuple[float, float]], limit: int) -> list[str]:
    """Violations of "never more than ``limit`` mains inside at once"."""
    points = []
    for pid, (start, end) in intervals.items():
        points.append((start, 1, pid))
        points.append((end, 0, pid))
    points.sort()  # at one instant, ends (0) before starts (1)
    inside: set[int] = set()
    found = []
    for when, kind, pid in points:
        if kind == 1:
            inside.add(pid)
            if len(inside) > limit:
                found.append(f"mutual exclusion: {len(inside)} mains inside at {when:.6f}: {sorted(inside)}")
        else:
            inside.discard(pid)
    return found


def in_stop(when: float, stops: list[tuple[float, float]]) -> bool:
    return any(begin <= when <= end for begin, end in stops)


def check_availability(events: list[tuple[str, int, float]], kills: list[Kill],
                       stops: list[tuple[float, float]],
                       bound: float) -> tuple[list[str], list[tuple[float, str]], float]:
    """(violations, failover gaps as (seconds, "sigkill" or "restart"), longest time
    with no main after a covered death).

    A death is covered when a standby was waiting: for a SIGKILL, chaos looked
    just before; a main that exited outside a stop was ended by ``restart``,
    which stops a main only once fresh standbys wait. Each covered death is
    matched, in time order, with the first later ``enter`` not yet matched.
    """
    intervals = main_intervals(events, kills, stops)
    exited = {pid: t for kind, pid, t in events if kind == "exit"}
    deaths: list[tuple[float, int, str]] = []
    covered_pids: set[int] = set()
    for kill in (k for k in kills if k.role == "main"):
        entered = intervals.get(kill.pid)
        if entered is None or entered[0] > kill.when:
            continue  # killed before it was inside the function: no main was lost
        if kill.pid in exited and exited[kill.pid] <= kill.when:
            continue
        if kill.covered and not in_stop(kill.when, stops):
            deaths.append((kill.when, kill.pid, "sigkill"))
            covered_pids.add(kill.pid)
    for pid, when in exited.items():
        if not in_stop(when, stops) and pid not in {k.pid for k in kills if k.when < when}:
            deaths.append((when, pid, "restart"))
            covered_pids.add(pid)
    deaths.sort()
    # A standby that took a slot but was SIGKILLed before it entered the function
    # may have been the replacement: chaos took it away, deaths before it are excused.
    taken_away = sorted(k.when for k in kills if k.pid not in intervals or intervals[k.pid][0] > k.when)
    enters = sorted(t for kind, _pid, t in events if kind == "enter")
    used = [False] * len(enters)
    found: list[str] = []
    gaps: list[tuple[float, str]] = []
    for when, pid, cause in deaths:
        match = next((i for i, t in enumerate(enters) if t > when and not used[i]), None)
        if match is None:
            found.append(f"availability: main {pid} died at {when:.6f} while a standby waited; "
                         "no main entered after it")
            continue
        used[match] = True
        gap = enters[match] - when
        if any(when < t < enters[match] for t in taken_away):
            continue
        gaps.append((gap, cause))
        if gap > bound:
            found.append(f"availability: main {pid} died at {when:.6f} while a standby waited; "
                         f"the next main entered {gap:.3f} s later")
    # periods with no main inside at all, begun by a covered death, outside stops
    points = sorted([(s, 1, p) for p, (s, e) in intervals.items()] + [(e, -1, p) for p, (s, e) in intervals.items()])
    inside = 0
    empty_since: float | None = None
    longest = 0.0
    for when, delta, pid in points:
        inside += delta
        if inside == 0 and delta == -1:
            empty_since = when if pid in covered_pids and not in_stop(when, stops) else None
        elif inside > 0 and empty_since is not None:
            longest = max(longest, when - empty_since)
            empty_since = None
    return found, gaps, longest


# ------------------------------------------------------------------ the run


class Chaos:
    def __init__(self, folder: Path, seed: int, out: Callable[[str], None]) -> None:
        self.folder = folder
        self.seed = seed
        self.rng = random.Random(seed)
        self.out = out
        self.marker = uuid.uuid4().hex
        self.pid_dir = folder / "run"
        self.ledger = folder / "ledger"
        self.config = folder / "chaos.toml"
        self.layout = Layout(str(self.pid_dir), str(self.pid_dir / "lock"), str(self.pid_dir / "lock-standby"),
                             str(self.pid_dir / "standby-stop-file"))
        self.env = {**os.environ, MARKER_VARIABLE: self.marker, "HADC_NO_COLORS": "1",
                    "HADCTL_PASS_ENV": f"{MARKER_VARIABLE} HADCTL_TEST_ID PYTHONPATH COVERAGE_*",
                    "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "src")])}
        self.kills: list[Kill] = []
        self.killed: set[int] = set()  # every pid chaos sent SIGKILL
        self.stops: list[tuple[float, float]] = []
        self.violations: list[str] = []
        self.counts: dict[str, int] = {}
        self.commands = 0
        self.bystander: subprocess.Popen[bytes] | None = None
        self.bystander_file = folder / "bystander"
        self.symlink_target = folder / "symlink-target"
        self.dead_pid = 0
        self.signals_to_us: list[str] = []
        self.previous_handlers: dict[int, object] = {}
        self.stopped: int | None = None
        self.journal = open(folder / "journal", "a") if folder.is_dir() else None  # noqa: SIM115 - for the run

    def violate(self, text: str) -> None:
        self.violations.append(text)
        self.note(f"violation: {text}")

    def note(self, text: str) -> None:
        """One line of the journal (folder/journal): what chaos did, when (monotonic)."""
        if self.journal is None:
            self.journal = open(self.folder / "journal", "a")  # noqa: SIM115 - for the run
        self.journal.write(f"{time.monotonic():.6f} {text}\n")
        self.journal.flush()

    # -------------------------------------------------------------- set-up

    def setup(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.config.write_text(
            f'name = "chaos"\n'
            f'entrypoint = "tests.services.basic:serve"\n'
            f'python_path = ["{ROOT}"]\n'
            f'pid_dir = "{self.pid_dir}"\n'
            f'log_file = "{self.folder / "hadctl.log"}"\n'
            f'kill_timeout = 1\n'
            f'start_limit_burst = 10000  # mains die on purpose here: no crash-loop back-off\n'
            f'env = {{ LEDGER = "{self.ledger}" }}\n'
            f'[locks]\nmax_procs = {MAX_PROCS}\nstandby_max_procs = {STANDBY_MAX_PROCS}\n')
        self.symlink_target.write_text(f"{os.getpid()}\n")
        by_env = {k: v for k, v in self.env.items() if k != MARKER_VARIABLE}
        self.bystander = subprocess.Popen([sys.executable, "-m", "tests.services.bystander", str(self.bystander_file)],
                                          env=by_env, cwd=ROOT)
        if not wait_for(lambda: self.bystander_file.exists() and "ready" in self.bystander_file.read_text(), 10):
            raise RuntimeError("the bystander did not start")
        dead = subprocess.Popen(["true"])
        dead.wait()
        self.dead_pid = dead.pid
        for signum in (signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGQUIT):
            self.previous_handlers[signum] = signal.signal(signum, self._signalled)
        self.hadctl("start", {0})

    def _signalled(self, signum: int, _frame: object) -> None:
        self.signals_to_us.append(signal.Signals(signum).name)

    # -------------------------------------------------------------- helpers

    def hadctl(self, action: str, allowed: set[int]) -> subprocess.CompletedProcess[str]:
        self.note(f"hadctl {action}")
        result = subprocess.run([sys.executable, "-m", "hadctl", "-c", str(self.config), action],
                                capture_output=True, text=True, env=self.env, timeout=COMMAND_TIMEOUT)
        self.commands += 1
        self.note(f"hadctl {action} exited {result.returncode}")
        self.judge(action, result, allowed)
        return result

    def judge(self, action: str, result: subprocess.CompletedProcess[str], allowed: set[int]) -> None:
        if result.returncode not in allowed or "Traceback" in result.stdout + result.stderr:
            self.violate(f"hadctl {action} exited {result.returncode} (expected {sorted(allowed)}): "
                                   f"{(result.stdout + result.stderr).strip()[-600:]!r}")

    def slots(self) -> dict[Role, list[tuple[int, int]]]:
        """role -> [(slot, holder pid)] of the slots held now."""
        reports, _stale = read_slots(self.layout, MAX_PROCS, STANDBY_MAX_PROCS)
        held: dict[Role, list[tuple[int, int]]] = {Role.MAIN: [], Role.STANDBY: []}
        for report in reports:
            if report.pid is not None:
                held[report.role].append((report.slot, report.pid))
        return held

    def waiting_standbys(self, held: dict[Role, list[tuple[int, int]]]) -> list[int]:
        """Standbys that can take a main slot now: not stopped, not dying, not main already
        (a promoted standby holds its standby slot until its replacement is spawned)."""
        mains = {pid for _slot, pid in held[Role.MAIN]}
        return [pid for _slot, pid in held[Role.STANDBY]
                if pid != self.stopped and pid not in mains and pid not in self.killed
                and state_of(pid) not in ("T", "t", "Z", "gone")]

    def signal(self, pid: int, signum: int) -> bool:
        try:
            fd = os.pidfd_open(pid)
        except ProcessLookupError:
            return False
        try:
            signal.pidfd_send_signal(fd, signum)
            return True
        except ProcessLookupError:
            return False
        finally:
            os.close(fd)

    def kill_a_main(self) -> tuple[int, int, bool] | None:
        held = self.slots()
        mains = [(slot, pid) for slot, pid in held[Role.MAIN] if pid not in self.killed]
        if not mains:
            return None
        slot, pid = self.rng.choice(mains)
        covered = bool(self.waiting_standbys(held))
        kill = Kill(pid, time.monotonic(), covered)
        if not self.signal(pid, signal.SIGKILL):
            return None
        self.kills.append(kill)
        self.killed.add(pid)
        self.note(f"SIGKILL main #{slot} {pid} (standbys waiting: {self.waiting_standbys(held)}, "
                  f"stopped: {self.stopped})")
        return slot, pid, covered

    def wait_for_failover(self, slot: int, dead: int, timeout: float = 2.0) -> None:
        """Pacing: let a covered failover finish (the ledger check judges how fast)."""
        def retaken() -> bool:
            return any(s == slot and p != dead for s, p in self.slots()[Role.MAIN])
        wait_for(retaken, timeout)

    def sample_locks(self) -> None:
        """Count the processes holding main and standby locks (an fd a child inherited counts).

        A scan of /proc is not atomic (a lock may pass from one process to
        another during it), and a replacement standby shares its main's lock
        fds for the moment between posix_spawn and exec. So too many holders
        count only when they are still seen after LOCK_SAMPLE_GRACE.
        """
        folders = {"main": str(self.pid_dir / "lock"), "standby": str(self.pid_dir / "lock-standby")}
        limits = {"main": MAX_PROCS, "standby": STANDBY_MAX_PROCS}

        def too_many() -> dict[str, set[int]]:
            holders = lock_holders(marked_processes(self.marker), folders)
            return {role: pids for role, pids in holders.items() if len(pids) > limits[role]}

        over = too_many()
        deadline = time.monotonic() + LOCK_SAMPLE_GRACE
        while over and time.monotonic() < deadline:
            time.sleep(0.005)  # the poll step of a wait with a deadline
            over = too_many()
        for role, pids in over.items():
            details: dict[int, list[str]] = {}
            lock_holders(sorted(pids), folders, details)
            self.violate(f"mutual exclusion: {len(pids)} processes hold {role} locks for "
                                   f"{LOCK_SAMPLE_GRACE:g} s: {[(describe(p), details.get(p)) for p in sorted(pids)]}")

    def check_clean(self, after: str) -> int:
        """Invariant 3, right after a stop that returned 0; returns the processes left."""
        left = marked_processes(self.marker)
        if left:
            self.violate(f"clean stop: after {after}, still running: {[describe(p) for p in left]}")
            kill_all(left)
            wait_for(lambda: not marked_processes(self.marker), 10)
        pid_files = sorted(p.name for p in self.pid_dir.glob("*.pid"))
        if pid_files:
            self.violate(f"clean stop: after {after}, pid files remain: {pid_files}")
        for folder in ("lock", "lock-standby"):
            for lock in sorted((self.pid_dir / folder).glob("*.lock")):
                fd = os.open(lock, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    self.violate(f"clean stop: after {after}, {folder}/{lock.name} is still held")
                finally:
                    os.close(fd)
        return len(left)

    # -------------------------------------------------------------- operations

    def op_kill_main(self) -> bool:
        killed = self.kill_a_main()
        if killed is None:
            return False
        slot, pid, covered = killed
        if covered and self.rng.random() < 0.6:
            self.wait_for_failover(slot, pid)
        return True

    def pick_standby(self) -> int | None:
        """A random live standby, or None."""
        standbys = [pid for _slot, pid in self.slots()[Role.STANDBY] if pid not in self.killed]
        return self.rng.choice(standbys) if standbys else None

    def op_kill_standby(self) -> bool:
        pid = self.pick_standby()
        if pid is None:
            return False
        kill = Kill(pid, time.monotonic(), False, "standby")  # it may be main by now: its end counts
        if not self.signal(pid, signal.SIGKILL):
            return False
        self.note(f"SIGKILL standby {pid}")
        self.kills.append(kill)
        self.killed.add(pid)
        return True

    def op_stop_standby(self) -> bool:
        pid = self.pick_standby()
        if pid is None:
            return False
        if not self.signal(pid, signal.SIGSTOP):
            return False
        self.note(f"SIGSTOP standby {pid}")
        self.stopped = pid
        try:
            wait_for(lambda: state_of(pid) in ("T", "t", "gone", "Z"), 2)
            if self.rng.random() < 0.5:
                killed = self.kill_a_main()
                if killed is not None and killed[2]:
                    self.wait_for_failover(killed[0], killed[1])
        finally:
            self.note(f"SIGCONT standby {pid}")
            self.signal(pid, signal.SIGCONT)
            self.stopped = None
        return True

    def op_restart(self) -> bool:
        self.hadctl("restart", {0})
        return True

    def op_fork(self) -> bool:
        self.hadctl("fork", {0})
        return True

    def op_stop_start(self) -> bool:
        begin = time.monotonic()
        result = self.hadctl("stop", {0})
        self.stops.append((begin, time.monotonic()))
        if result.returncode == 0:
            self.check_clean("stop")
        self.hadctl("start", {0})
        return True

    def op_together(self) -> bool:
        actions = [self.rng.choice(("start", "fork", "restart")) for _ in range(3)]
        self.note(f"hadctl {' + '.join(actions)} at once")
        results = run_together([["-c", str(self.config), a] for a in actions], self.env)
        self.commands += len(results)
        for action, result in zip(actions, results, strict=False):
            self.judge(f"{action} (one of {'+'.join(actions)} at once)", result, {0})
        return True

    def op_kill_controller(self) -> bool:
        """Invariant 5: a controller SIGKILLed at a random moment leaves nothing that the
        next start or fork cannot repair, and only a stop leaves the stop file."""
        action = self.rng.choice(("start", "stop", "restart", "fork"))
        delay = self.rng.uniform(*KILL_AFTER)
        begin = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "hadctl", "-c", str(self.config), action],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=self.env)
        self.commands += 1
        try:
            proc.wait(timeout=delay)
            self.note(f"hadctl {action} ended before its SIGKILL at {delay * 1000:.0f} ms")
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            self.note(f"hadctl {action} SIGKILLed after {delay * 1000:.0f} ms")
        if action == "stop":  # the mains it ended were asked to go (a main killed by its TERM writes no exit line)
            self.stops.append((begin, time.monotonic()))
        stop_file = self.pid_dir / "standby-stop-file"
        if action != "stop" and os.path.lexists(stop_file):
            self.violate(f"killed controllers: a {action} killed after {delay * 1000:.0f} ms left {stop_file}")
        repair = "start" if action == "stop" else self.rng.choice(("start", "fork"))
        self.hadctl(repair, {0})
        if not wait_for(self.pool_is_whole, REPAIR_TIMEOUT):
            self.violate(f"killed controllers: after a {action} killed after {delay * 1000:.0f} ms and a {repair}, "
                         f"the pool is not whole within {REPAIR_TIMEOUT:g} s: {self.slots()}")
        return True

    def pool_is_whole(self) -> bool:
        """Every main and standby slot held, and no standby slot above them."""
        held = self.slots()
        if len(held[Role.MAIN]) != MAX_PROCS or len(held[Role.STANDBY]) != STANDBY_MAX_PROCS:
            return False
        for lock in (self.pid_dir / "lock-standby").glob("*.lock"):
            if lock.stem.isdigit() and int(lock.stem) > STANDBY_MAX_PROCS and is_held(lock):
                return False
        return True

    def op_junk(self) -> bool:
        contents: dict[str, str] = {
            "bystander": f"{self.bystander.pid if self.bystander else 1}\n", "dead": f"{self.dead_pid}\n",
            "init": "1\n", "chaos": f"{os.getpid()}\n", "text": "not a pid\n", "empty": "",
            "huge": "99999999999999999999\n", "negative": "-5\n", "binary": "\x00\x7f\x01garbage",
        }
        kind = self.rng.choice([*contents, "symlink", "directory", "unknown"])
        name = self.rng.choice(["main-1.pid", "main-2.pid", "standby-1.pid", "standby-2.pid"])
        path = self.pid_dir / name
        self.pid_dir.mkdir(exist_ok=True)
        self.note(f"junk {kind} in {name}")
        try:
            if kind == "symlink":
                path.unlink(missing_ok=True)
                path.symlink_to(self.symlink_target)
            elif kind == "directory":
                path.unlink(missing_ok=True)
                path.mkdir()
            elif kind == "unknown":  # a starting worker's name, or the back-off file, naming no worker of ours
                pid = self.rng.choice([self.dead_pid, os.getpid(), self.bystander.pid if self.bystander else 1])
                junk = self.rng.choice([f"unknown-{pid}.pid", "hadctl-backoff.pid"])
                (self.pid_dir / junk).write_text(f"{pid}\n1.000\n")
            else:
                path.write_text(contents[kind])
        except (IsADirectoryError, FileExistsError):
            return False  # a directory dropped earlier still stands there
        except OSError as exc:
            self.violate(f"chaos could not drop junk in {path}: {exc}")
        return True

    # -------------------------------------------------------------- run

    def step(self) -> None:
        names = list(WEIGHTS)
        while True:
            name = self.rng.choices(names, weights=[WEIGHTS[n] for n in names])[0]
            if getattr(self, "op_" + name.replace("-", "_"))():
                break
        self.counts[name] = self.counts.get(name, 0) + 1
        self.sample_locks()

    def finish(self) -> int:
        begin = time.monotonic()
        result = self.hadctl("stop", {0})
        self.stops.append((begin, time.monotonic()))
        return self.check_clean("the final stop") if result.returncode == 0 else len(marked_processes(self.marker))

    def cleanup(self) -> None:
        """Restore our signal handlers; kill whatever of the service is left, and the bystander."""
        for signum, handler in self.previous_handlers.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        left = marked_processes(self.marker)
        kill_all(left)
        wait_for(lambda: not marked_processes(self.marker), 10)
        if self.bystander is not None:
            if self.bystander.poll() is not None:
                self.violate("PID safety: the bystander whose pid was put in pid files died")
            self.bystander.kill()
            self.bystander.wait()
        if self.journal is not None:
            self.journal.close()

    def judge_all(self, result: Result) -> None:
        events = read_ledger(self.ledger)
        intervals = main_intervals(events, self.kills, self.stops)
        self.violations += check_exclusion(intervals, MAX_PROCS)
        found, gaps, longest = check_availability(events, self.kills, self.stops, AVAILABILITY_BOUND)
        self.violations += found
        received = [w for w in self.bystander_file.read_text().split() if w != "ready"]
        if received:
            self.violations.append(f"PID safety: the bystander received {received}")
        if self.signals_to_us:
            self.violations.append(f"PID safety: chaos itself received {self.signals_to_us}")
        if not self.symlink_target.exists():
            self.violations.append("PID safety: the file a junk symlink pointed to was removed")
        result.gaps = gaps
        result.failovers = len(gaps)
        result.longest_gap = max((gap for gap, _cause in gaps), default=0.0)
        result.longest_no_main = longest


def run_chaos(operations: int, seed: int, folder: Path | str,
              out: Callable[[str], None] = lambda line: None) -> Result:
    """Run ``operations`` random operations from ``seed`` in ``folder``; check the invariants."""
    began = time.monotonic()
    chaos = Chaos(Path(folder), seed, out)
    result = Result(operations=0, seed=seed)
    try:
        chaos.setup()
        for number in range(1, operations + 1):
            chaos.step()
            chaos.note(f"-- operation {number} done")
            result.operations = number
            if number % 100 == 0:
                out(f"  {number} operations, {len(chaos.violations)} violations, "
                    f"{time.monotonic() - began:.0f} s")
        result.leftovers = chaos.finish()
    finally:
        chaos.cleanup()
    chaos.judge_all(result)
    result.violations = chaos.violations
    result.counts = chaos.counts
    result.commands = chaos.commands
    result.duration = time.monotonic() - began
    return result


def report(result: Result) -> str:
    def figures(cause: str) -> str:
        gaps = sorted(gap for gap, why in result.gaps if why == cause)
        if not gaps:
            return f"{cause}: none"

        def pct(q: float) -> float:
            return gaps[min(len(gaps) - 1, int(q * len(gaps)))] * 1000
        return f"{cause}: {len(gaps)}, p50 {pct(0.5):.1f} ms, p99 {pct(0.99):.1f} ms, max {gaps[-1] * 1000:.1f} ms"

    lines = [
        f"operations: {result.operations} ({', '.join(f'{k} {v}' for k, v in sorted(result.counts.items()))}; "
        f"{result.commands} hadctl commands)",
        f"violations: {len(result.violations)}",
        *[f"  - {v}" for v in result.violations[:50]],
        f"longest gap with no main after a main died while a standby waited: {result.longest_gap * 1000:.1f} ms "
        f"({figures('sigkill')}; {figures('restart')})",
        f"longest time with no main at all (outside stops): {result.longest_no_main * 1000:.1f} ms",
        f"processes left: {result.leftovers}",
        f"seed: {result.seed}",
        f"duration: {result.duration:.1f} s",
    ]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--operations", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--folder", default=None,
                        help="work folder (default: a new temporary one, removed if all is well)")
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(1 << 32)
    print(f"chaos: seed {seed}", flush=True)
    folder = Path(args.folder) if args.folder else Path(tempfile.mkdtemp(prefix="hadctl-chaos-"))
    print(f"chaos: work folder {folder}", flush=True)
    result = run_chaos(args.operations, seed, folder, out=lambda line: print(line, flush=True))
    print(report(result), flush=True)
    if result.ok and not args.folder:
        import shutil

        shutil.rmtree(folder, ignore_errors=True)
    elif not result.ok:
        print(f"chaos: FAILED; ledger and logs kept in {folder}; replay with --seed {seed}", flush=True)
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
