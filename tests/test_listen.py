"""Listening sockets held by the workers (``listen``, issue 13): real services, real
clients, real SIGKILLs. A client loop in a thread counts what a client would see."""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from conftest import HADCTL, wait_until

HTTP = "tests.services.http:serve"


def _listening(service, listen: list[object], **settings: object):
    """``service(**settings)`` with ``listen`` (its tables written inline: support's
    toml_text writes flat values only)."""
    svc = service(**settings)
    items = [json.dumps(i) if isinstance(i, str) else
             "{ " + ", ".join(f"{k} = {json.dumps(v)}" for k, v in i.items()) + " }" for i in listen]
    with open(svc.config, "a") as handle:
        handle.write(f"listen = [{', '.join(items)}]\n")
    return svc


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _get(address: object, family: int = socket.AF_INET) -> int:
    """One HTTP/1.0 request; the pid that answered. Raises OSError as a client sees it."""
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.settimeout(10)
        client.connect(address)
        client.sendall(b"GET / HTTP/1.0\r\nConnection: close\r\n\r\n")
        data = b""
        while True:
            chunk = client.recv(4096)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.0 200"):
        raise ConnectionError(f"bad answer {data!r}")
    return int(body)


class Clients:
    """Clients in threads, each doing one request after another until stopped; errors
    are counted by type."""

    def __init__(self, address: object, count: int = 4) -> None:
        self.address = address
        self.ok = 0
        self.errors: list[BaseException] = []
        self.lock = threading.Lock()
        self.done = threading.Event()
        self.threads = [threading.Thread(target=self._loop, daemon=True) for _ in range(count)]

    def _loop(self) -> None:
        while not self.done.is_set():
            try:
                _get(self.address)
            except OSError as exc:
                with self.lock:
                    self.errors.append(exc)
            else:
                with self.lock:
                    self.ok += 1

    def __enter__(self) -> Clients:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.done.set()
        for thread in self.threads:
            thread.join(30)

    def served_more_than(self, count: int) -> bool:
        with self.lock:
            return self.ok > count

    def take(self) -> tuple[int, list[BaseException]]:
        """(requests answered, errors) so far, and start counting afresh."""
        with self.lock:
            found = self.ok, self.errors
            self.ok, self.errors = 0, []
        return found


def _socket_inodes(pid: int) -> list[str]:
    """What fds 3, 4, ... of ``pid`` are, while they are sockets."""
    found = []
    fd = 3
    while True:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            return found
        if not target.startswith("socket:"):
            return found
        found.append(target)
        fd += 1


def _new_main(svc, old: int) -> int:
    wait_until(lambda: (svc.pid_dir / "main-1.pid").exists() and svc.pid_of("main") != old, 10, "a new main")
    return svc.pid_of("main")


def _fail_over(svc) -> int:
    """SIGKILL the main; wait until the promoted standby runs and a new standby waits."""
    old = svc.pid_of("main")
    os.kill(old, signal.SIGKILL)
    main = _new_main(svc, old)
    wait_until(lambda: (svc.pid_dir / "standby-1.pid").exists() and svc.pid_of("standby") != main, 10,
               "a replacement standby")
    return main


def test_no_client_is_refused_across_restarts_and_failovers(service):
    port = _free_port()
    svc = service(entrypoint=HTTP, listen=[f"127.0.0.1:{port}"])
    svc.run("start", check=True)
    with Clients(("127.0.0.1", port)) as clients:
        wait_until(lambda: clients.served_more_than(20), 10, "the clients served")
        clients.take()
        for _ in range(3):
            svc.run("restart", check=True)
            wait_until(lambda: clients.served_more_than(20), 10, "the clients served after a restart")
        served, errors = clients.take()
        assert errors == [], f"across 3 restarts: {len(errors)} failed of {served + len(errors)}: {errors[:5]}"
        for _ in range(3):
            _fail_over(svc)
            wait_until(lambda: clients.served_more_than(20), 10, "the clients served after a failover")
        served, errors = clients.take()
    refused = [e for e in errors if isinstance(e, ConnectionRefusedError)]
    assert refused == [], f"across 3 failovers: {len(refused)} refused of {served + len(errors)}"
    # at most the requests the killed main had in hand (one at a time, in this service)
    assert len(errors) <= 3 * len(clients.threads), errors
    svc.run("stop", check=True)


