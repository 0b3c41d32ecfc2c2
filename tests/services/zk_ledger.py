"""A main for the ZooKeeper engine's tests (issue #7): it notes in $LEDGER when it
enters (with its host and fencing token), a ``tick`` every 10 ms while it runs user
code, and when it exits on TERM. Every line: ``<event> <pid> <monotonic> [extra]``.
The last tick of a fenced main tells when it stopped running."""
import os
import signal
import time

import hadctl


def _ledger(event: str, extra: str = "") -> None:
    fd = os.open(os.environ["LEDGER"], os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
    os.write(fd, f"{event} {os.getpid()} {time.monotonic():.6f} {extra}".rstrip().encode() + b"\n")
    os.close(fd)


def serve() -> int:
    host = os.environ.get("HADCTL_HOST_ID", "?")
    _ledger("enter", f"{host} {hadctl.fencing_token()} {os.environ.get('HADCTL_FENCING_TOKEN')} {hadctl.slot()}")
    stopping: list[int] = []
    signal.signal(signal.SIGTERM, lambda signum, _frame: stopping.append(signum))
    signal.signal(signal.SIGINT, lambda signum, _frame: stopping.append(signum))
    while not stopping:  # (not sigtimedwait: after SIGSTOP/SIGCONT it can return a bogus signal)
        _ledger("tick")
        time.sleep(0.01)
    _ledger("exit")
    return 0
