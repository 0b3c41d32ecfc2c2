"""Crash-loop protection: a small record of recent unexpected deaths of mains in
``PID_DIR/hadctl-starts``.

Only a death counts: not a start, and not a hand-over a controller asked for.
Whoever ends a main on purpose (stop, restart, the watchdog or max_rss, in a
controller or in a watching standby) first calls ``note_handover(pid_dir, slot,
pid)``; the next main of that slot takes the note (``take_handover``). A main
whose function ends though nobody asked counts its own death (``main_ended``)
and leaves a note DIED for its successor. A main that takes a slot whose holder
left without any note (it was killed: a promoted standby, or a main's
replacement standby that found the slot free) records the death with
``record_death``. A record is a ``time.monotonic()`` (system-wide, so comparable
between processes), appended under a short flock. A main started by a
controller into a slot left without a note records nothing: nothing it can see
died (the service was stopped, or the host rebooted).

A new standby (one spawned by a promoted main, not by a person) asks ``delay()``
how long it must wait before it may take a standby slot:

* the *run* is the deaths since the last one that came more than
  ``start_limit_interval`` after its predecessor (a main that stayed up that
  long ended the crash loop: that resets the back-off);
* when the run reaches ``start_limit_burst`` deaths and the newest one is
  younger than ``start_limit_interval``, the delay is 1 s, 2 s, 4 s ... capped
  at ``restart_backoff_max``: one doubling per death beyond the burst.

Worker-safe: standard library (os, time, fcntl) and lean only.
"""
from __future__ import annotations

import fcntl
import os
import time

from .lean import read_small

KEEP = 64  # entries kept; a run longer than this is as bad as it gets anyway


def handover_file(pid_dir: str, slot: int) -> str:
    return os.path.join(pid_dir, f"hadctl-handover-{slot}")


ASKED = "asked"  # a controller or the watchdog ends that main on purpose
DIED = "died"  # that main left on its own (its function ended): its death is counted already


def note_handover(pid_dir: str, slot: int, pid: int, why: str = ASKED) -> None:
    """Say why main ``pid`` of ``slot`` leaves: ASKED (by a controller, the watchdog)
    or DIED (it ended on its own and counted its death itself). Its successor reads
    it (``take_handover``). Made anew (O_EXCL, never through a link: a root controller
    writes here in the service user's pid_dir); a failure only costs a death counted."""
    path = handover_file(pid_dir, slot)
    try:
        os.unlink(path)
    except OSError:
        pass
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
    except OSError:
        return
    try:
        os.write(fd, f"{pid} {why}\n".encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def read_handover(pid_dir: str, slot: int) -> tuple[int, str] | None:
    """(pid, why) of the hand-over note of ``slot``, or None."""
    data = read_small(handover_file(pid_dir, slot), 64)
    if data is None:
        return None
    words = data.split()
    if len(words) != 2 or not words[0].isdigit():
        return None
    return int(words[0]), words[1].decode("ascii", "replace")


def take_handover(pid_dir: str, slot: int) -> str | None:
    """Read and remove the hand-over note of ``slot``: ASKED, DIED, or None when there
    is none (its main was killed: a death nobody counted yet)."""
    found = read_handover(pid_dir, slot)
    try:
        os.unlink(handover_file(pid_dir, slot))
    except OSError:
        pass
    return found[1] if found is not None else None


def main_ended(pid_dir: str, slot: int, pid: int, starts_file: str) -> None:
    """Main ``pid`` of ``slot`` is leaving (its function ended), before it frees the
    slot: unless it was asked to (a note ASKED naming it), count its death and say
    so to its successor (a note DIED), which then counts it no second time."""
    found = read_handover(pid_dir, slot)
    if found is not None and found == (pid, ASKED):
        return
    record_death(starts_file)
    note_handover(pid_dir, slot, pid, DIED)


def record_death(path: str) -> None:
    """Append now to the record of deaths.

    A promoting standby calls this on its way to the function, so the common
    case is one read and one O_APPEND write (atomic for a line); only a record
    grown past KEEP entries is rewritten, under a flock.
    """
    now = time.monotonic()
    try:
        # never through a link planted in pid_dir (a worker may run as root)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError:
        return  # no record, no protection; never stop a main from running
    try:
        data = os.pread(fd, 65536, 0)
        os.write(fd, f"{now:.6f}\n".encode())
        if data.count(b"\n") >= 2 * KEEP:
            fcntl.flock(fd, fcntl.LOCK_EX)
            kept = _parse(os.pread(fd, 65536, 0))[-KEEP:]
            os.ftruncate(fd, 0)
            os.write(fd, "".join(f"{t:.6f}\n" for t in kept).encode())
    except OSError:
        pass
    finally:
        os.close(fd)


def read_starts(path: str) -> list[float]:
    try:
        with open(path, "rb") as handle:
            return _parse(handle.read(65536))
    except OSError:
        return []


def _parse(data: bytes) -> list[float]:
    now = time.monotonic()
    times = []
    for word in data.split():
        try:
            value = float(word)
        except ValueError:
            continue
        if value <= now:  # a value from before a reboot would be in the future: ignore it
            times.append(value)
    return sorted(times)


def delay(starts: list[float], burst: int, interval: float, cap: float) -> tuple[float, int]:
    """(seconds a new standby must wait, deaths in the current run)."""
    if not starts:
        return 0.0, 0
    now = time.monotonic()
    if now - starts[-1] > interval:
        return 0.0, 0
    run = 1
    for earlier, later in zip(reversed(starts[:-1]), reversed(starts[1:]), strict=True):
        if later - earlier > interval:
            break
        run += 1
    if run < burst:
        return 0.0, run
    return min(2.0 ** (run - burst), cap), run
