"""A hostile service user: hadctl runs as root for a service whose user (nobody)
owns pid_dir and its log folder, and may plant anything there. Nothing planted
may steer the root controller (signal a foreign process, write into a root-only
folder, crash it), and two services must never mix through one pid_dir
(issue 12, items 1, 2, 3 and 12).

The service user's doing is played by the test (root) and then handed to
nobody with chown, as ``prepare`` leaves pid_dir for ``user = "nobody"``.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import pid_alive
from support import marked_processes, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the threat is a root controller (CI runs as root)")

NOBODY = 65534

_HOLDER = ("import fcntl, os, signal, sys\n"
           "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)\n"
           "fcntl.flock(fd, fcntl.LOCK_EX)\n"
           "print('held', flush=True)\n"
           "signal.pause()\n")


class Daemon:
    """Some root daemon holding a flock on ``path``, in its own session and group."""

    def __init__(self, path: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(path)], stdout=subprocess.PIPE, text=True,
                                     start_new_session=True)
        assert self.proc.stdout is not None and self.proc.stdout.readline() == "held\n"

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()


def _give_to_nobody(*folders: Path) -> None:
    """chown -hR nobody: what the service's user owns (links included, as if it made them)."""
    for folder in folders:
        for path in [folder, *folder.rglob("*")]:
            os.lchown(path, NOBODY, NOBODY)


def _root_only(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o700)
    return folder


