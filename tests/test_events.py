"""The event history (issue 15, item 4): ``PID_DIR/events`` written by the process
that saw each event, ``hadctl events``, the last failover in ``status``, and
``status --format prometheus`` (item 5)."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, pid_alive, wait_until

SRC = str(ROOT / "src")


def _events(svc) -> list[dict]:
    result = svc.run("events", "-n", "1000", "--json", check=True)
    return [json.loads(line) for line in result.stdout.splitlines()]


def _kinds(svc) -> list[str]:
    return [e["kind"] for e in _events(svc)]


def test_a_scripted_life_shows_exactly_its_events(service):
    """start, SIGKILL of the main, restart, stop: exactly those events, each written by
    the process that saw it (the promoted standby writes the failover, with the gap)."""
    svc = service()
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    killed_at = time.monotonic()
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: "failover" in _kinds(svc), 10, "the promoted standby's failover event")
    wait_until(lambda: (svc.pid_dir / "standby-1.pid").exists() and svc.pid_of("standby") != standby, 10,
               "a replacement standby")
    promoted = svc.pid_of("main")
    svc.run("restart", check=True)
    new_main = svc.pid_of("main")
    svc.run("stop", check=True)
    found = _events(svc)
    kinds = [e["kind"] for e in found]
    # restart: the old main returns (exit) as the new one takes the slot (handover: a
    # controller was at work), then the controller notes the restart; stop: the main returns
    assert kinds[:2] == ["start", "failover"], kinds
    assert sorted(kinds[2:5]) == ["exit", "handover", "restart"] and kinds.index("handover") < kinds.index("restart")
    assert kinds[5:] == ["exit", "stop"], kinds
    failover = found[1]
    assert (failover["slot"], failover["old_pid"], failover["new_pid"], failover["pid"]) == (1, main, standby, standby)
    entered = [float(line[2]) for line in svc.ledger_lines() if line[0] == "enter" and int(line[1]) == standby]
    assert entered and 0 <= failover["gap_ms"] <= 1000, failover
    # an upper bound (a clock tick, the thread's start), never far beyond the real gap on a quiet machine
    assert failover["gap_ms"] <= (entered[0] - killed_at) * 1000 + failover["clock_ms"] + 50, (failover, entered)
    restart = found[kinds.index("restart")]
    assert (restart["old_pid"], restart["new_pid"]) == (promoted, new_main)
    assert found[kinds.index("handover")]["new_pid"] == new_main
    text = svc.run("events", check=True).stdout.splitlines()
    assert len(text) == 7 and f"failover main #1: pid {main} died, pid {standby} took the slot" in text[1]


def test_status_shows_the_last_failover(service):
    svc = service()
    svc.run("start", check=True)
    assert "failovers" not in svc.run("status", check=True).stdout.lower()
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: "failover" in _kinds(svc), 10, "the failover event")
    text = svc.run("status").stdout
    assert re.search(rf"last failover: main #1 pid {main} -> {standby}, gap <= [\d.]+ ms, \d+ s ago; "
                     r"1 in the last hour \[Failover\]", text), text
    summary = svc.status()["failovers"]
    assert summary["last_hour"] == summary["total"] == 1
    assert (summary["last"]["old_pid"], summary["last"]["new_pid"], summary["last"]["slot"]) == (main, standby, 1)


def test_events_options(service):
    svc = service()
    svc.run("start", check=True)
    svc.run("stop", check=True)
    svc.run("start", check=True)
    assert len(svc.run("events", "-n", "2", check=True).stdout.splitlines()) == 2
    assert len(svc.run("events", "--since", "1h", check=True).stdout.splitlines()) == 4
    assert svc.run("events", "--since", "@" + str(time.time() + 60), check=True).stdout == ""
    for args, word in ((("-n", "x"), "-n"), (("--since", "yesterday"), "--since")):
        result = svc.run("events", *args)
        assert result.returncode == 2 and word in result.stderr and len(result.stderr.splitlines()) == 1, result


def _record_in_subprocess(pid_dir: Path, code: str, count: int) -> subprocess.Popen[bytes]:
    script = f"import sys; sys.path.insert(0, {SRC!r})\nfrom hadctl import events\n" + code
    return subprocess.Popen([sys.executable, "-c", script, str(pid_dir), str(count)])


def test_concurrent_writers_never_interleave_and_rotation_loses_nothing(tmp_path):
    """8 processes append 150 lines of ~300 bytes each (~360 KB: one rotation past
    256 KiB): every line is whole, none lost or doubled, events.1 holds the older part."""
    pid_dir = tmp_path / "run"
    pid_dir.mkdir()
    code = ("pid_dir, count = sys.argv[1], int(sys.argv[2])\n"
            "for n in range(count):\n"
            "    events.record(pid_dir, 'test', n=n, pad='x' * 250)\n")
    writers = [_record_in_subprocess(pid_dir, code, 150) for _ in range(8)]
    assert [writer.wait(60) for writer in writers] == [0] * len(writers)
    lines = (pid_dir / "events.1").read_bytes().splitlines() + (pid_dir / "events").read_bytes().splitlines()
    parsed = [json.loads(line) for line in lines]
    assert sorted((e["pid"], e["n"]) for e in parsed) == sorted((w.pid, n) for w in writers for n in range(150))
    assert (pid_dir / "events.1").stat().st_size > 256 * 1024 > (pid_dir / "events").stat().st_size


def test_record_never_writes_through_a_link_a_fifo_or_a_hard_link(tmp_path):
    pid_dir = tmp_path / "run"
    pid_dir.mkdir()
    target = tmp_path / "precious"
    target.write_text("keep\n")
    sys.path.insert(0, SRC)
    try:
        from hadctl import events
    finally:
        sys.path.remove(SRC)
    (pid_dir / "events").symlink_to(target)
    events.record(str(pid_dir), "test")
    (pid_dir / "events").unlink()
    os.link(target, pid_dir / "events")
    events.record(str(pid_dir), "test")
    assert target.read_text() == "keep\n"
    (pid_dir / "events").unlink()
    os.mkfifo(pid_dir / "events")
    started = time.monotonic()
    events.record(str(pid_dir), "test")  # O_NONBLOCK: no reader, ENXIO at once, never blocked
    assert time.monotonic() - started < 5
    assert events.read(str(pid_dir)) == []


def test_backoff_steps_are_recorded(service):
    """A crash loop: the standby that backs off writes each step."""
    svc = service(start_limit_burst=2, start_limit_interval=30, restart_backoff_max=4)
    svc.run("start", check=True)
    for _ in range(2):
        main = svc.pid_of("main")
        os.kill(main, signal.SIGKILL)
        wait_until(lambda m=main: not pid_alive(m) and (svc.pid_dir / "main-1.pid").exists()
                   and svc.pid_of("main") != m, 10, "a new main")
    wait_until(lambda: "backoff" in _kinds(svc), 10, "a backoff event")
    backoff = next(e for e in _events(svc) if e["kind"] == "backoff")
    assert backoff["delay"] == 1.0 and backoff["run"] == 2


PROMETHEUS_LINE = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})? '
                             r'(-?[0-9.e+-]+|NaN|[+-]Inf)$')


def parse_prometheus(text: str) -> dict[str, list[tuple[dict[str, str], float]]]:
    """The text exposition format, strictly: HELP and TYPE once per metric, before its
    samples; every sample line well formed and of a declared metric."""
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    helped, typed = set(), {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name = line.split()[2]
            assert name not in helped and name not in samples, line
            helped.add(name)
        elif line.startswith("# TYPE "):
            _h, _t, name, kind = line.split()
            assert kind in ("counter", "gauge") and name in helped and name not in typed, line
            typed[name] = kind
        else:
            match = PROMETHEUS_LINE.match(line)
            assert match, f"not a sample line: {line!r}"
            name = match.group(1)
            assert name in typed, line
            labels = dict(re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.setdefault(name, []).append((labels, float(match.group(3))))
    return samples


def test_status_all_in_prometheus_format(services, tmp_path):
    one = services(name="one")
    services(name="two", locks={"max_procs": 2, "standby_max_procs": 0})
    one.run("start", check=True)
    main = one.pid_of("main")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: "failover" in _kinds(one), 10, "the failover event")
    folder = one.config.parent
    result = subprocess.run([sys.executable, "-m", "hadctl", "status", "--all", "--config-dir", str(folder),
                             "--format", "prometheus"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 3, result  # the worst: two is not running
    found = parse_prometheus(result.stdout)
    up = {(s["service"], s["role"], s["slot"]): v for s, v in found["hadctl_up"]}
    assert up == {("one", "main", "1"): 1, ("one", "standby", "1"): 1, ("two", "main", "1"): 0,
                  ("two", "main", "2"): 0}
    assert {s["service"]: v for s, v in found["hadctl_status"]} == {"one": 0, "two": 3}
    assert {s["service"]: v for s, v in found["hadctl_failovers_total"]} == {"one": 1, "two": 0}
    assert [s["service"] for s, _v in found["hadctl_last_failover_gap_seconds"]] == ["one"]
    assert [(s["service"], s["slot"]) for s, v in found["hadctl_rss_bytes"] if v > 1e6] == [("one", "1")]
    assert {s["service"]: v for s, v in found["hadctl_backoff_seconds"]} == {"one": 0, "two": 0}
    single = one.run("status", "--format", "prometheus", check=True)
    assert parse_prometheus(single.stdout)["hadctl_up"]
    bad = one.run("status", "--format", "xml")
    assert bad.returncode == 2 and len(bad.stderr.splitlines()) == 1 and "--format" in bad.stderr


def test_the_prometheus_parser_sees_a_breach():
    """The parser above fails on what it must refuse (a parser that accepted all would pass)."""
    good = "# HELP a_b x\n# TYPE a_b gauge\na_b{s=\"v\"} 1\n"
    assert parse_prometheus(good) == {"a_b": [({"s": "v"}, 1.0)]}
    for bad in ("a_b 1\n", good + "a_b{s=v} 1\n", good + "# HELP a_b again\n", "# TYPE a_b gauge\na_b 1\n"):
        with pytest.raises(AssertionError):
            parse_prometheus(bad)


@pytest.fixture
def services(tmp_path: Path):
    """Services whose files lie in one folder (for --all)."""
    from conftest import Service

    folder = tmp_path / "configs"
    folder.mkdir()
    made = []

    def make(**settings):
        name = settings["name"]
        home = tmp_path / name
        home.mkdir()
        svc = Service(home, **settings)
        svc.config.rename(folder / f"{name}.toml")
        svc.config = folder / f"{name}.toml"
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()


def test_events_shows_no_escape_sequence_planted_in_the_file(service):
    """The history belongs to the service's user; root may read it at a terminal."""
    svc = service()
    svc.run("start", check=True)
    with open(svc.pid_dir / "events", "a") as handle:
        handle.write(json.dumps({"time": time.time(), "kind": "spawn_failure", "pid": 1, "reason": "x",
                                 "message": "\x1b]0;owned\x07\x1b[2J"}) + "\n")
    text = svc.run("events", check=True).stdout
    assert "\x1b" not in text and "\x07" not in text and "?]0;owned??[2J" in text


