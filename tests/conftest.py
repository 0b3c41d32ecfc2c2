"""Fixtures for real-process tests.

Every process a test starts carries HADCTL_TEST_ID=<uuid> in its environment;
at teardown ``no_leftovers`` finds any survivor by that marker (double-forked
processes are not our children), kills it, and fails the test naming it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from support import describe, is_alive, marked_processes, toml_text, wait_until

ROOT = Path(__file__).resolve().parent.parent
HADCTL = [sys.executable, "-m", "hadctl"]


def _marked_processes(marker: str) -> list[int]:
    return marked_processes("HADCTL_TEST_ID", marker)


_describe = describe
pid_alive = is_alive


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the test item (``item.report_call``), so a fixture's
    teardown can tell whether the test failed (and then print what helps on CI)."""
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"report_{report.when}", report)


def failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "report_call", None)
    return report is None or report.failed


@pytest.fixture(scope="session")
def parse_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """hadctl's cache of parsed service files, for this test session only (not /run/hadctl)."""
    return tmp_path_factory.mktemp("parse-cache")


@pytest.fixture(autouse=True)
def no_leftovers(monkeypatch: pytest.MonkeyPatch, parse_cache: Path) -> Any:
    marker = uuid.uuid4().hex
    monkeypatch.setenv("HADCTL_CACHE_DIR", str(parse_cache))
    monkeypatch.setenv("HADCTL_TEST_ID", marker)
    # Workers get a defined environment, not ours: these names must still reach them.
    monkeypatch.setenv("HADCTL_PASS_ENV", "HADCTL_TEST_ID PYTHONPATH COVERAGE_* HADC_TRACE")
    monkeypatch.setenv("HADC_NO_COLORS", "1")
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(ROOT), str(ROOT / "src")]))
    yield marker
    survivors = _marked_processes(marker)
    if survivors:
        names = [_describe(p) for p in survivors]
        for pid in survivors:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        wait_until(lambda: not _marked_processes(marker), 10, "killed leftovers to exit")
        pytest.fail(f"processes left behind: {names}")


class Service:
    """A service whose every path lies under one temporary folder; ``command`` runs hadctl
    (a test may prefix it, e.g. to run it inside a network namespace)."""

    command: list[str] = HADCTL

    def __init__(self, folder: Path, **settings: Any) -> None:
        self.folder = folder
        self.pid_dir = folder / "run"
        self.log_file = folder / "hadctl.log"
        self.ledger = folder / "ledger"
        self.config = folder / "svc.toml"
        self.settings: dict[str, Any] = {}
        self.write(**settings)

    def write(self, **settings: Any) -> None:
        base: dict[str, Any] = {
            "name": "svc",
            "entrypoint": "tests.services.basic:serve",
            "python_path": [str(ROOT)],
            "pid_dir": str(self.pid_dir),
            "log_file": str(self.log_file),
            "kill_timeout": 2,
            "env": {"LEDGER": str(self.ledger)},
        }
        locks = settings.pop("locks", {})
        base["env"] = {**base["env"], **settings.pop("env", {})}  # LEDGER stays unless overridden
        base.update(settings)
        self.settings = {**base, "locks": locks}
        text = toml_text(base)
        if locks:
            text += "\n[locks]\n" + toml_text(locks)
        self.config.write_text(text)

    def run(self, *args: str, timeout: float = 60, check: bool | int = False) -> subprocess.CompletedProcess[str]:
        result = subprocess.run([*self.command, "-c", str(self.config), *args], capture_output=True, text=True,
                                timeout=timeout)
        if check is not False:
            expected = 0 if check is True else check
            assert result.returncode == expected, (
                f"hadctl {' '.join(args)} exited {result.returncode}, expected {expected}\n"
                f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}")
        return result

    def status(self) -> dict[str, Any]:
        result = self.run("status", "--json")
        return json.loads(result.stdout)

    def holders(self, role: str) -> list[int]:
        return [s["pid"] for s in self.status()["slots"] if s["role"] == role and s["running"]]

    def pid_of(self, role: str, slot: int = 1) -> int:
        return int((self.pid_dir / f"{role}-{slot}.pid").read_text())

    def ledger_lines(self) -> list[list[str]]:
        if not self.ledger.exists():
            return []
        return [line.split() for line in self.ledger.read_text().splitlines()]

    def stop(self) -> None:
        if self.pid_dir.exists():
            self.run("stop")


def make_services(tmp_path: Path, naming: Callable[[int], str]) -> Any:
    """Body of a fixture: yields a factory ``make(**settings)`` that writes a config in
    a new folder ``tmp_path/naming(i)``; every service made is stopped at teardown."""
    made: list[Service] = []

    def make(**settings: Any) -> Service:
        folder = tmp_path / naming(len(made))
        folder.mkdir()
        svc = Service(folder, **settings)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.stop()


@pytest.fixture
def service(tmp_path: Path) -> Any:
    """A factory: ``service(**settings)`` writes a config under tmp_path; stopped at teardown."""
    yield from make_services(tmp_path, lambda index: f"s{index}")
