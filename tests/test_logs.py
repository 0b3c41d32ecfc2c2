"""Output files that rotate (reopen-logs, logs -f, get-logrotate) and syslog output,
against the real tools: Debian's logrotate and a real rsyslogd started here."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import HADCTL
from support import wait_until

LOGROTATE = shutil.which("logrotate") or "/usr/sbin/logrotate"
RSYSLOGD = shutil.which("rsyslogd") or "/usr/sbin/rsyslogd"


def _numbers(paths: list[Path], prefix: str = "") -> list[int]:
    found = []
    for path in paths:
        for line in path.read_text().splitlines():
            if prefix:
                if line.startswith(prefix):
                    found.append(int(line[len(prefix):]))
            elif line.strip():
                found.append(int(line))
    return found


def _rotated(path: Path) -> list[Path]:
    """The rotated files (``path.N``) oldest first, then ``path`` itself."""
    numbered = sorted((p for p in path.parent.glob(path.name + ".*") if p.suffix[1:].isdigit()),
                      key=lambda p: -int(p.suffix[1:]))
    return numbered + ([path] if path.exists() else [])


def _assert_consecutive(numbers: list[int], what: str) -> None:
    assert numbers, f"no line of {what}"
    expected = list(range(numbers[0], numbers[0] + len(numbers)))
    if numbers != expected:
        missing = sorted(set(expected) - set(numbers))[:10]
        twice = sorted({n for n in numbers if numbers.count(n) > 1})[:10]
        pytest.fail(f"{what}: lines lost {missing} or duplicated {twice} (of {len(numbers)})")


def test_logrotate_100_rotations_of_a_live_service_lose_and_duplicate_nothing(service: Any, tmp_path: Path) -> None:
    (tmp_path / "out").mkdir()
    out, err = tmp_path / "out" / "out.log", tmp_path / "out" / "err.log"
    svc = service(entrypoint="tests.services.writer:write", stdout_file=str(out), stderr_file=str(err),
                  env={"RATE": "1000"})
    svc.run("start", check=True)
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "the writer's first lines")
    conf = tmp_path / "logrotate.conf"
    hadctl = " ".join([sys.executable, "-m", "hadctl"])
    conf.write_text(f"{out} {err} {{\n    rotate 200\n    missingok\n    nocompress\n    sharedscripts\n"
                    f"    postrotate\n        {hadctl} -c {svc.config} reopen-logs\n    endscript\n}}\n")
    state = tmp_path / "logrotate.state"
    for number in range(100):
        result = subprocess.run([LOGROTATE, "-f", "-s", str(state), str(conf)], capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 0, f"rotation {number}: {result.stderr}"
    svc.run("stop", check=True)
    assert len(_rotated(out)) >= 100
    stdout_numbers = _numbers(_rotated(out))
    _assert_consecutive(stdout_numbers, "stdout")
    assert stdout_numbers[0] == 1
    errors = _numbers(_rotated(err), "err ")
    assert errors == list(range(10, 10 * len(errors) + 1, 10)), "stderr lines lost or duplicated"
    # every rotated file got lines: the writer really moved to each new file
    assert sum(1 for p in _rotated(out) if p.stat().st_size) >= 95


@pytest.mark.parametrize("mains", [1, 2], ids=["one main slot", "two: the standby waits in threads"])
def test_reopen_logs_moves_standbys_and_main_to_the_new_files(service: Any, tmp_path: Path, mains: int) -> None:
    out = tmp_path / "out.log"
    svc = service(entrypoint="tests.services.writer:write", stdout_file=str(out), env={"RATE": "200"},
                  locks={"max_procs": mains, "standby_max_procs": 1})
    svc.run("start", check=True)
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "the writer's first lines")
    out.rename(tmp_path / "out.log.1")
    svc.log_file.rename(tmp_path / "hadctl.log.1")
    result = svc.run("reopen-logs", check=True)
    assert "main #1" in result.stdout and "standby #1" in result.stdout
    standby = svc.holders("standby")[0]
    assert os.stat(f"/proc/{standby}/fd/1").st_ino == svc.log_file.stat().st_ino
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "lines in the new file")


def test_reopen_logs_exits_7_when_nothing_runs(service: Any) -> None:
    svc = service()
    result = svc.run("reopen-logs")
    assert result.returncode == 7, result.stderr
    assert "nothing is running" in result.stderr


def test_get_logrotate_prints_a_stanza_logrotate_accepts(service: Any, tmp_path: Path) -> None:
    svc = service(stdout_file=str(tmp_path / "out.log"))
    result = svc.run("get-logrotate", check=True)
    assert f"-c {svc.config} reopen-logs" in result.stdout
    assert str(tmp_path / "out.log") in result.stdout and str(svc.log_file) in result.stdout
    conf = tmp_path / "stanza.conf"
    conf.write_text(result.stdout)
    checked = subprocess.run([LOGROTATE, "-d", "-s", str(tmp_path / "state"), str(conf)], capture_output=True,
                             text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    assert "error" not in checked.stderr.lower(), checked.stderr


def test_logs_prints_the_last_lines_and_follows_across_rotations(service: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    svc = service(entrypoint="tests.services.writer:write", stdout_file=str(out), env={"RATE": "300"})
    svc.run("start", check=True)
    wait_until(lambda: out.exists() and len(out.read_text().splitlines()) >= 20, 10, "20 lines")
    last = svc.run("logs", "-n", "5", check=True).stdout.splitlines()
    assert len(last) == 5
    _assert_consecutive([int(x) for x in last], "logs -n 5")
    shown = tmp_path / "shown"
    with open(shown, "w") as handle:
        follower = subprocess.Popen([*HADCTL, "-c", str(svc.config), "logs", "-f", "-n", "0"], stdout=handle)
    try:
        wait_until(lambda: shown.stat().st_size > 0, 10, "logs -f to print appended lines")
        for number in (1, 2, 3):
            out.rename(tmp_path / f"out.log.{number}")
            svc.run("reopen-logs", check=True)
            wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "lines in the new file")
        svc.run("stop", check=True)
        final = _numbers([out])[-1]
        wait_until(lambda: str(final) in shown.read_text().split(), 10, f"logs -f to show line {final}")
    finally:
        follower.send_signal(signal.SIGINT)
        follower.wait(10)
    _assert_consecutive(_numbers([shown]), "logs -f")
    assert follower.returncode == 130


def test_logs_of_hadctl_and_stderr(service: Any, tmp_path: Path) -> None:
    err = tmp_path / "err.log"
    svc = service(entrypoint="tests.services.writer:write", stderr_file=str(err), stdout_file=str(tmp_path / "out.log"),
                  env={"RATE": "500"})
    svc.run("start", check=True)
    wait_until(lambda: err.exists() and err.stat().st_size > 0, 10, "stderr lines")
    assert svc.run("logs", "--stderr", "-n", "1", check=True).stdout.startswith("err ")
    assert "main #1 started" in svc.run("logs", "--hadctl", "-n", "100", check=True).stdout
    result = svc.run("logs", "-n", "x")
    assert result.returncode == 2 and "-n" in result.stderr  # a bad argument, as for events -n


@pytest.fixture
def rsyslogd(tmp_path: Path) -> Any:
    """A real rsyslogd: imuxsock on a socket in tmp_path, omfile writing tag, facility,
    severity and message of each line to a file. Yields (socket path, output file)."""
    folder = tmp_path / "rsyslog"
    folder.mkdir()
    sock, output = folder / "log.sock", folder / "messages"
    conf = folder / "rsyslog.conf"
    conf.write_text(
        f'global(workDirectory="{folder}")\n'
        'module(load="imuxsock" SysSock.Use="off")\n'
        f'input(type="imuxsock" Socket="{sock}" CreatePath="on" RateLimit.Interval="0")\n'
        'template(name="fields" type="string"\n'
        '         string="%syslogtag%|%syslogfacility-text%|%syslogseverity-text%|%msg%\\n")\n'
        f'*.* action(type="omfile" file="{output}" template="fields")\n')
    process = subprocess.Popen([RSYSLOGD, "-n", "-f", str(conf), "-i", str(folder / "pid")],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: sock.exists() or process.poll() is not None, 10, "rsyslogd's socket")
        assert process.poll() is None, process.stdout.read() if process.stdout else ""
        yield sock, output
    finally:
        process.terminate()
        process.wait(10)


def _syslog_lines(output: Path) -> list[list[str]]:
    if not output.exists():
        return []
    return [line.split("|", 3) for line in output.read_text().splitlines()]


def test_syslog_output_reaches_rsyslogd_with_tag_facility_and_severity(
        service: Any, rsyslogd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    sock, output = rsyslogd
    monkeypatch.setenv("HADCTL_SYSLOG_SOCKET", str(sock))
    svc = service(name="shipper", entrypoint="tests.services.writer:write", stdout_file="syslog",
                  stderr_file="syslog", syslog_facility="local3", env={"RATE": "1000"})
    svc.run("start", check=True)
    main = svc.holders("main")[0]
    wait_until(lambda: len(_syslog_lines(output)) > 300, 20, "lines in rsyslogd's file")
    os.kill(main, signal.SIGKILL)  # what the killed main wrote is still forwarded
    wait_until(lambda: svc.holders("main") and svc.holders("main")[0] != main, 10, "a new main")
    svc.run("stop", check=True)
    lines = _syslog_lines(output)
    first = [fields for fields in lines if fields[0] == f"shipper[{main}]:"]
    assert first and all(f[1] == "local3" for f in first)
    stdout = [int(f[3]) for f in first if f[2] == "info"]
    stderr = [f[3].strip() for f in first if f[2] == "err"]
    _assert_consecutive(stdout, "stdout through syslog")
    assert stdout[0] == 1
    assert stderr and all(s.startswith("err ") for s in stderr)
    missing = {n for n in stdout if n % 10 == 0} - {int(s[4:]) for s in stderr}
    assert missing <= {stdout[-1]}, f"stderr lines lost: {sorted(missing)[:10]}"  # (killed between the two writes)
    assert any(f[0] != f"shipper[{main}]:" and f[0].startswith("shipper[") for f in lines), "the new main's lines"


def test_syslog_lines_go_to_the_log_file_when_no_syslogd_listens(
        service: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HADCTL_SYSLOG_SOCKET", str(tmp_path / "nobody-listens.sock"))
    svc = service(entrypoint="tests.services.writer:write", stdout_file="syslog", env={"RATE": "200"})
    svc.run("start", check=True)
    wait_until(lambda: "[syslog unreachable" in svc.log_file.read_text(), 10, "undelivered lines in log_file")
    svc.run("stop", check=True)
    kept = [line.rsplit(": ", 1)[1] for line in svc.log_file.read_text().splitlines()
            if line.startswith("[syslog unreachable") and "svc[" in line]
    _assert_consecutive([int(x) for x in kept], "stdout kept in log_file")
    assert kept[0] == "1"


def test_hadctl_log_to_syslog_reaches_rsyslogd_with_tag_facility_and_severity(
        service: Any, rsyslogd: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """log_file = "syslog": the controller's lines (start, stop) and a worker's (the
    promoted main's) arrive tagged hadctl/NAME[PID] at their level; stdout_file, unset,
    follows log_file to syslog; no file is written; logs --hadctl says where to look."""
    sock, output = rsyslogd
    monkeypatch.setenv("HADCTL_SYSLOG_SOCKET", str(sock))
    svc = service(name="shipper", entrypoint="tests.services.writer:write", log_file="syslog",
                  syslog_facility="local4", env={"RATE": "100"})
    svc.run("start", check=True)
    main = svc.holders("main")[0]
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: svc.holders("main") and svc.holders("main")[0] != main, 10, "a new main")
    promoted = svc.holders("main")[0]
    wait_until(lambda: any(f[0] == f"shipper[{promoted}]:" for f in _syslog_lines(output)), 10, "the new main's output")
    svc.run("stop", check=True)
    lines = _syslog_lines(output)
    ours = [f for f in lines if f[0].startswith("hadctl/shipper[")]
    assert all(f[1] == "local4" for f in lines), lines
    assert any(f[2] == "info" and f[3].strip().startswith("main #1 started (pid ") for f in ours), ours
    assert any(f[2] == "info" and f[3].strip().startswith("main #1 (pid ") and f[3].endswith("[Stopped]")
               for f in ours), ours
    assert [f[2] for f in ours if f[0] == f"hadctl/shipper[{promoted}]:" and "promoted)" in f[3]] == ["info"], ours
    assert [f[2] for f in lines if f[0] == f"shipper[{promoted}]:"][:2] == ["info", "info"]  # its stdout
    assert not svc.log_file.exists() and not list(svc.folder.rglob("syslog")), "a log file was written"
    result = svc.run("logs", "--hadctl")
    assert result.returncode == 6 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and "journalctl -t hadctl/shipper" in result.stderr, result.stderr
    result = svc.run("get-logrotate")
    assert result.returncode == 6 and result.stderr.count("\n") == 1, result.stderr


def test_hadctl_log_levels_map_to_syslog_severities(rsyslogd: Any) -> None:
    from hadctl.log import open_log

    sock, output = rsyslogd
    log = open_log("syslog", "levels", "user", str(sock))
    log.tracing = True
    for level in ("trace", "info", "warn", "error"):
        getattr(log, level)(f"a {level} line")
    wait_until(lambda: len(_syslog_lines(output)) >= 4, 10, "the four lines")
    assert [(f[0], f[1], f[2], f[3].strip()) for f in _syslog_lines(output)] == [
        (f"hadctl/levels[{os.getpid()}]:", "user", severity, f"a {level} line")
        for level, severity in (("trace", "debug"), ("info", "info"), ("warn", "warning"), ("error", "err"))]


def _stopped(pid: int) -> bool:
    """Every thread of ``pid`` is stopped (state T)."""
    tasks = Path(f"/proc/{pid}/task")
    return all((task / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T" for task in tasks.iterdir())


def test_hadctl_log_waits_for_a_stopped_syslogd_once_not_for_every_line(rsyslogd: Any, tmp_path: Path) -> None:
    """rsyslogd stopped, its queue full: the first line waits SEND_TIMEOUT, the next ones
    none (a failover logs several); all go to the fallback fd; once syslogd reads again,
    lines reach it again."""
    import socket as sockets

    from hadctl.log import open_log
    from hadctl.syslogsend import SEND_TIMEOUT

    sock, output = rsyslogd
    daemon = int((sock.parent / "pid").read_text())
    kept = tmp_path / "stderr"
    fd = os.open(kept, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.kill(daemon, signal.SIGSTOP)
    wait_until(lambda: _stopped(daemon), 10, "rsyslogd stopped")  # (a signal is delivered later)
    filler = sockets.socket(sockets.AF_UNIX, sockets.SOCK_DGRAM)
    try:
        filler.connect(str(sock))
        filler.setblocking(False)
        filled = 0
        with pytest.raises(BlockingIOError):
            for _n in range(10000):
                filler.send(b"<14>fill")
                filled += 1
        log = open_log("syslog", "jam", "user", str(sock), fd)
        started = time.monotonic()
        for n in range(20):
            log.info(f"line {n}")
        took = time.monotonic() - started
    finally:
        os.kill(daemon, signal.SIGCONT)
        filler.close()
        os.close(fd)
    assert took < SEND_TIMEOUT * 5, f"20 lines took {took:.2f} s with syslogd stopped"
    assert [line.rsplit(": ", 1)[1] for line in kept.read_text().splitlines()] == [f"line {n}" for n in range(20)]
    assert kept.read_text().startswith("[syslog unreachable: queue full] <14>")
    wait_until(lambda: len(_syslog_lines(output)) >= filled, 10, "rsyslogd emptying its queue")
    log.info("after")
    wait_until(lambda: any(f[3].strip() == "after" for f in _syslog_lines(output)), 10, "the line after the jam")


def test_hadctl_log_lines_syslog_does_not_take_go_to_the_controllers_stderr(
        service: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HADCTL_SYSLOG_SOCKET", str(tmp_path / "nobody-listens.sock"))
    svc = service(log_file="syslog")
    result = svc.run("start", check=True)
    assert "[syslog unreachable: " in result.stderr and "hadctl/svc[" in result.stderr
    assert "main #1 started (pid " in result.stderr
    svc.run("stop", check=True)
    svc.write(log_file="syslog", entrypoint="tests.services.broken:nothing")
    result = svc.run("start")
    assert result.returncode != 0 and "check syslog (journalctl -t hadctl/svc) for details" in result.stderr
    assert not list(svc.folder.rglob("syslog"))


def test_with_reopen_signal_hup_reload_reopens_instead_of_replacing_the_main(service: Any, tmp_path: Path) -> None:
    out = tmp_path / "out.log"
    svc = service(entrypoint="tests.services.writer:write", stdout_file=str(out), reopen_signal="HUP",
                  env={"RATE": "200"})
    svc.run("start", check=True)
    main = svc.holders("main")[0]
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "the writer's first lines")
    out.rename(tmp_path / "out.log.1")
    svc.run("reload", check=True)
    wait_until(lambda: out.exists() and out.stat().st_size > 0, 10, "lines in the new file")
    assert svc.holders("main") == [main]
