"""Opening and creating the files and directories hotcopy keeps: regular files only, never
through a link, never another user's file written, modes set exactly.

Every data file (a main file, a WAL, a copy, a backup piece, a manifest, a lock file) is opened
here, so that a FIFO, socket or device planted where a data file belongs is refused at once
instead of hanging the reader, and a symbolic link in its last component is never followed.
A file opened for writing must have been made by someone we trust (:func:`trusted_owner`:
ourselves, root, or a member of the group a shared directory is shared with); a file created
here gets exactly the mode its directory's policy gives (:func:`file_mode_in`: 0600, or
0640/0660 in a directory shared with its group), whatever the umask.

Where a path component could be swapped by somebody else between two calls, the caller holds a
descriptor of the directory and uses the ``*_at`` functions, which resolve only one name.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from hotcopy.coordinator._errors import UnsafePlace
from hotcopy.coordinator._paths import (
    check_place,
    dir_mode_in,
    file_mode_in,
    open_dir_at,
    trusted_owner,
    user_name,
)

from ._errors import NotRegularFile, StorageError

__all__ = [
    "check_place",
    "make_directory",
    "open_dir",
    "open_dir_at",
    "open_regular",
    "open_regular_at",
    "read_regular",
    "refuse_unsafe_place",
]

_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITING = os.O_WRONLY | os.O_RDWR


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY) -> int:
    """A descriptor on the regular file ``path``, opened with ``flags``.

    ``O_NONBLOCK`` makes the open of a FIFO return at once (it is refused after ``fstat``) and is
    cleared again before the descriptor is returned; ``O_NOFOLLOW`` refuses a symbolic link. With
    ``O_CREAT`` the file is created with its directory's policy mode if it does not exist
    (``O_EXCL``: it must not). Opened for writing, an existing file must have a trusted owner.

    Raises:
        NotRegularFile: ``path`` is a symbolic link, FIFO, socket, device or directory.
        UnsafePlace: Opened for writing, ``path`` belongs to a user we do not trust.
        FileNotFoundError: ``path`` does not exist (and ``flags`` do not create it).
    """
    return _open(None, os.fspath(path), flags, os.fspath(path))


def open_regular_at(
    dir_fd: int, name: str, flags: int = os.O_RDONLY, *, path: str | os.PathLike[str] = ""
) -> int:
    """:func:`open_regular` of the entry ``name`` of the directory ``dir_fd`` (one plain name,
    resolved there and nowhere else); ``path`` names it in messages."""
    if not name or "/" in name or name in (".", ".."):
        raise ValueError(f"not a plain file name: {name!r}")
    return _open(dir_fd, name, flags, os.fspath(path) or name)


def _open(dir_fd: int | None, name: str, flags: int, where: str) -> int:
    if flags & os.O_CREAT and not flags & os.O_EXCL:
        # Open or create, knowing which: a file we create gets its exact mode, a file we find
        # is checked like any other.
        while True:
            try:
                return _open(dir_fd, name, flags & ~os.O_CREAT, where)
            except FileNotFoundError:
                pass
            try:
                return _open(dir_fd, name, flags | os.O_EXCL, where)
            except FileExistsError:
                continue  # made by someone else meanwhile: open theirs
    try:
        # 0o600 until fchmod below: never wider than private, whatever the policy.
        fd = os.open(name, flags | _FLAGS, 0o600, dir_fd=dir_fd)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_regular(where, _kind_of(dir_fd, name)) from None
        raise
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _not_regular(where, _kind(info.st_mode))
        if flags & os.O_CREAT:
            os.fchmod(fd, file_mode_in(_directory_of(dir_fd, name)))
        elif flags & _WRITING and not trusted_owner(info, _directory_of(dir_fd, name)):
            raise UnsafePlace(
                f"{where} belongs to {user_name(info.st_uid)}: hotcopy never writes into a "
                "file of a user it does not trust; remove it",
                path=where,
            )
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _directory_of(dir_fd: int | None, name: str) -> os.stat_result:
    if dir_fd is not None:
        return os.fstat(dir_fd)
    return os.stat(os.path.dirname(name) or ".")


def read_regular(path: str | os.PathLike[str], limit: int = 64 << 20) -> bytes:
    """The whole content of the regular file ``path`` (at most ``limit`` bytes)."""
    fd = open_regular(path)
    try:
        size = os.fstat(fd).st_size
        if size > limit:
            raise StorageError(
                f"{path} is {size} bytes; a file of this kind is at most {limit}", path=str(path)
            )
        parts = []
        while chunk := os.read(fd, 1 << 20):
            parts.append(chunk)
        return b"".join(parts)
    finally:
        os.close(fd)


def open_dir(path: str | os.PathLike[str], *, create: bool = False) -> int:
    """A descriptor on the directory ``path`` (its last component never a symlink), checked by
    :func:`check_place`; created with its parent's policy mode when ``create``."""
    path = Path(path)
    parent_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        return open_dir_at(parent_fd, path.name, path, create=create)
    finally:
        os.close(parent_fd)


