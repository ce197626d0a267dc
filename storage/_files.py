"""Opening files that hotcopy reads or writes as data: regular files only, never through a link.

Every data file (a main file, a WAL, a copy, a backup piece, a manifest) is opened here, so that
a FIFO, socket or device planted where a data file belongs is refused at once instead of
hanging the reader, and a symbolic link in its last component is never followed.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from ._errors import NotRegularFile, StorageError

_FLAGS = os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular(path: str | os.PathLike[str], flags: int = os.O_RDONLY, mode: int = 0o600) -> int:
    """A descriptor on the regular file ``path``, opened with ``flags``.

    ``O_NONBLOCK`` makes the open of a FIFO return at once (it is refused after ``fstat``) and is
    cleared again before the descriptor is returned; ``O_NOFOLLOW`` refuses a symbolic link.

    Raises:
        NotRegularFile: ``path`` is a symbolic link, FIFO, socket, device or directory.
        FileNotFoundError: ``path`` does not exist (and ``flags`` do not create it).
    """
    try:
        fd = os.open(path, flags | _FLAGS, mode)
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EISDIR, errno.ENXIO):
            raise _not_regular(path, _kind_of(path)) from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_regular(path, _kind(st.st_mode))
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


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


def _not_regular(path: str | os.PathLike[str], kind: str) -> NotRegularFile:
    return NotRegularFile(
        f"{path} is {kind}, not a regular file; refusing to use it", path=str(path)
    )


def _kind_of(path: str | os.PathLike[str]) -> str:
    try:
        return _kind(os.lstat(Path(path)).st_mode)
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