def test_a_watchdog_replacement_is_recorded_then_the_failover(service):
    """The standby that watches a hung main writes "replaced", then, promoted, "failover"."""
    svc = service(entrypoint="tests.services.contained:hangs", watchdog_timeout=0.5, kill_timeout=1,
                  env={"HANG": "stop", "HEALTHY": "0.3"}, locks={"standby_max_procs": 1})
    svc.run("start", check=True)
    hung, standby = svc.pid_of("main"), svc.pid_of("standby")
    wait_until(lambda: "failover" in _kinds(svc), 15, "the failover after the replacement")
    found = _events(svc)
    kinds = [e["kind"] for e in found]
    assert kinds == ["start", "replaced", "failover"], kinds
    replaced, failover = found[1], found[2]
    assert (replaced["slot"], replaced["main_pid"], replaced["why"], replaced["pid"]) == (1, hung, "hung", standby)
    assert replaced["figure"] > 0.5
    assert (failover["old_pid"], failover["new_pid"]) == (hung, standby)
    svc.run("stop", check=True)


def test_a_restart_without_standbys_is_recorded_per_slot(service):
    svc = service(locks={"max_procs": 2, "standby_max_procs": 0})
    svc.run("start", check=True)
    old = {slot: svc.pid_of("main", slot) for slot in (1, 2)}
    svc.run("restart", check=True)
    restarts = [e for e in _events(svc) if e["kind"] == "restart"]
    assert sorted((e["slot"], e["old_pid"]) for e in restarts) == sorted(old.items())
    assert all(e["gap"] is True for e in restarts)  # no standby: a gap, as documented


