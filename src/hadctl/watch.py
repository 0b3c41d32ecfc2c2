"""Wake on a file appearing in (or leaving) a folder, through inotify, without polling.

Controllers use it: ``restart`` waits for the new main's pid file, ``upgrade``
for a main to remove its upgrade file. (A waiting standby watches the stop
file with dnotify instead, which needs no ctypes.) Python's standard library
has no inotify, so this calls libc through ctypes. Imports nothing from hadctl.
"""
from __future__ import annotations

import ctypes
import os
import struct

IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_NONBLOCK = 0o4000
IN_CLOEXEC = 0o2000000
_EVENT = struct.Struct("iIII")

_libc = ctypes.CDLL(None, use_errno=True)


class FolderWatch:
    """An inotify descriptor watching one folder for names that appear in it.

    ``fd`` can be given to select()/poll(); ``names()`` drains the events and
    returns the names that appeared (created, moved in, or written).
    """

    __slots__ = ("fd",)

    def __init__(self, folder: str, mask: int = IN_CREATE | IN_MOVED_TO | IN_CLOSE_WRITE | IN_ATTRIB) -> None:
        fd = _libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, os.strerror(errno))
        if _libc.inotify_add_watch(fd, os.fsencode(folder), mask | IN_DELETE_SELF) < 0:
            errno = ctypes.get_errno()
            os.close(fd)
            raise OSError(errno, f"{os.strerror(errno)}: {folder}")
        self.fd = fd

    def names(self) -> list[str]:
        found: list[str] = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                return found
            offset = 0
            while offset + _EVENT.size <= len(data):
                _wd, _mask, _cookie, length = _EVENT.unpack_from(data, offset)
                offset += _EVENT.size
                name = data[offset:offset + length].rstrip(b"\0")
                offset += length
                found.append(os.fsdecode(name))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
