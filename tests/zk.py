"""Throw-away ZooKeeper servers and a cuttable TCP proxy for the ZooKeeper engine's tests.

``Server`` runs Debian's ZooKeeper (``/usr/share/java/zookeeper.jar``, whose manifest
names its dependencies) with ``java`` directly: tickTime 500 ms, admin server off,
only the ``srvr`` four-letter word, data in a temporary folder, bound to 127.0.0.1.
It is ready once it answers ``srvr`` with its mode; ``stop`` ends it and waits for
the exit (the JVM carries the tests' HADCTL_TEST_ID marker like every process we start).

``Proxy`` relays TCP between a client and a server; ``cut`` turns it into a black
hole (connections stay open, bytes are dropped, as in a network partition that
sends no RST), ``heal`` relays again.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

JAR = "/usr/share/java/zookeeper.jar"
# The server's own log (slf4j-simple, from libslf4j-java, which Debian's ZooKeeper depends
# on) goes to server.log, so a failure on CI can be read from the server's side too.
LOGGER = "/usr/share/java/slf4j-simple.jar"
LOGGER_FLAGS = ["-Dorg.slf4j.simpleLogger.showDateTime=true",
                "-Dorg.slf4j.simpleLogger.dateTimeFormat=yyyy-MM-dd HH:mm:ss.SSS"]
JAVA = "/usr/bin/java"
# A JVM that starts in ~0.4 s on 2 cores: client compiler only, serial GC, class data sharing.
JVM_FLAGS = ["-XX:TieredStopAtLevel=1", "-XX:+UseSerialGC", "-Xshare:auto", "-Xmx96m", "-Xss512k"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def srvr(port: int, timeout: float = 0.5) -> str:
    """The server's answer to ``srvr`` ('' when it does not answer)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout) as sock:
            sock.sendall(b"srvr")
            chunks = []
            while True:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                chunks.append(chunk)
            return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""


class Server:
    """One ZooKeeper server: standalone, or member ``myid`` of ``ensemble`` (a list of
    (client port, quorum port, election port) for servers 1, 2, 3...)."""

    def __init__(self, folder: Path, port: int | None = None, myid: int | None = None,
                 ensemble: list[tuple[int, int, int]] | None = None) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.myid = myid
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            "tickTime=500", f"dataDir={self.data}", f"clientPort={self.port}", "clientPortAddress=127.0.0.1",
            "admin.enableServer=false", "4lw.commands.whitelist=srvr", "maxClientCnxns=0",
            "initLimit=10", "syncLimit=4", "minSessionTimeout=1000", "maxSessionTimeout=20000",
        ]
        if ensemble:
            (self.data / "myid").write_text(f"{myid}\n")
            lines += [f"server.{n}=127.0.0.1:{quorum}:{election}" for n, (_c, quorum, election)
                      in enumerate(ensemble, start=1)]
        (folder / "zoo.cfg").write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "Server":
        log = open(self.folder / "server.log", "ab")
        try:
            self.process = subprocess.Popen(
                [JAVA, *JVM_FLAGS, *LOGGER_FLAGS, f"-Dzookeeper.log.dir={self.folder}",
                 "-cp", f"{JAR}:{LOGGER}" if os.path.exists(LOGGER) else JAR,
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(self.folder / "zoo.cfg")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        return self

    def mode(self) -> str:
        """'standalone', 'leader', 'follower', or '' (not serving)."""
        for line in srvr(self.port).splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

    def wait_serving(self, timeout: float = 30.0) -> "Server":
        deadline = time.monotonic() + timeout
        while not self.mode():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"ZooKeeper on port {self.port} exited with {self.process.returncode}: "
                                     f"{(self.folder / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ZooKeeper on port {self.port} did not answer srvr within {timeout} s")
            time.sleep(0.02)  # poll step of a wait with a deadline
        return self

    def stop(self, sig: int = signal.SIGTERM) -> None:
        """Signal the JVM and wait for it to exit (SIGKILL after 10 s)."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


class Proxy:
    """127.0.0.1:<port> -> 127.0.0.1:<target>, one thread for everything (select)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.port = int(self.listener.getsockname()[1])
        self.pairs: dict[socket.socket, socket.socket | None] = {}
        self.cut_off = False
        self.closing = False
        self.wake_read, self.wake_write = os.pipe()
        self.thread = threading.Thread(target=self._run, daemon=True, name="zk-proxy")
        self.thread.start()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Partition: keep every connection open, drop every byte, connect nothing new."""
        self.cut_off = True
        os.write(self.wake_write, b"x")

    def close(self) -> None:
        self.closing = True
        os.write(self.wake_write, b"x")
        self.thread.join(5)
        for sock in list(self.pairs):
            sock.close()
        self.listener.close()
        os.close(self.wake_read)
        os.close(self.wake_write)

    def _run(self) -> None:
        while not self.closing:
            readable, _, _ = select.select([self.listener, self.wake_read, *self.pairs], [], [])
            for sock in readable:
                if sock == self.wake_read:
                    os.read(self.wake_read, 64)
                elif sock is self.listener:
                    self._accept()
                else:
                    self._relay(sock)

    def _accept(self) -> None:
        client, _ = self.listener.accept()
        if self.cut_off:
            self.pairs[client] = None  # a black hole: accepted, never answered
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target), 1)
        except OSError:
            client.close()
            return
        self.pairs[client] = server
        self.pairs[server] = client

    def _relay(self, sock: socket.socket) -> None:
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        peer = self.pairs.get(sock)
        if self.cut_off:
            if not data:  # the far end closed: forget it, tell nobody
                self.pairs.pop(sock, None)
                sock.close()
            return
        if not data or peer is None:
            self._drop(sock)
            return
        try:
            peer.sendall(data)
        except OSError:
            self._drop(sock)

    def _drop(self, sock: socket.socket) -> None:
        peer = self.pairs.pop(sock, None)
        sock.close()
        if peer is not None:
            self.pairs.pop(peer, None)
            peer.close()
