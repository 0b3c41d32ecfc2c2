"""The life of a spawned process: slot, import, wait, run, clean up.

Runs in a fresh interpreter exec'd by spawn.py, with the service's spec (a
plain dict, see ServiceConfig.worker_spec) read from a pipe. In order:

  1. give up at once if the standby stop file exists;
  2. write ``unknown-PID.pid``; import the entrypoint (and run ``warmup``) so
     that a standby is warm; an import failure is reported and nothing is taken;
  3. take a free main slot (``max_procs`` down to 1), else a standby slot,
     else report ``noslot`` and leave; rename the pid file to match;
  4. report the role on the report pipe (the controller is waiting for it);
  5. as a standby, block in the kernel on every main slot at once, and on a
     dnotify watch of the stop file and on our signals: no wake-ups while idle;
  6. as main: drop the standby slot, spawn a replacement standby, point
     stdout/stderr at stdout_file/stderr_file, export HADC_lock_fd, call the
     function; on return remove the pid file and release the slot.

Must stay small (the standby RSS budget is 10 MB): no dataclasses, typing,
logging, json, click or rich here or in what it imports; even ``signal`` and
``threading`` (enum and friends, ~1 MB) give way to ``_signal`` and ``_thread``.

How a standby waits with zero wake-ups: with one main slot it blocks in
``flock(LOCK_EX)`` in its only thread; with several, ``flock.SlotWaiter``
blocks on all of them. The stop file's folder is watched with dnotify
(``F_NOTIFY``, a SIGIO on any name created or renamed there). TERM, INT and
that SIGIO interrupt the wait: their handler raises ``_Wake`` while we wait.
"""
from __future__ import annotations

import _signal
import _thread
import fcntl
import os
import sys
import time

import hadctl

from . import backoff
from . import layout as paths
from .entrypoint import EntrypointError, exit_status, resolve
from .locks import flock
from .spawn import read_spec, spawn_from_worker
from .log import Log, open_append

EX_NOTINSTALLED = 5


class _Wake(Exception):
    """Raised by our signal handler to break a blocking wait."""


def main() -> None:
    """Entry of the exec'd worker: ``python -c BOOT REPORT_FD SPEC_FD``."""
    report_fd, spec_fd = int(sys.argv[1]), int(sys.argv[2])
    spec = read_spec(spec_fd)
    os.close(spec_fd)
    sys.argv = [spec["name"]]
    worker = Worker(spec, report_fd)
    code = worker.run()
    if not worker.ran_main:
        # No user code ran: nothing for atexit or a full interpreter shutdown to do,
        # and a leaving standby is gone (for stop's pidfd) milliseconds sooner.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


