"""Core behaviour (issue #2): start, status, failover, stop, slots, identity, bad input."""
from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from conftest import HADCTL, ROOT, pid_alive, wait_until


def test_start_then_status_shows_main_and_standby(service):
    svc = service()
    result = svc.run("start", check=True)
    assert "main #1" in result.stdout and "standby #1" in result.stdout
    status = svc.run("status", check=True)
    assert "svc : main #1 (pid " in status.stdout and "[Running]" in status.stdout
    assert "svc : standby #1 (pid " in status.stdout
    data = svc.status()
    assert data["exit_status"] == 0
    by_role = {s["role"]: s for s in data["slots"]}
    assert by_role["main"]["pid"] == svc.pid_of("main") and pid_alive(by_role["main"]["pid"])
    assert by_role["standby"]["pid"] == svc.pid_of("standby") and pid_alive(by_role["standby"]["pid"])


def test_sigkill_of_main_promotes_the_standby(service):
    svc = service(respawn_standby=False)
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: svc.holders("main") == [standby], 5, "the standby to hold main slot 1")
    result = svc.run("status", check=1)
    assert f"main #1 (pid {standby}) [Running]" in result.stdout
    assert "standby #1 [Not Running]" in result.stdout
    entered = [line for line in svc.ledger_lines() if line[0] == "enter"]
    assert [int(line[1]) for line in entered] == [main, standby]


def test_stop_ends_everything_and_frees_every_slot(service):
    svc = service()
    svc.run("start", check=True)
    pids = svc.holders("main") + svc.holders("standby")
    result = svc.run("stop", check=True)
    assert "[Stopped]" in result.stdout
    assert not any(pid_alive(p) for p in pids)
    assert not list(svc.pid_dir.glob("*.pid"))
    assert all(not s["running"] for s in svc.status()["slots"])
    assert svc.run("stop", check=True).stdout.strip() == "svc : Not Running [OK]"


def test_start_twice_says_already_running(service):
    svc = service()
    svc.run("start", check=True)
    before = svc.holders("main") + svc.holders("standby")
    result = svc.run("start", check=True)
    assert "Already Running" in result.stdout
    assert svc.holders("main") + svc.holders("standby") == before


def test_status_when_stopped_is_3(service):
    svc = service()
    result = svc.run("status", check=3)
    assert "main #1 [Not Running]" in result.stdout and "standby #1 [Not Running]" in result.stdout


def test_three_mains_and_two_standbys(service):
    svc = service(locks={"max_procs": 3, "standby_max_procs": 2})
    result = svc.run("start", check=True)
    assert result.stdout.count("[Started]") == 5
    assert len(svc.holders("main")) == 3 and len(svc.holders("standby")) == 2
    wait_until(lambda: len([l for l in svc.ledger_lines() if l[0] == "enter"]) == 3, 5, "3 mains inside")


def test_several_slots_fail_over_one_by_one(service):
    svc = service(respawn_standby=False, locks={"max_procs": 2, "standby_max_procs": 2})
    svc.run("start", check=True)
    standbys = set(svc.holders("standby"))
    for main in svc.holders("main"):
        os.kill(main, signal.SIGKILL)
    wait_until(lambda: set(svc.holders("main")) == standbys, 5, "both standbys promoted")


def _world_readable_install(folder: Path) -> list[str]:
    """A copy of hadctl and the test services under ``folder``, run by a venv of
    Debian's /usr/bin/python3: a user like nobody can read none of /root (pyenv's
    interpreter) and maybe not the CI clone, but can read these."""
    import shutil
    import site

    assert Path("/usr/bin/python3").exists(), "this test needs Debian's /usr/bin/python3 (apt-get install python3)"
    subprocess.run(["/usr/bin/python3", "-m", "venv", "--without-pip", str(folder / "venv")], check=True)
    shutil.copytree(ROOT / "src" / "hadctl", folder / "code" / "hadctl")
    shutil.copytree(ROOT / "tests" / "services", folder / "code" / "tests" / "services")
    (folder / "code" / "tests" / "__init__.py").write_text("")
    subprocess.run(["chmod", "-R", "a+rX", str(folder)], check=True)
    os.environ["PYTHONPATH"] = os.pathsep.join([str(folder / "code"), *_debian_site_packages(site.getsitepackages())])
    return [str(folder / "venv" / "bin" / "python"), "-m", "hadctl"]


