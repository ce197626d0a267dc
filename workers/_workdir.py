"""Work directories beside a result: a restore's staging directory, a download's scratch.

A work directory may have to live in a directory others can write (a ROOT shared with a group,
or its parent): they may rename anything in it and put a link of their own in its place, so
nothing may reach the work by a path through a name they can change. A work directory is two:
an outer one (0700, named for its process: :func:`temp_path_for`), which only its user can
list, and inside it the directory the work is done in, with a random name. Paths go through
that name, which nobody else can learn: a link planted in place of the outer directory leads
nowhere, and the work is not redirected. What is done by descriptor (the moves of a restore)
needs no name at all.

The outer directory also holds a token, a file that names it: a sweep removes only the work
directory of a dead process that has its token, never a directory of this user's that someone
renamed to look like one.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
from collections.abc import Callable, Iterator
from pathlib import Path

from hotcopy.coordinator._paths import dir_mode_in
from hotcopy.storage._durable import TEMP_MARK, is_abandoned_temp, temp_path_for, write_all
from hotcopy.storage._files import make_directory

_TOKEN = ".hotcopy-work"
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class WorkDirectory:
    """A work directory in the directory ``parent`` (open as ``parent_fd``, which the caller
    keeps open while this one lives): work in :attr:`path`, or through :attr:`fd`."""

    def __init__(self, parent: Path, parent_fd: int, base: str) -> None:
        """Make one named for ``base`` (and this process). The inner directory gets the mode
        (and group) ``parent``'s policy gives a directory made in it."""
        self._parent_fd = parent_fd
        self.outer_name = temp_path_for(parent / base).name
        os.mkdir(self.outer_name, 0o700, dir_fd=parent_fd)
        self.outer_fd = os.open(self.outer_name, _DIRECTORY, dir_fd=parent_fd)
        # Others who may write in ``parent`` may have exchanged the new directory for one of
        # ours between the two calls: what is opened must be ours and empty, as made.
        if os.fstat(self.outer_fd).st_uid != os.geteuid() or os.listdir(self.outer_fd):
            os.close(self.outer_fd)
            raise FileExistsError(
                errno.EEXIST,
                "a work directory was replaced as it was made (by another user who may write "
                "there?); nothing was done in it",
                str(parent / self.outer_name),
            )
        policy = os.fstat(parent_fd)
        # Set-group-ID kept, so that the inner directory gets the shared group as it would in
        # ``parent``; nobody but its user can list or enter it.
        os.fchmod(self.outer_fd, 0o700 | (policy.st_mode & stat.S_ISGID))
        token = os.open(
            _TOKEN,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
            dir_fd=self.outer_fd,
        )
        try:
            write_all(token, self.outer_name.encode())
        finally:
            os.close(token)
        self.name = os.urandom(16).hex()
        os.mkdir(self.name, 0o700, dir_fd=self.outer_fd)
        self.fd = os.open(self.name, _DIRECTORY, dir_fd=self.outer_fd)
        os.fchmod(self.fd, dir_mode_in(policy))
        self.path = parent / self.outer_name / self.name

    def remove(self) -> None:
        """Remove what is left of it (the inner directory, unless it was renamed away)."""
        _remove(self._parent_fd, self.outer_name, self.outer_fd)

    def close(self) -> None:
        os.close(self.fd)
        os.close(self.outer_fd)


@contextlib.contextmanager
def opened_directory(path: Path) -> Iterator[int]:
    """A descriptor of the directory ``path`` (its last component not followed)."""
    fd = os.open(path, _DIRECTORY)
    try:
        yield fd
    finally:
        os.close(fd)


@contextlib.contextmanager
def work_directory(parent: Path, base: str) -> Iterator[WorkDirectory]:
    """A new work directory for ``base`` in ``parent`` (made if missing), removed when the
    block ends; those of dead processes are swept first."""
    make_directory(parent)
    with opened_directory(parent) as parent_fd:
        sweep_work_directories(parent, parent_fd, base)
        work = WorkDirectory(parent, parent_fd, base)
        try:
            yield work
        finally:
            work.remove()
            work.close()


