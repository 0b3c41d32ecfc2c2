"""A cache of parsed service files, so a command need not import tomllib.

``import tomllib`` costs a command about 6 ms here (it pulls in typing, datetime,
string and its own regular expressions) out of a ``stop`` or ``fork`` held to
30 / 60 ms. What is cached is only what tomllib made of the file's bytes (never
the validated config: users, groups and paths are checked anew every time),
and an entry is used only when the bytes it was made from equal the file's
bytes now, so an edit, however quick, is never missed.

Where: ``$HADCTL_CACHE_DIR`` (empty: no cache); else ``/run/hadctl`` for root
and ``$XDG_RUNTIME_DIR/hadctl`` for others; else nowhere. Root runs the
entrypoint a cached file names, so an entry counts only in a folder and a file
that belong to us and that nobody else can write; anything odd is a miss.
Imports os and marshal only; nothing from hadctl.
"""
from __future__ import annotations

import marshal
import os

_TAG = "hadctl-toml-1"
_PRIVATE = 0o022  # write bits for group and others: not ours alone


def folder() -> str | None:
    """The cache folder for this process, or None (no cache)."""
    configured = os.environ.get("HADCTL_CACHE_DIR")
    if configured is not None:
        return configured or None
    if os.geteuid() == 0:
        return "/run/hadctl" if os.path.isdir("/run") else None
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    return os.path.join(runtime, "hadctl") if runtime else None


def _entry(where: str, config_path: str) -> str:
    # One entry per config file (by its absolute path; crc32 is plenty to spread names).
    import zlib

    return os.path.join(where, f"config-{zlib.crc32(os.path.abspath(config_path).encode()):08x}.marshal")


def _ours(fd_or_path: int | str) -> bool:
    st = os.stat(fd_or_path)
    return st.st_uid == os.geteuid() and not st.st_mode & _PRIVATE


def lookup(config_path: str, data: bytes) -> dict | None:  # type: ignore[type-arg]
    """What tomllib made of ``data`` for this file before, or None."""
    where = folder()
    if where is None:
        return None
    try:
        if not _ours(where):
            return None
        fd = os.open(_entry(where, config_path), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        if not _ours(fd):
            return None
        with os.fdopen(fd, "rb") as handle:
            fd = -1
            tag, source, parsed = marshal.loads(handle.read())
    except (OSError, EOFError, ValueError, TypeError):
        return None
    finally:
        if fd >= 0:
            os.close(fd)
    return parsed if tag == _TAG and source == data and isinstance(parsed, dict) else None


def store(config_path: str, data: bytes, parsed: dict) -> None:  # type: ignore[type-arg]
    """Remember ``parsed`` for ``data``; quietly does nothing when it cannot."""
    where = folder()
    if where is None:
        return
    try:
        blob = marshal.dumps((_TAG, data, parsed))
    except ValueError:
        return  # TOML dates and times: marshal has no type for them (and no hadctl key takes one)
    entry = _entry(where, config_path)
    temporary = f"{entry}.{os.getpid()}"
    try:
        os.makedirs(where, 0o700, exist_ok=True)
        if not _ours(where):
            return
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, blob)
        finally:
            os.close(fd)
        os.replace(temporary, entry)
    except OSError:
        try:
            os.unlink(temporary)
        except OSError:
            pass
