"""Crash-loop protection: a small record of recent promotions in ``PID_DIR/hadctl-starts``.

Every process that becomes main appends its ``time.monotonic()`` (system-wide,
so comparable between processes) to the record, under a short flock. A new
standby (one spawned by a promoted main, not by a person) asks ``delay()``
how long it must wait before it may take a standby slot:

* the *run* is the promotions since the last one that came more than
  ``start_limit_interval`` after its predecessor (a main that stayed up that
  long ended the crash loop: that resets the back-off);
* when the run reaches ``start_limit_burst`` promotions and the newest one is
  younger than ``start_limit_interval``, the delay is 1 s, 2 s, 4 s ... capped
  at ``restart_backoff_max``: one doubling per promotion beyond the burst.

Worker-safe: standard library (os, time, fcntl) only.
"""
from __future__ import annotations

import fcntl
import os
import time

KEEP = 64  # entries kept; a run longer than this is as bad as it gets anyway


def record_start(path: str) -> list[float]:
    """Append now to the record; returns the earlier entries, so the caller can
    tell whether it replaces a main that started (and so died) moments ago.

    A promoting standby calls this on its way to the function, so the common
    case is one read and one O_APPEND write (atomic for a line); only a record
    grown past KEEP entries is rewritten, under a flock.
    """
    now = time.monotonic()
    try:
        # never through a link planted in pid_dir (a worker may run as root)
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
    except OSError:
        return []  # no record, no protection; never stop a main from running
    times: list[float] = []
    try:
        data = os.pread(fd, 65536, 0)
        times = _parse(data)
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
    return times


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
    """(seconds a new standby must wait, promotions in the current run)."""
    if not starts:
        return 0.0, 0
    now = time.monotonic()
    if now - starts[-1] > interval:
        return 0.0, 0
    run = 1
    for earlier, later in zip(reversed(starts[:-1]), reversed(starts[1:])):
        if later - earlier > interval:
            break
        run += 1
    if run < burst:
        return 0.0, run
    return min(2.0 ** (run - burst), cap), run
