"""Lines to the local syslog socket: RFC 3164 datagrams, one per line.

``<PRI>Mmm dd hh:mm:ss TAG[PID]: message`` over a connected AF_UNIX datagram
socket ($HADCTL_SYSLOG_SOCKET, else /dev/log), reconnected once when syslogd has
restarted. Two users, each importing this module only when something is
"syslog" (the worker's fast path never loads it otherwise):

* the output forwarder (outputs.forward) for ``stdout_file``/``stderr_file =
  "syslog"``: blocking sends (nothing dropped), tag ``NAME[PID]``; a line it
  cannot send goes to log_file;
* hadctl's own log for ``log_file = "syslog"`` (``SyslogLog``, made by
  log.open_log): tag ``hadctl/NAME[PID]`` (as postfix/smtpd), severity from the
  level, sends that wait at most SEND_TIMEOUT, and only until one has waited in
  vain (Sender.jammed: a stopped syslogd costs a failover one timeout); a line
  it cannot send goes to the controller's stderr, and is dropped in a worker (it
  has no terminal, and its stderr may be syslog too).
"""
from __future__ import annotations

import _socket  # not socket: its enums would cost a worker ~2 ms and ~1 MB (lean.py)
import os
import time

from .log import Log, open_append

FACILITIES = {name: code for code, name in enumerate(
    ("kern", "user", "mail", "daemon", "auth", "syslog", "lpr", "news", "uucp", "cron", "authpriv", "ftp"))}
FACILITIES.update({f"local{n}": 16 + n for n in range(8)})
SEVERITIES = {"TRACE": 7, "INFO": 6, "WARN": 4, "ERROR": 3}  # debug, info, warning, err
MAX_LINE = 8000  # bytes of one datagram's message: longer lines go as several
SEND_TIMEOUT = 0.1  # seconds hadctl's own log waits for a full syslogd queue


def default_socket() -> str:
    return os.environ.get("HADCTL_SYSLOG_SOCKET") or "/dev/log"


def log_tag(name: str) -> str:
    """The tag of hadctl's own lines for service ``name``: ``journalctl -t hadctl/NAME``."""
    return f"hadctl/{name}"


def frames(priority: int, tag: bytes, line: bytes) -> list[bytes]:
    """The datagrams of one line (several when it is longer than MAX_LINE)."""
    line = line.rstrip(b"\r")
    now = time.localtime()  # RFC 3164: "Dec  2 18:49:45", English month, space-padded day
    month = b"JanFebMarAprMayJunJulAugSepOctNovDec"[(now.tm_mon - 1) * 3:][:3]
    stamp = b"%2d %02d:%02d:%02d" % (now.tm_mday, now.tm_hour, now.tm_min, now.tm_sec)
    return [b"<%d>%s %s %s: %s" % (priority, month, stamp, tag, line[start:start + MAX_LINE])
            for start in range(0, max(len(line), 1), MAX_LINE)]


class Sender:
    """One connected datagram socket to syslogd, reconnected when syslogd restarts.

    ``timeout``: None blocks while syslogd's queue is full; a number waits that long,
    once: then the sender is ``jammed`` and does not wait (a line syslogd does not
    take at once goes to the fallback) until a line goes through again, so that a
    stopped syslogd costs a command or a failover one timeout, not one per line.
    ``fallback``: where a line that cannot be sent goes: a file path (appended,
    log.open_append), a file descriptor, or -1 (dropped)."""

    def __init__(self, path: str, tag: bytes, fallback: str | int, timeout: float | None = None) -> None:
        self.path, self.tag, self.fallback, self.timeout = path, tag, fallback, timeout
        self.sock: _socket.socket | None = None
        self.jammed = False

    def send(self, priority: int, line: bytes) -> None:
        for message in frames(priority, self.tag, line):
            for attempt in (1, 2):
                try:
                    self._socket().send(message)
                except (TimeoutError, BlockingIOError) as exc:  # syslogd's queue is full
                    self._jam(True)
                    self._keep(message, exc)
                    break
                except OSError as exc:
                    if self.sock is not None:
                        self.sock.close()
                        self.sock = None
                    if attempt == 2:
                        self._keep(message, exc)
                else:
                    self._jam(False)
                    break

    def _jam(self, jammed: bool) -> None:
        if jammed != self.jammed and self.timeout is not None:
            self.jammed = jammed
            if self.sock is not None:
                self.sock.settimeout(0.0 if jammed else self.timeout)

    def _socket(self) -> _socket.socket:
        if self.sock is None:
            sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_DGRAM | _socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(0.0 if self.jammed else self.timeout)
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            self.sock = sock
        return self.sock

    def _keep(self, message: bytes, exc: OSError) -> None:
        """syslogd cannot be reached: the line goes to the fallback rather than nowhere."""
        why = ("queue full" if isinstance(exc, (TimeoutError, BlockingIOError))
               else exc.strerror or type(exc).__name__)
        text = b"[syslog unreachable: %s] %s\n" % (why.encode(), message)
        try:
            if isinstance(self.fallback, str):
                fd = open_append(self.fallback)
                try:
                    os.write(fd, text)
                finally:
                    os.close(fd)
            elif self.fallback >= 0:
                os.write(self.fallback, text)
        except OSError:
            pass


class SyslogLog(Log):
    """hadctl's own log sent to syslog: each line one datagram, the level as severity."""

    __slots__ = ("sender", "facility", "tag")

    def __init__(self, name: str, facility: str, socket_path: str | None = None, fallback_fd: int = 2) -> None:
        super().__init__("syslog")
        self.facility = FACILITIES.get(facility, FACILITIES["daemon"]) * 8
        self.tag = log_tag(name).encode()
        self.sender = Sender(socket_path or default_socket(), b"", fallback_fd, SEND_TIMEOUT)

    def write(self, level: str, message: str) -> None:
        priority = self.facility + SEVERITIES.get(level, 6)
        self.sender.tag = b"%s[%d]" % (self.tag, os.getpid())  # (a forked child logs with its own pid)
        for line in message.split("\n"):
            self.sender.send(priority, line.encode("utf-8", "replace"))