def test_a_failover_record_leaves_no_lock_to_a_child_the_function_forks_meanwhile(tmp_path, monkeypatch):
    """The promoted main's settling thread looks whether a controller holds hadctl.lock
    (a shared flock) beside the function: a child the function forks in that moment
    shares the open file. It must not keep the lock (a 60 s stop was seen: the
    function's children, left by kill_mode = "process", held it)."""
    import fcntl

    from hadctl import events
    from hadctl.layout import Layout
    from hadctl.locks import flock

    layout = Layout(str(tmp_path), str(tmp_path / "lock"), str(tmp_path / "lock-standby"),
                    str(tmp_path / "standby-stop-file"))
    hold_shared = flock.hold_shared
    gate_read, gate_write = os.pipe()
    children = []

    def hold_then_fork(path):
        fd = hold_shared(path)
        child = os.fork()
        if child == 0:  # the function's child: lives on, shares every open file
            os.close(gate_write)
            os.read(gate_read, 1)
            os._exit(0)
        children.append(child)
        return fd

    monkeypatch.setattr(flock, "hold_shared", hold_then_fork)
    try:
        events.record_failover(layout, 1, os.getpid())
        fd = os.open(layout.control_lock, os.O_RDWR | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError while the child holds it
        finally:
            os.close(fd)
    finally:
        os.close(gate_write)
        os.close(gate_read)
        for child in children:
            os.waitpid(child, 0)
    assert children
