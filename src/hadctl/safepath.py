"""Opening, creating and removing paths as root without being steered by links
that a less-privileged user planted on the way.

hadctl often runs as root for a service whose user owns pid_dir and its log
folder. That user may replace any name in those folders by a symbolic link, so
a root controller that opens ``PID_DIR/logs/hadctl.log`` by path could be sent
into a root-only folder. Checking the path first and opening it afterwards
leaves a window; the walk closes it: each component is looked up relative to
the folder already held open (``openat`` with ``O_NOFOLLOW``), starting at "/".

The rule for links met on the way, as root: a link is followed only when root
alone could have made it, that is the link is owned by root and the folder
holding it is owned by root and writable by no one else (or sticky, like /tmp,
where nobody else may replace root's link). So /var/run -> /run and
/dev/stdout are followed, a link in pid_dir is not: ``LinkRefusedError``
(an OSError with errno ELOOP) naming the link. A link in the middle of a path
is followed by reading it and walking its target the same way; the last
component, once trusted, is opened by the kernel (so /dev/stdout ->
/proc/self/fd/1, whose target is no path, still works).

Not root, hadctl is plain ``os.open`` and ``os.makedirs``: a link can only send
a controller where its own user may go anyway.

Leaf module: imports os, errno and stat only (the worker uses it through log and
locks.flock, and must stay small).
"""
from __future__ import annotations

import errno
import os
import stat

_FOLDER = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_MAX_LINKS = 40  # as the kernel's own limit on links in one lookup


class LinkRefusedError(OSError):
    """A symbolic link on the way to a path that someone other than root could
    have planted: never followed as root. ``filename`` is the link (named as
    reached: after a trusted link, by its target's path); ``final`` tells whether
    it stands at the path's last component rather than at a folder on the way."""

    def __init__(self, link: str, final: bool) -> None:
        super().__init__(errno.ELOOP, "a symbolic link in a folder that others can write", link)
        self.final = final


def guarded() -> bool:
    """Whether paths are walked component by component (hadctl runs as root)."""
    return os.geteuid() == 0


def open_beneath(path: str, flags: int, mode: int = 0o644) -> int:
    """``os.open(path, flags, mode)``, as root never through an untrusted link.

    Raises OSError as os.open does, LinkRefusedError for a refused link.
    """
    if not guarded():
        return os.open(path, flags | os.O_CLOEXEC, mode)
    folder, name, where = _walk(path)
    try:
        return _open_last(folder, name, where, flags, mode)
    finally:
        os.close(folder)


def make_folders(path: str, mode: int = 0o755, owner: tuple[int, int] | None = None) -> list[str]:
    """Create ``path`` and its missing parents, as root never through an untrusted
    link; ``path`` itself, if created, is given to ``owner`` (uid, gid). Returns
    the folders it created; raises OSError (NotADirectoryError, PermissionError,
    LinkRefusedError, ...)."""
    if not guarded():
        missing = []
        here = os.path.abspath(path)
        while not os.path.lexists(here):
            missing.append(here)
            here = os.path.dirname(here)
        os.makedirs(path, mode, exist_ok=True)
        return missing[::-1]
    made: list[str] = []
    folder, _name, _where = _walk(path, (mode, owner, made))
    os.close(folder)
    return made


def unlink(path: str) -> None:
    """Remove the file (or link) ``path``; the folders on the way are walked as for
    open_beneath. Raises OSError (FileNotFoundError when it is not there)."""
    if not guarded():
        os.unlink(path)
        return
    folder, name, _where = _walk(path)
    try:
        os.unlink(name, dir_fd=folder)
    finally:
        os.close(folder)


def check_walk(path: str) -> None:
    """Raise LinkRefusedError when the existing part of ``path`` (the last component
    included) holds a link that open_beneath would refuse; nothing else is
    checked, and nothing is made (a missing part ends the walk)."""
    if not guarded():
        return
    try:
        folder, name, where = _walk(path)
    except OSError as exc:
        if isinstance(exc, LinkRefusedError):
            raise
        return  # missing, or not a folder: for the caller to find out
    try:
        _trusted_link(folder, name, where, final=True)
    finally:
        os.close(folder)


