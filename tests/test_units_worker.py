"""Fast unit tests of the worker side's pure logic: the crash-loop back-off delays,
the report protocol, the spec's framing over the pipe, the entrypoint runner and the
ZooKeeper holder merge. No processes; every function here is the real one."""
from __future__ import annotations

import os
import time

import pytest

from hadctl import backoff, spawn
from hadctl.entrypoint import call
from hadctl.model import Role, SlotReport
from hadctl.spec import FIELDS, WorkerSpec, frame, read, unframe

# ------------------------------------------------------------------ back-off


def _starts(*ages: float) -> list[float]:
    """Promotion times ``ages`` seconds ago, oldest first (as read_starts returns them)."""
    now = time.monotonic()
    return sorted(now - age for age in ages)


def test_no_record_means_no_delay():
    assert backoff.delay([], burst=5, interval=10.0, cap=60.0) == (0.0, 0)


def test_a_run_shorter_than_the_burst_waits_nothing_but_is_counted():
    assert backoff.delay(_starts(3, 2, 1), burst=5, interval=10.0, cap=60.0) == (0.0, 3)


def test_the_delay_doubles_per_promotion_beyond_the_burst():
    assert backoff.delay(_starts(5, 4, 3, 2, 1), burst=5, interval=10.0, cap=60.0) == (1.0, 5)
    assert backoff.delay(_starts(6, 5, 4, 3, 2, 1), burst=5, interval=10.0, cap=60.0) == (2.0, 6)
    assert backoff.delay(_starts(7, 6, 5, 4, 3, 2, 1), burst=5, interval=10.0, cap=60.0) == (4.0, 7)


def test_the_delay_is_capped():
    ages = [float(a) for a in range(20, 0, -1)]
    assert backoff.delay(_starts(*ages), burst=5, interval=10.0, cap=60.0) == (60.0, 20)


def test_a_main_that_stayed_up_longer_than_the_interval_ends_the_run():
    # 100 s between the third and fourth promotion: only the last two count
    assert backoff.delay(_starts(203, 202, 201, 101, 100.5), burst=2, interval=10.0, cap=60.0) == (0.0, 0)
    assert backoff.delay(_starts(203, 202, 201, 2, 1), burst=2, interval=10.0, cap=60.0) == (1.0, 2)


def test_an_old_record_means_no_delay():
    assert backoff.delay(_starts(50, 49, 48, 47, 46, 45), burst=5, interval=10.0, cap=60.0) == (0.0, 0)


# ------------------------------------------------------------------ report protocol


@pytest.mark.parametrize("kind, slot, message", [
    (spawn.MAIN, 1, ""),
    (spawn.STANDBY, 3, ""),
    (spawn.NOSLOT, None, ""),
    (spawn.STOPFILE, None, ""),
    (spawn.IMPORT_ERROR, None, "entrypoint app:run: cannot import app: ModuleNotFoundError: No module named 'app'"),
    (spawn.ERROR, None, "cannot write pid file /run/x/unknown-7.pid: Permission denied"),
])
def test_a_report_reads_back_as_written(kind, slot, message):
    line = spawn.format_report(kind, 4242, slot, message)
    assert "\n" not in line
    assert spawn.parse_report(line) == spawn.Report(kind, 4242, slot, message)
    assert spawn.parse_report(line + "\n") == spawn.Report(kind, 4242, slot, message)


def test_every_kind_round_trips():
    for kind in spawn.KINDS:
        slot = 2 if kind in (spawn.MAIN, spawn.STANDBY) else None
        assert spawn.parse_report(spawn.format_report(kind, 9, slot, "a b  c")).kind == kind


def test_a_message_stays_on_one_line():
    line = spawn.format_report(spawn.ERROR, 5, message="first\nsecond")
    assert spawn.parse_report(line) == spawn.Report(spawn.ERROR, 5, None, "first second")


def test_a_slot_is_given_exactly_for_main_and_standby():
    with pytest.raises(ValueError):
        spawn.format_report(spawn.MAIN, 5)
    with pytest.raises(ValueError):
        spawn.format_report(spawn.NOSLOT, 5, slot=1)
    with pytest.raises(ValueError):
        spawn.format_report("promoted", 5)


