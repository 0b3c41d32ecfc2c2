"""Test services. Each main appends ``<event> <pid> <monotonic>`` lines to the
ledger named by $LEDGER (when set), so tests can see who ran when."""
import os
import signal
import sys
import time

import hadctl


def _ledger(event: str, extra: str = "") -> None:
    path = os.environ.get("LEDGER")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        os.write(fd, f"{event} {os.getpid()} {time.monotonic():.6f} {extra}".rstrip().encode() + b"\n")
        os.close(fd)


def _wait_for_term() -> None:
    """Block until SIGTERM (or SIGINT), then return."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    signal.sigwait({signal.SIGTERM, signal.SIGINT})


def serve(*args: object) -> int:
    """A well-behaved main: note entry, wait for TERM, note exit."""
    _ledger("enter", " ".join(map(str, args)))
    signal.signal(signal.SIGHUP, lambda *_: _ledger("hup"))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    while True:
        received = signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 3600)
        if received is not None:
            break
    _ledger("exit")
    return 0


def linger() -> int:
    """Returns at once, then the process stays $LINGER seconds more, its slot given back
    (an atexit handler; a program whose thread outlives its function does the same)."""
    import atexit

    _ledger("enter")
    atexit.register(time.sleep, float(os.environ.get("LINGER", "1")))
    return 0


def _open_fds() -> list[int]:
    found = []
    for fd in range(256):
        try:
            os.fstat(fd)
        except OSError:
            continue
        found.append(fd)
    return found


def _links() -> dict[int, str]:
    """fd -> what it points to. A promoted main's settling thread (worker.py) opens and
    closes files beside the function: an fd gone between the listing and its readlink
    was one of those, and is skipped (it made this test fail about 1 run in 7)."""
    found = {}
    for fd in _open_fds():
        try:
            found[fd] = os.readlink(f"/proc/self/fd/{fd}")
        except FileNotFoundError:
            continue
    return found


def report_env() -> int:
    """Write what the process sees (identity, umask, cwd, env, fds) to $REPORT, then serve."""
    mask = os.umask(0)
    os.umask(mask)
    lines = [
        f"uid={os.getuid()}", f"gid={os.getgid()}", f"umask={mask:03o}", f"cwd={os.getcwd()}",
        f"HOME={os.environ.get('HOME')}", f"USER={os.environ.get('USER')}",
        f"EXTRA={os.environ.get('EXTRA')}", f"HADC_lock_fd={os.environ.get('HADC_lock_fd')}",
        f"slot={hadctl.slot()}", f"fds={_open_fds()}",
        f"links={_links()!r}",
        f"title={open('/proc/self/cmdline').read().replace(chr(0), ' ').strip()}",
        f"warmup={hadctl.warmup_result()!r}",
    ]
    with open(os.environ["REPORT"] + ".tmp", "w") as handle:
        handle.write("\n".join(lines) + "\n")
    os.replace(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
    print("to stdout", flush=True)
    print("to stderr", file=sys.stderr, flush=True)
    return serve()


def ignore_term() -> int:
    """A main that ignores TERM and INT: only KILL ends it."""
    _ledger("enter")
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while True:
        signal.pause()


def stop_file_aware() -> int:
    """Exits when its main stop file ($STOP_FILE with %p -> pid) appears."""
    _ledger("enter")
    path = os.environ["STOP_FILE"].replace("%p", str(os.getpid()))
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while not os.path.exists(path):
        time.sleep(0.01)
    _ledger("exit-by-stop-file")
    return 0


def with_child() -> int:
    """Starts a long-lived child (fork), then serves; the child just sleeps."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        _ledger("child")
        while True:
            signal.pause()
    with open(os.environ["REPORT"], "w") as handle:
        handle.write(str(pid))
    return serve()


def with_children_everywhere() -> int:
    """os.fork(), subprocess.Popen and multiprocessing children, all long-lived."""
    import multiprocessing
    import subprocess

    pids = []
    pid = os.fork()
    if pid == 0:
        while True:
            signal.pause()
    pids.append(pid)
    pids.append(subprocess.Popen([sys.executable, "-c", "import signal; signal.pause()"]).pid)
    proc = multiprocessing.get_context("fork").Process(target=signal.pause, daemon=False)
    proc.start()
    pids.append(proc.pid)
    with open(os.environ["REPORT"] + ".tmp", "w") as handle:
        handle.write(" ".join(map(str, pids)))
    os.replace(os.environ["REPORT"] + ".tmp", os.environ["REPORT"])
    return serve()


def ready_later() -> int:
    """Says ready after $READY_DELAY seconds."""
    time.sleep(float(os.environ.get("READY_DELAY", "0")))
    hadctl.ready()
    return serve()


def version() -> int:
    """Serves, noting the VERSION constant of services/versioned.py (changed by tests)."""
    from tests.services import versioned  # noqa: F401 - imported so the standby is warm

    return serve(versioned.VERSION)


def returns(code: object = 3) -> object:
    _ledger("enter")
    return code


def crash() -> int:
    _ledger("enter")
    raise RuntimeError("crashed on purpose")


def warm() -> dict[str, object]:
    _ledger("warmup")
    return {"model": "loaded", "pid": os.getpid()}


def bad_warmup() -> None:
    raise ValueError("no model here")


NOT_CALLABLE = 42
