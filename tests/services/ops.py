"""Services for the operations and self-healing tests."""
import os
import signal
import time

from tests.services.basic import _ledger, serve


def upgrade_aware() -> int:
    """Removes its upgrade file ($UPGRADE_FILE, %p -> pid) when it appears, noting it."""
    _ledger("enter")
    path = os.environ["UPGRADE_FILE"].replace("%p", str(os.getpid()))
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    while signal.sigtimedwait({signal.SIGTERM}, 0.01) is None:
        if os.path.exists(path):
            _ledger("upgraded")
            os.unlink(path)
    _ledger("exit")
    return 0


def crash_then_serve() -> int:
    """Serves, except that starts number $CRASH_FROM to $CRASH_TO (counted in $COUNTER) crash at once."""
    path = os.environ["COUNTER"]
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    import fcntl

    fcntl.flock(fd, fcntl.LOCK_EX)
    count = int(os.read(fd, 32) or b"0") + 1
    os.lseek(fd, 0, 0)
    os.ftruncate(fd, 0)
    os.write(fd, str(count).encode())
    os.close(fd)
    if int(os.environ["CRASH_FROM"]) <= count <= int(os.environ["CRASH_TO"]):
        _ledger("enter")
        raise SystemExit(1)
    return serve()


def slow_exit() -> int:
    """Serves; on TERM takes $EXIT_DELAY seconds to leave."""
    _ledger("enter")
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    signal.sigwait({signal.SIGTERM})
    time.sleep(float(os.environ.get("EXIT_DELAY", "0.2")))  # the service's own shutdown work
    _ledger("exit")
    return 0
