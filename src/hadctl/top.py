"""``hadctl top``: a live table of one service's slots (or, ``--all``, every service's).

One row per expected slot: role, pid, uptime, CPU (% of one core since the last
frame) and RSS of the process with its descendants, the listen sockets it holds,
the last event of the slot (events.py), and the crash-loop back-off. Refreshed
every second until Ctrl-C (exit 0); one frame with ``--once`` or when stdout is
no terminal (``hadctl top | head``, where a closed pipe ends it quietly).

It costs the services nothing: slots are read from the locks (slots.py, no lock
taken from a holder), figures from /proc through psutil; no signal is sent and no
standby is woken. The terminal's size is read at every frame, so a resize
(SIGWINCH, left at its default: ignored) takes effect at the next one.

The one module that imports rich's live display and psutil (both only here,
inside the functions: ``import hadctl.top`` stays cheap). Never imported by the
worker or the status path.
"""
from __future__ import annotations

import os
import sys
import time

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .config import ServiceConfig

REFRESH = 1.0  # seconds between frames
COLUMNS = ("service", "slot", "role", "pid", "uptime", "cpu", "rss", "listen", "last event", "back-off")


def top(cfg: ServiceConfig, once: bool = False) -> int:
    """The live table of one service; returns the exit status (0)."""
    return _run(lambda: [cfg], once)


def top_all(folder: str, once: bool = False) -> int:
    """The live table of every ``*.toml`` service in ``folder`` (read again at each frame:
    a file added or broken meanwhile shows at the next one)."""
    from .config import load
    from .errors import HadctlError
    from .services import config_files

    def configs() -> list[Any]:
        found: list[Any] = []
        for path in config_files(folder):
            try:
                found.append(load(path))
            except HadctlError as exc:
                found.append((os.path.splitext(os.path.basename(path))[0], str(exc)))
        return found

    return _run(configs, once)


def _run(configs: Callable[[], list[Any]], once: bool) -> int:
    from rich.console import Console

    from .render import use_color

    tty = sys.stdout.isatty()
    color = use_color(sys.stdout)
    width = None if tty else max(int(os.environ.get("COLUMNS", "0") or 0), 160)
    console = Console(file=sys.stdout, force_terminal=True if color else None, no_color=not color, width=width,
                      highlight=False, emoji=False, markup=False, color_system="standard" if color else None)
    console.on_broken_pipe = _closed_pipe  # type: ignore[method-assign]  # rich's own exits 1: a reader that has seen enough is no failure
    sampler = Sampler()
    try:
        if once or not tty:
            console.print(frame(configs(), sampler))
            sys.stdout.flush()
            return 0
        return _live(console, configs, sampler)
    except KeyboardInterrupt:  # Ctrl-C: how top ends
        return 0
    except BrokenPipeError:  # the reader went away (hadctl top | head -1): nothing more to say
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
        os.close(null)
        return 0


def _closed_pipe() -> None:
    raise BrokenPipeError


def _live(console: Any, configs: Callable[[], list[Any]], sampler: Sampler) -> int:
    """Redraw every REFRESH seconds on the terminal's alternate screen until Ctrl-C."""
    from rich.live import Live

    with Live(console=console, screen=True, auto_refresh=False, transient=True) as live:
        while True:
            started = time.monotonic()
            live.update(frame(configs(), sampler), refresh=True)
            time.sleep(max(0.0, REFRESH - (time.monotonic() - started)))


class Sampler:
    """psutil's view of the processes, kept between frames: CPU % is the CPU time used
    since the previous frame's reading of the same process (at the first reading: since
    the process started)."""

    def __init__(self) -> None:
        self.processes: dict[int, Any] = {}
        self.children: dict[int, list[int]] = {}
        self.cpu: dict[int, tuple[float, float]] = {}  # pid -> (CPU seconds, time.monotonic()) last read

    def sample(self) -> None:
        """Read every process's parent once per frame (descendants of each worker)."""
        import psutil

        children: dict[int, list[int]] = {}
        alive: dict[int, Any] = {}
        for proc in psutil.process_iter(["ppid"]):  # psutil keeps these objects between calls
            alive[proc.pid] = proc
            children.setdefault(proc.info["ppid"], []).append(proc.pid)
        self.processes, self.children = alive, children
        self.cpu = {pid: value for pid, value in self.cpu.items() if pid in alive}

    def _cpu_percent(self, pid: int, seconds: float, age: float) -> float:
        now = time.monotonic()
        before = self.cpu.get(pid)
        self.cpu[pid] = (seconds, now)
        if before is None or now <= before[1]:
            return 100.0 * seconds / age if age > 0 else 0.0
        return 100.0 * max(0.0, seconds - before[0]) / (now - before[1])

    def tree(self, pid: int) -> list[int]:
        found, pending = [], [pid]
        while pending:
            current = pending.pop()
            found.append(current)
            pending.extend(self.children.get(current, ()))
        return found

    def figures(self, pid: int) -> tuple[float | None, float | None, int | None]:
        """(uptime s, CPU % since the last frame, RSS bytes) of ``pid`` with its descendants."""
        import psutil

        cpu, rss, uptime = 0.0, 0, None
        for member in self.tree(pid):
            proc = self.processes.get(member)
            if proc is None:
                continue
            try:
                with proc.oneshot():
                    age = max(0.0, time.time() - proc.create_time())
                    if member == pid:
                        uptime = age
                    times = proc.cpu_times()
                    cpu += self._cpu_percent(member, times.user + times.system, age)
                    rss += proc.memory_info().rss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
        if uptime is None:
            return None, None, None
        return uptime, cpu, rss