def sweep_work_directories(
    parent: Path,
    parent_fd: int,
    base: str,
    before_removal: Callable[[int], None] | None = None,
) -> list[str]:
    """Remove the work directories for ``base`` in ``parent`` (open as ``parent_fd``) whose
    process died; ``before_removal`` gets each one's outer directory, open, first. Only this
    user's, 0700, holding its own token count; anything else is left alone."""
    removed = []
    for name in sorted(os.listdir(parent_fd)):
        if not name.startswith(base + TEMP_MARK) or not is_abandoned_temp(parent / name):
            continue
        try:
            fd = os.open(name, _DIRECTORY, dir_fd=parent_fd)
        except OSError:
            continue
        try:
            if not _is_work_directory(fd, name):
                continue
            if before_removal is not None:
                before_removal(fd)
            if _remove(parent_fd, name, fd):
                removed.append(str(parent / name))
        finally:
            os.close(fd)
    return removed


def remove_work_directory(path: Path) -> None:
    """Remove the work directory whose :attr:`WorkDirectory.path` is ``path`` (by a process
    that no longer holds it open), if it is one."""
    outer = path.parent
    with contextlib.suppress(OSError), opened_directory(outer.parent) as parent_fd:
        fd = os.open(outer.name, _DIRECTORY, dir_fd=parent_fd)
        try:
            if _is_work_directory(fd, outer.name):
                _remove(parent_fd, outer.name, fd)
        finally:
            os.close(fd)


def _remove(parent_fd: int, name: str, fd: int) -> bool:
    """Empty the work directory ``fd``, then remove it if it is still ``parent_fd``'s entry
    ``name``; whether it was removed."""
    with contextlib.suppress(OSError):
        _empty(fd)
        if same_directory(parent_fd, name, fd):
            os.rmdir(name, dir_fd=parent_fd)
            return True
    return False


def _is_work_directory(fd: int, name: str) -> bool:
    """Whether the directory ``fd`` (named ``name``) is a work directory of this user's."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        return False
    try:
        token = os.open(_TOKEN, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
    except OSError:
        return False
    try:
        if not stat.S_ISREG(os.fstat(token).st_mode):
            return False
        return os.read(token, len(name) + 1) == name.encode()
    finally:
        os.close(token)


def same_directory(parent: int, name: str, directory: int) -> bool:
    """Whether the entry ``name`` of ``parent`` is the open ``directory`` itself."""
    try:
        entry = os.stat(name, dir_fd=parent, follow_symlinks=False)
    except FileNotFoundError:
        return False
    held = os.fstat(directory)
    return (entry.st_dev, entry.st_ino) == (held.st_dev, held.st_ino)


def remove_entry(fd: int, name: str, inode: int | None = None) -> None:
    """Remove the entry ``name`` of the directory ``fd``: a file, a link, or a tree; with
    ``inode``, only if it is that one. A tree is emptied through a descriptor of its own
    and removed by name only if the name still leads to it, so that an exchange of names
    meanwhile (``renameat2``) never removes another directory's contents."""
    try:
        info = os.stat(name, dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if inode is not None and info.st_ino != inode:
        return
    if not stat.S_ISDIR(info.st_mode):
        os.unlink(name, dir_fd=fd)
        return
    tree = os.open(name, _DIRECTORY, dir_fd=fd)
    try:
        if inode is not None and os.fstat(tree).st_ino != inode:
            return
        for entry in os.listdir(tree):
            with contextlib.suppress(FileNotFoundError):
                _remove_within(tree, entry)
        if same_directory(fd, name, tree):
            os.rmdir(name, dir_fd=fd)
    finally:
        os.close(tree)


def _remove_within(fd: int, name: str) -> None:
    if stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
        shutil.rmtree(name, dir_fd=fd)
    else:
        os.unlink(name, dir_fd=fd)


def _empty(fd: int) -> None:
    for name in os.listdir(fd):
        remove_entry(fd, name)
