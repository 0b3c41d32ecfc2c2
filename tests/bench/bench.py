#!/usr/bin/env python3
"""hadctl's benchmark (issue #4): the "Numbers it is held to" of SPEC.md, measured.

Starts real services (tests/bench/benchsvc.py, one main + one standby unless a
row says otherwise) from a temporary folder, one folder per scenario, runs each
measurement many times and prints min / median / p90 / p99 / max against the
target and HADaemon::Control's figures; the same goes to bench-results.json.

    .venv/bin/python tests/bench/bench.py               # full run (make bench)
    .venv/bin/python tests/bench/bench.py --quick       # fewer trials: a smoke run
    .venv/bin/python tests/bench/bench.py --only failover,restart --json /tmp/r.json

How each figure is taken (CLOCK_MONOTONIC is system-wide, so times written by
the service compare with the bench's own):

* failover: the bench reads time.monotonic() just before os.kill(main, SIGKILL);
  the standby, once promoted, writes "<pid> <monotonic>" as the first thing
  inside the entrypoint. Before each kill the bench waits until the standby is
  blocked in flock() on the main lock (/proc/PID/syscall), then lets the
  machine settle; it waits for the marker on inotify, so it sleeps meanwhile.
  A dead main may linger as a zombie (PID 1 reaps late): nothing waits on that.
* restart gap: the old main writes its exit time when SIGTERM arrives, just
  before it returns; the new main its enter time. The gap is the time in which
  no main was serving (an upper bound of the time no process held the lock:
  it also counts the old main's clean-up). "Promoted" means the new main had
  imported the entrypoint (as a standby does) before the old main exited.
* wall times: time.perf_counter() around subprocess.run of the hadctl CLI; the
  notes add the CPU time (user+sys) of those runs, which other load moves less.

Before measuring, the bench byte-compiles hadctl and itself (as `make install`
does): with PYTHONDONTWRITEBYTECODE set, stale .pyc files would make every run
and every standby compile from source. It warns when sources change during the
run, and when the machine is not quiet (CPU busy before/after, from /proc/stat):
the targets are for a quiet machine. ``--hadctl-src DIR`` measures a patched
copy of src/ (``python -m hadctl`` with PYTHONPATH=DIR) without touching the tree.

Every service is stopped at the end, also on Ctrl-C or an error; then any
process still carrying this run's HADCTL_BENCH_ID is killed and reported.
Exit status: 0 when every scenario ran (MISS rows included), 1 on an error.
"""
from __future__ import annotations

import argparse
import compileall
import ctypes
import json
import os
import platform
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: the helpers shared with the test suite
import support  # noqa: E402
from support import describe, is_alive, toml_text  # noqa: E402

PY = sys.executable
_CLI = Path(PY).parent / "hadctl"
HADCTL = [str(_CLI)] if _CLI.exists() else [PY, "-m", "hadctl"]
BENCH_ID = uuid.uuid4().hex
ENTRYPOINT = "benchsvc:serve"

# HADaemon::Control's figures from the issue (same 2-core machine, interval 1 s).
PERL = {
    "failover": "640 ms p50 / 973 p90",
    "failover_busy": "-",
    "pool_whole": "-",
    "restart_gap": "208 ms",
    "restart_wall": "885 ms",
    "stop_wall": "1124 ms",
    "start_wall": "225 ms",
    "fork_after_failover": "122 ms",
    "idle_wakeups": "2 wake-ups/s",
    "idle_cpu": "-",
    "status_wall": "19 ms",
    "standby_rss": "8.7 MB",
    "status_all_100": "n/a",
    "start_100": "n/a",
}

# flock(2)'s number, to see in /proc/PID/syscall that a standby is blocked in it.
FLOCK_SYSCALL = {"x86_64": 73, "aarch64": 32, "riscv64": 32}.get(platform.machine())


class BenchError(Exception):
    """A scenario could not be measured (a service misbehaved or timed out)."""


# ====================================================================== small tools


def timed_run(command: list[str], timeout: float = 120,
              env: dict[str, str] | None = None) -> tuple[float, float, subprocess.CompletedProcess[str]]:
    """Run ``command``; returns (wall ms, CPU ms, result). CPU is user+sys of the command and of
    the children it waited for (not of the detached workers): a figure that load barely moves."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    began = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    wall = (time.perf_counter() - began) * 1000
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime) * 1000
    return wall, cpu, result


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    data = sorted(values)
    if not data:
        return float("nan")
    pos = (len(data) - 1) * q / 100.0
    low = int(pos)
    high = min(low + 1, len(data) - 1)
    return data[low] + (data[high] - data[low]) * (pos - low)


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.002) -> Any:
    """Poll ``predicate`` (for preconditions, never for a timed figure)."""
    return support.wait_until(predicate, timeout, what, interval, error=BenchError)


class Inotify:
    """Wake when something happens to a file or in a folder (sleeping meanwhile)."""

    IN_MODIFY = 0x2
    IN_MOVED_TO = 0x80
    IN_CREATE = 0x100
    _libc = ctypes.CDLL(None, use_errno=True)

    def __init__(self, path: Path, mask: int) -> None:
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self._libc.inotify_add_watch(self.fd, os.fsencode(str(path)), mask) < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify on {path}: {os.strerror(err)}")
        self.poller = select.poll()
        self.poller.register(self.fd, select.POLLIN)

    def drain(self) -> None:
        try:
            while os.read(self.fd, 65536):
                pass
        except BlockingIOError:
            pass

    def wait_for(self, predicate: Callable[[], Any], timeout: float, what: str) -> Any:
        """Check ``predicate`` after each event (and every 100 ms in case of a missed one)."""
        deadline = time.monotonic() + timeout
        while True:
            value = predicate()
            if value:
                return value
            left = deadline - time.monotonic()
            if left <= 0:
                raise BenchError(f"timed out after {timeout:g} s waiting for {what}")
            if self.poller.poll(min(left, 0.1) * 1000 + 1):
                self.drain()

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def read_pid(path: Path) -> int | None:
    try:
        text = path.read_text().split()
    except OSError:
        return None
    return int(text[0]) if text and text[0].isdigit() else None


def proc_state(pid: int) -> str | None:
    """One letter (R, S, Z...) or None when the pid is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            data = handle.read()
    except OSError:
        return None
    return data[data.rfind(b")") + 2:].split()[0].decode()


def blocked_in_flock_on(pid: int, lock_file: str) -> bool:
    """True when ``pid``'s only thread is blocked in flock() on ``lock_file``."""
    try:
        with open(f"/proc/{pid}/syscall") as handle:
            fields = handle.read().split()
        if FLOCK_SYSCALL is None:  # unknown architecture: trust wchan
            with open(f"/proc/{pid}/wchan") as handle:
                return "lock" in handle.read() and proc_state(pid) == "S"
        if not fields or fields[0] != str(FLOCK_SYSCALL):
            return False
        return os.path.realpath(f"/proc/{pid}/fd/{int(fields[1], 16)}") == os.path.realpath(lock_file)
    except (OSError, ValueError, IndexError):
        return False


def any_thread_in_flock_on(pid: int, lock_file: str) -> bool:
    """True when some thread of ``pid`` is blocked in flock() on ``lock_file``."""
    for tid in os.listdir(f"/proc/{pid}/task") if os.path.isdir(f"/proc/{pid}/task") else []:
        try:
            with open(f"/proc/{pid}/task/{tid}/syscall") as handle:
                fields = handle.read().split()
            if fields and FLOCK_SYSCALL is not None and fields[0] == str(FLOCK_SYSCALL) and \
                    os.path.realpath(f"/proc/{pid}/fd/{int(fields[1], 16)}") == os.path.realpath(lock_file):
                return True
        except (OSError, ValueError, IndexError):
            continue
    return False


def proc_status(pid: int) -> dict[str, str]:
    found = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            found[key] = value.strip()
    return found