def _debian_site_packages(running: list[str]) -> list[str]:
    """Compiled dependencies (setproctitle) built for /usr/bin/python3's version: the
    running interpreter's when it is that version, else those of the project's .venv
    (made from /usr/bin/python3 by `make install`), as under `make test-pythons`."""
    version = subprocess.run(["/usr/bin/python3", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    if "{}.{}".format(*sys.version_info[:2]) == version:
        return running
    found = sorted(str(p) for p in (ROOT / ".venv" / "lib").glob(f"python{version}/site-packages"))
    assert found, f"no .venv for /usr/bin/python3 ({version}) under {ROOT}: run `make install` first"
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root (CI runs as root)")
def test_runs_as_configured_user_with_umask_directory_env_and_titles(service, monkeypatch):
    shared = Path(tempfile.mkdtemp(prefix="hadctl-user-"))
    try:
        command = _world_readable_install(shared)
        monkeypatch.setattr("conftest.Service.command", command)
        workdir = shared / "work"
        workdir.mkdir()
        report = shared / "report"
        shared.chmod(0o777)
        svc = service(entrypoint="tests.services.basic:report_env", user="nobody", umask="027",
                      directory=str(workdir), process_name_change=True, python_path=[str(shared / "code")],
                      pid_dir=str(shared / "run"), log_file=str(shared / "hadctl.log"),
                      stdout_file=str(shared / "out.log"), stderr_file=str(shared / "err.log"),
                      env={"EXTRA": "yes", "REPORT": str(report), "LEDGER": str(shared / "ledger")})
        svc.pid_dir = shared / "run"
        svc.run("start", check=True)
        wait_until(report.exists, 10, "the report file")
        facts = dict(line.split("=", 1) for line in report.read_text().splitlines())
        nobody = pwd.getpwnam("nobody")
        assert facts["uid"] == str(nobody.pw_uid) and facts["gid"] == str(nobody.pw_gid)
        assert facts["umask"] == "027" and facts["cwd"] == str(workdir)
        assert facts["HOME"] == nobody.pw_dir and facts["USER"] == "nobody" and facts["EXTRA"] == "yes"
        assert facts["title"] == "svc"
        standby = svc.pid_of("standby")
        assert Path(f"/proc/{standby}/cmdline").read_bytes().split(b"\0")[0] == b"svc - standby"
        assert os.stat(f"/proc/{standby}").st_uid == nobody.pw_uid
        wait_until(lambda: "to stdout" in (shared / "out.log").read_text(), 5, "stdout_file")
        assert "to stderr" in (shared / "err.log").read_text()
        assert "to stdout" not in (shared / "hadctl.log").read_text()
        lock_fd = int(facts["HADC_lock_fd"])
        alive = [fd for fd, target in eval(facts["links"]).items() if target == str(svc.pid_dir / "hadctl-alive.lock")]
        assert len(alive) == 1  # held for the process's life, so stop knows when it is gone
        assert eval(facts["fds"]) == sorted([0, 1, 2, lock_fd, *alive])  # close_fds_on_start: nothing else
        svc.run("stop", check=True)
    finally:
        subprocess.run(["rm", "-rf", str(shared)])


def test_main_with_a_forked_child_still_hands_over(service, tmp_path):
    report = tmp_path / "child"
    svc = service(entrypoint="tests.services.basic:with_child", respawn_standby=False,
                  kill_mode="process",  # the child must outlive the failover to show it does not keep the slot
                  env={"REPORT": str(report), "LEDGER": str(tmp_path / "ledger")})
    svc.run("start", check=True)
    wait_until(report.exists, 5, "the child's pid")
    child = int(report.read_text())
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    os.kill(main, signal.SIGKILL)
    wait_until(lambda: svc.holders("main") == [standby], 5, "the standby to take the slot")
    assert pid_alive(child)  # the child lives on, yet did not keep the slot
    os.kill(child, signal.SIGKILL)
    svc.write(**{**svc.settings, "kill_mode": "group"})  # so that the final stop ends the new main's child


def test_stale_pid_file_naming_an_unrelated_process_is_not_running_and_not_signalled(service):
    svc = service()
    svc.pid_dir.mkdir()
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (svc.pid_dir / "main-1.pid").write_text(f"{bystander.pid}\n")
        result = svc.run("status", check=3)
        assert "main #1" in result.stdout and "Not Running" in result.stdout
        assert f"names pid {bystander.pid}" in result.stdout
        svc.run("stop", check=True)
        svc.run("reload", check=7)
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()


def test_entrypoint_that_cannot_be_imported_exits_5_and_leaves_nothing(service):
    for entrypoint, words in (("tests.services.nonexistent:serve", "No module named"),
                              ("tests.services.basic:nothing_here", "has no attribute"),
                              ("tests.services.basic:NOT_CALLABLE", "not callable"),
                              ("tests.services.broken:serve", "broken on purpose")):
        svc = service(entrypoint=entrypoint)
        result = svc.run("start", check=5)
        assert words in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
        assert all(not s["running"] for s in svc.status()["slots"])
        assert not list(svc.pid_dir.glob("*.pid"))


@pytest.mark.parametrize("text, words", [
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\n', 'missing required key "log_file"'),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\nbogus = 1\n', 'unknown key "bogus"'),
    ('name = "x"\nentrypoint = "ab"\npid_dir = "r"\nlog_file = "l"\n', 'key "entrypoint"'),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\numask = "abc"\n', 'key "umask"'),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\nuser = "no-such-user-xyz"\n',
     "unknown user"),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\ngroup = "no-such-group-xyz"\n',
     "unknown group"),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\nkill_timeout = "soon"\n',
     'key "kill_timeout"'),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\n[locks]\nmax_procs = 0\n',
     'key "locks.max_procs"'),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = \n', "invalid TOML"),
    ('name = "x"\nentrypoint = "a:b"\npid_dir = "r"\nlog_file = "l"\nprogram_args = []\n', 'did you mean "args"'),
])
def test_bad_config_is_refused_with_6_and_one_line(tmp_path, text, words):
    config = tmp_path / "bad.toml"
    config.write_text(text)
    for action in ("start", "status", "stop"):
        result = subprocess.run([*HADCTL, "-c", str(config), action], capture_output=True, text=True)
        assert result.returncode == 6, result
        assert words in result.stderr and str(config) in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1 and "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_invalid_toml_names_its_line(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('name = "x"\n\nentrypoint = = 3\n')
    result = subprocess.run([*HADCTL, "-c", str(config), "status"], capture_output=True, text=True)
    assert result.returncode == 6 and "line 3" in result.stderr


