"""The service's history: one JSON line per event in ``PID_DIR/events``.

Written by the process that saw the event: a controller (start, stop, restart
of a slot, a spawn that failed), a promoted standby (failover, or hand-over
when a controller was replacing the main), a standby that backs off, the
watchdog (a replaced main), a main whose function returned. Read by
``hadctl events``, ``status`` (the last failover, the count in the last hour),
``status --format prometheus`` and ``top``.

A line is ``{"time":EPOCH,"kind":KIND,"pid":WRITER,...}``, written with one
``write`` on an O_APPEND fd and kept under PIPE_BUF, so concurrent writers never
interleave. pid_dir belongs to the service's user and the writer may be root:
the folder is opened with safepath, the file relative to it with O_NOFOLLOW and
O_NONBLOCK, and written only when it is a regular file with a single link; a
file root creates is given to the folder's owner, so the workers can append.
Bounded: a writer that finds the file over ``LIMIT`` renames it to
``events.1`` under a flock on the file, after checking that the name still
points at the file it holds (two writers never rotate twice).

Must stay cheap for the worker: imports os and time at the top; json only for a
value that is no number or plain text, and to read; safepath and fcntl (both
already loaded in a worker) lazily.
Never raises from ``record``: a history must not stop a worker or a command.
"""
from __future__ import annotations

import os
import time

from .lean import TYPE_CHECKING

if TYPE_CHECKING:
    from typing import Any

    from .layout import Layout

FILE = "events"
ROTATED = "events.1"
LIMIT = 256 * 1024  # bytes in ``events`` before it becomes ``events.1``
LINE_MAX = 4000  # one write under PIPE_BUF (4096): never interleaved with another writer's
FAILOVER = "failover"
_CLOCK_REALTIME_COARSE = 5  # Linux's; the clock file times come from (time has no name for it)


def _pid_dir(where: Layout | str) -> str:
    return where if isinstance(where, str) else where.pid_dir


def record(where: Layout | str, kind: str, **fields: object) -> None:
    """Append one event (``kind`` and ``fields``, JSON values) to ``where``'s history
    (a Layout or a pid_dir). Never raises: a failure leaves no line, nothing else."""
    try:
        line = _line(kind, fields)
        folder = _open_folder(_pid_dir(where))
    except (OSError, ValueError, TypeError):
        return
    try:
        fd = _open_for_append(folder)
        if fd is None:
            return
        try:
            if os.fstat(fd).st_size > LIMIT:
                fd = _rotate(folder, fd)
            os.write(fd, line)
        finally:
            os.close(fd)
    except OSError:
        pass
    finally:
        os.close(folder)


def record_failover(layout: Layout, slot: int, pid: int) -> None:
    """A promoted standby, beside its function: the old main (its pid file, still
    named main-SLOT.pid), the gap, and whether a controller was replacing the main
    (``handover``: restart) or it died (``failover``).

    ``gap_ms`` is an upper bound, measured from outside the fast path: from the lock
    file's modification time (our pid written into it as the lock came free,
    flock.note_holder) to now (this thread starts as the function is entered, and may
    run a little later: on a busy machine, milliseconds). The kernel stamps files
    with its coarse clock, so the write may have come up to one tick (``clock_ms``,
    1-4 ms) after the stamp. Both errors make it larger, never smaller than the time
    from the pid write to the function's entry. ``make bench`` measures failovers exactly."""
    now_ns = time.time_ns()
    from .layout import read_pid_file
    from .locks import flock

    gap = None
    try:
        written = os.stat(layout.lock_file("main", slot), follow_symlinks=False).st_mtime_ns
        if 0 <= now_ns - written < 60_000_000_000:
            gap = round((now_ns - written) / 1e6, 3)
    except OSError:
        pass
    found = read_pid_file(layout.pid_file("main", slot))
    old = found.pid if found is not None and found.pid != pid else None
    try:
        control = flock.hold_shared(layout.control_lock)  # None: a controller holds it (restart)
    except OSError:
        control = -1
    if control is not None and control >= 0:
        # unlocked, not just closed: the function runs beside this thread, and a child it
        # forked meanwhile shares the open file: closing would leave it holding the lock,
        # and every later controller would wait for that child (stop: 60 s, then "busy")
        flock.release(control)
    try:
        tick = round(time.clock_getres(_CLOCK_REALTIME_COARSE) * 1000, 3)
    except OSError:
        tick = None
    record(layout, FAILOVER if control is not None else "handover", slot=slot, old_pid=old, new_pid=pid,
           gap_ms=gap, clock_ms=tick)


def _line(kind: str, fields: dict[str, object]) -> bytes:
    """The event as one JSON line of at most LINE_MAX bytes: long texts are cut, and
    past that only the heading is kept."""
    event: dict[str, object] = {"time": round(time.time(), 6), "kind": kind, "pid": os.getpid()}
    event.update(fields)
    line = _encode(event)
    if len(line) > LINE_MAX:
        for key, value in fields.items():
            if isinstance(value, str) and len(value) > 200:
                event[key] = value[:200] + "..."
        line = _encode(event)
        if len(line) > LINE_MAX:
            line = _encode({"time": event["time"], "kind": kind, "pid": event["pid"], "truncated": True})
    return line


_PLAIN = frozenset(" !#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[]^_`abcdefghijklmnopqrstuvwxyz{|}~")


