"""Liveness and recycling of mains: the heartbeat, and who acts on a silent or bloated main.

The main's side (``start_beats``): a 16-byte file per slot in pid_dir,
``hadctl-beat-SLOT``, mapped into the main: ``hadctl.alive()`` writes
``time.monotonic_ns()`` into its first 8 bytes (a memory store, no system call;
the clock is the host's, so another process can compare), the pid sits in the
last 8. It is written once as the function starts, and by ``hadctl.ready()``.

The watcher's side (``Watcher``): the standby that would take over is already
waiting for the slot, so it watches, with no resident supervisor and no cron:

* while ``watchdog_timeout`` is set it wakes when the newest beat it saw would
  expire (at most 2 wake-ups per watchdog_timeout, about 1 while the main beats);
  with ``max_rss`` set, once per ``locks.interval`` to add up the main's tree;
  with neither it never wakes (a waiting standby costs 0 wake-ups);
* a main silent for longer than watchdog_timeout gets ``watchdog_signal`` (then
  SIGCONT: a stopped main must run to die), then KILL after kill_timeout; a
  main over max_rss gets the ``stop_signals`` ladder (TERM first: it drains),
  exactly as restart stops one slot. Each signal goes through a pidfd opened
  first and then checked against the slot's lock, and between steps the watcher
  goes back to waiting on the lock: the slot is taken the instant it frees.
  Both are logged, and ``hadctl-replaced-SLOT`` tells status why.

Without a standby, ``fork`` (cron) checks the beats (``check_from_controller``).
Imports backoff, contain, lean, locks.flock and probe; the worker imports it only when a
watchdog or max_rss is configured.
"""
from __future__ import annotations

import os
import time

from . import backoff, contain, events, lean, probe
from .locks import flock

if lean.TYPE_CHECKING:
    from typing import Any

    from .spec import WorkerSpec

BEAT_SIZE = 16
HUNG = "hung"
MAX_RSS = "max_rss"


def beat_file(pid_dir: str, slot: int) -> str:
    return os.path.join(pid_dir, f"hadctl-beat-{slot}")


def replaced_file(pid_dir: str, slot: int) -> str:
    return os.path.join(pid_dir, f"hadctl-replaced-{slot}")


# ------------------------------------------------------------ the main's side


def start_beats(pid_dir: str, slot: int, pid: int) -> Any:
    """Map ``hadctl-beat-SLOT`` into this main and write its first beat; returns the
    mapping (``hadctl.alive()`` writes into it), or None when it cannot be made."""
    import mmap

    path = beat_file(pid_dir, slot)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return None
    try:
        os.ftruncate(fd, BEAT_SIZE)
        mapping = mmap.mmap(fd, BEAT_SIZE)
    except (OSError, ValueError):
        return None
    finally:
        os.close(fd)
    # The beat before the pid: a watcher reading between the two stores must never see
    # this main's pid beside an old beat (the file's zeros, or the last main's final beat,
    # maybe that of a hung main): it would replace a main that has just begun.
    mapping[0:8] = time.monotonic_ns().to_bytes(8, "little")
    mapping[8:16] = pid.to_bytes(8, "little")
    return mapping


def read_beat(pid_dir: str, slot: int) -> tuple[int, int] | None:
    """(monotonic_ns of the last beat, pid) of ``slot``'s main, or None (none yet)."""
    data = lean.read_small(beat_file(pid_dir, slot), BEAT_SIZE)
    if data is None or len(data) != BEAT_SIZE:
        return None
    beat, pid = int.from_bytes(data[:8], "little"), int.from_bytes(data[8:], "little")
    if beat == 0 or pid == 0:  # made, not yet written (start_beats)
        return None
    return beat, pid


def read_replaced(pid_dir: str, slot: int) -> dict[str, object] | None:
    """What ``hadctl-replaced-SLOT`` says: pid, why (``hung`` or ``max_rss``), when."""
    try:
        with open(replaced_file(pid_dir, slot)) as handle:
            words = handle.read().split()
        return {"pid": int(words[0]), "why": words[1], "at": float(words[2])}
    except (OSError, ValueError, IndexError):
        return None


def _note_replaced(pid_dir: str, slot: int, pid: int, why: str) -> None:
    backoff.note_handover(pid_dir, slot, pid)  # a replacement asked for: no death for the crash-loop limit
    path = replaced_file(pid_dir, slot)
    temporary = f"{path}.{os.getpid()}.tmp"
    try:
        # pid_dir is the service user's, and fork may run as root: never write through a
        # name that user may have prepared (a link); only into a file made here and now
        if os.path.lexists(temporary):
            os.unlink(temporary)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
        try:
            os.write(fd, f"{pid} {why} {time.time():.3f}\n".encode())
        finally:
            os.close(fd)
        os.replace(temporary, path)
    except OSError:
        pass


# ------------------------------------------------------------ the watcher's side


class _Replacing:
    """A main being replaced: the pidfd, the signals still to send, when the next is due."""

    __slots__ = ("pid", "pidfd", "ladder", "due")

    def __init__(self, pid: int, pidfd: int, ladder: list[str], due: float) -> None:
        self.pid = pid
        self.pidfd = pidfd
        self.ladder = ladder
        self.due = due


