"""``hadctl top`` (issue 15, item 5): one frame when not on a terminal, a quiet end on
a closed pipe, and a live table under a real pseudo-terminal (tmux) that refreshes,
survives a resize, ends with Ctrl-C (exit 0), and wakes no worker meanwhile."""
from __future__ import annotations

import os
import re
import subprocess
import uuid

import pytest

from conftest import HADCTL, pid_alive, wait_until


def _switches(pid: int) -> int:
    """Context switches of every thread of ``pid`` (a wake-up is one more)."""
    total = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{tid}/status") as handle:
            for line in handle:
                if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                    total += int(line.split()[1])
    return total


def _row(text: str, role: str, pid: int) -> bool:
    return any(re.search(rf"\b{role}\b.*\b{pid}\b", line) for line in text.splitlines())


def test_top_prints_one_frame_when_not_on_a_terminal(service):
    svc = service(locks={"max_procs": 2})
    svc.run("start", check=True)
    result = svc.run("top", check=True)
    for role, slot in (("main", 1), ("main", 2), ("standby", 1)):
        assert _row(result.stdout, role, svc.pid_of(role, slot)), result.stdout
    assert re.search(r"\bmain\b.*\d+ s\s.*\d+\.\d%.*\d+\.\dM", result.stdout), result.stdout  # uptime, cpu, rss


def test_top_ends_quietly_on_a_closed_pipe(service):
    svc = service()
    svc.run("start", check=True)
    read, write = os.pipe()
    os.close(read)  # nobody will ever read: the first write fails (EPIPE)
    try:
        result = subprocess.run([*HADCTL, "-c", str(svc.config), "top"], stdout=write, stderr=subprocess.PIPE,
                                text=True, timeout=60)
    finally:
        os.close(write)
    assert (result.returncode, result.stderr) == (0, "")
    piped = subprocess.run(["bash", "-c", f"{' '.join(HADCTL)} -c {svc.config} top | head -1; "
                                          "echo status ${PIPESTATUS[0]}"], capture_output=True, text=True, timeout=60)
    assert piped.stdout.splitlines()[-1] == "status 0" and piped.stderr == "", piped


class Tmux:
    """A tmux server of our own (its own socket), killed at the end."""

    def __init__(self) -> None:
        self.socket = f"hadctl-test-{uuid.uuid4().hex[:8]}"

    def __call__(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result
        return result.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def kill(self) -> None:
        try:
            pid = int(self("display-message", "-p", "-t", "top", "#{pid}"))
        except AssertionError:
            return
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
        wait_until(lambda: not pid_alive(pid), 10, "the tmux server to exit")


@pytest.fixture
def tmux():
    server = Tmux()
    yield server
    server.kill()


def _clock(screen: str) -> str | None:
    found = re.search(r"hadctl top\s+(\d\d:\d\d:\d\d)", screen)
    return found.group(1) if found else None


def _wait_screen(tmux: Tmux, predicate, what: str, timeout: float = 10) -> str:
    """The pane's text once ``predicate`` holds for it."""
    def matching() -> str | None:
        screen = tmux.screen()
        return screen if predicate(screen) else None

    return str(wait_until(matching, timeout, what))


def test_top_live_under_a_terminal(service, tmux):
    svc = service()
    svc.run("start", check=True)
    main, standby = svc.pid_of("main"), svc.pid_of("standby")
    before = {pid: _switches(pid) for pid in (main, standby)}
    command = " ".join([*HADCTL, "-c", str(svc.config), "top"])
    tmux("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", command)
    tmux("set-option", "-w", "-t", "top", "remain-on-exit", "on")
    screen = _wait_screen(tmux, lambda s: _row(s, "main", main) and _row(s, "standby", standby),
                          "top's rows on the terminal", 20)
    seen = {_clock(screen)}
    for what in ("a second frame", "a third frame"):
        seen.add(_clock(_wait_screen(tmux, lambda s: _clock(s) not in seen, what)))
    tmux("resize-window", "-t", "top", "-x", "100", "-y", "30")  # SIGWINCH to top
    seen.add(_clock(tmux.screen()))
    _wait_screen(tmux, lambda s: _clock(s) not in seen and _row(s, "main", main), "a frame after the resize")
    assert tmux("display-message", "-p", "-t", "top", "#{pane_dead}").strip() == "0"
    tmux("send-keys", "-t", "top", "C-c")
    wait_until(lambda: tmux("display-message", "-p", "-t", "top", "#{pane_dead}").strip() == "1", 10,
               "top to end on Ctrl-C")
    assert tmux("display-message", "-p", "-t", "top", "#{pane_dead_status}").strip() == "0"
    assert "Traceback" not in tmux.screen()
    after = {pid: _switches(pid) for pid in (main, standby)}
    assert after == before, "top woke a worker"

