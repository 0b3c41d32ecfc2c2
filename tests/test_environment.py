"""Workers start from a defined environment, umask and nice value, whoever ran hadctl:
a person's shell, cron (``env -i``), or a main respawning a standby after a failover."""
from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import HADCTL
from hadctl.environment import DEFAULT_PATH, digest, of_process, parse_env_text, passed
from hadctl.errors import ConfigError
from support import wait_until

HARNESS = ("HADCTL_TEST_ID", "HADCTL_PASS_ENV", "PYTHONPATH", "HADCTL_CACHE_DIR", "HADC_NO_COLORS")


def _umask_of(pid: int) -> str:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Umask:"):
            return line.split()[1]
    raise AssertionError(f"no Umask in /proc/{pid}/status")


def _facts(svc: Any, role: str) -> tuple[int, str | None, str, int]:
    """(pid, environment digest from status --json, umask, nice) of the running ``role`` #1."""
    status = svc.status()
    pid = next(s["pid"] for s in status["slots"] if s["role"] == role and s["running"])
    return pid, status["environment"][f"{role}-1"], _umask_of(pid), os.getpriority(os.PRIO_PROCESS, pid)


def _run(svc: Any, action: str, env: dict[str, str], umask: str, nice: int) -> None:
    command = ["nice", "-n", str(nice), "sh", "-c", f'umask {umask}; exec "$@"', "sh",
               *HADCTL, "-c", str(svc.config), action]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_shell_cron_and_failover_workers_share_one_environment(service: Any, tmp_path: Path) -> None:
    env_file = tmp_path / "service.env"
    env_file.write_text('# defaults\nGREETING="hello world"\nexport MODE=prod\n')
    svc = service(env_file=[str(env_file), str("-" + str(tmp_path / "absent.env"))], pass_env=["FROM_CALLER"],
                  env={"EXTRA": "from env"})
    harness = {k: os.environ[k] for k in HARNESS if k in os.environ}
    shell = {**os.environ, "SSH_AUTH_SOCK": "/tmp/agent", "SUDO_USER": "admin", "LANG": "fr_FR.UTF-8",
             "TZ": "Europe/Paris", "HOME": "/nonexistent", "PATH": "/opt/weird/bin:" + os.environ["PATH"],
             "FROM_CALLER": "yes"}
    cron = {**harness, "FROM_CALLER": "yes", "PATH": "/usr/bin:/bin"}  # what env -i plus a crontab line gives

    _run(svc, "start", shell, "077", 5)
    main, from_shell, umask, nice = _facts(svc, "main")
    assert (umask, nice) == ("0022", 0), "umask and nice come from the config, not the caller"
    seen = of_process(main)
    assert seen is not None
    assert "SSH_AUTH_SOCK" not in seen and "SUDO_USER" not in seen and "TZ" not in seen
    assert seen["PATH"] == DEFAULT_PATH and seen["HOME"] != "/nonexistent"
    assert (seen["GREETING"], seen["MODE"], seen["EXTRA"], seen["FROM_CALLER"]) == \
        ("hello world", "prod", "from env", "yes")
    assert seen.get("LANG") != "fr_FR.UTF-8"
    standby_digest = _facts(svc, "standby")[1]
    assert standby_digest == from_shell

    standby = svc.holders("standby")[0]
    os.kill(main, signal.SIGKILL)  # the standby takes over and spawns a replacement from inside the main
    wait_until(lambda: svc.holders("main") == [standby] and svc.holders("standby")
               and svc.holders("standby")[0] != standby, 10, "the replacement standby")
    _pid, after_failover, umask, nice = _facts(svc, "standby")
    assert after_failover == from_shell and (umask, nice) == ("0022", 0)

    svc.run("stop", check=True)
    _run(svc, "start", cron, "027", 0)
    _pid, from_cron, umask, nice = _facts(svc, "main")
    assert from_cron == from_shell and (umask, nice) == ("0022", 0)


def test_umask_and_nice_from_the_config(service: Any, tmp_path: Path) -> None:
    report = tmp_path / "report"
    svc = service(entrypoint="tests.services.writer:write", umask="027", nice=3,
                  stdout_file=str(tmp_path / "out.log"), env={"REPORT": str(report), "RATE": "10"})
    svc.run("start", check=True)
    wait_until(report.exists, 10, "the main's report")
    assert report.read_text().splitlines() == ["umask=027", "nice=3"]


def test_a_missing_env_file_refuses_to_start(service: Any, tmp_path: Path) -> None:
    svc = service(env_file=[str(tmp_path / "absent.env")])
    result = svc.run("start")
    assert result.returncode == 6, result.stderr
    assert "absent.env: no such file" in result.stderr
    assert not svc.holders("main") and not svc.holders("standby")


def test_env_file_syntax_is_systemds() -> None:
    text = ("# comment\n; also a comment\n\nPLAIN=value   \nSPACED = a b\nSINGLE='it''s $HOME \\n'\n"
            'DOUBLE="say \\"hi\\" \\\\ \\$x"\nMULTI="one\ntwo"\nCONT=first\\\nsecond\nexport SHELLISH=1\nEMPTY=\n')
    assert parse_env_text(text, "f") == [
        ("PLAIN", "value"), ("SPACED", "a b"), ("SINGLE", "its $HOME \\n"), ("DOUBLE", 'say "hi" \\ $x'),
        ("MULTI", "one\ntwo"), ("CONT", "firstsecond"), ("SHELLISH", "1"), ("EMPTY", "")]
    with pytest.raises(ConfigError, match="f:2: expected KEY=value"):
        parse_env_text("A=1\nnot a pair\n", "f")
    with pytest.raises(ConfigError, match="f:1: unterminated"):
        parse_env_text('A="open\n', "f")
    with pytest.raises(ConfigError, match="invalid variable name"):
        parse_env_text("1A=x\n", "f")


def test_pass_env_names_and_prefixes() -> None:
    caller = {"COVERAGE_FILE": "a", "COVERAGE_RC": "b", "KEEP": "c", "DROP": "d"}
    assert passed(["KEEP", "COVERAGE_*", "ABSENT"], caller) == {"KEEP": "c", "COVERAGE_FILE": "a", "COVERAGE_RC": "b"}


def test_digest_ignores_order_and_per_process_variables() -> None:
    assert digest({"A": "1", "B": "2"}) == digest({"B": "2", "A": "1", "LISTEN_PID": "7", "HADC_lock_fd": "3"})
    assert digest({"A": "1"}) != digest({"A": "2"})


def test_foreign_python_sees_no_harness_leak(service: Any) -> None:
    """The harness's own variables reach workers only because HADCTL_PASS_ENV names them."""
    svc = service()
    svc.run("start", check=True)
    env = of_process(svc.holders("main")[0])
    assert env is not None and env["HADCTL_TEST_ID"] == os.environ["HADCTL_TEST_ID"]
    assert "PYTEST_CURRENT_TEST" not in env
