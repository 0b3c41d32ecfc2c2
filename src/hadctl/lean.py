"""The speed rules, in one named place.

hadctl is run by cron every minute and a standby waits for days, so two budgets
are kept (tests/test_imports.py makes both executable): a command such as
``status`` must cost less than ``python -c "import click"``, and a waiting
standby must stay under 10 MB. Both are lost to a few standard modules that look
free: ``signal`` (its enums pull in ``enum``, ~2 ms and ~1 MB), ``typing``,
``dataclasses`` (``inspect`` and friends, ~15 ms), ``threading``, ``re``.

So hadctl's modules take from here instead:

* ``TYPE_CHECKING``: always False at run time; the type checker reads it as
  typing's (it is a name it knows), so ``if TYPE_CHECKING:`` imports typing only
  for mypy.
* signal numbers and calls, typed, over CPython's ``_signal`` (the C module
  under ``signal``; same functions without the enum wrapping);
* ``signum(name)``: ``"TERM"`` or ``"SIGTERM"`` → the number, without enum;
* ``host_id()``: this host's name in lock nodes and events;
* ``read_proc(path)``: a whole /proc file through os.open and os.read, about
  half the cost of ``open()`` (no file object, no buffer): status --all, start
  and stop read /proc/PID/{stat,environ,fdinfo} of every process of the host.

Leaf module: imports nothing from hadctl, and nothing heavy.
"""
from __future__ import annotations

import _signal  # type: ignore[import-not-found,unused-ignore]  # see the docstring: not signal
import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable

    Handler = Callable[[int, object], object] | int | None

SIGHUP: int = _signal.SIGHUP
SIGINT: int = _signal.SIGINT
SIGQUIT: int = _signal.SIGQUIT
SIGABRT: int = _signal.SIGABRT
SIGKILL: int = _signal.SIGKILL
SIGUSR1: int = _signal.SIGUSR1
SIGUSR2: int = _signal.SIGUSR2
SIGALRM: int = _signal.SIGALRM
SIGTERM: int = _signal.SIGTERM
SIGCHLD: int = _signal.SIGCHLD
SIGCONT: int = _signal.SIGCONT
SIGSTOP: int = _signal.SIGSTOP
SIGIO: int = _signal.SIGIO
SIGPIPE: int = _signal.SIGPIPE
SIGRTMIN: int = _signal.SIGRTMIN
SIG_DFL: int = _signal.SIG_DFL
SIG_IGN: int = _signal.SIG_IGN
SIG_SETMASK: int = _signal.SIG_SETMASK
ITIMER_REAL: int = _signal.ITIMER_REAL


def set_handler(signum: int, handler: Handler) -> Handler:
    """``signal.signal``; returns the previous handler."""
    previous: Handler = _signal.signal(signum, handler)
    return previous


def set_timer(seconds: float, interval: float = 0.0) -> None:
    """``setitimer(ITIMER_REAL, ...)``: SIGALRM after ``seconds`` (0 cancels)."""
    _signal.setitimer(_signal.ITIMER_REAL, seconds, interval)


def pause() -> None:
    """Sleep until a signal arrives (its handler has run on return)."""
    _signal.pause()


def pidfd_send_signal(pidfd: int, signum: int) -> None:
    """Signal the process behind ``pidfd`` (never a recycled pid)."""
    _signal.pidfd_send_signal(pidfd, signum)


def pthread_kill(thread_id: int, signum: int) -> None:
    _signal.pthread_kill(thread_id, signum)


def unblock_all() -> None:
    """Clear the signal mask (a caller may have blocked some; a daemon must not inherit that)."""
    _signal.pthread_sigmask(_signal.SIG_SETMASK, [])


def signum(name: str) -> int:
    """``"TERM"``, ``"SIGTERM"`` → 15; ValueError for an unknown name."""
    key = name.upper()
    key = key if key.startswith("SIG") else "SIG" + key
    value = getattr(_signal, key, None)
    if not isinstance(value, int) or key.startswith("SIG_"):
        raise ValueError(f"unknown signal {name!r}")
    return value


def host_id() -> str:
    """This host's name in lock nodes and events: ``$HADCTL_HOST_ID``, else the node name."""
    return os.environ.get("HADCTL_HOST_ID") or os.uname().nodename


def read_small(path: str, size: int) -> bytes | None:
    """The first ``size`` bytes of a small file hadctl keeps in pid_dir (a hand-over
    note, a heartbeat), or None when it cannot be read. Never through a link and
    never blocking on a FIFO planted in its place (the folder is the service user's)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        return os.pread(fd, size, 0)
    except OSError:
        return None
    finally:
        os.close(fd)


def read_proc(path: str) -> bytes:
    """The whole content of ``path`` (a /proc file: read until the end, whatever
    each read returns); raises OSError as ``open`` would."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(fd)
    return b"".join(chunks)