def _encode(event: dict[str, object]) -> bytes:
    """JSON without json for what events hold (numbers, None, booleans, plain texts):
    importing json costs a promoted main ~1 ms of the GIL beside its function. Any
    other value goes through json."""
    parts = []
    for key, value in event.items():
        if value is None or isinstance(value, bool):
            text = "null" if value is None else "true" if value else "false"
        elif isinstance(value, int):
            text = str(value)
        elif isinstance(value, float):
            text = repr(value) if value - value == 0 else "null"  # (inf and nan are no JSON)
        elif isinstance(value, str) and _PLAIN.issuperset(value):
            text = f'"{value}"'
        else:
            import json

            text = json.dumps(value if isinstance(value, (str, int, float, list, dict)) else str(value))
        parts.append(f'"{key}":{text}')
    return ("{" + ",".join(parts) + "}\n").encode()


def _open_folder(pid_dir: str) -> int:
    from .safepath import open_beneath

    return open_beneath(pid_dir, os.O_RDONLY | os.O_DIRECTORY)


def _open_for_append(folder: int, name: str = FILE) -> int | None:
    """The history file in ``folder``, opened to append (made if missing); None when
    the name is anything but a regular file with one link (a FIFO, a hard link
    planted by the folder's owner). A file root makes goes to the folder's owner."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(name, flags, 0o644, dir_fd=folder)
    st = os.fstat(fd)
    if (st.st_mode & 0o170000) != 0o100000 or st.st_nlink != 1:
        os.close(fd)
        return None
    if st.st_uid == 0 and os.geteuid() == 0:
        owner = os.fstat(folder)
        if owner.st_uid != 0:
            os.fchown(fd, owner.st_uid, owner.st_gid)
    return fd


def _rotate(folder: int, fd: int) -> int:
    """``events`` -> ``events.1`` unless another writer did it first; returns the fd to
    write to (the new file's, or ``fd`` when no new file could be opened)."""
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)  # held until the rename is done: one rotation per file
    try:
        mine = os.fstat(fd)
        try:
            there = os.stat(FILE, dir_fd=folder, follow_symlinks=False)
        except FileNotFoundError:
            there = None
        if there is not None and (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino):
            os.rename(FILE, ROTATED, src_dir_fd=folder, dst_dir_fd=folder)
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
    fresh = _open_for_append(folder)
    if fresh is None:
        return fd
    os.close(fd)
    return fresh


# ------------------------------------------------------------ reading


def _read_file(folder: int, name: str) -> bytes:
    """The last LIMIT * 2 bytes of ``name`` in ``folder``; b"" when it is missing or
    not a regular file (never a link, never blocking on a FIFO)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=folder)
    except OSError:
        return b""
    try:
        st = os.fstat(fd)
        if (st.st_mode & 0o170000) != 0o100000:
            return b""
        start = max(0, st.st_size - 2 * LIMIT)
        data = os.pread(fd, st.st_size - start, start)
        if start:
            data = data[data.find(b"\n") + 1:]  # a cut first line is no event
        return data
    except OSError:
        return b""
    finally:
        os.close(fd)


def read_bytes(pid_dir: str) -> bytes:
    """The history, oldest first: events.1, then events."""
    try:
        folder = _open_folder(pid_dir)
    except OSError:
        return b""
    try:
        older = _read_file(folder, ROTATED)
        return older + _read_file(folder, FILE)
    finally:
        os.close(folder)


def read(pid_dir: str, since: float | None = None) -> list[dict[str, Any]]:
    """Every readable event, oldest first (at ``since`` or later: epoch seconds).
    Lines that are not an event object with a numeric time are skipped."""
    import json

    found = []
    for raw in read_bytes(pid_dir).splitlines():
        try:
            event = json.loads(raw)
        except ValueError:
            continue
        if not isinstance(event, dict) or not isinstance(event.get("time"), (int, float)) \
                or not isinstance(event.get("kind"), str):
            continue
        if since is None or event["time"] >= since:
            found.append(event)
    return found


def failover_summary(pid_dir: str, now: float | None = None) -> dict[str, Any]:
    """For status, without json (its import costs what status cannot afford): the
    number of failovers in the last hour, the total in the kept history, the slots
    restarted (``restart``) in the kept history, and the last failover's ``time``,
    ``slot``, ``old_pid``, ``new_pid``, ``gap_ms`` (None if none)."""
    now = time.time() if now is None else now
    data = read_bytes(pid_dir)
    needle = b'"kind":"' + FAILOVER.encode() + b'"'  # (a quote inside a JSON text is escaped: never this)
    last: dict[str, Any] | None = None
    hour, end = 0, len(data)
    while True:  # newest first, until the first line older than an hour (lines come in time order)
        found = data.rfind(needle, 0, end)
        if found < 0:
            break
        end = data.rfind(b"\n", 0, found) + 1
        stop = data.find(b"\n", found)
        line = data[end:stop if stop >= 0 else len(data)]
        at = _number(line, b"time")
        if last is None and at is not None:
            last = {"time": at, **{key: _number(line, key.encode()) for key in ("slot", "old_pid", "new_pid",
                                                                                  "gap_ms")}}
        if at is None or at < now - 3600:
            break
        hour += at <= now + 60
    return {"last_hour": hour, "total": data.count(needle), "last": last,
            "restarts": data.count(b'"kind":"restart"')}


def _number(line: bytes, key: bytes) -> float | None:
    """The number after ``"key":`` in a flat JSON line of ours; None if absent or not a number."""
    start = 8 if key == b"time" and line.startswith(b'{"time":') else line.find(b'"' + key + b'":')  # ours: first
    if start < 0:
        return None
    if start != 8 or key != b"time":
        start += len(key) + 3
    end = line.find(b",", start)
    if end < 0:
        end = line.find(b"}", start)
    try:
        value = float(line[start:end])
    except ValueError:  # null, a text
        return None
    return int(value) if value.is_integer() and key != b"gap_ms" and key != b"time" else value


def age(seconds: float) -> str:
    """``42 s``, ``12 min``, ``5.0 h``, ``3.0 days``: how long ago, or how long up."""
    seconds = max(seconds, 0.0)
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} days"

