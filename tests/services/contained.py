"""Test services for containment, the watchdog and max_rss. Mains note ``enter``/``exit``
(and ``beat``) lines in $LEDGER like tests/services/basic.py."""
import os
import signal
import subprocess
import sys
import threading
import time

from tests.services.basic import _ledger, serve

import hadctl


def _write_report(pids: list[int]) -> None:
    path = os.environ["REPORT"]
    with open(path + ".tmp", "w") as handle:
        handle.write(" ".join(map(str, pids)))
    os.replace(path + ".tmp", path)


def _setsid_child() -> int:
    """A daemon of its own: fork, setsid, fork again; returns the grandchild's pid."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.setsid()
        grandchild = os.fork()
        if grandchild == 0:
            os.close(write)
            while True:
                signal.pause()
        os.write(write, str(grandchild).encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    data = os.read(read, 32)
    os.close(read)
    return int(data)


def with_leftovers() -> int:
    """Starts a Popen child, a forked child and a setsid daemon ($REPORT gets their pids), then serves."""
    pids = [subprocess.Popen(["sleep", "300"]).pid]
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    pids.append(pid)
    pids.append(_setsid_child())
    _write_report(pids)
    return serve()


def with_stubborn_child() -> int:
    """A setsid daemon that ignores TERM ($REPORT gets its pid), then serves."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        os.setsid()
        if os.fork() == 0:
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
            os.write(write, str(os.getpid()).encode())  # its TERM is ignored from now on
            os.close(write)
            while True:
                signal.pause()
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    stubborn = int(os.read(read, 32))
    os.close(read)
    _write_report([stubborn])
    return serve()


def many_children() -> int:
    """$CHILDREN setsid daemons (each in its own session: the process group cannot reach them)."""
    pids = [_setsid_child() for _ in range(int(os.environ.get("CHILDREN", "50")))]
    _write_report(pids)
    return serve()


def beating() -> int:
    """A healthy main: calls hadctl.alive() every $BEAT seconds and serves until TERM."""
    _ledger("enter")
    period = float(os.environ.get("BEAT", "0.05"))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    beats = 0
    while not stop.wait(period):
        hadctl.alive()
        beats += 1
        if beats % 10 == 0:
            _ledger("beat")
    _ledger("exit")
    return 0


def hangs() -> int:
    """Beats for $HEALTHY seconds, then hangs the way $HANG says: busy (a loop that never
    beats), deadlock (a lock taken twice), stop (SIGSTOP to itself). With $ONCE (a
    path), only the first main hangs: the later ones beat like ``beating``."""
    once = os.environ.get("ONCE")
    if once:
        if os.path.exists(once):
            return beating()
        open(once, "w").close()
    _ledger("enter")
    until = time.monotonic() + float(os.environ.get("HEALTHY", "0.3"))
    while time.monotonic() < until:
        hadctl.alive()
        time.sleep(0.02)
    hadctl.alive()  # the last beat: the "hang" line's time is the time of silence's start
    _ledger("hang")
    how = os.environ.get("HANG", "busy")
    if how == "busy":
        while True:
            pass
    elif how == "deadlock":
        lock = threading.Lock()
        lock.acquire()
        lock.acquire()
    else:
        os.kill(os.getpid(), signal.SIGSTOP)
    _ledger("exit")  # never reached while the watchdog works
    return 0


def grows() -> int:
    """Beats nothing; grows by $GROW bytes every 50 ms after $HEALTHY seconds, serving
    (``enter``/``exit`` in the ledger) until TERM, which it drains for 50 ms."""
    _ledger("enter")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    hoard = []
    until = time.monotonic() + float(os.environ.get("HEALTHY", "0.2"))
    while not stop.wait(0.05):
        if time.monotonic() > until:
            hoard.append(bytearray(int(os.environ.get("GROW", str(8 << 20)))))
    hoard.clear()  # its memory goes back while it drains, not after its exit line
    time.sleep(0.05)  # draining: still serving, never two at once
    _ledger("exit")
    return 0


def child_script() -> None:
    """``python -m tests.services.contained``: a child that sleeps until killed."""
    while True:
        signal.pause()


if __name__ == "__main__":
    child_script()
    sys.exit(0)