def test_the_same_kernel_socket_outlives_10_restarts_and_10_failovers(service):
    port = _free_port()
    svc = _listening(service, [f"127.0.0.1:{port}", {"address": f"127.0.0.1:{_free_port()}", "name": "admin"}],
                     entrypoint=HTTP, start_limit_burst=30)  # 10 quick failovers are no crash loop here
    svc.run("start", check=True)
    first = _socket_inodes(svc.pid_of("main"))
    assert len(first) == 2 and first == _socket_inodes(svc.pid_of("standby"))
    for _ in range(10):
        svc.run("restart", check=True)
        assert _socket_inodes(svc.pid_of("main")) == first
    for _ in range(10):
        main = _fail_over(svc)
        assert _socket_inodes(main) == first
        assert _socket_inodes(svc.pid_of("standby")) == first
    assert _get(("127.0.0.1", port)) == svc.pid_of("main")
    svc.run("stop", check=True)
    with pytest.raises(ConnectionRefusedError):  # the last worker closed it
        _get(("127.0.0.1", port))


def test_each_worker_is_told_its_sockets_the_systemd_way(service, tmp_path):
    report = tmp_path / "report"
    svc = _listening(service, [f"127.0.0.1:{_free_port()}", {"address": f"unix:{tmp_path}/api.sock", "name": "api"}],
                     entrypoint="tests.services.http:report", env={"REPORT": str(report)})
    svc.run("start", check=True)
    wait_until(report.exists, 10, "the report")
    facts = dict(line.split("=", 1) for line in report.read_text().splitlines())
    assert facts == {"LISTEN_FDS": "2", "LISTEN_PID": facts["pid"], "LISTEN_FDNAMES": "listen:api",
                     "names": "listen,api", "pid": str(svc.pid_of("main"))}
    text = svc.run("status", check=True).stdout
    assert "listen 127.0.0.1:" in text and f"api unix:{tmp_path}/api.sock" in text, text
    listed = svc.status()["listen"]
    assert [item["pids"] for item in listed] == [sorted([svc.pid_of("main"), svc.pid_of("standby")])] * 2
    svc.run("stop", check=True)