def context_switches(pid: int) -> tuple[int, int, int]:
    """(voluntary, nonvoluntary, threads) summed over every thread of ``pid``."""
    voluntary = nonvoluntary = threads = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/status") as handle:
                for line in handle:
                    if line.startswith("voluntary_ctxt_switches:"):
                        voluntary += int(line.split()[1])
                    elif line.startswith("nonvoluntary_ctxt_switches:"):
                        nonvoluntary += int(line.split()[1])
            threads += 1
        except OSError:
            continue
    return voluntary, nonvoluntary, threads


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process, in clock ticks."""
    with open(f"/proc/{pid}/stat", "rb") as handle:
        data = handle.read()
    fields = data[data.rfind(b")") + 2:].split()
    return int(fields[11]) + int(fields[12])


def pidfd_exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


def marked_processes() -> list[int]:
    """Live processes started by this run (they carry HADCTL_BENCH_ID in their environment)."""
    return support.marked_processes("HADCTL_BENCH_ID", BENCH_ID)


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def cpu_busy(seconds: float = 1.0) -> float:
    """Percent of all CPUs busy over ``seconds`` (from /proc/stat), while the bench itself sleeps."""
    def sample() -> tuple[int, int]:
        with open("/proc/stat") as handle:
            fields = [int(x) for x in handle.readline().split()[1:9]]
        return sum(fields), fields[3] + fields[4]  # total, idle + iowait
    total1, idle1 = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return round(100.0 * (1 - (idle2 - idle1) / max(1, total2 - total1)), 1)


# ====================================================================== a service


class Service:
    """One bench service: every path under ``folder`` (the config may live elsewhere)."""

    def __init__(self, folder: Path, name: str, config: Path | None = None, **settings: Any) -> None:
        folder.mkdir(parents=True)
        self.folder = folder
        self.name = name
        self.pid_dir = folder / "run"
        self.marker = folder / "marker"
        self.exits = folder / "exits"
        self.imports = folder / "imports"
        for path in (self.marker, self.exits, self.imports):
            path.touch()
        self.config = config or folder / "svc.toml"
        self.main_lock = str(self.pid_dir / "lock" / "1.lock")
        locks = settings.pop("locks", {})
        table: dict[str, Any] = {
            "name": name,
            "entrypoint": ENTRYPOINT,
            "python_path": [str(HERE)],
            "pid_dir": str(self.pid_dir),
            "log_file": str(folder / "hadctl.log"),
            "env": {"BENCH_MARKER": str(self.marker), "BENCH_EXITS": str(self.exits),
                    "BENCH_IMPORTS": str(self.imports)},
            # Hundreds of kills in a row look like a crash loop: keep the back-off out of the figures.
            "start_limit_burst": 10000,
        }
        table.update(settings)
        text = toml_text(table)
        if locks:
            text += "\n[locks]\n" + toml_text(locks)
        self.config.write_text(text)
        self.env: dict[str, str] | None = None  # the environment of its hadctl commands (None: ours)
        self.used = False
        self.cpu: dict[str, list[float]] = {}  # action -> CPU ms of each hadctl run

    def cpu_note(self, action: str) -> str:
        samples = self.cpu.get(action, [])
        return f"CPU of the hadctl command itself: median {percentile(samples, 50):.1f} ms" if samples else ""

    def run(self, *args: str, timeout: float = 120) -> tuple[float, subprocess.CompletedProcess[str]]:
        """Run ``hadctl -c CONFIG ARGS``; returns (wall ms, result)."""
        self.used = True  # something may run from now on, until a stop succeeds
        elapsed, cpu, result = timed_run([*HADCTL, "-c", str(self.config), *args], timeout, self.env)
        self.cpu.setdefault(args[0], []).append(cpu)
        if args[:1] == ("stop",) and result.returncode == 0:
            self.used = False
        return elapsed, result

    def must(self, *args: str, expect: tuple[int, ...] = (0,)) -> tuple[float, subprocess.CompletedProcess[str]]:
        ms, result = self.run(*args)
        if result.returncode not in expect:
            raise BenchError(f"{self.name}: hadctl {' '.join(args)} exited {result.returncode}\n"
                             f"stdout: {result.stdout.strip()}\nstderr: {result.stderr.strip()}")
        return ms, result

    @staticmethod
    def _lines(path: Path) -> dict[int, float]:
        """pid -> time of the last line of that pid."""
        found = {}
        for line in path.read_text().splitlines():
            words = line.split()
            if len(words) == 2:
                found[int(words[0])] = float(words[1])
        return found

    def entered(self) -> dict[int, float]:
        return self._lines(self.marker)

    def exited(self) -> dict[int, float]:
        return self._lines(self.exits)

    def imported(self) -> dict[int, float]:
        return self._lines(self.imports)

    def pid(self, role: str) -> int | None:
        return read_pid(self.pid_dir / f"{role}-1.pid")

    def ready(self) -> tuple[int, int] | None:
        """(main, standby) once the main is inside the function and the standby blocks on its lock."""
        main, standby = self.pid("main"), self.pid("standby")
        if main is None or standby is None or not is_alive(main) or main not in self.entered():
            return None
        if not blocked_in_flock_on(standby, self.main_lock):
            return None
        return main, standby

    def wait_ready(self, timeout: float = 30, settle: float = 0.0) -> tuple[int, int]:
        pair: tuple[int, int] = wait_until(self.ready, timeout,
                                           f"{self.name}: a main in its function and a standby in flock")
        if settle:
            time.sleep(settle)  # let the start-up of the new standby fade from the caches and run queues
            again = self.ready()
            if again != pair:
                raise BenchError(f"{self.name}: processes changed while settling: {pair} -> {again}")
        return pair

    def stop(self) -> None:
        if self.used and self.pid_dir.exists():
            try:
                _ms, result = self.run("stop", timeout=60)
                if result.returncode != 0:
                    print(f"bench: hadctl stop of {self.name} exited {result.returncode}: "
                          f"{result.stderr.strip()}", file=sys.stderr)
            except subprocess.TimeoutExpired:
                print(f"bench: hadctl stop of {self.name} timed out", file=sys.stderr)


# ====================================================================== results


class Row:
    """One line of the table."""

    def __init__(self, name: str, title: str, unit: str, samples: list[float], target: str,
                 passed: bool | None, perl: str | None = None, notes: str = "",
                 stats: dict[str, float] | None = None) -> None:
        self.name, self.title, self.unit, self.samples = name, title, unit, samples
        self.target, self.passed, self.notes = target, passed, notes
        self.perl = perl if perl is not None else PERL.get(name, "-")
        self.stats = stats if stats is not None else self._stats(samples)

    @staticmethod
    def _stats(samples: list[float]) -> dict[str, float]:
        if not samples:
            return {}
        return {"min": min(samples), "p50": percentile(samples, 50), "p90": percentile(samples, 90),
                "p99": percentile(samples, 99), "max": max(samples)}

    @property
    def result(self) -> str:
        if self.notes.startswith("not available"):
            return "N/A"
        return {True: "PASS", False: "MISS", None: "-"}[self.passed]

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "title": self.title, "unit": self.unit, "n": len(self.samples),
                **{k: round(v, 3) for k, v in self.stats.items()}, "target": self.target,
                "result": self.result, "hadaemon_control": self.perl, "notes": self.notes,
                "samples": [round(s, 3) for s in self.samples]}


def unavailable(name: str, title: str, target: str, why: str) -> Row:
    return Row(name, title, "", [], target, None, notes=f"not available: {why}")


def print_table(rows: list[Row], out: Any = sys.stdout) -> None:
    def fmt(row: Row, key: str) -> str:
        n = len(row.samples)
        if key not in row.stats or (key == "p90" and n < 10) or (key == "p99" and n < 100):
            return "-"
        value = row.stats[key]
        return f"{value:.3f}" if abs(value) < 10 else f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"

    header = ["measure", "unit", "n", "min", "median", "p90", "p99", "max", "target", "result", "HADC (Perl)"]
    table = [header] + [
        [row.title, row.unit, str(len(row.samples)) if row.samples else "-",
         fmt(row, "min"), fmt(row, "p50"), fmt(row, "p90"), fmt(row, "p99"), fmt(row, "max"),
         row.target, row.result, row.perl]
        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    right = {2, 3, 4, 5, 6, 7}
    for number, line in enumerate(table):
        cells = [cell.rjust(widths[i]) if i in right else cell.ljust(widths[i]) for i, cell in enumerate(line)]
        print("  ".join(cells).rstrip(), file=out)
        if number == 0:
            print("  ".join("-" * w for w in widths), file=out)
    notes = [(row.title, row.notes) for row in rows if row.notes]
    if notes:
        print(file=out)
        for title, note in notes:
            print(f"* {title}: {note}", file=out)


# ====================================================================== the bench


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.quick = args.quick
        self.root = Path(tempfile.mkdtemp(prefix="hadctl-bench-"))
        self.services: list[Service] = []
        self.children: list[subprocess.Popen[bytes]] = []
        self.rows: list[Row] = []
        self.settle = args.settle

    def trials(self, full: int, quick: int) -> int:
        if self.args.trials:
            return int(self.args.trials)
        return quick if self.quick else full

    def service(self, scenario: str, name: str | None = None, config: Path | None = None,
                **settings: Any) -> Service:
        svc = Service(self.root / scenario, name or f"bench-{scenario}", config, **settings)
        self.services.append(svc)
        return svc

    def burn_cpus(self, count: int) -> list[subprocess.Popen[bytes]]:
        procs = [subprocess.Popen([PY, "-c", "while True: pass"]) for _ in range(count)]
        self.children.extend(procs)
        return procs

    @staticmethod
    def stop_children(procs: list[subprocess.Popen[bytes]]) -> None:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            proc.wait()

    def cleanup(self) -> list[str]:
        """Stop every service this run started, kill whatever still carries our marker."""
        self.stop_children(self.children)
        for svc in reversed(self.services):
            svc.stop()
        survivors = marked_processes()
        names = [describe(p) for p in survivors]
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if survivors:
            wait_until(lambda: not marked_processes(), 10, "left-over processes to die")
        if not self.args.keep:
            shutil.rmtree(self.root, ignore_errors=True)
        return names

    # ------------------------------------------------------------------ failover

    def _failovers(self, svc: Service, count: int, on_ready: Callable[[int, int], None] | None = None) -> list[float]:
        """``count`` times: SIGKILL the main, time until the standby is inside the function (ms)."""
        watch = Inotify(svc.marker, Inotify.IN_MODIFY)
        samples = []
        try:
            for _ in range(count):
                main, standby = svc.wait_ready(settle=self.settle)
                if on_ready is not None:
                    on_ready(main, standby)
                watch.drain()
                killed_at = time.monotonic()
                os.kill(main, signal.SIGKILL)
                entered = watch.wait_for(lambda: svc.entered().get(standby), 10,
                                         f"standby {standby} to enter the function after main {main} was killed")
                samples.append((entered - killed_at) * 1000)
        finally:
            watch.close()
        return samples

    def scenario_failover(self) -> None:
        svc = self.service("failover")
        svc.must("start")
        samples = self._failovers(svc, self.trials(200, 40))
        p50, p99 = percentile(samples, 50), percentile(samples, 99)
        self.rows.append(Row("failover", "failover: SIGKILL main -> standby in function", "ms", samples,
                             "p50<=1.5 p99<=5", p50 <= 1.5 and p99 <= 5,
                             notes=f"p50 {p50:.3f} ms, p99 {p99:.3f} ms (respawn_standby = true, the default)"))

    def scenario_failover_busy(self) -> None:
        svc = self.service("failover-busy")
        svc.must("start")
        burners = self.burn_cpus(os.cpu_count() or 2)
        try:
            time.sleep(0.2)  # let the burners reach full speed
            samples = self._failovers(svc, self.trials(200, 40))
        finally:
            self.stop_children(burners)
        p99 = percentile(samples, 99)
        self.rows.append(Row("failover_busy", f"failover, {len(burners)} CPU burners", "ms", samples,
                             "p99<=10", p99 <= 10, notes=f"p99 {p99:.3f} ms with every core busy"))

    def scenario_pool(self) -> None:
        """SIGKILL of main -> a new standby holds the standby slot (respawn_standby), no fork run."""
        svc = self.service("pool")
        svc.must("start")
        watch = Inotify(svc.pid_dir, Inotify.IN_MOVED_TO | Inotify.IN_CREATE)
        samples = []
        try:
            for _ in range(self.trials(50, 10)):
                main, standby = svc.wait_ready(settle=self.settle)
                watch.drain()
                killed_at = time.monotonic()
                os.kill(main, signal.SIGKILL)

                def refilled() -> float | None:
                    pid = svc.pid("standby")  # renamed into place only once its lock is held
                    return time.monotonic() if pid not in (None, main, standby) and is_alive(pid) else None

                samples.append((watch.wait_for(refilled, 10, "a new standby in the standby slot") - killed_at) * 1000)
        finally:
            watch.close()
        p50 = percentile(samples, 50)
        self.rows.append(Row("pool_whole", "failover -> standby pool whole again", "ms", samples,
                             "median<=80", p50 <= 80,
                             notes="from the kill until the replacement standby (spawned by the promoted main) "
                                   "holds the standby slot; seen through inotify on pid_dir"))

    # ------------------------------------------------------------------ restart

    def scenario_restart(self) -> None:
        svc = self.service("restart")
        svc.must("start")
        walls, gaps = [], []
        not_promoted = []
        svc.wait_ready(settle=self.settle)
        svc.must("restart")  # warm-up, not counted
        svc.cpu.clear()
        for number in range(self.trials(30, 8)):
            old_main, old_standby = svc.wait_ready(settle=self.settle)
            ms, result = svc.must("restart")
            walls.append(ms)
            new_main = wait_until(lambda: (p := svc.pid("main")) != old_main and is_alive(p) and p, 10,
                                  "the new main's pid file")
            exit_at = wait_until(lambda: svc.exited().get(old_main), 10, f"old main {old_main}'s exit line")
            enter_at = wait_until(lambda: svc.entered().get(new_main), 10, f"new main {new_main}'s enter line")
            gaps.append((enter_at - exit_at) * 1000)
            imported_at = svc.imported().get(new_main)
            if imported_at is None or imported_at >= exit_at or new_main == old_standby:
                not_promoted.append(number)
        gap_p50, wall_p50 = percentile(gaps, 50), percentile(walls, 50)
        promoted = f"waiting standby promoted in {len(gaps) - len(not_promoted)}/{len(gaps)} trials"
        self.rows.append(Row("restart_gap", "restart: longest time with no main", "ms", gaps,
                             "median<=2", gap_p50 <= 2 and not not_promoted,
                             notes=f"old main's exit (written on SIGTERM, just before it returns) -> new main "
                                   f"inside the function; {promoted}"))
        self.rows.append(Row("restart_wall", "restart wall time", "ms", walls, "median<=150", wall_p50 <= 150,
                             notes=svc.cpu_note("restart")))

    # ------------------------------------------------------------------ stop / start

    def scenario_stop_start(self) -> None:
        svc = self.service("stop-start")
        starts, stops = [], []
        problems = []
        count = self.trials(30, 8)
        for number in range(count + 1):  # the first cycle warms up, not counted
            ms_start, result = svc.must("start")
            if "main #1 started" not in result.stdout or "standby #1 started" not in result.stdout:
                problems.append(f"start {number}: {result.stdout.strip()!r}")
            main, standby = svc.wait_ready(settle=max(self.settle, 0.05))
            pidfds = [os.pidfd_open(main), os.pidfd_open(standby)]
            try:
                ms_stop, result = svc.must("stop")
                if not all(pidfd_exited(fd) for fd in pidfds):
                    problems.append(f"stop {number} returned while a process still ran")
            finally:
                for fd in pidfds:
                    os.close(fd)
            if number:
                starts.append(ms_start)
                stops.append(ms_stop)
            else:
                svc.cpu.clear()
        note = "; ".join(problems[:3])
        self.rows.append(Row("stop_wall", "stop wall time", "ms", stops, "median<=30",
                             percentile(stops, 50) <= 30 and not problems,
                             notes="; ".join(filter(None, [svc.cpu_note("stop"), note]))))
        self.rows.append(Row("start_wall", "start wall time (both report roles)", "ms", starts, "median<=100",
                             percentile(starts, 50) <= 100 and not problems, notes=svc.cpu_note("start")))

    # ------------------------------------------------------------------ fork

    def scenario_fork(self) -> None:
        svc = self.service("fork", respawn_standby=False)
        svc.must("start")
        walls, failovers = [], []
        watch = Inotify(svc.marker, Inotify.IN_MODIFY)
        for _ in range(self.trials(30, 8)):
            main, standby = svc.wait_ready(settle=self.settle)
            watch.drain()
            killed_at = time.monotonic()
            os.kill(main, signal.SIGKILL)
            entered = watch.wait_for(lambda: svc.entered().get(standby), 10, f"standby {standby} to be promoted")
            failovers.append((entered - killed_at) * 1000)
            ms, result = svc.must("fork")
            if "standby #1 started" not in result.stdout:
                raise BenchError(f"fork did not start a standby: {result.stdout.strip()!r}")
            walls.append(ms)
        watch.close()
        self.rows.append(Row("fork_after_failover", "fork after a failover (standby back)", "ms", walls,
                             "median<=60", percentile(walls, 50) <= 60,
                             notes=f"respawn_standby = false; {svc.cpu_note('fork')}"))
        self.rows.append(Row("failover_no_respawn", "  failover with respawn_standby = false", "ms", failovers,
                             "(info)", None, perl="-",
                             notes="the same kill -> function time as the failover row, without spawning a "
                                   "replacement on the way: the cost of the respawn is the difference"))

    # ------------------------------------------------------------------ ZooKeeper

    def scenario_zookeeper(self) -> None:
        """Two "hosts" on this machine (own pid_dir, own HADCTL_HOST_ID) sharing
        one throw-away ZooKeeper server: host A's main, host B's standby. Hand-over: A's
        main writes its exit on the TERM of `stop` on A -> B's standby inside the function.
        Failover: SIGKILL of A's main -> B's standby inside the function (the slot moves
        when A's session expires: about session_timeout)."""
        import zk

        timeouts = (2.0, 6.0)
        if not (os.path.exists(zk.JAR) and os.path.exists(zk.JAVA)):
            for timeout in timeouts:
                for kind in ("handover", "failover"):
                    self.rows.append(unavailable(f"zk_{kind}_{timeout:g}", f"ZooKeeper {kind}, "
                                                 f"session_timeout {timeout:g} s", "(info)",
                                                 f"no ZooKeeper ({zk.JAR}); make system-deps installs it"))
            return
        from kazoo.client import KazooClient

        server = zk.Server(self.root / "zookeeper").start()
        client = None
        try:
            server.wait_serving(60)
            client = KazooClient(hosts=server.address)
            client.start(timeout=10)
            for timeout in timeouts:
                slot = f"/bench-{timeout:g}/bench-zk/slot-1"
                hosts = []
                for host in ("A", "B"):
                    svc = self.service(f"zk-{timeout:g}-{host}", name="bench-zk", respawn_standby=False,
                                       locks={"engine": "zookeeper", "hosts": server.address,
                                              "root": f"/bench-{timeout:g}", "session_timeout": timeout,
                                              "standby_max_procs": 1 if host == "B" else 0})
                    svc.env = {**os.environ, "HADCTL_HOST_ID": f"bench-{host}"}
                    hosts.append(svc)
                a, b = hosts
                samples: dict[str, list[float]] = {"handover": [], "failover": []}
                for _trial in range(self.trials(5, 2)):
                    for kind in ("handover", "failover"):
                        a.must("start")
                        b.must("start")
                        main, standby = a.pid("main"), b.pid("standby")
                        if main is None or standby is None:
                            raise BenchError(f"ZooKeeper: no main on A or no standby on B ({main}, {standby})")
                        wait_until(lambda: main in a.entered(), 10, "A's main inside the function")
                        # B's standby queues in ZooKeeper (a second contender node) after it reports
                        wait_until(lambda: len(client.get_children(slot)) >= 2, 10, "B's standby in line")
                        if kind == "handover":
                            a.must("stop")
                            began = a.exited().get(main)
                        else:
                            began = time.monotonic()
                            os.kill(main, signal.SIGKILL)
                        entered = wait_until(lambda: b.entered().get(standby), timeout + 10,
                                             "B's standby inside the function")
                        if began is None:
                            raise BenchError("ZooKeeper: A's main wrote no exit time on stop")
                        samples[kind].append((entered - began) * 1000)
                        b.must("stop")
                        a.must("stop")
                self.rows.append(Row(f"zk_handover_{timeout:g}", f"ZooKeeper hand-over on stop, T={timeout:g} s",
                                     "ms", samples["handover"], "(info)", None, perl="-",
                                     notes="A's main exits on stop's TERM -> B's standby inside the function"))
                self.rows.append(Row(f"zk_failover_{timeout:g}", f"ZooKeeper SIGKILL failover, other host, "
                                     f"T={timeout:g} s", "ms", samples["failover"], "(info)", None, perl="-",
                                     notes="B's standby takes over when A's session expires (about "
                                           "session_timeout): B cannot know that A's main is dead"))
                if timeout == timeouts[0]:
                    self._zookeeper_same_host(server.address, client, timeout)
        finally:
            if client is not None:
                client.stop()
                client.close()
            server.stop()

    def _zookeeper_same_host(self, address: str, client: Any, timeout: float) -> None:
        """Host A alone, a main and a standby (respawned by each new main): SIGKILL of the
        main -> A's standby inside the function; the standby's RSS while it waits; status
        on A (this host holds every slot: no ZooKeeper) and on B (holds none: asks it)."""
        root = f"/bench-same-{timeout:g}"
        locks = {"engine": "zookeeper", "hosts": address, "root": root, "session_timeout": timeout,
                 "standby_max_procs": 1}
        a = self.service(f"zk-same-{timeout:g}-A", name="bench-zk", locks=locks)
        b = self.service(f"zk-same-{timeout:g}-B", name="bench-zk", locks=locks)
        a.env = {**os.environ, "HADCTL_HOST_ID": "bench-A"}
        b.env = {**os.environ, "HADCTL_HOST_ID": "bench-B"}
        slot = f"{root}/bench-zk/slot-1"

        def ready() -> tuple[int, int] | None:
            """(main, standby): the main in its function, the standby in line in ZooKeeper and
            blocked in flock on the main's local lock (same-host takeover)."""
            main, standby = a.pid("main"), a.pid("standby")
            if main is None or standby is None or not is_alive(main) or main not in a.entered():
                return None
            if len(client.get_children(slot)) < 2 or not any_thread_in_flock_on(standby, a.main_lock):
                return None
            return main, standby

        a.must("start")
        failovers: list[float] = []
        rss: list[float] = []
        watch = Inotify(a.marker, Inotify.IN_MODIFY)
        try:
            for _ in range(self.trials(20, 5)):
                main, standby = wait_until(ready, 30, "A's main in its function, its standby in line")
                time.sleep(self.settle)  # let the new standby's start-up fade from the caches
                rss.append(int(proc_status(standby)["VmRSS"].split()[0]) / 1024)
                watch.drain()
                killed_at = time.monotonic()
                os.kill(main, signal.SIGKILL)
                entered = watch.wait_for(lambda pid=standby: a.entered().get(pid), timeout + 10,
                                         f"standby {standby} inside the function after main {main} was killed")
                failovers.append((entered - killed_at) * 1000)
            wait_until(ready, 30, "A's main in its function, its standby in line")
            statuses: dict[str, list[float]] = {"A": [], "B": [], "click": []}
            for _ in range(self.trials(20, 5)):  # interleaved with `import click`, the budget of a status
                for name, svc in (("A", a), ("B", b)):
                    ms, result = svc.run("status")
                    if result.returncode not in (0, 1, 3):
                        raise BenchError(f"ZooKeeper status on {name} exited {result.returncode}: "
                                         f"{result.stdout}{result.stderr}")
                    statuses[name].append(ms)
                statuses["click"].append(timed_run([PY, "-c", "import click"])[0])
        finally:
            watch.close()
        p50 = percentile(failovers, 50)
        self.rows.append(Row(f"zk_samehost_failover_{timeout:g}", f"ZooKeeper SIGKILL failover, same host, "
                             f"T={timeout:g} s", "ms", failovers, "p50<=50", p50 <= 50, perl="-",
                             notes="A's standby gets the dead main's local flock, deletes its lock node "
                                   "and takes the slot without waiting for the session to expire"))
        self.rows.append(Row("zk_status_local", "ZooKeeper status, this host holds every slot", "ms",
                             statuses["A"], "median<=60", percentile(statuses["A"], 50) <= 60, perl="-",
                             notes="read from the local locks: no kazoo, no session; `python -c 'import "
                                   f"click'` in the same run: median {percentile(statuses['click'], 50):.1f} ms"))
        self.rows.append(Row("zk_status_remote", "ZooKeeper status, another host holds the main", "ms",
                             statuses["B"], "(info)", None, perl="-",
                             notes="imports kazoo and opens a session to ask who holds the slot"))
        self.rows.append(Row("zk_standby_rss", "ZooKeeper standby RSS (VmRSS)", "MB", rss, "median<=15",
                             percentile(rss, 50) <= 15, perl="-",
                             notes="kazoo.client alone adds ~11 MB (106 modules: logging, ssl, socket, "
                                   "threading, uuid, json, inspect...); stubbing its unused recipes and ssl saves "
                                   "1.6 MB: 15 MB needs a ZooKeeper client of our own"))

    # ------------------------------------------------------------------ idle standby

    def scenario_idle(self) -> None:
        svc = self.service("idle")
        svc.must("start")
        _main, standby = svc.wait_ready(settle=0.5)
        window = 3.0 if self.quick else 10.0
        before_switches, before_ticks = context_switches(standby), cpu_ticks(standby)
        time.sleep(window)  # the measurement window itself
        after_switches, after_ticks = context_switches(standby), cpu_ticks(standby)
        if not blocked_in_flock_on(standby, svc.main_lock):
            raise BenchError(f"standby {standby} is no longer waiting in flock")
        voluntary = after_switches[0] - before_switches[0]
        involuntary = after_switches[1] - before_switches[1]
        cpu_ms = (after_ticks - before_ticks) * 1000 / os.sysconf("SC_CLK_TCK")
        self.rows.append(Row("idle_wakeups", f"waiting standby, {window:g} s: voluntary ctx switches", "count",
                             [float(voluntary)], "0", voluntary == 0,
                             notes=f"{after_switches[2]} thread(s); {involuntary} involuntary; "
                                   f"{voluntary / window:.2f} wake-ups/s"))
        self.rows.append(Row("idle_cpu", f"waiting standby, {window:g} s: utime+stime", "ms", [cpu_ms], "0",
                             cpu_ms == 0))

    # ------------------------------------------------------------------ status

    def scenario_status(self) -> None:
        svc = self.service("status")
        svc.must("start")
        svc.wait_ready()
        self._status_rows(svc, "status_wall", "status wall time")

    def scenario_status_history(self) -> None:
        """status over a full event history (events at its 256 KiB bound, events.1 too, one
        failover line in 20): what reading the last failover and the hour's count costs."""
        svc = self.service("status_history")
        svc.must("start")
        svc.wait_ready()
        now = time.time()
        failover = '"failover","pid":9,"slot":1,"old_pid":8,"new_pid":9,"gap_ms":0.9'
        for name, start in (("events.1", now - 7200), ("events", now - 3600)):
            lines, size, n = [], 0, 0
            while size < 256 * 1024:
                kind = failover if n % 20 == 0 else '"start","pid":7,"action":"start"'
                lines.append(f'{{"time":{start + n:.6f},"kind":{kind}}}\n')
                size += len(lines[-1])
                n += 1
            (svc.pid_dir / name).write_text("".join(lines))
        self._status_rows(svc, "status_history", "status, full event history", extra=False)

    def _status_rows(self, svc: Service, row: str, title: str, extra: bool = True) -> None:
        commands = {
            "status": [*HADCTL, "-c", str(svc.config), "status"],
            "click": [PY, "-c", "import click"],
            "pass": [PY, "-c", "pass"],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        cpus: dict[str, list[float]] = {k: [] for k in commands}
        count = self.trials(40, 10)
        for number in range(count + 3):  # interleaved, so load changes hit all three alike
            for key, command in commands.items():
                ms, cpu, result = timed_run(command)
                if key == "status" and result.returncode != 0:
                    raise BenchError(f"status exited {result.returncode}: {result.stdout}{result.stderr}")
                if number >= 3:
                    times[key].append(ms)
                    cpus[key].append(cpu)
        status, click = percentile(times["status"], 50), percentile(times["click"], 50)
        ratio = status / click
        self.rows.append(Row(row, title, "ms", times["status"], "<=1.2x import click",
                             ratio <= 1.2,
                             notes=f"median status {status:.1f} ms / median `python -c 'import click'` "
                                   f"{click:.1f} ms = {ratio:.2f}x (Perl original: 19 ms); CPU medians: status "
                                   f"{percentile(cpus['status'], 50):.1f} ms, import click "
                                   f"{percentile(cpus['click'], 50):.1f} ms = "
                                   f"{percentile(cpus['status'], 50) / percentile(cpus['click'], 50):.2f}x"))
        if not extra:
            return
        self.rows.append(Row("import_click", "  python -c 'import click'", "ms", times["click"], "(baseline)",
                             None, perl="-"))
        self.rows.append(Row("python_pass", "  python -c pass", "ms", times["pass"], "(floor)", None, perl="-"))

    # ------------------------------------------------------------------ standby RSS

    def scenario_reopen(self) -> None:
        """reopen-logs after a rename, as logrotate's postrotate runs it: the wall time
        until every worker writes to the new files (it waits for that), beside status."""
        # a main that runs Python code (benchsvc waits in sigwait, where no Python handler runs)
        svc = self.service("reopen", stdout_file=str(self.root / "reopen" / "out.log"),
                           entrypoint="tests.services.writer:write", python_path=[str(HERE.parent.parent)],
                           env={"RATE": "100"})
        svc.must("start")
        out = self.root / "reopen" / "out.log"
        wait_until(lambda: out.exists() and out.stat().st_size > 0 and (svc.pid_dir / "standby-1.pid").exists(),
                   30, "the writer's first lines and a standby")
        times: dict[str, list[float]] = {"reopen": [], "status": []}
        count = self.trials(30, 10)
        for number in range(count + 3):
            out.rename(out.with_name("out.log.1"))
            ms, _cpu, result = timed_run([*HADCTL, "-c", str(svc.config), "reopen-logs"])
            if result.returncode != 0:
                raise BenchError(f"reopen-logs exited {result.returncode}: {result.stdout}{result.stderr}")
            status_ms, _cpu, _result = timed_run([*HADCTL, "-c", str(svc.config), "status"])
            if number >= 3:
                times["reopen"].append(ms)
                times["status"].append(status_ms)
        reopen, status = percentile(times["reopen"], 50), percentile(times["status"], 50)
        self.rows.append(Row("reopen_logs_wall", "reopen-logs wall time (main + standby)", "ms", times["reopen"],
                             "(informational)", None, perl="-",
                             notes=f"median {reopen:.1f} ms against status {status:.1f} ms run alike"))

    def scenario_rss(self) -> None:
        svc = self.service("rss")
        svc.must("start")
        rss: list[float] = []
        detail: list[tuple[float, float]] = []

        def measure(_main: int, standby: int) -> None:
            status = proc_status(standby)
            rss.append(int(status["VmRSS"].split()[0]) / 1024)
            detail.append((int(status["RssAnon"].split()[0]) / 1024, int(status["RssFile"].split()[0]) / 1024))

        self._failovers(svc, self.trials(20, 5), on_ready=measure)
        anon = percentile([a for a, _f in detail], 50)
        files = percentile([f for _a, f in detail], 50)
        self.rows.append(Row("standby_rss", "standby RSS (VmRSS)", "MB", rss, "median<=10",
                             percentile(rss, 50) <= 10,
                             notes=f"median RssAnon {anon:.2f} MB + RssFile {files:.2f} MB; the first standby "
                                   "comes from start (double fork), the others from respawn"))

    # ------------------------------------------------------------------ 100 services

    def scenario_many(self) -> None:
        count = self.args.services
        conf = self.root / "many" / "conf"
        conf.mkdir(parents=True)
        services = [self.service(f"many/svc{n:03d}", f"bench{n:03d}", conf / f"bench{n:03d}.toml")
                    for n in range(count)]
        starts = []
        began = time.perf_counter()
        for svc in services:
            ms, result = svc.must("start")
            starts.append(ms)
        total_start = (time.perf_counter() - began) * 1000
        self.rows.append(Row("start_100", f"start {count} services one after another (total)", "ms",
                             [total_start], "<=10000", total_start <= 10000 if count == 100 else None,
                             notes=f"per start: median {percentile(starts, 50):.1f} ms, "
                                   f"max {max(starts):.1f} ms"))
        wait_until(lambda: all(s.ready() for s in services), 60, "every service to be up")
        command = [*HADCTL, "status", "--all", "--config-dir", str(conf)]
        probe = subprocess.run(command, capture_output=True, text=True)
        if probe.returncode != 0:
            why = (probe.stderr.strip() or probe.stdout.strip()).splitlines()
            self.rows.append(unavailable("status_all_100", f"status --all, {count} services", "median<=300",
                                         f"exit {probe.returncode}: {why[-1] if why else ''}"[:160]))
        else:
            lines = len(re.findall(r"#\d+ \(pid \d+\).*\[Running\]", probe.stdout))
            walls = []
            for _ in range(self.trials(30, 5)):
                began = time.perf_counter()
                result = subprocess.run(command, capture_output=True, text=True)
                walls.append((time.perf_counter() - began) * 1000)
                if result.returncode != 0:
                    raise BenchError(f"status --all exited {result.returncode}: {result.stderr.strip()}")
            self.rows.append(Row("status_all_100", f"status --all, {count} services", "ms", walls, "median<=300",
                                 percentile(walls, 50) <= 300 if count == 100 else None,
                                 notes=f"{lines} slots Running of {2 * count}"))
        stops = []
        for svc in services:
            ms, _result = svc.must("stop")
            stops.append(ms)
        self.rows.append(Row("stop_100", f"  stop {count} services one after another (total)", "ms",
                             [sum(stops)], "(info)", None, perl="-"))

    # ------------------------------------------------------------------ wrk: clients across failovers and restarts

    def scenario_wrk(self) -> None:
        """Debian's wrk (16 connections, one request per connection, loopback) against the
        HTTP test service, side by side: under hadctl with ``listen`` (the workers hold the
        socket), and the same service binding its own port (SO_REUSEADDR) as before."""
        wrk = shutil.which("wrk")
        if wrk is None:
            self.rows.append(unavailable("wrk", "wrk against an HTTP service", "0 refused",
                                         "wrk is not installed (tools/system-deps.sh installs it)"))
            return
        kills, restarts = self.trials(8, 3), self.trials(3, 2)
        root = str(HERE.parent.parent)
        for variant in ("own_port", "listen"):
            port = _free_port()
            settings: dict[str, Any] = {"python_path": [root], "env": {"BIND": f"127.0.0.1:{port}"}}
            if variant == "listen":
                settings.update(entrypoint="tests.services.http:serve", listen=[f"127.0.0.1:{port}"])
            else:
                settings.update(entrypoint="tests.services.http:serve_own_port")
            svc = self.service(f"wrk_{variant}", **settings)
            svc.must("start")
            url = f"http://127.0.0.1:{port}/"
            wait_until(lambda port=port: _http_ok(port), 10, f"{variant}: an answer on {url}")
            calm = _wrk(wrk, url, 3.0 if self.quick else 5.0)

            def fail_over(svc: Service = svc) -> None:
                for _ in range(kills):
                    main = svc.pid("main")
                    if main is None:
                        raise BenchError(f"{svc.name}: no main to kill")
                    os.kill(main, signal.SIGKILL)
                    wait_until(lambda main=main: svc.pid("main") not in (None, main), 10, "a promoted main")
                    wait_until(lambda: svc.pid("standby") not in (None, svc.pid("main")), 10, "a new standby")
                    time.sleep(1.0)  # one kill a second, as in the issue

            def restart(svc: Service = svc) -> None:
                for _ in range(restarts):
                    svc.must("restart")
                    time.sleep(1.0)

            failover = _wrk(wrk, url, kills * 1.0 + 4.0, during=fail_over)
            restarted = _wrk(wrk, url, restarts * 2.0 + 4.0, during=restart)
            svc.must("stop")
            label = "with listen" if variant == "listen" else "own bind (before)"
            target_f = "<=16 per failover, 0 refused" if variant == "listen" else "(baseline)"
            self.rows.append(Row(f"wrk_{variant}_failover", f"wrk {label}: failed requests per SIGKILL failover",
                                 "count", [failover["failed"] / kills],
                                 target_f, (failover["failed"] / kills <= 16 and failover["refused"] == 0)
                                 if variant == "listen" else None, perl="-",
                                 notes=f"{kills} kills in {failover['seconds']:g} s: {_wrk_errors(failover)}; "
                                       f"{failover['rps']:.0f} requests/s, p99 {failover['p99']:.1f} ms"))
            self.rows.append(Row(f"wrk_{variant}_restart", f"wrk {label}: failed requests per restart", "count",
                                 [restarted["failed"] / restarts], "0" if variant == "listen" else "(baseline)",
                                 restarted["failed"] == 0 if variant == "listen" else None, perl="-",
                                 notes=f"{restarts} restarts in {restarted['seconds']:g} s: {_wrk_errors(restarted)}; "
                                       f"{restarted['rps']:.0f} requests/s, p99 {restarted['p99']:.1f} ms"))
            self.rows.append(Row(f"wrk_{variant}_rps", f"wrk {label}: requests/s (no fault)", "req/s",
                                 [calm["rps"]], "(info)", None, perl="-",
                                 notes=f"p99 latency {calm['p99']:.1f} ms (failovers: {failover['p99']:.1f} ms); "
                                       f"{_wrk_errors(calm)}"))


    # ------------------------------------------------------------------ containment, watchdog, max_rss

    def scenario_contain(self) -> None:
        """Issue 14's rows, with tests/services/contained.py (its ledger: ``EVENT PID MONOTONIC``)."""
        repo = str(HERE.parent.parent)

        def ledger_of(svc: Service) -> list[tuple[str, int, float]]:
            path = svc.folder / "ledger"
            if not path.exists():
                return []
            return [(w[0], int(w[1]), float(w[2])) for w in (line.split() for line in path.read_text().splitlines())]

        def contained(scenario: str, entrypoint: str, env: dict[str, str], **settings: Any) -> Service:
            svc = self.service(scenario, python_path=[repo], entrypoint=f"tests.services.contained:{entrypoint}",
                               **settings)
            svc.config.write_text(svc.config.read_text().replace(
                "env = {", "env = { " + ", ".join(f'{k} = {json.dumps(v)}' for k, v in
                                                  {"LEDGER": str(svc.folder / "ledger"), **env}.items()) + ", ", 1))
            return svc

        # hung main -> the standby inside the function: every main beats 0.2 s, then stops itself
        timeout = 0.5
        svc = contained("watchdog", "hangs", {"HANG": "stop", "HEALTHY": "0.2"}, watchdog_timeout=timeout,
                        kill_timeout=1)
        svc.must("start")
        count = self.trials(20, 5)
        wait_until(lambda: sum(1 for e in ledger_of(svc) if e[0] == "enter") > count, 20 + 2 * count,
                   f"{count} watchdog replacements")
        events = ledger_of(svc)
        samples, overlaps = [], 0
        for index, (event, _pid, at) in enumerate(events):
            if event == "hang":
                following = [e for e in events[index + 1:] if e[0] == "enter"]
                if following:
                    samples.append((following[0][2] - at) * 1000)
            if event == "enter" and any(e[0] == "enter" for e in events[index + 1:index + 2]):
                overlaps += 1  # two enters in a row: a main entered while another had not hung yet
        svc.must("stop")
        target = timeout * 1000 + 100
        self.rows.append(Row("watchdog_replace", f"hung main (SIGSTOP) -> standby in the function, "
                             f"watchdog_timeout {timeout:g} s", "ms", samples, f"p99<={target:g}",
                             bool(samples) and percentile(samples, 99) <= target and not overlaps, perl="never",
                             notes=f"from the main's last beat to the new main's entry; {overlaps} overlaps"))

        # standby wake-ups per second: with a watchdog (the main beats every 20 ms), and without
        window = 3.0 if self.quick else 10.0
        for name, settings in (("watchdog_wakeups", {"watchdog_timeout": timeout}), ("contain_idle_wakeups", {})):
            svc = contained(name.replace("_", "-"), "beating", {"BEAT": "0.02"}, **settings)
            svc.must("start")
            standby = wait_until(lambda svc=svc: (p := svc.pid("standby")) and  # type: ignore[misc]
                                 blocked_in_flock_on(p, svc.main_lock) and p, 30, "a standby waiting in flock")
            time.sleep(0.5)  # settle: its start-up is not counted
            before = context_switches(standby)[0]
            time.sleep(window)  # the measurement window itself
            rate = (context_switches(standby)[0] - before) / window
            svc.must("stop")
            if settings:
                self.rows.append(Row(name, f"waiting standby with watchdog_timeout {timeout:g} s: wake-ups/s",
                                     "1/s", [rate], f"<={2 / timeout:g}", rate <= 2 / timeout, perl="2",
                                     notes="the standby wakes when the newest beat it saw would expire"))
            else:
                self.rows.append(Row(name, "waiting standby without watchdog: wake-ups/s", "1/s", [rate], "0",
                                     rate == 0, perl="2"))

        # max_rss: the growing main is replaced as restart replaces one slot; its target is the
        # restart gap of the same service (same exit path: a 50 ms drain, then the function returns)
        def exit_to_enter(svc: Service) -> list[float]:
            events = ledger_of(svc)
            gaps = []
            for index, (event, _pid, at) in enumerate(events):
                if event == "exit":
                    following = [e for e in events[index + 1:] if e[0] == "enter"]
                    if following:
                        gaps.append((following[0][2] - at) * 1000)
            return gaps

        count = self.trials(10, 3)
        svc = contained("max-rss-restart", "grows", {"GROW": "0", "HEALTHY": "0.2"}, kill_timeout=2,
                        locks={"interval": 0.1})
        svc.must("start")
        for _ in range(count):
            svc.must("restart")
        restart_gaps = exit_to_enter(svc)
        svc.must("stop")
        svc = contained("max-rss", "grows", {"GROW": str(8 << 20), "HEALTHY": "0.2"}, max_rss="100M",
                        kill_timeout=2, locks={"interval": 0.1})
        svc.must("start")
        wait_until(lambda: sum(1 for e in ledger_of(svc) if e[0] == "enter") > count, 30 + 3 * count,
                   f"{count} max_rss recycles")
        gaps = exit_to_enter(svc)
        svc.must("stop")
        same = percentile(restart_gaps, 50) if restart_gaps else 0.0
        self.rows.append(Row("max_rss_restart_gap", "  restart of the same service: longest time with no main", "ms",
                             restart_gaps, "(baseline)", None, perl="-",
                             notes="hadctl restart of the max_rss row's service (not growing): exit line -> entry"))
        self.rows.append(Row("max_rss_gap", "max_rss recycle: longest time with no main", "ms", gaps,
                             f"median<={same:.2f} (its restart gap)",
                             bool(gaps) and bool(restart_gaps) and percentile(gaps, 50) <= same, perl="-",
                             notes="the old main's exit line (after a 50 ms drain) -> the new main's entry"))

        # stop with 50 leftover descendants (setsid daemons: the process group cannot reach them)
        for name, entrypoint in (("stop_leftovers_50", "many_children"), ("stop_plain", "beating")):
            svc = contained(name.replace("_", "-"), entrypoint, {"CHILDREN": "50", "REPORT": str(self.root / name)})
            walls = []
            for _ in range(self.trials(8, 2)):
                report = self.root / name
                report.unlink(missing_ok=True)
                svc.must("start")
                if entrypoint == "many_children":
                    wait_until(report.exists, 30, "50 children started")
                else:
                    wait_until(lambda svc=svc: any(e[0] == "enter" for e in ledger_of(svc)),  # type: ignore[misc]
                               30, "the main")
                ms, _result = svc.must("stop")
                walls.append(ms)
            if entrypoint == "many_children":
                leftover_walls = walls
            else:
                plain = percentile(walls, 50)
                self.rows.append(Row("stop_leftovers_50", "stop with 50 leftover descendants (setsid)", "ms",
                                     leftover_walls, f"median<=2x plain stop ({2 * plain:.0f})",
                                     percentile(leftover_walls, 50) <= 2 * plain, perl="-",
                                     notes=f"plain stop of the same service without children: median {plain:.0f} ms"))


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _http_ok(port: int) -> bool:
    import socket

    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2) as client:
            client.sendall(b"GET / HTTP/1.0\r\n\r\n")
            return client.recv(64).startswith(b"HTTP/1.0 200")
    except OSError:
        return False


def _wrk(wrk: str, url: str, seconds: float, during: Callable[[], None] | None = None) -> dict[str, float]:
    """Run wrk for ``seconds`` (16 connections, one request each), calling ``during``
    meanwhile; its figures: requests/s, p99 ms, failed requests and their kinds."""
    duration = max(1, round(seconds))
    command = [wrk, "-t2", "-c16", f"-d{duration}s", "--latency", "-H", "Connection: close", url]
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        try:
            time.sleep(0.5)  # let the load reach its pace before the faults
            if during is not None:
                during()
            out, _ = proc.communicate(timeout=duration + 30)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    if proc.returncode != 0:
        raise BenchError(f"wrk exited {proc.returncode}: {out.strip()[-300:]}")
    found: dict[str, float] = {"seconds": float(duration), "connect": 0, "read": 0, "write": 0, "timeout": 0,
                               "non2xx": 0}
    errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    if errors:
        for key, value in zip(("connect", "read", "write", "timeout"), errors.groups(), strict=True):
            found[key] = float(value)
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        found["non2xx"] = float(non2xx.group(1))
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    found["rps"] = float(rps.group(1)) if rps else 0.0
    p99 = re.search(r"^\s+99%\s+([\d.]+)(us|ms|s)\s*$", out, re.MULTILINE)
    found["p99"] = float(p99.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)] if p99 else float("nan")
    found["failed"] = found["connect"] + found["read"] + found["write"] + found["timeout"] + found["non2xx"]
    # a refused connect surfaces in wrk as a connect or a write error (its connect is non-blocking)
    found["refused"] = found["connect"] + found["write"]
    return found