class Watcher:
    """The standby's watch over the main slots ``slots`` (see the module docstring).

    ``check()`` looks, acts, and returns the seconds until it must look again
    (None: never, nothing to watch on a timer)."""

    def __init__(self, spec: WorkerSpec, lock_file: Any, log: Any, slots: list[int]) -> None:
        self.pid_dir = spec.pid_dir
        self.timeout = spec.watchdog_timeout
        self.signal = spec.watchdog_signal
        self.max_rss = spec.max_rss
        self.stop_signals = list(spec.stop_signals)
        self.step = spec.signal_timeout
        self.interval = max(spec.locks_interval, 0.05)
        self.lock_file = lock_file  # slot -> path of its lock
        self.log = log
        self.slots = slots
        self.finder = contain.Finder(spec.service_id, spec.cgroup) if spec.max_rss else None
        self.next_rss = 0.0
        self.replacing: dict[int, _Replacing] = {}

    def check(self) -> float | None:
        now = time.monotonic()
        wake: float | None = None

        def sooner(seconds: float) -> None:
            nonlocal wake
            wake = seconds if wake is None else min(wake, seconds)

        for slot, item in list(self.replacing.items()):
            if probe.wait_for_exit([item.pidfd], now) == []:
                os.close(item.pidfd)
                del self.replacing[slot]
            elif now >= item.due and item.ladder:
                self._send(item, item.ladder.pop(0))
                item.due = now + self.step
            if slot in self.replacing:
                sooner(max(item.due - now, 0.01))
        if self.timeout:
            now_ns = time.monotonic_ns()
            for slot in self.slots:
                if slot in self.replacing:
                    continue
                beat = read_beat(self.pid_dir, slot)
                if beat is None:
                    sooner(self.timeout)
                    continue
                age = (now_ns - beat[0]) / 1e9
                if age < self.timeout or not self._replace(slot, beat[1], HUNG, age):
                    sooner(max(self.timeout - age, 0.0) + 0.001 if age < self.timeout else self.timeout)
        if self.max_rss and self.finder is not None:
            if now >= self.next_rss:
                self.next_rss = now + self.interval
                for slot in self.slots:
                    pid = flock.lock_file_pid(self.lock_file(slot))
                    if slot in self.replacing or pid is None:
                        continue
                    rss = contain.tree_rss(self.finder.tree(pid))
                    if rss > self.max_rss:
                        self._replace(slot, pid, MAX_RSS, rss)
            sooner(max(self.next_rss - now, 0.001))
        return wake

    def _replace(self, slot: int, pid: int, why: str, figure: float) -> bool:
        """Begin replacing ``slot``'s main ``pid`` if it still holds the slot; False if not."""
        target = probe.open_target(pid)
        if target is None:
            return False
        if not flock.holds_path(pid, self.lock_file(slot)):
            target.close()
            return False
        if why == HUNG:
            ladder = [self.signal, "KILL"]
            self.log.warn(f"main #{slot} (pid {pid}) silent for {figure:.3f} s (watchdog_timeout "
                          f"{self.timeout:g} s): hung, replaced: SIG{self.signal}, then SIGKILL after {self.step:g} s")
        else:
            ladder = list(self.stop_signals)
            self.log.warn(f"main #{slot} (pid {pid}) uses {int(figure)} bytes with its descendants, over max_rss "
                          f"{self.max_rss}: replaced by this standby (pid {os.getpid()})")
        _note_replaced(self.pid_dir, slot, pid, why)
        events.record(self.pid_dir, "replaced", slot=slot, main_pid=pid, why=why, figure=figure)
        item = _Replacing(pid, target.pidfd, ladder, 0.0)
        target.pidfd = -1  # the item owns it now
        self._send(item, item.ladder.pop(0))
        item.due = time.monotonic() + self.step
        self.replacing[slot] = item
        return True

    def _send(self, item: _Replacing, name: str) -> None:
        self.log.trace(f"watchdog: SIG{name} to pid {item.pid}")
        try:
            signum = lean.signum(name)
            lean.pidfd_send_signal(item.pidfd, signum)
            if signum not in (lean.SIGKILL, lean.SIGCONT, lean.SIGSTOP):
                lean.pidfd_send_signal(item.pidfd, lean.SIGCONT)  # a stopped main must run to die
        except ProcessLookupError:
            pass

    def close(self) -> None:
        for item in self.replacing.values():
            os.close(item.pidfd)
        self.replacing.clear()


def check_from_controller(pid_dir: str, slots: list[int], lock_file: Any, timeout: float, signal: str,
                          step: float, log: Any) -> list[int]:
    """``fork``'s watchdog, for services without a standby: each main silent for longer
    than ``timeout`` gets ``signal`` (and SIGCONT), then KILL after ``step``; waits
    for its exit. Returns the slots whose main was replaced (now free)."""
    ended = []
    now_ns = time.monotonic_ns()
    for slot in slots:
        beat = read_beat(pid_dir, slot)
        if beat is None or (now_ns - beat[0]) / 1e9 <= timeout:
            continue
        target = probe.open_target(beat[1])
        if target is None:
            continue
        try:
            if not flock.holds_path(beat[1], lock_file(slot)):
                continue
            log.warn(f"main #{slot} (pid {beat[1]}) silent for {(now_ns - beat[0]) / 1e9:.3f} s "
                     f"(watchdog_timeout {timeout:g} s): hung, replaced: SIG{signal}")
            _note_replaced(pid_dir, slot, beat[1], HUNG)
            events.record(pid_dir, "replaced", slot=slot, main_pid=beat[1], why=HUNG, figure=(now_ns - beat[0]) / 1e9)
            for name in (signal, "KILL"):
                target.signal(lean.signum(name), group=False)
                if name != "KILL":
                    target.signal(lean.SIGCONT, group=False)
                if target.exited(step):
                    break
            ended.append(slot)
        finally:
            target.close()
    return ended