def test_missing_config_option_is_a_usage_error():
    result = subprocess.run([*HADCTL, "status"], capture_output=True, text=True)
    assert result.returncode == 2 and "-c/--config" in result.stderr
    result = subprocess.run([*HADCTL, "-c", "x.toml", "dance"], capture_output=True, text=True)
    assert result.returncode == 2 and "No such command" in result.stderr


def test_foreground_runs_in_this_process_and_returns_its_status(service):
    svc = service(entrypoint="tests.services.basic:returns", args=[4])
    result = svc.run("foreground")
    assert result.returncode == 4 and result.stdout == ""
    assert not svc.pid_dir.exists()


def test_the_return_value_is_the_exit_status_and_the_slot_is_freed(service):
    svc = service(entrypoint="tests.services.basic:returns", args=[0], respawn_standby=False,
                  locks={"standby_max_procs": 0})
    svc.run("start", check=True)
    wait_until(lambda: not svc.holders("main"), 5, "the main to return and free its slot")
    assert not (svc.pid_dir / "main-1.pid").exists()


def test_status_json_is_machine_readable(service):
    svc = service()
    data = json.loads(svc.run("status", "--json", check=3).stdout)
    assert data["name"] == "svc" and data["exit_status"] == 3
    assert [(s["role"], s["slot"], s["running"], s["pid"]) for s in data["slots"]] == [
        ("main", 1, False, None), ("standby", 1, False, None)]