def _wrk_errors(found: dict[str, float]) -> str:
    return (f"{found['failed']:.0f} failed (connect {found['connect']:.0f}, read {found['read']:.0f}, "
            f"write {found['write']:.0f}, timeout {found['timeout']:.0f}, non-2xx {found['non2xx']:.0f})")


def stale_bytecode(folder: Path) -> list[str]:
    """Modules under ``folder`` whose .pyc no longer matches the source (edited during the run)."""
    import importlib.util

    stale = []
    for source in folder.rglob("*.py"):
        try:
            header = Path(importlib.util.cache_from_source(str(source))).read_bytes()[:16]
            st = source.stat()
        except (OSError, ValueError):
            stale.append(source.name)
            continue
        flags = int.from_bytes(header[4:8], "little")
        if flags == 0 and (int.from_bytes(header[8:12], "little") != int(st.st_mtime) & 0xFFFFFFFF
                           or int.from_bytes(header[12:16], "little") != st.st_size & 0xFFFFFFFF):
            stale.append(source.name)
    return sorted(stale)


def _installed_package() -> Path | None:
    """The folder of the hadctl package that HADCTL runs."""
    found = subprocess.run([PY, "-c", "import hadctl, os; print(os.path.dirname(hadctl.__file__))"],
                           capture_output=True, text=True)
    return Path(found.stdout.strip()) if found.returncode == 0 and found.stdout.strip() else None


