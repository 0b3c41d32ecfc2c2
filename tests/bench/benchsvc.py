"""The trivial service that tests/bench/bench.py runs under hadctl.

``serve`` appends ``"<pid> <time.monotonic()>"`` to $BENCH_MARKER the moment it
is inside the function, then blocks (no wake-ups) until SIGTERM or SIGINT,
appends ``"<pid> <time.monotonic()>"`` to $BENCH_EXITS and returns 0 at once.
CLOCK_MONOTONIC is system-wide, so the bench compares these times with its own.
At import (which is when a standby warms up) it appends the same line to
$BENCH_IMPORTS: a main whose import time precedes the old main's exit was
already waiting as a standby.

Kept as small as hadctl's worker: only builtin modules (``_signal``, not
``signal``), so the standby's RSS measured by the bench is hadctl's, not ours.
"""
import _signal
import os
import time

_TERM_OR_INT = {_signal.SIGTERM, _signal.SIGINT}


def _append(variable: str, now: float) -> None:
    path = os.environ.get(variable)
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, f"{os.getpid()} {now:.6f}\n".encode())
        finally:
            os.close(fd)


_append("BENCH_IMPORTS", time.monotonic())


def serve() -> int:
    """Note entry; wait for TERM/INT; note the exit time just before returning."""
    entered = time.monotonic()
    _append("BENCH_MARKER", entered)
    _signal.pthread_sigmask(_signal.SIG_BLOCK, _TERM_OR_INT)
    _signal.sigwait(_TERM_OR_INT)
    _append("BENCH_EXITS", time.monotonic())
    return 0
