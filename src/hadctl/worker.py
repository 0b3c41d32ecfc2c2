"""The life of a spawned process: one worker, one phase at a time.

Runs in a fresh interpreter exec'd by spawn.py, with the service's
``spec.WorkerSpec`` read from a pipe. Its phases (``Worker.phase``, named in the
log as ``phase A -> B``):

  phase      holds                               leaves for
  starting   alive lock, unknown-PID.pid          backoff, standby, main, leaving
  backoff    the same, and hadctl-backoff.pid     starting (to take a slot), leaving
  standby    a standby slot, standby-N.pid        main, leaving
  main       a main slot, main-N.pid              done
  done       nothing (the function returned)      exit, through a full interpreter exit
  leaving    nothing (TERM/INT, stop file,        exit at once (os._exit): no user code ran
             no slot, retries used up, error)

Its life story, in order:

  1. starting: give up at once if a stop holds the alive lock or the standby
     stop file exists; write ``unknown-PID.pid``; import the entrypoint (and
     run ``warmup``) so that a standby is warm; an import failure is reported
     and nothing is taken;
  2. backoff: a replacement standby spawned by a main waits out the crash-loop
     back-off (backoff.py), if any;
  3. take a free main slot (``locks.max_procs`` down to 1) through the lock
     engine (locks/engine.py: flock or ZooKeeper), else a standby slot (always
     local flock), else report ``noslot`` and leave; rename the pid file;
  4. report the phase on the report pipe (the controller is waiting for it);
  5. standby: block in the engine's wait for every main slot at once, and on a
     dnotify watch of the stop file and on our signals: no wake-ups while idle;
  6. main: arm the engine's fencing; spawn a replacement standby, drop the
     standby slot; point stdout/stderr at stdout_file/stderr_file, export
     HADC_lock_fd, call the function (entrypoint.call); done: remove the pid
     file and give the slot back to the engine.

Must stay small (the standby RSS budget is 10 MB): no dataclasses, typing,
logging, json, click or rich here or in what it imports; even ``signal`` and
``threading`` (enum and friends, ~1 MB) give way to lean.py and ``_thread``.

How a signal breaks a wait: TERM, INT, the stop file's SIGIO and the timer's
SIGALRM run ``_on_signal``; while ``Worker.block`` is running a call, it raises
``_Wake`` out of it. That is the only place a wait is broken; the engines wait
through ``block``.
"""
from __future__ import annotations

import _thread
import faulthandler
import fcntl
import os
import sys
import time

import hadctl

from . import backoff, contain, events, lean
from . import layout as paths
from . import spawn as protocol
from .entrypoint import EntrypointError, call, resolve
from .locks import flock
from .locks.engine import Engine, EngineError, GaveUp, Waits, worker_engine
from .log import open_log
from .outputs import Outputs
from .spawn import spawn_from_worker
from .spec import read as read_spec

if lean.TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

    from .spec import WorkerSpec

EX_NOTINSTALLED = 5

STARTING = "starting"
BACKOFF = "backoff"
STANDBY = "standby"
MAIN = "main"
DONE = "done"
LEAVING = "leaving"


class _Wake(Exception):
    """Raised by our signal handler to break a blocking wait."""


def main() -> None:
    """Entry of the exec'd worker: ``python -c BOOT REPORT_FD SPEC_FD``."""
    report_fd, spec_fd = int(sys.argv[1]), int(sys.argv[2])
    spec = read_spec(spec_fd)
    os.close(spec_fd)
    if spec.listen_names:  # the sockets spawn.py put at fds 3, 4, ...: systemd's convention
        os.environ.update(LISTEN_FDS=str(len(spec.listen_names)), LISTEN_PID=str(os.getpid()),
                          LISTEN_FDNAMES=":".join(spec.listen_names))
    sys.argv = [spec.name]
    worker = Worker(spec, report_fd)
    code = worker.run()
    if worker.phase != DONE:
        # No user code ran: nothing for atexit or a full interpreter shutdown to do,
        # and a leaving standby is gone (for stop's pidfd) milliseconds sooner.
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        os._exit(code)
    sys.exit(code)