SCENARIOS = ["failover", "failover_busy", "pool", "restart", "stop_start", "fork", "idle", "status", "status_history",
             "rss", "many", "zookeeper", "reopen", "contain"]
SCENARIOS.append("wrk")
ALIASES = {  # row names and short words -> scenario
    "pool_whole": "pool", "restart_gap": "restart", "restart_wall": "restart", "stop": "stop_start",
    "start": "stop_start", "stop_wall": "stop_start", "start_wall": "stop_start",
    "fork_after_failover": "fork", "idle_wakeups": "idle", "idle_cpu": "idle", "status_wall": "status",
    "standby_rss": "rss", "status_all": "many", "status_all_100": "many", "start_100": "many", "busy": "failover_busy",
    "failover_no_respawn": "fork", "import_click": "status", "python_pass": "status", "stop_100": "many",
    "zk": "zookeeper", "zk_samehost_failover_2": "zookeeper", "zk_status_local": "zookeeper",
    "zk_status_remote": "zookeeper", "zk_standby_rss": "zookeeper",
    "reopen_logs_wall": "reopen",
    "watchdog_replace": "contain", "watchdog_wakeups": "contain", "contain_idle_wakeups": "contain",
    "max_rss_gap": "contain", "max_rss_restart_gap": "contain", "stop_leftovers_50": "contain",
}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer trials: a smoke run, not the figures")
    parser.add_argument("--only", metavar="NAME[,NAME]", help=f"scenarios or rows to run: {', '.join(SCENARIOS)}")
    parser.add_argument("--json", metavar="PATH", default="bench-results.json", help="where the results go")
    parser.add_argument("--trials", type=int, default=0, help="override every scenario's number of trials")
    parser.add_argument("--services", type=int, default=100, help="services for the status --all row")
    parser.add_argument("--settle", type=float, default=0.02,
                        help="seconds of quiet before each timed action (default 0.02)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (for logs)")
    parser.add_argument("--hadctl-src", metavar="DIR",
                        help="run `python -m hadctl` from DIR (a patched copy of src/) instead of the venv's "
                             "hadctl: to measure a proposed change without touching the checkout")
    args = parser.parse_args(argv)

    chosen = SCENARIOS
    if args.only:
        chosen = []
        for word in args.only.replace(" ", "").split(","):
            name = ALIASES.get(word, word)
            if name not in SCENARIOS:
                parser.error(f"--only: unknown name {word!r}; choose from {', '.join(SCENARIOS)}")
            if name not in chosen:
                chosen.append(name)

    if args.hadctl_src:
        source = str(Path(args.hadctl_src).resolve())
        if not Path(source, "hadctl", "cli.py").exists():
            parser.error(f"--hadctl-src: no hadctl/cli.py under {source}")
        os.environ["PYTHONPATH"] = os.pathsep.join([source, *filter(None, [os.environ.get("PYTHONPATH")])])
        HADCTL[:] = [PY, "-m", "hadctl"]
    # Byte-compile what the spawned processes import (as `make install` does): with
    # PYTHONDONTWRITEBYTECODE set and sources edited since, every hadctl run and every
    # standby would compile from source, and the figures would measure the compiler.
    package = Path(args.hadctl_src).resolve() / "hadctl" if args.hadctl_src else _installed_package()
    for folder in filter(None, [package, HERE]):
        compileall.compile_dir(str(folder), quiet=1)
    # ...and let every process we start rewrite a .pyc that an edit made stale meanwhile.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    os.environ["HADCTL_BENCH_ID"] = BENCH_ID
    os.environ["HADCTL_PASS_ENV"] = "HADCTL_BENCH_ID PYTHONPATH"  # workers get a defined environment
    os.environ["HADC_NO_COLORS"] = "1"
    os.environ.pop("HADC_TRACE", None)

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)

    bench = Bench(args)
    errors: list[str] = []
    machine = {"cpus": os.cpu_count(), "python": platform.python_version(), "hadctl": HADCTL,
               "hadctl_src": args.hadctl_src,
               "kernel": platform.release(), "quick": args.quick, "loadavg_before": loadavg(),
               "cpu_busy_before_percent": cpu_busy(),
               "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    print(f"hadctl bench: {', '.join(chosen)}{' (quick)' if args.quick else ''}; "
          f"{machine['cpus']} CPUs, load average {machine['loadavg_before']}, "
          f"{machine['cpu_busy_before_percent']}% busy; folder {bench.root}", file=sys.stderr)
    if machine["cpu_busy_before_percent"] > 5:
        print("bench: warning: the machine is not quiet (other work keeps the CPUs busy): the figures will be "
              "pessimistic; the targets are for a quiet machine", file=sys.stderr)
    left: list[str] = []
    status = 0
    try:
        for name in chosen:
            began = time.monotonic()
            print(f"bench: {name} ...", file=sys.stderr, flush=True)
            try:
                getattr(bench, f"scenario_{name}")()
            except (BenchError, subprocess.SubprocessError, OSError) as exc:
                errors.append(f"{name}: {exc}")
                print(f"bench: {name} failed: {exc}", file=sys.stderr)
                if not isinstance(exc, BenchError):
                    traceback.print_exc()
                bench.rows.append(Row(name, f"{name} (error)", "", [], "-", None, perl="-",
                                      notes=f"error: {str(exc).splitlines()[0][:200]}"))
            finally:
                for svc in bench.services:
                    svc.stop()  # only those that may still run
            print(f"bench: {name} took {time.monotonic() - began:.1f} s", file=sys.stderr)
    except KeyboardInterrupt:
        print("bench: interrupted; stopping every service", file=sys.stderr)
        status = 130
    finally:
        left = bench.cleanup()
    if left:
        errors.append(f"processes left behind (killed): {left}")
        print(f"bench: processes left behind, killed: {left}", file=sys.stderr)
    if errors:
        status = status or 1
    machine["loadavg_after"] = loadavg()
    machine["cpu_busy_after_percent"] = cpu_busy()
    stale = [name for folder in filter(None, [package, HERE]) for name in stale_bytecode(folder)]
    if stale:
        machine["stale_bytecode"] = stale
        print(f"bench: warning: sources edited during the run (until a process rewrote their .pyc, hadctl "
              f"runs and standbys compiled them from source, slower and ~1 MB larger): {', '.join(stale)}",
              file=sys.stderr)
    print()
    print_table(bench.rows)
    quiet = max(machine["cpu_busy_before_percent"], machine["cpu_busy_after_percent"]) <= 5
    print(f"\nmachine: {machine['cpus']} CPUs, Python {machine['python']}, CPU busy before/after "
          f"{machine['cpu_busy_before_percent']}%/{machine['cpu_busy_after_percent']}% (others' work), load average "
          f"before {machine['loadavg_before']} after {machine['loadavg_after']}"
          f"{'' if quiet else ' (NOT QUIET: other work was running)'}"
          f"{'; QUICK run: too few trials for the figures' if args.quick else ''}")
    document = {"machine": machine, "rows": [row.as_dict() for row in bench.rows], "errors": errors}
    Path(args.json).write_text(json.dumps(document, indent=2) + "\n")
    print(f"results written to {args.json}")
    return status


if __name__ == "__main__":
    sys.exit(main())
