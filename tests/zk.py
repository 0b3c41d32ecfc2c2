"""Throw-away ZooKeeper servers and a cuttable TCP proxy for the ZooKeeper engine's tests.

``Server`` runs Debian's ZooKeeper (``/usr/share/java/zookeeper.jar``, whose manifest
names its dependencies) with ``java`` directly: tickTime 500 ms, admin server off,
only the ``srvr`` four-letter word, data in a temporary folder, bound to 127.0.0.1.
It is ready once it answers ``srvr`` with its mode; ``stop`` ends it and waits for
the exit (the JVM carries the tests' HADCTL_TEST_ID marker like every process we start).

A server may run inside a network namespace (``netns``, bound to every address
there, ``srvr`` asked from inside it); ``Lan`` builds those namespaces: one per
"host" or server, each with its own address on a bridge that lives in a namespace
of its own, so nothing touches the machine's network. ``Lan.cut`` puts a member's
bridge port down (its packets are dropped silently, like a pulled cable on the far
side of a switch), ``heal`` brings it back, ``close`` deletes every namespace (and
with them every link).

``Proxy`` relays TCP between a client and a server; ``cut`` turns it into a black
hole (connections stay open, bytes are dropped, as in a network partition that
sends no RST), ``heal`` relays again.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import select
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

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


def four_letters(port: int, word: str = "srvr", timeout: float = 0.5, netns: str | None = None) -> str:
    """The server's answer to a four-letter word ('' when it does not answer), asked
    on 127.0.0.1, inside network namespace ``netns`` when given."""
    def ask() -> str:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout) as sock:
                sock.sendall(word.encode())
                chunks = []
                while True:
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    chunks.append(chunk)
                return b"".join(chunks).decode(errors="replace")
        except OSError:
            return ""

    return ask() if netns is None else in_netns(netns, ask)


def srvr(port: int, timeout: float = 0.5, netns: str | None = None) -> str:
    """The server's answer to ``srvr`` ('' when it does not answer)."""
    return four_letters(port, "srvr", timeout, netns)


CLONE_NEWNET = 0x40000000


def in_netns(netns: str, call: Callable[[], Any]) -> Any:
    """``call()`` in a thread that entered network namespace ``netns`` (setns moves only
    the calling thread, and this one ends with the call, so we never leave our own)."""
    outcome: list[Any] = []

    def run() -> None:
        try:
            fd = os.open(f"/run/netns/{netns}", os.O_RDONLY)
            try:
                if ctypes.CDLL(None, use_errno=True).setns(fd, CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), f"setns into {netns}")
            finally:
                os.close(fd)
            outcome.append((True, call()))
        except BaseException as error:  # handed to the caller's thread
            outcome.append((False, error))

    thread = threading.Thread(target=run, name=f"netns-{netns}")
    thread.start()
    thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=10)
    if check and result.returncode:
        raise OSError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result


def netns_refused() -> str:
    """Why this machine cannot run Lan ('' when it can): no ``ip``, or a kernel (or a
    container without CAP_SYS_ADMIN) that refuses network namespaces."""
    import shutil

    if shutil.which("ip") is None:
        return "no ip command (iproute2)"
    name = f"hadt{secrets.token_hex(3)}probe"
    result = ip("netns", "add", name, check=False)
    if result.returncode:
        return f"the kernel refuses network namespaces: {result.stderr.strip()}"
    ip("netns", "del", name, check=False)
    return ""


