"""A process that belongs to no service and records every signal it receives.

``python -m tests.services.bystander FILE`` installs a handler for every
catchable signal, appends ``ready`` to FILE, then one line per signal received
(its name). Tests name its pid in pid files and prove hadctl never signals it.
"""
import os
import signal
import sys


def _note(path: str, word: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.write(fd, word.encode() + b"\n")
    os.close(fd)


def main(path: str) -> None:
    def record(signum: int, _frame: object) -> None:
        _note(path, signal.Signals(signum).name)

    for sig in signal.Signals:
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            signal.signal(sig, record)
        except (OSError, ValueError):
            pass
    _note(path, "ready")
    while True:
        signal.pause()


if __name__ == "__main__":
    main(sys.argv[1])