def refuse_unsafe_place(path: str | os.PathLike[str]) -> Path:
    """Check the directory ``path`` that a user named (a repository, a backup catalog), and
    every directory on the way to it, with :func:`check_place`: whoever could rename ``path``
    or one of them could put a directory of their own in its place. A path that does not exist
    is left to the caller to report.

    Returns:
        ``path`` resolved (symlinks the user's path goes through are followed once, here): a
        caller that goes on with it cannot be redirected by a link changed after the check.

    Raises:
        UnsafePlace: Someone hotcopy does not trust could change what is in it.
    """
    real = Path(os.path.realpath(path))
    try:
        info = os.stat(real)
    except FileNotFoundError:
        return real
    check_place(path, info)
    for ancestor in real.parents:
        check_place(ancestor, os.stat(ancestor), ancestor=True)
    return real


def make_directory(path: str | os.PathLike[str], *, gid: int = -1, exist_ok: bool = True) -> bool:
    """Create the directory ``path`` and its missing parents, each with exactly the mode its
    parent's policy gives (:func:`dir_mode_in`: 0700 unless shared), whatever the umask.

    With ``gid``, ``path`` itself is shared with that group on purpose (2770) and the parents
    created on the way let that group pass (``g+x``), so its members can reach it.

    Returns:
        Whether ``path`` was created (False: it existed and ``exist_ok``).

    Raises:
        FileExistsError: ``path`` exists and not ``exist_ok``.
    """
    path = Path(os.path.abspath(path))
    missing = []
    ancestor = path
    while not os.path.lexists(ancestor):
        missing.append(ancestor)
        ancestor = ancestor.parent
    if not missing:
        if exist_ok:
            return False
        raise FileExistsError(errno.EEXIST, "File exists", str(path))
    # Never made through a link someone else planted where a directory was (one who may write
    # in a shared directory could send what we make anywhere we may write): the deepest
    # directory that exists is followed only if it is a link of this user's or root's, and
    # each one made here is entered as what it is.
    found = os.lstat(ancestor)
    if stat.S_ISLNK(found.st_mode) and found.st_uid not in (os.geteuid(), 0):
        raise UnsafePlace(
            f"{str(ancestor)!r} is a symbolic link of {user_name(found.st_uid)}'s: hotcopy "
            "makes nothing through it",
            path=str(ancestor),
        )
    followed = stat.S_ISLNK(found.st_mode)
    for directory in reversed(missing):
        follow = followed and directory.parent == ancestor
        flags = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW)
        parent_fd = os.open(directory.parent, flags)
        try:
            mode = dir_mode_in(os.fstat(parent_fd))
            try:
                os.mkdir(directory.name, 0o700, dir_fd=parent_fd)
            except FileExistsError:
                if directory == path and not exist_ok:
                    raise
                continue  # made by someone else meanwhile: theirs, as it is
            fd = os.open(
                directory.name,
                os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC,
                dir_fd=parent_fd,
            )
        finally:
            os.close(parent_fd)
        try:
            if gid != -1:
                os.fchown(fd, -1, gid)
                mode = 0o2770 if directory == path else mode | stat.S_IXGRP
            os.fchmod(fd, mode)
        finally:
            os.close(fd)
    return True


def _not_regular(path: str, kind: str) -> NotRegularFile:
    return NotRegularFile(f"{path} is {kind}, not a regular file; refusing to use it", path=path)


def _kind_of(dir_fd: int | None, name: str) -> str:
    try:
        return _kind(os.lstat(name, dir_fd=dir_fd).st_mode)
    except OSError:
        return "not a regular file"


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a regular file"
