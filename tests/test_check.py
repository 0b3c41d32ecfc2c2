"""``hadctl check``: every problem, one line each, exit 6; nothing started or created."""
from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path
from typing import Any

import pytest

from conftest import HADCTL, ROOT


def _problems(result: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if line.endswith("[Failed]")]


def test_a_good_service_passes_and_nothing_is_created(service: Any) -> None:
    svc = service()
    result = svc.run("check")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "no problem" in result.stdout and "[OK]" in result.stdout
    assert not svc.pid_dir.exists() and not svc.log_file.exists()


def test_every_bad_key_is_named_not_only_the_first(service: Any) -> None:
    svc = service(umask="abc", kill_timeout=-1, bogus=1, locks={"max_procs": 0})
    result = svc.run("check")
    assert result.returncode == 6
    problems = _problems(result)
    assert len(problems) == 4, problems
    for key in ('"umask"', '"kill_timeout"', '"bogus"', '"locks.max_procs"'):
        assert sum(key in p for p in problems) == 1, (key, problems)


def test_a_reopen_signal_the_workers_live_by_is_refused(service: Any) -> None:
    problems = _problems(service(reopen_signal="TERM").run("check", check=6))
    assert len(problems) == 1 and '"reopen_signal"' in problems[0]


def test_unknown_user_and_group_are_both_named(service: Any) -> None:
    svc = service(user="no-such-user-hadctl", group="no-such-group-hadctl")
    problems = _problems(svc.run("check", check=6))
    assert len(problems) == 2 and "unknown user" in problems[0] and "unknown group" in problems[1]


def test_folders_env_files_listen_and_limits(service: Any, tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "real").mkdir()
    (tmp_path / "linked").symlink_to(tmp_path / "real")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    port = busy.getsockname()[1]
    try:
        svc = service(stdout_file=str(tmp_path / "a-file" / "out.log"), env_file=[str(tmp_path / "absent.env")],
                      listen=[f"127.0.0.1:{port}"], locks={"path": str(tmp_path / "linked")},
                      limits={"nofile": 2**40})
        problems = _problems(svc.run("check", check=6))
    finally:
        busy.close()
    expected = ["absent.env: no such file", '"locks.path"', "is a symbolic link", '"stdout_file"',
                "a-file is not a directory", f"127.0.0.1:{port}: cannot bind: Address already in use",
                '"limits.nofile"']
    for text in expected:
        assert any(text in p for p in problems), (text, problems)
    assert len(problems) == 4 + 1, problems  # env_file, locks.path, stdout_file, listen, nofile


@pytest.mark.skipif(os.geteuid() != 0, reason="importing as another user needs root")
def test_the_entrypoint_is_imported_as_the_service_user(service: Any, tmp_path: Path) -> None:
    code = tmp_path / "private"
    code.mkdir(mode=0o700)  # root can read it; the service's user cannot
    (code / "secret_svc.py").write_text("def serve():\n    pass\ndef warm():\n    pass\n")
    os.chmod(tmp_path, 0o755)
    good = service(entrypoint="secret_svc:serve", python_path=[str(code), str(ROOT)])
    assert good.run("check").returncode == 0
    as_nobody = service(entrypoint="secret_svc:serve", warmup="secret_svc:missing", user="nobody",
                        python_path=[str(code), str(ROOT)])
    problems = _problems(as_nobody.run("check", check=6))
    assert len(problems) == 2, problems
    assert "entrypoint secret_svc:serve" in problems[0] and "No module named 'secret_svc'" in problems[0]
    assert "warmup secret_svc:missing" in problems[1]


def test_check_all_checks_every_service_in_the_folder(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    base = f'entrypoint = "tests.services.basic:serve"\npython_path = ["{ROOT}"]\n'
    (folder / "good.toml").write_text(f'name = "good"\n{base}pid_dir = "{tmp_path}/g"\nlog_file = "{tmp_path}/g.log"\n')
    (folder / "bad.toml").write_text(f'name = "bad"\n{base}pid_dir = "{tmp_path}/b"\nlog_file = "{tmp_path}/b.log"\n'
                                     'umask = "xyz"\n')
    result = subprocess.run([*HADCTL, "check", "--all", "--config-dir", str(folder)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 6
    assert "good : " in result.stdout and "no problem" in result.stdout
    assert '"umask"' in result.stdout + result.stderr