class Worker:
    def __init__(self, spec: dict, report_fd: int) -> None:  # type: ignore[type-arg]
        self.spec = spec
        self.report_fd = report_fd
        self.pid = os.getpid()
        self.log = Log(spec["log_file"])
        self.layout = paths.Layout.from_spec(spec)
        self.name = spec["name"]
        self.pid_file = self.layout.unknown_pid_file(self.pid)
        self.leaving: int | None = None
        self.ran_main = False
        self.folder_changed = False
        self.waiting = False
        self.watch_fd = -1
        self.alive_fd = -1

    # ------------------------------------------------------------ reporting

    def report(self, line: str) -> None:
        """Tell the controller (once) how we ended up; then close the pipe."""
        if self.report_fd < 0:
            return
        try:
            os.write(self.report_fd, (line.replace("\n", " ") + "\n").encode("utf-8", "replace"))
        except OSError:
            pass  # the controller went away; nothing else to tell
        os.close(self.report_fd)
        self.report_fd = -1

    # ------------------------------------------------------------ life

    def run(self) -> int:
        spec = self.spec
        if spec["process_name_change"]:
            _set_title(f"{self.name} - standby")
        sys.path[:0] = spec["python_path"]
        self._catch_signals()
        self._watch_stop_file()
        try:
            alive = self._hold_alive_lock()
        except OSError as exc:
            self.report(f"error {self.pid} cannot take {exc.filename}: {exc.strerror}")
            return 1
        if not alive or self._stop_file_exists():
            self.report(f"stopfile {self.pid}")
            return 0
        try:
            paths.write_pid_file(self.pid_file, self.pid)
        except OSError as exc:
            self.report(f"error {self.pid} cannot write pid file {self.pid_file}: {exc.strerror}")
            return 1
        try:
            return self._run_with_pid_file()
        except OSError as exc:  # ours, not the program's (_run_main keeps those): lock files, pid files
            where = f" {exc.filename}" if exc.filename else ""
            self.log.error(f"worker {self.pid}: {exc.strerror or exc}{where}")
            self.report(f"error {self.pid} {exc.strerror or exc}{where}")
            return 1
        finally:
            paths.remove_if_ours(self.pid_file, self.pid)

    def _run_with_pid_file(self) -> int:
        spec = self.spec
        function = self._import(spec["entrypoint"], "entrypoint")
        if function is None:
            return EX_NOTINSTALLED
        warm = None
        if spec["warmup"]:
            warmup = self._import(spec["warmup"], "warmup")
            if warmup is None:
                return EX_NOTINSTALLED
            try:
                warm = warmup()
            except BaseException as exc:  # noqa: BLE001 - user code; report, never crash silently
                import traceback

                traceback.print_exc()
                self.report(f"error {self.pid} warmup {spec['warmup']} failed: {type(exc).__name__}: {exc}")
                return 1
        hadctl._state["warmup"] = warm
        if self._stop_file_exists():  # a stop began while we were importing
            self.report(f"stopfile {self.pid}")
            return 0
        if not spec.get("manual", False) and not self._back_off():
            return 0
        if spec.get("engine") == "zookeeper":  # main slots in ZooKeeper (issue #7); kazoo only then
            from .locks import zookeeper

            return zookeeper.run_worker(self, function, _Wake)
        mains = [(s, self.layout.lock_file("main", s)) for s in range(spec["max_procs"], 0, -1)]
        taken = flock.take_first_free(mains, self.pid)
        if taken is not None and self._stop_file_exists():  # a stop began as we took the slot
            flock.release(taken[1])
            self.report(f"stopfile {self.pid}")
            return 0
        if taken is not None:
            self.report_fd, report_fd = -1, self.report_fd  # report once the pid file is renamed
            return self._run_main(taken[0], taken[1], function, report_fd=report_fd)
        standbys = [(s, self.layout.lock_file("standby", s)) for s in range(spec["standby_max_procs"], 0, -1)]
        standby = flock.take_first_free(standbys, self.pid)
        if standby is None:
            self.report(f"noslot {self.pid}")
            return 0
        standby_slot, standby_fd = standby
        self._rename_pid_file(self.layout.pid_file("standby", standby_slot))
        if self._stop_file_exists():  # a stop began between our first look and the slot
            self.report(f"stopfile {self.pid}")
            flock.release(standby_fd)
            return 0
        self.report(f"standby {standby_slot} {self.pid}")
        self.log.trace(f"standby #{standby_slot} waiting for a main slot")
        promoted = self._wait_for_main(mains)
        if promoted is None:
            flock.release(standby_fd)
            return 0
        return self._run_main(promoted[0], promoted[1], function, standby_fd)

    def _import(self, target: str, key: str):  # type: ignore[no-untyped-def]
        """Import ``module:function``; on failure report ``import-error`` and return None."""
        try:
            return resolve(target)
        except EntrypointError as exc:
            if exc.__cause__ is not None:
                import traceback

                traceback.print_exception(exc.__cause__)
            self.report(f"import-error {self.pid} {key} {target}: {exc}")
            return None

    def _back_off(self) -> bool:
        """Wait out the crash-loop back-off, if any; False when we must leave instead."""
        spec = self.spec
        wait, run = backoff.delay(backoff.read_starts(self.layout.starts_file), spec["start_limit_burst"],
                                  spec["start_limit_interval"], spec["restart_backoff_max"])
        if wait <= 0:
            return True
        self.log.warn(f"crash loop: {run} promotions within {spec['start_limit_interval']:g} s of each other; "
                      f"this standby waits {wait:g} s before taking a slot")
        until = time.monotonic() + wait
        paths.write_pid_file(self.layout.backoff_file, self.pid, extra=f"{wait:.3f}")
        try:
            while True:
                left = until - time.monotonic()
                if self.leaving is not None or self._stop_file_exists():
                    self.report(f"stopfile {self.pid}")
                    return False
                if left <= 0:
                    return True
                _signal.setitimer(_signal.ITIMER_REAL, left)
                try:
                    self.waiting = True
                    if self.leaving is None and not self.folder_changed:
                        _signal.pause()
                except _Wake:
                    pass
                finally:
                    self.waiting = False
                    self.folder_changed = False
        finally:
            _signal.setitimer(_signal.ITIMER_REAL, 0)
            paths.remove_if_ours(self.layout.backoff_file, self.pid)

    def _hold_alive_lock(self) -> bool:
        """Hold the service's alive lock shared until we exit: a stop takes it
        exclusively to know that the last process is gone, even one that holds no
        slot (a main that has returned but is still exiting). A standby spawned by a
        main shares the main's hold from birth (``alive_fd``, spawn_from_worker), so a
        main stopped before it could name its new standby in pid_dir still cannot
        leave it unseen. False when a stop holds the lock: we must not start."""
        path = self.layout.alive_lock
        fd = self.spec.get("alive_fd", -1)
        if fd >= 0 and not _is_file(fd, path):
            fd = -1
        if fd >= 0:
            os.set_inheritable(fd, False)
        else:
            fd = flock.hold_shared(path)
            if fd is None:
                return False
        self.alive_fd = fd
        os.register_at_fork(after_in_child=lambda: _close_quietly(fd))  # children do not hold it
        return True

    def _rename_pid_file(self, new: str) -> None:
        """Rename our pid file; junk in the way (a folder of that name) is removed, and
        if it cannot be, we run on under the old name: the lock is the truth, the pid
        file a hint, and a promoted main must not die of it (issue #6)."""
        try:
            os.replace(self.pid_file, new)
        except OSError as exc:
            try:
                paths.remove_stale(new)
                os.replace(self.pid_file, new)
            except OSError:
                self.log.warn(f"cannot rename {self.pid_file} to {new}: {exc.strerror}; it keeps its name")
                return
        self.pid_file = new

    # ------------------------------------------------------------ waiting

    def _catch_signals(self) -> None:
        """TERM and INT make a standby leave cleanly; SIGIO reports the stop
        file's folder changed; HUP is for mains only."""
        _signal.signal(_signal.SIGTERM, self._on_signal)
        _signal.signal(_signal.SIGINT, self._on_signal)
        _signal.signal(_signal.SIGIO, self._on_signal)
        _signal.signal(_signal.SIGALRM, self._on_signal)
        _signal.signal(_signal.SIGHUP, _signal.SIG_IGN)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == _signal.SIGIO:
            self.folder_changed = True
        elif signum != _signal.SIGALRM:
            self.leaving = signum
        if self.waiting:
            self.waiting = False
            raise _Wake

    def _watch_stop_file(self) -> None:
        """dnotify on the stop file's folder: a SIGIO whenever a name appears there."""
        folder = os.path.dirname(self.spec["standby_stop_file"])
        try:
            self.watch_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.fcntl(self.watch_fd, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_RENAME | fcntl.DN_MULTISHOT)
        except OSError as exc:
            if self.watch_fd >= 0:
                os.close(self.watch_fd)
                self.watch_fd = -1
            self.log.warn(f"cannot watch {folder} ({exc.strerror}); "
                          f"checking the stop file every {self.spec['interval']:g} s")

    def must_leave(self) -> bool:
        """Asked to leave (TERM/INT), or the standby stop file exists. Clears the
        "folder changed" flag: the stop file has been looked at."""
        if self.leaving is not None:
            self.log.trace(f"standby leaves on signal {self.leaving}")
            return True
        self.folder_changed = False
        if self._stop_file_exists():
            self.log.trace("standby leaves: standby stop file exists")
            return True
        return False

    def _stop_file_exists(self) -> bool:
        return os.path.lexists(self.spec["standby_stop_file"])

    def _wait_for_main(self, mains: list[tuple[int, str]]) -> tuple[int, int] | None:
        """Block until a main slot is ours (returns ``(slot, fd)``) or we must leave (None)."""
        spec = self.spec
        retries = spec["retries"]
        ticking = self.watch_fd < 0 or retries is not None
        if ticking:  # only then do we wake up on our own, every ``interval``
            _signal.setitimer(_signal.ITIMER_REAL, spec["interval"], spec["interval"])
        waiter = flock.SlotWaiter(mains) if len(mains) > 1 else None
        single_fd = flock.open_lock_file(mains[0][1]) if waiter is None else -1
        taken = None
        tries = 0
        try:
            while True:
                if self.must_leave():
                    return None
                try:
                    taken = self._block(waiter, mains[0][0], single_fd)
                except _Wake:
                    taken = None
                if taken is not None:
                    return taken
                if retries is not None and self.leaving is None and not self.folder_changed:
                    tries += 1
                    if tries > retries:
                        self.log.info(f"standby gives up after {retries} tries for a main slot")
                        return None
        finally:
            if ticking:
                _signal.setitimer(_signal.ITIMER_REAL, 0)
            if waiter is not None:
                waiter.cancel(keep=taken[1] if taken else None)
            elif taken is None:
                os.close(single_fd)

    def _block(self, waiter: "flock.SlotWaiter | None", slot: int, fd: int) -> tuple[int, int] | None:
        """One blocking wait; a signal handler breaks it by raising _Wake."""
        self.waiting = True
        if self.leaving is not None or self.folder_changed:
            self.waiting = False
            return None
        if waiter is None:
            fcntl.flock(fd, fcntl.LOCK_EX)
            self.waiting = False
            flock.note_holder(fd, self.pid)
            return slot, fd
        import select

        select.select([waiter.fd], [], [])
        self.waiting = False
        taken = waiter.taken()
        if taken is not None:
            flock.note_holder(taken[1], self.pid)
        return taken

    # ------------------------------------------------------------ main

    def _respawn_standby(self) -> None:
        """Refill the standby pool at once, without delaying our own start."""
        try:
            lock_fd = hadctl._state.get("lock_fd")
            child = spawn_from_worker({**self.spec, "manual": False},
                                      close=(lock_fd,) if isinstance(lock_fd, int) else (), alive_fd=self.alive_fd)
            self.log.trace(f"spawned replacement standby {child}")
        except OSError as exc:
            self.log.error(f"cannot spawn a replacement standby: {exc.strerror}")

    def _settle_promotion(self, slot: int, standby_fd: int, settled: _thread.LockType) -> None:
        """Runs in a short-lived thread as a promoted standby's function starts:
        record the promotion, spawn the replacement standby, rename the pid file
        to main-SLOT.pid (restart waits for that), then free the standby slot
        (in that order: the replacement may take it at once)."""
        try:
            self.log.info(f"main #{slot} running {self.spec['entrypoint']} (pid {self.pid}, promoted)")
            backoff.record_start(self.layout.starts_file)
            if self.spec["respawn_standby"] and not self._stop_file_exists():
                self._respawn_standby()
            self._rename_pid_file(self.layout.pid_file("main", slot))
            flock.release(standby_fd)
        except BaseException as exc:  # noqa: BLE001 - a thread must not die silently
            self.log.error(f"settling the promotion failed: {type(exc).__name__}: {exc}")
        finally:
            settled.release()

    def _run_main(self, slot: int, fd: int, function, standby_fd: int = -1,  # type: ignore[no-untyped-def]
                  report_fd: int = -1) -> int:
        """Become main of ``slot`` (lock held through ``fd``) and run the function.

        The pid file becomes main-SLOT.pid only as the function starts (just
        before the call, or, for a promoted standby, in the settling thread
        beside it), so a restart that waits for that rename knows the new main
        is in its function. A promoted standby spawns its replacement, then
        gives up its standby slot.
        """
        spec = self.spec
        if self.watch_fd >= 0:
            os.close(self.watch_fd)  # ends the dnotify watch
            self.watch_fd = -1
        for signum in (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGIO, _signal.SIGALRM):
            _signal.signal(signum, _signal.SIG_DFL)
        if self.leaving is not None:  # asked to leave while we were taking the slot
            os.kill(self.pid, self.leaving)
        if spec["process_name_change"]:
            _set_title(self.name)
        _redirect(spec["stdout_file"], 1)
        _redirect(spec["stderr_file"], 2)
        os.environ["HADC_lock_fd"] = str(fd)
        if spec["reset_close_on_exec_main_lock_fd"]:
            os.set_inheritable(fd, True)
        else:
            os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
        hadctl._state.update(slot=slot, lock_fd=fd, ready_file=self.layout.ready_file(slot))
        settled = None
        if standby_fd >= 0:
            # A promoted standby: the kernel just gave it the slot of a main that died,
            # and every microsecond until the function runs is downtime. Spawning the
            # replacement standby (~0.5 ms), renaming the pid file and freeing the
            # standby slot are begun now in a short-lived thread, joined before cleanup.
            settled = _thread.allocate_lock()
            settled.acquire()
            _thread.start_new_thread(self._settle_promotion, (slot, standby_fd, settled))
        else:
            # Not promoted: a main died moments ago (a crash loop) if the record says
            # so; a replacement spawned by a promoted main always refills the pool.
            earlier = backoff.record_start(self.layout.starts_file)
            replacing = not spec.get("manual", False) or \
                (bool(earlier) and time.monotonic() - earlier[-1] < spec["start_limit_interval"])
            self.log.info(f"main #{slot} running {spec['entrypoint']} (pid {self.pid})")
            if replacing and spec["respawn_standby"] and not self._stop_file_exists():
                self._respawn_standby()
            self._rename_pid_file(self.layout.pid_file("main", slot))
            if report_fd >= 0:
                self.report_fd = report_fd
                self.report(f"main {slot} {self.pid}")
        code: object = 0
        self.ran_main = True
        try:
            code = function(*spec["args"])
        except SystemExit as exc:
            code = exc.code
        except BaseException:  # noqa: BLE001 - the service's own failure; goes to its stderr
            import traceback

            traceback.print_exc()
            code = 1
        finally:
            if settled is not None:
                settled.acquire()  # the promotion thread has finished its work
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except (OSError, ValueError):
                    pass
            paths.remove_if_ours(self.layout.ready_file(slot), self.pid)
            paths.remove_if_ours(self.pid_file, self.pid)
            flock.release(fd)
        self.log.info(f"main #{slot} returned {code!r}")
        return exit_status(code)


def _redirect(path: str, target: int) -> None:
    fd = open_append(path)
    os.dup2(fd, target)
    os.close(fd)


def _is_file(fd: int, path: str) -> bool:
    """True when ``fd`` is open on the file at ``path``."""
    try:
        mine, there = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (there.st_dev, there.st_ino)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


def _set_title(title: str) -> None:
    try:
        from setproctitle import setproctitle
    except ImportError:
        return
    setproctitle(title)