class Worker(Waits):
    def __init__(self, spec: WorkerSpec, report_fd: int) -> None:
        self.spec = spec
        self.report_fd = report_fd
        self.pid = os.getpid()
        self.log = open_log(spec.log_file, spec.name, spec.syslog_facility, spec.syslog_socket, -1)  # unsent: dropped
        self.layout = paths.Layout(spec.pid_dir, spec.locks_path, spec.locks_standby_path, spec.standby_stop_file)
        self.name = spec.name
        self.pid_file = self.layout.unknown_pid_file(self.pid)
        self.phase = STARTING
        self.leave_signal: int | None = None  # the TERM or INT that made us leave
        self.folder_changed = False  # a SIGIO came: look at the stop file again
        self.blocking = False  # inside block(): a signal raises _Wake
        self.watch_fd = -1
        self.alive_fd = -1
        self.engine = Engine()  # no engine yet (its close() does nothing); the real one after the imports
        self.watcher: Any = None  # watchdog.Watcher while a standby watches the mains (watchdog, max_rss)

    def enter(self, phase: str) -> None:
        self.log.trace(f"worker {self.pid}: phase {self.phase} -> {phase}")
        self.phase = phase

    @property
    def watched(self) -> bool:  # type: ignore[override]
        return self.watch_fd >= 0

    # ------------------------------------------------------------ reporting

    def report(self, kind: str, slot: int | None = None, message: str = "") -> bool:
        """Tell the controller (once) how we ended up; then close the pipe. False when
        the controller that spawned us is gone (killed) and nobody reads it."""
        if self.report_fd < 0:
            return True
        delivered = protocol.write_report(self.report_fd, kind, self.pid, slot, message)
        os.close(self.report_fd)
        self.report_fd = -1
        return delivered

    def leave(self, kind: str = "", message: str = "", code: int = 0) -> int:
        """Enter ``leaving``, report ``kind`` (if any); returns the exit status."""
        self.enter(LEAVING)
        if kind:
            self.report(kind, message=message)
        return code

    # ------------------------------------------------------------ life

    def run(self) -> int:
        spec = self.spec
        self._contain()
        if spec.process_name_change:
            _set_title(f"{self.name} - standby")
        sys.path[:0] = spec.python_path
        self._catch_signals()
        self.outputs = Outputs(spec, self.log)  # reopen_signal: reopen our output files
        hadctl._state["reopen_outputs"] = self.outputs.reopen
        self._watch_stop_file()
        try:
            alive = self._hold_alive_lock()
        except OSError as exc:
            return self.leave(protocol.ERROR, f"cannot take {exc.filename}: {exc.strerror}", 1)
        if not alive or self._stop_file_exists():
            return self.leave(protocol.STOPFILE)
        try:
            paths.write_pid_file(self.pid_file, self.pid)
        except OSError as exc:
            return self.leave(protocol.ERROR, f"cannot write pid file {self.pid_file}: {exc.strerror}", 1)
        self.outputs.start_forwarder(self.alive_fd)  # syslog output: started while a standby
        try:
            return self._run_with_pid_file()
        except (OSError, EngineError) as exc:  # ours, not the program's (entrypoint.call keeps those)
            if isinstance(exc, OSError):
                where = f" {exc.filename}" if exc.filename else ""
                text = f"{exc.strerror or exc}{where}"
            else:
                text = str(exc)
            self.log.error(f"worker {self.pid}: {text}")
            return self.leave(protocol.ERROR, text, 1)
        finally:
            self.engine.close()
            paths.remove_if_ours(self.pid_file, self.pid)

    def _run_with_pid_file(self) -> int:
        spec = self.spec
        self._limit_the_start()
        function = self._import(spec.entrypoint, "entrypoint")
        if function is None:
            return self.leave(code=EX_NOTINSTALLED)
        warm = None
        if spec.warmup:
            warmup = self._import(spec.warmup, "warmup")
            if warmup is None:
                return self.leave(code=EX_NOTINSTALLED)
            try:
                warm = warmup()
            except BaseException as exc:
                import traceback

                traceback.print_exc()
                return self.leave(protocol.ERROR, f"warmup {spec.warmup} failed: {type(exc).__name__}: {exc}", 1)
        hadctl._state["warmup"] = warm
        if spec.spawn_timeout:
            faulthandler.cancel_dump_traceback_later()
        if self._stop_file_exists():  # a stop began while we were importing
            return self.leave(protocol.STOPFILE)
        if spec.spawned_by_main and not self._back_off():
            return self.leave(protocol.STOPFILE)
        self.engine = worker_engine(spec, self.layout, self.log)  # ZooKeeper: kazoo is imported here
        self.engine.start()
        mains = list(range(spec.locks_max_procs, 0, -1))
        taken = self.engine.take_main(mains)
        if taken is not None:
            if self._stop_file_exists():  # a stop began as we took the slot
                self.engine.release_main(*taken)
                return self.leave(protocol.STOPFILE)
            return self._run_main(taken[0], taken[1], function)
        return self._run_as_standby(mains, function)

    def _run_as_standby(self, mains: list[int], function: Callable[..., Any]) -> int:
        """Every main slot taken: take a standby slot and wait for a main slot."""
        spec = self.spec
        # (a restart's new standby takes a slot above the configured ones first: the old
        # standbys keep theirs until every new one is ready, actions.restart)
        top = spec.locks_standby_max_procs + spec.standby_extra
        standbys = [(s, self.layout.lock_file("standby", s)) for s in range(top, 0, -1)]
        standby = flock.take_first_free(standbys, self.pid)
        if standby is None:
            return self.leave(protocol.NOSLOT)
        standby_slot, standby_fd = standby
        self._rename_pid_file(self.layout.pid_file("standby", standby_slot))
        if self._stop_file_exists():  # a stop began between our first look and the slot
            flock.release(standby_fd)
            return self.leave(protocol.STOPFILE)
        self.enter(STANDBY)
        if not self.report(protocol.STANDBY, standby_slot) and standby_slot > spec.locks_standby_max_procs:
            flock.release(standby_fd)  # a spare slot of a restart that was killed: nobody would end us
            return self.leave()
        self.log.trace(f"standby #{standby_slot} waiting for a main slot ({spec.locks_engine})")
        self._start_watching(mains)
        try:
            promoted = self.engine.wait_main(mains, self)
        except GaveUp as exc:
            self.log.info(str(exc))
            promoted = None
        finally:
            self._stop_watching()
        if promoted is None:
            flock.release(standby_fd)
            return self.leave()
        return self._run_main(promoted[0], promoted[1], function, standby_fd)

    def _limit_the_start(self) -> None:
        """A worker whose import or warmup hangs must not stay: at the spawn timeout a
        faulthandler thread writes where it hangs on the report pipe (the controller
        logs it and names the import; a main's replacement standby has none: the log)
        and exits; the controller then ends what it started (spawn.end_unreported)."""
        if self.spec.spawn_timeout:
            out = self.report_fd if self.report_fd >= 0 else 2
            faulthandler.dump_traceback_later(self.spec.spawn_timeout, exit=True, file=out)

    def _contain(self) -> None:
        """What this worker starts carries its pid (contain.OWNER); a replacement standby,
        born in its main's cgroup, moves into its own (the controller's spawn did it
        before exec for the others)."""
        os.environ[contain.OWNER] = str(self.pid)
        if self.spec.spawned_by_main:
            contain.join(self.spec.cgroup, self.pid)

    def _start_watching(self, mains: list[int]) -> None:
        """With a watchdog or max_rss, this standby watches the mains while it waits
        (watchdog.py): a timer breaks the wait when it must look (must_leave looks)."""
        spec = self.spec
        if not (spec.watchdog_timeout or spec.max_rss) or spec.locks_engine != "flock":
            return
        from .watchdog import Watcher

        self.watcher = Watcher(spec, lambda slot: self.layout.lock_file("main", slot), self.log, mains)
        self._watch()

    def _watch(self) -> None:
        wake = self.watcher.check()
        if wake is not None:
            lean.set_timer(wake)

    def _stop_watching(self) -> None:
        if self.watcher is not None:
            lean.set_timer(0)  # its SIGALRM would kill a main (default disposition)
            self.watcher.close()
            self.watcher = None

    def _sweep_leftovers(self) -> None:
        """kill_mode = "group": end what dead workers left behind (their pools, setsid
        daemons), logged with pids and commands; called once the slot is ours, beside
        the function, so the failover is not delayed by it."""
        spec = self.spec
        if spec.kill_mode == "group":
            contain.sweep(contain.Finder(spec.service_id, spec.cgroup), self.layout.alive_lock, spec.stop_signals,
                          spec.signal_timeout, self.log, f"main #{hadctl.slot()} (pid {self.pid})")

    def _import(self, target: str, key: str) -> Callable[..., Any] | None:
        """Import ``module:function``; on failure report ``import-error`` and return None."""
        try:
            return resolve(target)
        except EntrypointError as exc:
            if exc.__cause__ is not None:
                import traceback

                traceback.print_exception(exc.__cause__)
            self.report(protocol.IMPORT_ERROR, message=f"{key} {target}: {exc}")
            return None

    def _back_off(self) -> bool:
        """Wait out the crash-loop back-off, if any; False when we must leave instead."""
        spec = self.spec
        wait, run = backoff.delay(backoff.read_starts(self.layout.starts_file), spec.start_limit_burst,
                                  spec.start_limit_interval, spec.restart_backoff_max)
        if wait <= 0:
            return True
        self.enter(BACKOFF)
        self.log.warn(f"crash loop: {run} unexpected deaths of mains within {spec.start_limit_interval:g} s "
                      f"of each other; this standby waits {wait:g} s before taking a slot")
        events.record(self.layout, "backoff", delay=wait, run=run)
        until = time.monotonic() + wait
        paths.write_pid_file(self.layout.backoff_file, self.pid, extra=f"{wait:.3f}")
        try:
            while True:
                left = until - time.monotonic()
                if self.must_leave():
                    return False
                if left <= 0:
                    self.enter(STARTING)
                    return True
                lean.set_timer(left)
                self.block(lean.pause)
        finally:
            lean.set_timer(0)
            paths.remove_if_ours(self.layout.backoff_file, self.pid)

    def _hold_alive_lock(self) -> bool:
        """Hold the service's alive lock shared until we exit: a stop takes it
        exclusively to know that the last process is gone, even one that holds no
        slot (a main that has returned but is still exiting). A standby spawned by a
        main shares the main's hold from birth (``alive_fd``, spawn_from_worker), so a
        main stopped before it could name its new standby in pid_dir still cannot
        leave it unseen. False when a stop holds the lock: we must not start."""
        path = self.layout.alive_lock
        fd = self.spec.alive_fd
        if fd >= 0 and not _is_file(fd, path):
            fd = -1
        if fd >= 0:
            os.set_inheritable(fd, False)
        else:
            found = flock.hold_shared(path)
            if found is None:
                return False
            fd = found
        self.alive_fd = fd
        os.register_at_fork(after_in_child=lambda: _close_quietly(fd))  # children do not hold it
        return True

    def _rename_pid_file(self, new: str) -> None:
        """Rename our pid file; junk in the way (a folder of that name) is removed, and
        if it cannot be, we run on under the old name: the lock is the truth, the pid
        file a hint, and a promoted main must not die of it."""
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

    # ------------------------------------------------------------ waiting (the engine's Waits)

    def _catch_signals(self) -> None:
        """TERM and INT make a standby leave cleanly; SIGIO reports the stop
        file's folder changed; SIGALRM ends a timed wait; HUP is for mains only."""
        for signum in (lean.SIGTERM, lean.SIGINT, lean.SIGIO, lean.SIGALRM):
            lean.set_handler(signum, self._on_signal)
        lean.set_handler(lean.SIGHUP, lean.SIG_IGN)

    def _on_signal(self, signum: int, _frame: object) -> None:
        if signum == lean.SIGIO:
            self.folder_changed = True
        elif signum != lean.SIGALRM:
            self.leave_signal = signum
        if self.blocking:
            self.blocking = False
            raise _Wake

    def block(self, call: Callable[..., Any], *args: Any) -> Any:
        """``call(*args)``, broken by a leave signal, a stop-file event or the timer: None then."""
        self.blocking = True
        try:
            if self.interrupted():
                return None
            return call(*args)
        except _Wake:
            return None
        finally:
            self.blocking = False

    def interrupted(self) -> bool:
        return self.leave_signal is not None or self.folder_changed

    def _watch_stop_file(self) -> None:
        """dnotify on the stop file's folder: a SIGIO whenever a name appears there."""
        folder = os.path.dirname(self.spec.standby_stop_file)
        try:
            self.watch_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            fcntl.fcntl(self.watch_fd, fcntl.F_NOTIFY, fcntl.DN_CREATE | fcntl.DN_RENAME | fcntl.DN_MULTISHOT)
        except OSError as exc:
            if self.watch_fd >= 0:
                os.close(self.watch_fd)
                self.watch_fd = -1
            self.log.warn(f"cannot watch {folder} ({exc.strerror}); "
                          f"checking the stop file every {self.spec.locks_interval:g} s")

    def must_leave(self) -> bool:
        """Asked to leave (TERM/INT), or the standby stop file exists. Clears the
        "folder changed" flag: the stop file has been looked at."""
        if self.leave_signal is not None:
            self.log.trace(f"{self.phase} leaves on signal {self.leave_signal}")
            return True
        self.folder_changed = False
        if self.watcher is not None:
            self._watch()
        if self._stop_file_exists():
            self.log.trace(f"{self.phase} leaves: standby stop file exists")
            return True
        return False

    def _stop_file_exists(self) -> bool:
        return os.path.lexists(self.spec.standby_stop_file)

    # ------------------------------------------------------------ main

    def _respawn_standby(self) -> None:
        """Refill the standby pool at once, without delaying our own start."""
        from .record import replace

        try:
            lock_fd = hadctl._state.get("lock_fd")
            child = spawn_from_worker(replace(self.spec, spawned_by_main=True, standby_extra=0),
                                      close=(lock_fd,) if isinstance(lock_fd, int) else (), alive_fd=self.alive_fd)
            self.log.trace(f"spawned replacement standby {child}")
        except OSError as exc:
            self.log.error(f"cannot spawn a replacement standby: {exc.strerror}")
            events.record(self.layout, "spawn_failure", reason="replacement standby", message=exc.strerror)

    def _settle_promotion(self, slot: int, standby_fd: int, settled: _thread.LockType) -> None:
        """Runs in a short-lived thread as a promoted standby's function starts:
        record the promotion, spawn the replacement standby, rename the pid file
        to main-SLOT.pid (restart waits for that), then free the standby slot
        (in that order: the replacement may take it at once)."""
        try:
            events.record_failover(self.layout, slot, self.pid)
            self.log.info(f"main #{slot} running {self.spec.entrypoint} (pid {self.pid}, promoted)")
            if backoff.take_handover(self.spec.pid_dir, slot) is None:  # its main was killed, unasked
                backoff.record_death(self.layout.starts_file)
            if self.spec.respawn_standby and not self._stop_file_exists():
                self._respawn_standby()
            self._rename_pid_file(self.layout.pid_file("main", slot))
            flock.release(standby_fd)
            self._sweep_leftovers()
        except BaseException as exc:
            self.log.error(f"settling the promotion failed: {type(exc).__name__}: {exc}")
        finally:
            settled.release()

    def _sweep_in_thread(self, settled: _thread.LockType) -> None:
        """A main that took a free slot: a dead main's leftovers may still be there."""
        try:
            self._sweep_leftovers()
        except BaseException as exc:
            self.log.error(f"ending leftovers failed: {type(exc).__name__}: {exc}")
        finally:
            settled.release()

    def _forget_pid_file(self) -> None:
        paths.remove_if_ours(self.pid_file, self.pid)

    def _run_main(self, slot: int, fd: int, function: Callable[..., Any], standby_fd: int = -1) -> int:
        """Become main of ``slot`` (lock held through ``fd``) and run the function.

        The pid file becomes main-SLOT.pid only as the function starts (just
        before the call, or, for a promoted standby, in the settling thread
        beside it), so a restart that waits for that rename knows the new main
        is in its function. A promoted standby spawns its replacement, then
        gives up its standby slot. Reports ``main`` (when not promoted) only
        once the pid file is renamed.
        """
        self._arm_fencing(slot, fd, standby_fd)
        self._become_main(slot)
        self._publish_main(slot, fd)
        settled = self._settle_beside(slot, standby_fd) if standby_fd >= 0 else self._announce_main(slot)
        code = 1
        try:
            code = call(function, self.spec.args)
        finally:
            self._end_main(slot, fd, settled)
        self.log.info(f"main #{slot} returned, exit status {code}")
        events.record(self.layout, "exit", slot=slot, status=code)
        return code

    def _arm_fencing(self, slot: int, fd: int, standby_fd: int) -> None:
        """The engine fences this main from now on (ZooKeeper); its token reaches the
        program. On EngineError every slot lock is given back, and the error raised."""
        try:
            token = self.engine.arm(slot, self._forget_pid_file)
        except EngineError:
            self.engine.release_main(slot, fd)
            if standby_fd >= 0:
                flock.release(standby_fd)
            raise
        if token is not None:
            os.environ["HADCTL_FENCING_TOKEN"] = str(token)
            hadctl._state["fencing_token"] = token

    def _become_main(self, slot: int) -> None:
        """Phase main: the standby's watch and handlers go (a signal asked for while
        we took the slot is raised again, now with its default action), the title
        and the main's outputs come."""
        if self.watch_fd >= 0:
            os.close(self.watch_fd)  # ends the dnotify watch
            self.watch_fd = -1
        for signum in (lean.SIGTERM, lean.SIGINT, lean.SIGHUP, lean.SIGIO, lean.SIGALRM):
            lean.set_handler(signum, lean.SIG_DFL)
        asked_to_leave = self.leave_signal
        self.enter(MAIN)
        if asked_to_leave is not None:  # asked to leave while we were taking the slot
            os.kill(self.pid, asked_to_leave)
        if self.spec.process_name_change:
            _set_title(self.name)
        self.outputs.attach_main()  # stdout_file, stderr_file (or the syslog forwarder)

    def _publish_main(self, slot: int, fd: int) -> None:
        """What the program may ask of hadctl (slot, lock fd, ready file, heartbeat),
        and the lock fd across its exec (reset_close_on_exec_main_lock_fd) or not."""
        spec = self.spec
        os.environ["HADC_lock_fd"] = str(fd)  # noqa: SIM112 - HADaemon::Control's name, read by programs
        if spec.reset_close_on_exec_main_lock_fd:
            os.set_inheritable(fd, True)
        else:
            os.register_at_fork(after_in_child=lambda: _close_quietly(fd))
        hadctl._state.update(slot=slot, lock_fd=fd, ready_file=self.layout.ready_file(slot))
        if spec.watchdog_timeout:
            from .watchdog import start_beats

            hadctl._state["beat"] = start_beats(spec.pid_dir, slot, self.pid)
            # a child's alive() must not keep a hung main alive: the mapping is shared
            os.register_at_fork(after_in_child=lambda: hadctl._state.pop("beat", None))

    def _settle_beside(self, slot: int, standby_fd: int) -> _thread.LockType:
        """A promoted standby: the kernel just gave it the slot of a main that died,
        and every microsecond until the function runs is downtime. Spawning the
        replacement standby (~0.5 ms), renaming the pid file and freeing the
        standby slot are begun now in a short-lived thread, joined before cleanup."""
        settled = _thread.allocate_lock()
        settled.acquire()
        _thread.start_new_thread(self._settle_promotion, (slot, standby_fd, settled))
        return settled

    def _announce_main(self, slot: int) -> _thread.LockType | None:
        """Not promoted: refill the standbys when replacing a main (one that died unasked,
        or we were spawned by a promoted main), rename the pid file, report ``main``;
        with kill_mode group, sweep a dead main's leftovers in a thread."""
        spec = self.spec
        # A free slot. Its main died if it said so (a note DIED, counted by itself), or,
        # for a main's replacement standby, if it left no note at all (killed). Then this
        # process, meant as a standby, refills the pool itself.
        why = backoff.take_handover(spec.pid_dir, slot)
        if spec.spawned_by_main and why is None:
            backoff.record_death(self.layout.starts_file)
        replacing = spec.spawned_by_main or why == backoff.DIED
        self.log.info(f"main #{slot} running {spec.entrypoint} (pid {self.pid})")
        if replacing and spec.respawn_standby and not self._stop_file_exists():
            self._respawn_standby()
        self._rename_pid_file(self.layout.pid_file("main", slot))
        self.report(protocol.MAIN, slot)
        if spec.kill_mode != "group":
            return None
        settled = _thread.allocate_lock()
        settled.acquire()
        _thread.start_new_thread(self._sweep_in_thread, (settled,))
        return settled

    def _end_main(self, slot: int, fd: int, settled: _thread.LockType | None) -> None:
        """The function returned: join the settling thread, flush, remove our ready
        and pid files, phase done, give the slot back."""
        if settled is not None:
            settled.acquire()  # the promotion thread has finished its work
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except (OSError, ValueError):
                pass
        paths.remove_if_ours(self.layout.ready_file(slot), self.pid)
        paths.remove_if_ours(self.pid_file, self.pid)
        self.enter(DONE)
        backoff.main_ended(self.spec.pid_dir, slot, self.pid, self.layout.starts_file)  # before the slot is free
        self.engine.release_main(slot, fd)


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