def test_lock_fd_kept_across_exec_still_fails_over(service):
    # Regression (review of #2/#8): with the lock fd inheritable, the replacement
    # standby a promoted main spawned inherited it and then waited on its own lock.
    svc = service(reset_close_on_exec_main_lock_fd=True, start_limit_burst=100)
    svc.run("start", check=True)
    for _ in range(2):
        main, standby = svc.pid_of("main"), svc.pid_of("standby")
        os.kill(main, signal.SIGKILL)
        wait_until(lambda: svc.holders("main") == [standby] and len(svc.holders("standby")) == 1, 5,
                   "the standby promoted and a new standby waiting")


def test_foreground_reports_user_errors_as_the_service_s(service):
    svc = service(entrypoint="tests.services.broken:serve")
    result = svc.run("foreground")
    assert result.returncode == 5 and "broken on purpose" in result.stderr and "internal error" not in result.stderr
    svc.write(**{**svc.settings, "entrypoint": "tests.services.basic:crash"})
    result = svc.run("foreground")
    assert result.returncode == 1 and "crashed on purpose" in result.stderr and "internal error" not in result.stderr


# ------------------------------------------------------------------ the parse cache


def test_an_edit_is_seen_at_once_whatever_the_parse_cache_holds(service):
    """The cache (hadctl/parsecache.py) is keyed by the file's bytes, not its times: an
    edit of the same length within the same clock tick is still seen."""
    svc = service(locks={"max_procs": 2})
    assert svc.run("status", "--json").stdout.count('"main"') == 2
    before = svc.config.stat()
    svc.write(**{**svc.settings, "locks": {"max_procs": 3}})
    os.utime(svc.config, ns=(before.st_atime_ns, before.st_mtime_ns))  # same size, same mtime
    assert svc.config.stat().st_size == before.st_size
    assert svc.run("status", "--json").stdout.count('"main"') == 3


def test_a_parse_cache_others_can_write_is_never_believed(service, parse_cache, monkeypatch, tmp_path):
    """Root runs the entrypoint a service file names: an entry that someone else could
    have written (here: one that claims a different entrypoint) must count for nothing."""
    import marshal

    from hadctl import parsecache

    folder = tmp_path / "cache"
    monkeypatch.setenv("HADCTL_CACHE_DIR", str(folder))
    svc = service(entrypoint="tests.services.basic:serve")
    svc.run("status", check=3)  # parsed and cached
    entries = list(folder.iterdir())
    assert len(entries) == 1
    tag, data, parsed = marshal.loads(entries[0].read_bytes())
    assert data == svc.config.read_bytes()
    entries[0].write_bytes(marshal.dumps((tag, data, {**parsed, "entrypoint": "tests.services.nowhere:x"})))
    assert parsecache.lookup(str(svc.config), data)["entrypoint"] == "tests.services.nowhere:x"  # as we wrote it
    entries[0].chmod(0o666)
    assert parsecache.lookup(str(svc.config), data) is None
    svc.run("start", check=True)  # the real entrypoint: the poisoned entry was not used
    assert len(svc.holders("main")) == 1
    svc.run("stop", check=True)
    folder.chmod(0o777)
    entries[0].chmod(0o600)
    assert parsecache.lookup(str(svc.config), data) is None  # nor one in a folder others can write