def _split(path: str) -> list[str]:
    """The components of ``path``, last first (a stack to pop)."""
    return [name for name in reversed(path.split("/")) if name and name != "."]


_Making = tuple[int, "tuple[int, int] | None", list[str]]


def _walk(path: str, making: _Making | None = None) -> tuple[int, str, str]:
    """Open every folder on the way to ``path``'s last component: returns the fd of
    the folder holding it (O_PATH; the caller closes it), the last name, and the
    folder's path (for messages). With ``making`` (mode, owner, list of folders
    made), every component is a folder, created when missing, and the name
    returned is "."."""
    pending = _split(os.path.normpath(path if path.startswith("/") else os.path.join(os.getcwd(), path)))
    folder = os.open("/", _FOLDER)
    where = "/"
    links = 0
    try:
        while pending:
            name = pending.pop()
            if name == "..":  # from a link's target: never itself a link
                inner = os.open("..", _FOLDER, dir_fd=folder)
                os.close(folder)
                folder, where = inner, os.path.dirname(where)
                continue
            if not pending and making is None:
                kept, folder = folder, -1
                return kept, name, where  # the last component: the caller opens it
            try:
                inner = os.open(name, _FOLDER, dir_fd=folder)
            except FileNotFoundError:
                if making is None:
                    raise
                _make_one(folder, name, making[0], None if pending else making[1])
                making[2].append(os.path.join(where, name))
                pending.append(name)
                continue
            except OSError as exc:
                if exc.errno not in (errno.ENOTDIR, errno.ELOOP):
                    raise
                target = _trusted_link(folder, name, where)
                if target is None:
                    raise
                links += 1
                if links > _MAX_LINKS:
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), os.path.join(where, name)) from None
                if target.startswith("/"):
                    os.close(folder)
                    folder = -1
                    folder, where = os.open("/", _FOLDER), "/"
                pending.extend(_split(target))
                continue
            os.close(folder)
            folder, where = inner, os.path.join(where, name)
        kept, folder = folder, -1
        return kept, ".", where
    finally:
        if folder >= 0:
            os.close(folder)


def _make_one(folder: int, name: str, mode: int, owner: tuple[int, int] | None) -> None:
    """mkdir ``name`` in ``folder``; give it to ``owner`` through an fd on the very
    folder made (a name swapped meanwhile is never chowned)."""
    try:
        os.mkdir(name, mode, dir_fd=folder)
    except FileExistsError:
        return  # made meanwhile by someone else: the walk looks at what it is
    if owner is not None:
        made = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=folder)
        try:
            os.fchown(made, owner[0], owner[1])
        finally:
            os.close(made)


def _open_last(folder: int, name: str, where: str, flags: int, mode: int) -> int:
    """Open the last component, never through a link unless root alone made it
    (and the caller did not ask for O_NOFOLLOW)."""
    path = os.path.join(where, name)
    try:
        return os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=folder)
    except OSError as exc:
        failed = OSError(exc.errno, exc.strerror, path)  # named in full (the subclass follows errno)
        if exc.errno not in (errno.ELOOP, errno.ENOTDIR):  # ENOTDIR: a link opened with O_DIRECTORY
            raise failed from None
        if _trusted_link(folder, name, where, final=True) is None or flags & os.O_NOFOLLOW:
            raise failed from None
    return os.open(name, flags | os.O_CLOEXEC, mode, dir_fd=folder)


def _trusted_link(folder: int, name: str, where: str, final: bool = False) -> str | None:
    """The target of the link ``name`` in ``folder`` if root alone could have made it;
    None when ``name`` is no link; LinkRefusedError for an untrusted link."""
    try:
        st = os.stat(name, dir_fd=folder, follow_symlinks=False)
    except OSError:
        return None
    if not stat.S_ISLNK(st.st_mode):
        return None
    holder = os.fstat(folder)
    others_write = holder.st_mode & 0o022 and not holder.st_mode & stat.S_ISVTX
    if st.st_uid != 0 or holder.st_uid != 0 or others_write:
        raise LinkRefusedError(os.path.join(where, name), final)
    return os.readlink(name, dir_fd=folder)
