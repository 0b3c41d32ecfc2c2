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


def _waiting_in(pid: int, word: str) -> bool:
    """``pid``'s only thread sleeps in a kernel function named with ``word``."""
    with open(f"/proc/{pid}/wchan") as handle:
        return word in handle.read() and len(os.listdir(f"/proc/{pid}/task")) == 1


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
        self.server: int | None = None

    def start(self, *command: str) -> None:
        """A 160x40 terminal running ``command`` in session "top", kept after it ends."""
        self("new-session", "-d", "-s", "top", "-x", "160", "-y", "40", *command)
        self.server = int(self("display-message", "-p", "-t", "top", "#{pid}"))
        self("set-option", "-w", "-t", "top", "remain-on-exit", "on")

    def __call__(self, *args: str) -> str:
        result = subprocess.run(["tmux", "-L", self.socket, "-f", "/dev/null", *args], capture_output=True,
                                text=True, timeout=30)
        assert result.returncode == 0, result
        return result.stdout

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "top")

    def kill(self) -> None:
        if self.server is None:
            return
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30)
        server = self.server
        wait_until(lambda: not pid_alive(server), 10, "the tmux server to exit")


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
    # both at rest first: the main in its function's sigtimedwait, the standby in flock
    wait_until(lambda: _waiting_in(main, "sigtimedwait") and _waiting_in(standby, "lock"), 10, "workers at rest")
    before = {pid: _switches(pid) for pid in (main, standby)}
    # bash notes top's exit status (tmux 3.3 at times leaves a dead pane's status unread, a zombie)
    ended = svc.folder / "top-status"
    command = f"{' '.join([*HADCTL, '-c', str(svc.config), 'top'])}; echo $? > {ended}"
    tmux.start("bash", "-c", command)
    screen = _wait_screen(tmux, lambda s: _row(s, "main", main) and _row(s, "standby", standby),
                          "top's rows on the terminal", 20)
    seen = {_clock(screen)}
    for what in ("a second frame", "a third frame"):
        seen.add(_clock(_wait_screen(tmux, lambda s: _clock(s) not in seen, what)))
    tmux("resize-window", "-t", "top", "-x", "100", "-y", "30")  # SIGWINCH to top
    seen.add(_clock(tmux.screen()))
    _wait_screen(tmux, lambda s: _clock(s) not in seen and _row(s, "main", main), "a frame after the resize")
    assert not ended.exists()
    tmux("send-keys", "-t", "top", "C-c")
    status = wait_until(lambda: ended.exists() and ended.read_text().strip(), 10, "top to end on Ctrl-C")
    assert status == "0", f"top ended with status {status}"
    after = {pid: _switches(pid) for pid in (main, standby)}
    assert after == before, "top woke a worker"