@pytest.mark.parametrize("line", ["", "main", "main one 12", "standby 1", "standby 1 x", "noslot", "noslot pid",
                                  "hello 12", "mainframe 1 2", "error"])
def test_a_bad_line_becomes_an_error_report_that_quotes_it(line):
    report = spawn.parse_report(line)
    assert report.kind == spawn.ERROR and report.pid is None and report.slot is None
    assert repr(line) in report.message


def test_write_report_writes_one_line_and_survives_a_closed_reader():
    read_fd, write_fd = os.pipe()
    spawn.write_report(write_fd, spawn.STANDBY, 77, 2)
    assert os.read(read_fd, 100) == b"standby 2 77\n"
    os.close(read_fd)
    spawn.write_report(write_fd, spawn.NOSLOT, 77)  # EPIPE: the controller went away; no exception
    os.close(write_fd)


# ------------------------------------------------------------------ spec framing


def _spec() -> WorkerSpec:
    return WorkerSpec(name="svc", entrypoint="app:run", pid_dir="/run/svc", log_file="/var/log/svc.log",
                      standby_stop_file="/run/svc/standby-stop", locks_path="/run/svc/LOCKS",
                      locks_standby_path="/run/svc/STANDBY_LOCKS", args=(1, "two", [3.0], {"k": None}),
                      python_path=("/srv/app",), env=(("A", "1"), ("B", "")), uid=1000, gid=None,
                      locks_engine="zookeeper", locks_hosts="zk1:2181,zk2:2181/chroot", locks_retries=3,
                      host_id="host-a", spawned_by_main=True, alive_fd=4)


def test_the_spec_reads_back_as_framed():
    spec = _spec()
    data = frame(spec)
    assert int.from_bytes(data[:8], "little") == len(data) - 8
    assert unframe(data[8:]) == spec


def test_the_spec_reads_exactly_its_frame_from_a_pipe():
    spec = _spec()
    read_fd, write_fd = os.pipe()
    try:
        os.write(write_fd, frame(spec) + b"what follows is not ours")
        assert read(read_fd) == spec
    finally:
        os.close(read_fd)
        os.close(write_fd)


def test_a_cut_spec_is_an_eof():
    read_fd, write_fd = os.pipe()
    os.write(write_fd, frame(_spec())[:20])
    os.close(write_fd)
    with pytest.raises(EOFError):
        read(read_fd)
    os.close(read_fd)


def test_a_frame_of_the_wrong_shape_is_refused():
    import marshal

    with pytest.raises(ValueError):
        unframe(marshal.dumps(("svc", "app:run")))
    with pytest.raises(ValueError):
        unframe(marshal.dumps({name: None for name in FIELDS}))


def test_worker_spec_fields_are_named_like_the_toml_keys():
    from hadctl.config import LOCKS_KEYS, TOP_KEYS

    # spec.py says where these come from
    not_toml = {"host_id", "spawned_by_main", "standby_extra", "spawn_timeout", "alive_fd", "listen_names",
                "uid", "gid", "home", "environment", "syslog_socket", "service_id", "cgroup", "signal_timeout",
                "rlimits"}
    for name in set(FIELDS) - not_toml:
        key = name[len("locks_"):] if name.startswith("locks_") else name
        assert key in (LOCKS_KEYS if name.startswith("locks_") else TOP_KEYS), name


# ------------------------------------------------------------------ entrypoint.call


def _returns(value: object) -> object:
    return value


def _exits(code: object) -> None:
    raise SystemExit(code)


def _fails() -> None:
    raise RuntimeError("boom")


def test_call_turns_the_end_of_the_function_into_an_exit_status(capsys):
    assert call(_returns, (None,)) == 0
    assert call(_returns, [3]) == 3
    assert call(_returns, (257,)) == 1
    assert call(_exits, (None,)) == 0
    assert call(_exits, (7,)) == 7
    assert call(_exits, ("bye",)) == 1
    assert "bye" in capsys.readouterr().err
    assert call(_fails, ()) == 1
    assert "RuntimeError: boom" in capsys.readouterr().err


# ------------------------------------------------------------------ ZooKeeper holder merge