def _one_line(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, result.stderr


def _service_processes(marker: str) -> list[int]:
    return [pid for pid in marked_processes("HADCTL_TEST_ID", marker) if pid_alive(pid)]


# ------------------------------------------------------------------ 1. planted lock files


@pytest.mark.parametrize("how", ["symlink", "hardlink", "moved in"])
def test_a_planted_lock_file_makes_root_signal_no_foreign_process(service, tmp_path, no_leftovers, how):
    """The service user swaps lock/1.lock for a link to a lock file some root daemon
    holds (and lock-standby/1.lock for one of another service's lock files). Before,
    root status named the daemon as main #1 [Running] and root stop killed it and its
    group, and exited 0. Now the slot is reported as tampered (exit 1) and nothing is
    signalled through it; start spawns nothing beside it."""
    svc = service(user="nobody")
    other = service()  # another service, running, whose main's lock file is borrowed
    other.run("start", check=True)
    other_main = other.pid_of("main")
    secret = _root_only(tmp_path / "root-daemon")
    daemon = Daemon(secret / "daemon.lock")
    before = set(_service_processes(no_leftovers))  # the daemon and the other service's workers
    for folder in ("lock", "lock-standby"):
        (svc.pid_dir / folder).mkdir(parents=True)
    planted = {svc.pid_dir / "lock" / "1.lock": secret / "daemon.lock"}
    if how != "moved in":
        planted[svc.pid_dir / "lock-standby" / "1.lock"] = other.pid_dir / "lock" / "1.lock"
    try:
        (svc.pid_dir / "main-1.pid").write_text(f"{daemon.pid}\n")
        _give_to_nobody(svc.pid_dir)
        for link, target in planted.items():
            if how == "symlink":
                link.symlink_to(target)
                os.lchown(link, NOBODY, NOBODY)
            elif how == "hardlink":
                os.link(target, link)  # root's files: nobody could only with protected_hardlinks off
            else:  # a file of someone else's (uid 4242), moved in while held
                os.chown(target, 4242, 4242)
                os.rename(target, link)

        status = svc.run("status", "--json")
        facts = json.loads(status.stdout)
        assert status.returncode == 1, status.stdout
        assert daemon.pid not in [s["pid"] for s in facts["slots"]]
        assert {(s["role"], s["slot"]) for s in facts["slots"] if s.get("tampered")} == {
            (role, 1) for role in ("main", "standby")[:len(planted)]}
        human = svc.run("status")
        assert human.returncode == 1 and "main #1: lock file" in human.stdout and "[Tampered]" in human.stdout

        for action in ("stop", "start", "fork", "restart", "reload"):
            result = svc.run(action)
            _one_line(result)
            assert result.returncode != 0, f"{action} exited 0 beside a tampered slot:\n{result.stdout}"
        assert daemon.alive(), "root signalled the daemon through the planted lock file"
        assert pid_alive(other_main), "root signalled another service's main through the planted lock file"
        assert set(_service_processes(no_leftovers)) == before
    finally:
        for link in planted:
            link.unlink(missing_ok=True)  # (a hard link to the other service's lock would keep it tampered)
        daemon.close()


# ------------------------------------------------------------------ 2. links on the way


@pytest.mark.parametrize("key", ["log_file", "stdout_file", "locks.path"])
def test_a_linked_folder_on_the_way_steers_no_file_into_a_root_only_folder(service, tmp_path, no_leftovers, key):
    """log_file = PID_DIR/logs/hadctl.log, and the user swaps logs/ for a link to a
    root-only folder: root start created the file in it (chowned to nobody) and gave
    it to the workers as stdout. Every folder on the way is now walked without
    following such links: exit 4, one line naming the link, nothing made."""
    svc = service(user="nobody")
    logs = svc.pid_dir / "logs"
    path = str(logs / "out.log")
    settings = {**svc.settings, "user": "nobody"}
    if key == "locks.path":
        settings["locks"] = {"path": str(logs / "lock")}
    else:
        settings[key] = path
    svc.write(**settings)
    svc.pid_dir.mkdir()
    secret = _root_only(tmp_path / "root-only")
    logs.symlink_to(secret)
    _give_to_nobody(svc.pid_dir)

    result = svc.run("start")
    _one_line(result)
    assert result.returncode == 4, result.stderr
    line = result.stderr.strip()
    assert len(line.splitlines()) == 1 and str(logs) in line and "symbolic link" in line, line
    assert list(secret.iterdir()) == [], "root made a file in the root-only folder through the link"
    assert _service_processes(no_leftovers) == []


def test_a_link_in_a_root_only_folder_is_followed(service, tmp_path, no_leftovers):
    """The rule's other half: a link root made in a folder only root may write (like
    /var/run -> /run) is followed, as before."""
    real = tmp_path / "real-logs"
    real.mkdir()
    (tmp_path / "logs").symlink_to(real)
    svc = service(log_file=str(tmp_path / "logs" / "hadctl.log"))
    svc.run("start", check=True)
    svc.run("stop", check=True)
    assert "started" in (real / "hadctl.log").read_text()


# ------------------------------------------------------------------ 3. anything planted in pid_dir


PLANTED = ["hadctl-alive.lock", "hadctl.lock", "standby-stop-file", "hadctl-owner", "main-1.pid",
           "main-1.ready", "hadctl-starts", "hadctl-backoff.pid", "unknown-2.pid", "lock", "lock/1.lock"]


@pytest.mark.parametrize("planted", PLANTED)
def test_a_link_planted_anywhere_in_pid_dir_gets_one_line_never_an_internal_error(service, tmp_path, no_leftovers,
                                                                                  planted):
    """A symlink at hadctl-alive.lock made stop end in "internal error" (exit 1,
    nothing stopped). Each file of pid_dir swapped for a link to a root file: every
    action answers in lines (no traceback), and the root file is left as it was."""
    svc = service()
    svc.run("start", check=True)
    svc.run("stop", check=True)
    secret = _root_only(tmp_path / "root-only")
    target = secret / "precious"
    target.write_text("precious\n")
    link = svc.pid_dir / planted
    if link.is_dir():
        for inner in link.iterdir():
            inner.unlink()
        link.rmdir()
    elif link.exists():
        link.unlink()
    link.symlink_to(secret if planted == "lock" else target)
    _give_to_nobody(svc.pid_dir)
    for action in ("status", "start", "status", "restart", "fork", "reload", "stop", "stop"):
        result = svc.run(action)
        _one_line(result)
        assert result.returncode in (0, 1, 3, 4, 7), f"{action}: {result.returncode}\n{result.stderr}"
    assert target.read_text() == "precious\n" and sorted(p.name for p in secret.iterdir()) == ["precious"]
    assert os.stat(target).st_uid == 0
    assert _service_processes(no_leftovers) == []
    if link.is_symlink():
        link.unlink()
    svc.run("start", check=True)
    svc.run("stop", check=True)


# ------------------------------------------------------------------ 12. one pid_dir, one service


def test_a_second_service_pointed_at_the_same_pid_dir_is_refused(service, no_leftovers):
    """beta's config names alpha's pid_dir by mistake: beta status showed alpha's
    processes, beta start said "Already Running", beta stop killed alpha's main.
    Now every beta action is refused (exit 6), naming both services."""
    alpha = service(name="alpha")
    alpha.run("start", check=True)
    main = alpha.pid_of("main")
    beta = service(name="beta")
    beta.write(**{**beta.settings, "pid_dir": str(alpha.pid_dir)})
    for action in ("status", "start", "stop", "restart", "fork", "reload"):
        result = beta.run(action)
        assert result.returncode == 6, f"beta {action}: {result.returncode}\n{result.stdout}{result.stderr}"
        assert "alpha" in result.stderr and "beta" in result.stderr, result.stderr
    assert pid_alive(main) and alpha.pid_of("main") == main
    assert alpha.run("status").returncode == 0
    beta.pid_dir = beta.folder / "unused"  # its teardown stop must not reach alpha's


def test_a_pid_dir_changed_while_the_service_runs_is_reported_not_doubled(service, tmp_path, no_leftovers):
    """pid_dir edited in the config while the service ran: status said not running,
    stop said "Not Running [OK]", start ran a second main beside the first. The
    workers carry their service's marker: they are found and named instead."""
    svc = service()
    svc.run("start", check=True)
    running = sorted(_service_processes(no_leftovers))
    old = svc.pid_dir
    svc.write(**{**svc.settings, "pid_dir": str(tmp_path / "moved")})
    try:
        status = svc.run("status")
        assert status.returncode == 1 and "[Elsewhere]" in status.stdout and str(old) in status.stdout, status.stdout
        start = svc.run("start")
        assert start.returncode == 1 and "[Elsewhere]" in start.stderr, start.stdout + start.stderr
        assert sorted(_service_processes(no_leftovers)) == running, "start ran a second set of workers"
        stop = svc.run("stop")
        said = stop.stdout + stop.stderr
        assert stop.returncode == 1 and "[Elsewhere]" in said and "Not Running" not in said, said
        assert sorted(_service_processes(no_leftovers)) == running
    finally:
        svc.write(**{**svc.settings, "pid_dir": str(old)})
    svc.run("stop", check=True)
    wait_until(lambda: not _service_processes(no_leftovers), 10, "the service's workers to exit")


def test_the_owner_file_names_the_service_and_follows_a_moved_config(service, no_leftovers):
    """start records the owner; the same service from a moved config file is let in."""
    svc = service()
    svc.run("start", check=True)
    assert (svc.pid_dir / "hadctl-owner").read_text() == f"svc\n{svc.config}\n"
    moved = svc.folder / "elsewhere.toml"
    os.rename(svc.config, moved)
    svc.config = moved
    result = svc.run("status")
    assert result.returncode == 0, result.stdout + result.stderr
    svc.run("stop", check=True)


# ------------------------------------------------------------------ the walk itself (safepath)


def _users_folder(tmp_path: Path, name: str = "user") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    os.chown(folder, NOBODY, NOBODY)
    return folder


@pytest.mark.parametrize("where", ["the user's folder", "a root folder others may write"])
def test_open_beneath_refuses_a_link_on_the_way_that_others_could_plant(tmp_path, where):
    from hadctl import safepath

    if where == "the user's folder":
        folder = _users_folder(tmp_path)
    else:
        folder = tmp_path / "shared"
        folder.mkdir()
        folder.chmod(0o777)  # not sticky: anyone may swap root's link
    secret = _root_only(tmp_path / "secret")
    (folder / "logs").symlink_to(secret)  # made by root, yet in a folder others can write
    for path in (folder / "logs" / "x.log", folder / "logs"):
        with pytest.raises(safepath.LinkRefusedError) as caught:
            safepath.open_beneath(str(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        assert caught.value.filename == str(folder / "logs")
    with pytest.raises(safepath.LinkRefusedError):
        safepath.make_folders(str(folder / "logs" / "made"))
    with pytest.raises(safepath.LinkRefusedError):
        safepath.check_walk(str(folder / "logs" / "x.log"))
    (secret / "keep").write_text("")
    with pytest.raises(safepath.LinkRefusedError):
        safepath.unlink(str(folder / "logs" / "keep"))
    assert sorted(p.name for p in secret.iterdir()) == ["keep"]


def test_open_beneath_follows_links_that_root_alone_could_make(tmp_path):
    from hadctl import safepath

    real = tmp_path / "real"
    real.mkdir()
    (real / "inner").mkdir()
    (tmp_path / "absolute").symlink_to(real)
    (tmp_path / "relative").symlink_to("real/inner/..")  # resolved from the link's own folder
    (tmp_path / "chain").symlink_to("relative")
    sticky = tmp_path / "sticky"
    sticky.mkdir()
    sticky.chmod(0o1777)  # like /tmp: others may write, but not replace root's link
    (sticky / "to-real").symlink_to(real)
    for path in ("absolute/a", "relative/b", "chain/c", "sticky/to-real/d"):
        os.close(safepath.open_beneath(str(tmp_path / path), os.O_WRONLY | os.O_CREAT))
    assert sorted(p.name for p in real.iterdir()) == ["a", "b", "c", "d", "inner"]
    (tmp_path / "loop").symlink_to("loop")
    with pytest.raises(OSError) as caught:
        safepath.open_beneath(str(tmp_path / "loop" / "x"), os.O_RDONLY)
    assert caught.value.errno == 40  # ELOOP: a loop ends, as in the kernel
    with pytest.raises(OSError):  # a lock file is never opened through a link, even root's
        safepath.open_beneath(str(tmp_path / "absolute"), os.O_RDONLY | os.O_NOFOLLOW)


def test_make_folders_gives_the_folder_asked_for_to_the_user_and_keeps_its_parents_roots(tmp_path):
    from hadctl import safepath

    made = safepath.make_folders(str(tmp_path / "a" / "b" / "c"), 0o755, (NOBODY, NOBODY))
    assert made == [str(tmp_path / "a"), str(tmp_path / "a" / "b"), str(tmp_path / "a" / "b" / "c")]
    assert [os.stat(path).st_uid for path in made] == [0, 0, NOBODY]
    assert safepath.make_folders(str(tmp_path / "a" / "b" / "c")) == []
    (tmp_path / "file").write_text("")
    with pytest.raises(NotADirectoryError):
        safepath.make_folders(str(tmp_path / "file" / "x"))


@pytest.mark.parametrize("kind", ["symlink", "hardlink", "fifo", "stranger's file", "folder on the way"])
def test_a_lock_file_not_made_by_hadctl_is_tampered_and_has_no_holder(tmp_path, kind):
    """HolderProbe.inspect asks who holds the file it opened itself, and names nobody
    for a lock file that is none hadctl made."""
    from hadctl.locks import flock

    secret = _root_only(tmp_path / "secret")
    held = secret / "daemon.lock"
    daemon = Daemon(held)
    try:
        locks = _users_folder(tmp_path, "lock")
        path = locks / "1.lock"
        if kind == "symlink":
            path.symlink_to(held)
        elif kind == "hardlink":
            os.link(held, path)
        elif kind == "fifo":
            os.mkfifo(path)
        elif kind == "stranger's file":
            os.rename(held, path)
            os.chown(path, 4242, 4242)
        else:
            locks.rmdir()
            locks.symlink_to(secret)
            os.lchown(locks, NOBODY, NOBODY)
            path = locks / "daemon.lock"
        holder, why = flock.HolderProbe().inspect(str(path), [daemon.pid], frozenset({0, NOBODY}))
        assert holder is None and why, (holder, why)
        assert not flock.holds_path(daemon.pid, str(path), frozenset({0, NOBODY}))
        if kind != "folder on the way":
            os.unlink(path)
        else:
            os.unlink(locks)
            locks.mkdir()
        path = locks / "1.lock"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # a plain lock file, as hadctl makes it
        os.close(fd)
        assert flock.HolderProbe().inspect(str(path), [], frozenset({0})) == (None, None)  # free
        worker = Daemon(path)
        try:
            assert flock.HolderProbe().inspect(str(path), [], frozenset({0})) == (worker.pid, None)
            assert flock.holds_path(worker.pid, str(path), frozenset({0}))
        finally:
            worker.close()
    finally:
        daemon.close()


def test_touch_removes_a_link_planted_at_a_stop_file_reached_through_a_trusted_link(tmp_path):
    """standby_stop_file = /var/run/svc/stop-file style: the walk follows root's
    /var/run -> /run, and the link the user planted at the file itself is removed."""
    from hadctl import control

    real = tmp_path / "run"
    real.mkdir()
    (tmp_path / "var-run").symlink_to(real)
    users = _users_folder(real, "svc")
    outside = tmp_path / "outside"
    (users / "stop-file").symlink_to(outside)
    os.lchown(users / "stop-file", NOBODY, NOBODY)
    control.touch(str(tmp_path / "var-run" / "svc" / "stop-file"))
    assert (users / "stop-file").is_file() and not (users / "stop-file").is_symlink() and not outside.exists()