class Lan:
    """Network namespaces ``<prefix>-<name>`` on one bridge (in ``<prefix>-lan``), member
    N at 10.231.0.N/24 on its ``eth0``; the prefix is ``hadt`` + a random id, so runs
    at the same time never share a name. Addresses exist only inside these namespaces."""

    NET = "10.231.0"

    def __init__(self) -> None:
        self.prefix = f"hadt{secrets.token_hex(3)}"
        self.members: dict[str, int] = {}
        self.namespaces: list[str] = []
        try:
            self.lan = self._add_netns("lan")
            ip("-n", self.lan, "link", "add", "br0", "type", "bridge")
            ip("-n", self.lan, "link", "set", "br0", "up")
        except BaseException:
            self.close()
            raise

    def _add_netns(self, name: str) -> str:
        netns = f"{self.prefix}-{name}"
        ip("netns", "add", netns)
        self.namespaces.append(netns)
        ip("-n", netns, "link", "set", "lo", "up")
        return netns

    def add(self, name: str) -> str:
        """A new member: its namespace's name (its address is ``address(name)``)."""
        number = len(self.members) + 1
        netns = self._add_netns(name)
        port = f"p{number}"
        ip("-n", netns, "link", "add", "eth0", "type", "veth", "peer", "name", port, "netns", self.lan)
        ip("-n", self.lan, "link", "set", port, "master", "br0")
        ip("-n", self.lan, "link", "set", port, "up")
        ip("-n", netns, "addr", "add", f"{self.NET}.{number}/24", "dev", "eth0")
        ip("-n", netns, "link", "set", "eth0", "up")
        self.members[name] = number
        return netns

    def netns(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def address(self, name: str) -> str:
        return f"{self.NET}.{self.members[name]}"

    def exec(self, name: str) -> list[str]:
        """The command prefix that runs a program inside member ``name``'s namespace."""
        return ["ip", "netns", "exec", self.netns(name)]

    def cut(self, name: str) -> None:
        """Partition ``name`` from everyone: its bridge port goes down, its packets vanish."""
        ip("-n", self.lan, "link", "set", f"p{self.members[name]}", "down")

    def heal(self, name: str) -> None:
        ip("-n", self.lan, "link", "set", f"p{self.members[name]}", "up")

    def close(self) -> None:
        """Delete every namespace made (their links go with them); tries them all."""
        errors = []
        for netns in reversed(self.namespaces):
            result = ip("netns", "del", netns, check=False)
            if result.returncode and f"{netns}" in ip("netns", "list").stdout:
                errors.append(result.stderr.strip())
        self.namespaces = []
        if errors:
            raise OSError("; ".join(errors))


class Server:
    """One ZooKeeper server: standalone, or member ``myid`` of ``ensemble`` (a list of
    (client port, quorum port, election port) for servers 1, 2, 3...).

    With ``netns`` (a ``Lan`` member's namespace) it runs inside that namespace, listens
    on every address there, and clients reach it at ``client_ip``; ``peers`` are then the
    ensemble's addresses (server N at ``peers[N-1]``), loopback otherwise."""

    def __init__(self, folder: Path, port: int | None = None, myid: int | None = None,
                 ensemble: list[tuple[int, int, int]] | None = None, netns: str | None = None,
                 client_ip: str = "127.0.0.1", peers: list[str] | None = None) -> None:
        self.folder = folder
        self.data = folder / "data"
        self.data.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.myid = myid
        self.netns = netns
        self.client_ip = client_ip
        self.process: subprocess.Popen[bytes] | None = None
        lines = [
            "tickTime=500", f"dataDir={self.data}", f"clientPort={self.port}",
            f"clientPortAddress={'0.0.0.0' if netns else '127.0.0.1'}",
            "admin.enableServer=false", "4lw.commands.whitelist=srvr,stat,cons", "maxClientCnxns=0",
            "initLimit=10", "syncLimit=4", "minSessionTimeout=1000", "maxSessionTimeout=20000",
        ]
        if ensemble:
            (self.data / "myid").write_text(f"{myid}\n")
            lines += [f"server.{n}={peers[n - 1] if peers else '127.0.0.1'}:{quorum}:{election}"
                      for n, (_c, quorum, election) in enumerate(ensemble, start=1)]
        (folder / "zoo.cfg").write_text("\n".join(lines) + "\n")

    @property
    def address(self) -> str:
        return f"{self.client_ip}:{self.port}"

    def start(self) -> Server:
        log = open(self.folder / "server.log", "ab")  # noqa: SIM115 - the server's stdout for its life
        inside = ["ip", "netns", "exec", self.netns] if self.netns else []
        try:
            self.process = subprocess.Popen(
                [*inside, JAVA, *JVM_FLAGS, *LOGGER_FLAGS, f"-Dzookeeper.log.dir={self.folder}",
                 "-cp", f"{JAR}:{LOGGER}" if os.path.exists(LOGGER) else JAR,
                 "org.apache.zookeeper.server.quorum.QuorumPeerMain", str(self.folder / "zoo.cfg")],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()
        return self

    def mode(self) -> str:
        """'standalone', 'leader', 'follower', or '' (not serving)."""
        for line in srvr(self.port, netns=self.netns).splitlines():
            if line.startswith("Mode:"):
                return line.split(":", 1)[1].strip()
        return ""

    def wait_serving(self, timeout: float = 30.0) -> Server:
        deadline = time.monotonic() + timeout
        while not self.mode():
            if self.process is not None and self.process.poll() is not None:
                raise AssertionError(f"ZooKeeper on port {self.port} exited with {self.process.returncode}: "
                                     f"{(self.folder / 'server.log').read_text()[-2000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"ZooKeeper on port {self.port} did not answer srvr within {timeout} s")
            time.sleep(0.02)  # poll step of a wait with a deadline
        return self

    def four_letters(self, word: str) -> str:
        return four_letters(self.port, word, netns=self.netns)

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
