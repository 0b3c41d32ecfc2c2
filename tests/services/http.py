"""A small HTTP/1.0 service, one request per connection, that keeps the contract of
``listen``: it accepts only in the entrypoint; on SIGTERM it stops accepting,
finishes the request in hand and returns; it never closes the inherited sockets.

``serve`` takes its sockets from ``hadctl.listen_sockets()``; ``serve_own_port``
binds $BIND (HOST:PORT) itself with SO_REUSEADDR (the behaviour before ``listen``,
for the bench). Each answer's body is the serving pid. ``report`` writes what a
worker was given (LISTEN_* and the names of listen_sockets()) to $REPORT, then serves.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import threading
import time

import hadctl


def _stop_on_term() -> int:
    """A pipe that becomes readable on SIGTERM or SIGINT (the handler only sets the wake-up fd)."""
    read, write = os.pipe()
    os.set_blocking(write, False)
    signal.set_wakeup_fd(write)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    return read


def _answer(conn: socket.socket) -> None:
    conn.settimeout(5.0)
    try:
        request = b""
        while b"\r\n\r\n" not in request and b"\n\n" not in request:
            chunk = conn.recv(4096)
            if not chunk:
                return
            request += chunk
        body = f"{os.getpid()}\n".encode()
        conn.sendall(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                     b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    except OSError:
        pass
    finally:
        conn.close()


def _serve_on(sockets: list[socket.socket]) -> int:
    stop = _stop_on_term()
    for sock in sockets:
        sock.setblocking(False)
    while True:
        ready, _, _ = select.select([stop, *sockets], [], [])
        if stop in ready:
            return 0  # stop accepting; the queue stays with the sockets for the next main
        for sock in ready:
            try:
                conn, _peer = sock.accept()
            except (BlockingIOError, InterruptedError):
                continue
            conn.setblocking(True)
            _answer(conn)


def serve() -> int:
    sockets = list(hadctl.listen_sockets().values())
    if not sockets:
        raise SystemExit("no listening sockets: set listen in the service file")
    return _serve_on(sockets)


def serve_growing() -> int:
    """``serve``, while a thread grows the process by $GROW bytes every 50 ms (for
    max_rss: the standby replaces it, TERM, and it drains like any main)."""
    hoard = []

    def grow() -> None:
        while True:
            time.sleep(0.05)
            hoard.append(bytearray(int(os.environ.get("GROW", str(8 << 20)))))

    threading.Thread(target=grow, daemon=True).start()
    return serve()


def serve_own_port() -> int:
    host, _, port = os.environ["BIND"].rpartition(":")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, int(port)))
    sock.listen(socket.SOMAXCONN)
    return _serve_on([sock])


def report() -> int:
    names = list(hadctl.listen_sockets())
    path = os.environ["REPORT"]
    with open(path + ".tmp", "w") as handle:
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            handle.write(f"{key}={os.environ.get(key, '')}\n")
        handle.write(f"names={','.join(names)}\npid={os.getpid()}\n")
    os.replace(path + ".tmp", path)
    return serve()
