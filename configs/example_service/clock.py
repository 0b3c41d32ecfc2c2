"""The example service: prints a line every second and says ready.

Run by configs/example.toml; try it with ``make demo``.
"""
import os
import signal
import sys
import time

import hadctl


def run(greeting: str = "hello") -> int:
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    signal.signal(signal.SIGHUP, lambda *_: print(f"{os.getpid()}: reloading", flush=True))
    hadctl.ready()
    print(f"{os.getpid()}: {greeting} from main slot {hadctl.slot()}", flush=True)
    while not stopping:
        print(f"{os.getpid()}: tick {time.strftime('%H:%M:%S')}", flush=True)
        time.sleep(1)
    print(f"{os.getpid()}: stopping", file=sys.stderr, flush=True)
    return 0