def _merge(report: SlotReport, found: tuple[str, int | None, int] | None, alive: set[int] = frozenset()):
    pytest.importorskip("kazoo", reason="the ZooKeeper engine needs kazoo")
    from hadctl.locks.zookeeper_controller import merge

    return merge(report, found, "host-a", lambda pid: pid in alive, 6.0)


def test_merge_a_slot_nobody_holds():
    free = SlotReport(Role.MAIN, 1, None)
    assert _merge(free, None) == free


def test_merge_a_local_lock_without_a_zookeeper_lock_is_being_fenced():
    merged = _merge(SlotReport(Role.MAIN, 1, 100), None)
    assert (merged.pid, merged.host) == (100, "host-a")
    assert "no ZooKeeper lock" in merged.stale[0]


def test_merge_the_same_holder_here_and_in_zookeeper():
    assert _merge(SlotReport(Role.MAIN, 1, 100), ("host-a", 100, 5)) == SlotReport(Role.MAIN, 1, 100, host="host-a")


def test_merge_a_slot_held_on_another_host():
    assert _merge(SlotReport(Role.MAIN, 2, None), ("host-b", 900, 5)) == SlotReport(Role.MAIN, 2, 900, host="host-b")


def test_merge_another_host_holds_what_a_local_process_still_locks():
    merged = _merge(SlotReport(Role.MAIN, 1, 100), ("host-b", 900, 5))
    assert (merged.pid, merged.host) == (900, "host-b")
    assert "pid 100 of this host still holds its lock" in merged.stale[0]


def test_merge_zookeeper_names_a_live_process_of_this_host_that_lost_its_local_lock():
    merged = _merge(SlotReport(Role.MAIN, 1, None), ("host-a", 300, 5), alive={300})
    assert (merged.pid, merged.host, merged.stale) == (300, "host-a", ())


def test_merge_zookeeper_names_a_process_of_this_host_that_is_gone():
    merged = _merge(SlotReport(Role.MAIN, 1, None), ("host-a", 300, 5))
    assert (merged.pid, merged.host) == (None, None)
    assert "which is gone" in merged.stale[0]


# ------------------------------------------------------------------ engine factories


def _config(tmp_path, locks: str = "") -> object:
    from hadctl import config

    path = tmp_path / "svc.toml"
    path.write_text(f'name = "svc"\nentrypoint = "app:run"\npid_dir = "{tmp_path}/run"\n'
                    f'log_file = "{tmp_path}/svc.log"\n{locks}')
    return config.load(str(path))


def test_the_flock_controller_engine_loads_neither_kazoo_nor_the_spec(tmp_path):
    import subprocess
    import sys

    _config(tmp_path)  # the file is valid
    code = ("import sys\nfrom hadctl import config\nfrom hadctl.locks.engine import controller_engine\n"
            f"engine = controller_engine(config.load({str(tmp_path / 'svc.toml')!r}), None)\n"
            "print(engine.new_holder(1, 5), engine.sees_ready(1, 5), engine.status_slots([], None))\n"
            "print(sorted(m for m in sys.modules if m.startswith(('kazoo', 'hadctl.spec', 'hadctl.locks.zoo'))))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.splitlines() == ["None True ([], None)", "[]"]


def test_the_zookeeper_engines_are_built_without_a_session(tmp_path):
    pytest.importorskip("kazoo", reason="the ZooKeeper engine needs kazoo")
    from hadctl.layout import Layout
    from hadctl.locks import zookeeper_controller
    from hadctl.locks.engine import ZooKeeperController, controller_engine, worker_engine
    from hadctl.locks.zookeeper import ZooKeeperEngine

    cfg = _config(tmp_path, '[locks]\nengine = "zookeeper"\nhosts = "127.0.0.1:1"\n')
    engine = controller_engine(cfg, None)
    assert isinstance(engine, ZooKeeperController)
    real = engine._zookeeper()
    assert isinstance(real, zookeeper_controller.Controller) and not zookeeper_controller._views
    spec = cfg.worker_spec()
    layout = Layout(spec.pid_dir, spec.locks_path, spec.locks_standby_path, spec.standby_stop_file)
    assert isinstance(worker_engine(spec, layout, None), ZooKeeperEngine)