def test_foreground_holds_the_sockets_at_fds_3_and_on(service, tmp_path):
    """foreground runs the function in hadctl's own process: the sockets of listen sit at
    fds 3, 4, ... with LISTEN_* as in a worker (before: {} and nothing bound)."""
    report, port = tmp_path / "report", _free_port()
    svc = _listening(service, [f"127.0.0.1:{port}", {"address": f"unix:{tmp_path}/api.sock", "name": "api"}],
                     entrypoint="tests.services.http:report", env={"REPORT": str(report)})
    process = subprocess.Popen([*svc.command, "-c", str(svc.config), "foreground"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until(lambda: report.exists() or process.poll() is not None, 10, "the report")
        assert report.exists(), process.communicate(timeout=10)
        facts = dict(line.split("=", 1) for line in report.read_text().splitlines())
        assert facts == {"LISTEN_FDS": "2", "LISTEN_PID": str(process.pid), "LISTEN_FDNAMES": "listen:api",
                         "names": "listen,api", "pid": str(process.pid)}
        assert _get(("127.0.0.1", port)) == process.pid
        assert _get(str(tmp_path / "api.sock"), socket.AF_UNIX) == process.pid
    finally:
        process.terminate()
        _out, err = process.communicate(timeout=10)
    assert process.returncode == 0, err


def test_a_unix_socket_gets_its_mode_and_a_dead_runs_path_is_replaced(service, tmp_path):
    path = tmp_path / "api.sock"
    svc = service(entrypoint=HTTP, listen=[f"unix:{path}"], listen_mode="600")
    svc.run("start", check=True)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_ISSOCK(path.stat().st_mode)
    assert _get(str(path), socket.AF_UNIX) == svc.pid_of("main")
    svc.run("stop", check=True)
    assert path.exists()  # left behind: nothing accepts on it, so the next start replaces it
    svc.run("start", check=True)
    assert _get(str(path), socket.AF_UNIX) == svc.pid_of("main")
    other = service(entrypoint=HTTP, listen=[f"unix:{path}"])  # a second service on a live path
    result = other.run("start", check=1)
    assert f"a process accepts connections on {path}" in result.stderr, result.stderr
    assert _get(str(path), socket.AF_UNIX) == svc.pid_of("main")
    svc.run("stop", check=True)


def test_a_unix_socket_is_never_bound_through_a_link(service, tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    svc = service(entrypoint=HTTP, listen=[f"unix:{tmp_path}/link/api.sock"])
    result = svc.run("start", check=1)
    assert "is a symbolic link" in result.stderr, result.stderr
    assert list(real.iterdir()) == []
    assert not (svc.pid_dir / "main-1.pid").exists()


def test_an_address_in_use_is_refused_naming_its_holder_and_nothing_starts(service):
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        svc = service(entrypoint=HTTP, listen=[f"127.0.0.1:{port}"])
        result = svc.run("start", check=1)
        assert f"cannot listen on 127.0.0.1:{port}: address already in use by pid {os.getpid()}" in result.stderr
        assert "Traceback" not in result.stderr
        assert not [p for p in svc.pid_dir.iterdir() if p.name.endswith(".pid")]
        assert svc.run("status").returncode == 3


def test_restart_binds_new_addresses_and_removed_ones_close_with_the_old_workers(service):
    kept, added = _free_port(), _free_port()
    svc = service(entrypoint=HTTP, listen=[f"127.0.0.1:{kept}"])
    svc.run("start", check=True)
    inode = _socket_inodes(svc.pid_of("main"))[0]
    svc.write(**{**svc.settings, "listen": [f"127.0.0.1:{added}", f"127.0.0.1:{kept}"]})
    svc.run("restart", check=True)
    main = svc.pid_of("main")
    assert _socket_inodes(main)[1] == inode  # the kept address: the same socket, now at fd 4
    assert _get(("127.0.0.1", added)) == main and _get(("127.0.0.1", kept)) == main
    svc.write(**{**svc.settings, "listen": [f"127.0.0.1:{added}"]})
    svc.run("restart", check=True)
    with pytest.raises(ConnectionRefusedError):
        _get(("127.0.0.1", kept))
    assert _get(("127.0.0.1", added)) == svc.pid_of("main")
    svc.run("stop", check=True)


def test_start_under_systemd_socket_activation_hands_on_its_sockets(service):
    with socket.socket() as given:
        given.bind(("127.0.0.1", 0))
        given.listen()
        port = given.getsockname()[1]
        inode = f"socket:[{os.fstat(given.fileno()).st_ino}]"
        svc = _listening(service, [{"address": f"127.0.0.1:{port}", "name": "web"}], entrypoint=HTTP)
        # what systemd does: the socket at fd 3, LISTEN_PID = the pid that execs hadctl
        code = ("import os, sys; os.dup2(int(sys.argv[1]), 3); "
                "os.environ.update(LISTEN_FDS='1', LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES='web'); "
                "os.execv(sys.executable, [sys.executable, *sys.argv[2:]])")
        subprocess.run([sys.executable, "-c", code, str(given.fileno()), *HADCTL[1:], "-c", str(svc.config),
                        "start"], check=True, pass_fds=[given.fileno()], timeout=60)
    assert _socket_inodes(svc.pid_of("main")) == [inode]
    assert _get(("127.0.0.1", port)) == svc.pid_of("main")
    svc.run("stop", check=True)


def test_get_systemd_unit_emits_a_socket_unit_that_systemd_accepts(service, tmp_path):
    svc = _listening(service, ["127.0.0.1:8080", {"address": "unix:/run/web/api.sock", "name": "api"}],
                     entrypoint=HTTP)
    text = svc.run("get-systemd-unit", check=True).stdout
    parts = {}
    for chunk in text.split("# ---- ")[1:]:
        name, _, body = chunk.partition(" ----\n")
        parts[name.strip()] = body
    socket_unit = next(name for name in parts if name.endswith(".socket"))
    body = parts[socket_unit]
    assert "ListenStream=127.0.0.1:8080" in body and "ListenStream=/run/web/api.sock" in body
    assert body.index("127.0.0.1:8080") < body.index("/run/web/api.sock")  # config order: fds 3, 4
    folder = tmp_path / "units"
    folder.mkdir()
    for name, unit in parts.items():
        (folder / name).write_text(unit)
    result = subprocess.run(["systemd-analyze", "verify", *(str(folder / n) for n in parts)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="binding a port below 1024 as nobody needs a root controller")
def test_nobody_serves_a_port_below_1024(service, monkeypatch):
    from test_core import _world_readable_install

    port = next(p for p in range(900, 1000) if _port_is_free(p))
    shared = Path(tempfile.mkdtemp(prefix="hadctl-listen-"))
    try:
        monkeypatch.setattr("conftest.HADCTL", _world_readable_install(shared))
        shared.chmod(0o777)
        svc = service(entrypoint=HTTP, user="nobody", listen=[f"127.0.0.1:{port}", f"unix:{shared}/api.sock"],
                      python_path=[str(shared / "code")], pid_dir=str(shared / "run"),
                      log_file=str(shared / "hadctl.log"), env={"LEDGER": str(shared / "ledger")})
        svc.pid_dir = shared / "run"
        svc.command = conftest_command()
        svc.run("start", check=True)
        main = svc.pid_of("main")
        assert os.stat(f"/proc/{main}").st_uid == 65534
        assert _get(("127.0.0.1", port)) == main
        owner = os.stat(shared / "api.sock")
        assert (owner.st_uid, stat.S_IMODE(owner.st_mode)) == (65534, 0o660)
        svc.run("restart", check=True)  # a root controller takes the sockets from nobody's workers
        assert _get(("127.0.0.1", port)) == svc.pid_of("main") != main
        svc.run("stop", check=True)
    finally:
        shutil.rmtree(shared)


def conftest_command() -> list[str]:
    import conftest

    return list(conftest.HADCTL)


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("runuser"), reason="becoming nobody needs root and runuser")
def test_permission_denied_binding_is_refused_with_4(no_leftovers):
    port = next(p for p in range(900, 1000) if _port_is_free(p))
    folder = Path(tempfile.mkdtemp(prefix="hadctl-listen-"))
    try:
        folder.chmod(0o777)
        config = folder / "svc.toml"
        root = Path(__file__).resolve().parent.parent
        config.write_text(f'name = "svc"\nentrypoint = "{HTTP}"\npython_path = ["{root}"]\n'
                          f'pid_dir = "{folder / "run"}"\nlog_file = "{folder / "hadctl.log"}"\n'
                          f'listen = ["127.0.0.1:{port}"]\n')
        config.chmod(0o644)
        result = subprocess.run(["runuser", "-u", "nobody", "--", *HADCTL, "-c", str(config), "start"],
                                capture_output=True, text=True, timeout=60, cwd="/")
        assert result.returncode == 4, result
        assert f"cannot listen on 127.0.0.1:{port}: Permission denied" in result.stderr
        assert "Traceback" not in result.stderr
        assert not [p for p in (folder / "run").iterdir() if p.name.endswith(".pid")]
    finally:
        shutil.rmtree(folder)


def test_restart_onto_an_address_in_use_is_refused_before_anything_stops(service):
    port = _free_port()
    svc = service(entrypoint=HTTP, listen=[f"127.0.0.1:{port}"])
    svc.run("start", check=True)
    before = (svc.pid_of("main"), svc.pid_of("standby"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        svc.write(**{**svc.settings, "listen": [f"127.0.0.1:{port}", f"127.0.0.1:{taken}"]})
        result = svc.run("restart", check=1)
    assert f"cannot listen on 127.0.0.1:{taken}: address already in use by pid {os.getpid()}" in result.stderr
    assert (svc.pid_of("main"), svc.pid_of("standby")) == before
    assert _get(("127.0.0.1", port)) == before[0]
    svc.run("stop", check=True)