def frame(configs: list[Any], sampler: Sampler) -> Any:
    """The table of one refresh: a row per expected slot of each service."""
    from rich.table import Table

    sampler.sample()
    table = Table(title=f"hadctl top  {time.strftime('%H:%M:%S')}", title_justify="left")
    for name in COLUMNS:
        table.add_column(name, justify="right" if name in ("slot", "pid", "uptime", "cpu", "rss") else "left",
                         no_wrap=name not in ("last event", "listen"))
    for cfg in configs:
        for row in rows(cfg, sampler):
            table.add_row(*row)
    return table


def rows(cfg: Any, sampler: Sampler) -> list[tuple[str, ...]]:
    """One service's rows (a broken config: one row naming its problem)."""
    if isinstance(cfg, tuple):
        return [(cfg[0], "", "broken", "", "", "", "", "", cfg[1], "")]
    from . import events
    from .control import Service
    from .errors import HadctlError

    svc = Service(cfg)
    try:
        reports, _stale = svc.slots()
    except (HadctlError, OSError) as exc:
        return [(cfg.name, "", "error", "", "", "", "", "", str(exc), "")]
    history = events.read(cfg.pid_dir) if os.path.isdir(cfg.pid_dir) else []
    listen = _listen(cfg, reports)
    backoff = _backoff(svc)
    found: list[tuple[str, ...]] = []
    for index, report in enumerate(reports):
        pid = report.pid
        uptime, cpu, rss = sampler.figures(pid) if pid is not None else (None, None, None)
        main = report.role.value == "main"
        last = next((e for e in reversed(history) if e.get("slot") == report.slot), None) if main else None
        found.append((cfg.name if index == 0 else "", str(report.slot), report.role.value,
                      str(pid) if pid is not None else "-", _duration(uptime),
                      f"{cpu:.1f}%" if cpu is not None else "", _size(rss), listen.get(pid, ""),
                      _ago(last) if last is not None else "",
                      backoff if index == 0 else ""))
    return found


def _listen(cfg: Any, reports: list[Any]) -> dict[int | None, str]:
    """pid -> the names of the listen sockets it holds."""
    if not cfg.listen:
        return {}
    from .sockets import listening

    held: dict[int | None, list[str]] = {}
    for item in listening(cfg, reports):
        for pid in item["pids"]:  # type: ignore[attr-defined]
            held.setdefault(pid, []).append(str(item["address"]))
    return {pid: " ".join(names) for pid, names in held.items()}


def _backoff(svc: Any) -> str:
    """``3 s (pid 123)`` while a standby waits out a crash-loop back-off, else ""."""
    from .layout import read_pid_file
    from .probe import is_worker_of

    layout = svc.layout
    found = read_pid_file(layout.backoff_file)
    if found is None or found.pid is None or not is_worker_of(found.pid, layout, svc.cfg.name):
        return ""
    try:
        with open(layout.backoff_file) as handle:
            delay = handle.read().splitlines()[1].strip()
    except (OSError, IndexError):
        delay = "?"
    return f"{delay} s (pid {found.pid})"


def _ago(event: dict[str, Any]) -> str:
    from .events import age
    from .render import what

    return f"{age(time.time() - float(event['time']))} ago: {what(event)}"


def _duration(seconds: float | None) -> str:
    from .events import age

    return "" if seconds is None else age(seconds)


def _size(rss: int | None) -> str:
    if rss is None:
        return ""
    return f"{rss / 1048576:.1f}M"
