"""A main that writes numbered lines: ``N`` on stdout, ``err N`` on stderr every
tenth, at ``RATE`` lines per second (default 1000), flushed one by one, until
stopped. Its environment, umask and nice value go to ``$REPORT`` (if set) first."""
from __future__ import annotations

import os
import sys
import time


def write() -> None:
    report = os.environ.get("REPORT")
    if report:
        umask = os.umask(0)
        os.umask(umask)
        with open(report + ".tmp", "w") as handle:
            handle.write(f"umask={umask:03o}\nnice={os.getpriority(os.PRIO_PROCESS, 0)}\n")
        os.replace(report + ".tmp", report)
    period = 1.0 / float(os.environ.get("RATE", "1000"))
    number = 0
    next_at = time.monotonic()
    while True:
        number += 1
        sys.stdout.write(f"{number}\n")
        sys.stdout.flush()
        if number % 10 == 0:
            sys.stderr.write(f"err {number}\n")
            sys.stderr.flush()
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
