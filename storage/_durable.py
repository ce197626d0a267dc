"""Durable file creation, written once and used by every path that creates a file.

A file is written to a temp beside it, ``DEST.hotcopy-tmp-<pid>-<start>-<rand>``, created
``O_EXCL`` relative to a descriptor of the directory (so no link is followed and the directory
cannot be swapped under us) with the directory's policy mode, fsynced, moved into place
(``os.replace``, or ``os.link`` when the destination must not exist yet), and the directory is
fsynced so the new name survives a power cut. A failure removes the temp.

Only temps provably ours are ever swept: a name of exactly this form (no user file is named
``*.hotcopy-tmp-<digits>-<digits>-<8 hex>``), owned by this user, a regular file (or a directory,
for a restore's staging directory), and whose creator, named in it by (pid, start time), is
dead; anything else stays where it is. :func:`temps_of` lists the temps of one destination
whatever their creator's state, for a caller that knows better than the process table (e.g.
fencing a stopped writer).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

from hotcopy.coordinator._process import ProcessIdentity, own_pid

from ._errors import NotEnoughSpace, SyncFailed
from ._faults import fsync_fault
from ._files import open_regular_at

TEMP_MARK = ".hotcopy-tmp-"
# At most 13 + 7 + 1 + 11 + 1 + 8 = 41 characters: with a 200-character prefix name and
# ".hc-wal", a temp name still fits in NAME_MAX (255).
_TEMP_RE = re.compile(r"\.hotcopy-tmp-(\d+)-(\d+)-[0-9a-f]{8}$")
_DIRECTORY = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


_OWN: ProcessIdentity | None = None


def _own_identity() -> tuple[int, int]:
    global _OWN
    if _OWN is None or _OWN.pid != own_pid():  # recomputed after fork
        _OWN = ProcessIdentity.current()
    return _OWN.pid, _OWN.start_ticks


def temp_path_for(dest: Path) -> Path:
    """A fresh temp name beside ``dest`` that names this process."""
    pid, ticks = _own_identity()
    return dest.with_name(f"{dest.name}{TEMP_MARK}{pid}-{ticks}-{os.urandom(4).hex()}")


def sync_file(
    fd: int, what: str | os.PathLike[str], *, data_only: bool = False, fault_point: str = ""
) -> None:
    """``fsync`` (or ``fdatasync``) ``fd``, the one way hotcopy makes bytes durable.

    Raises:
        SyncFailed: the kernel reported a writeback error. Linux reports one only once and may
            have dropped the unwritten pages meanwhile, so a later sync that succeeds proves
            nothing: whoever gets this must stop trusting what it wrote (see ``Log``).
    """
    try:
        if fault_point:
            fsync_fault(fault_point)
        (os.fdatasync if data_only else os.fsync)(fd)
    except OSError as err:
        raise SyncFailed(
            f"fsync of {what} failed: {os.strerror(err.errno or 0)}; what was written since "
            "the last successful fsync may be lost",
            path=str(what),
            errno=err.errno,
        ) from err


def fsync_dir(directory: Path) -> None:
    """Make entries created, renamed or removed in ``directory`` durable."""
    fd = os.open(directory, _DIRECTORY)
    try:
        sync_file(fd, directory)
    finally:
        os.close(fd)


def _raise_if_out_of_space(err: OSError, dest: Path) -> None:
    """``err`` as :class:`NotEnoughSpace` naming ``dest``, if it is the file system's (or the
    user's quota's) lack of space or inodes: the free space checked before, if it was, went to
    someone else meanwhile."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        raise NotEnoughSpace(
            f"{dest} could not be written: its file system ran out of space "
            f"({os.strerror(err.errno)}); its temp file is removed",
            path=str(dest),
            errno=err.errno,
        ) from err


def write_durably(
    dest: Path,
    content: bytes | Callable[[int], None],
    *,
    overwrite: bool = True,
    sync: bool = True,
    before_rename: Callable[[], None] | None = None,
    directory: int | None = None,
) -> None:
    """Create ``dest`` atomically and durably, with its directory's policy mode (0600 unless
    the directory is shared with its group: see ``hotcopy.coordinator._paths.file_mode_in``).

    Args:
        dest: Final path.
        content: The bytes, or a function that writes them to the given file descriptor.
        overwrite: Replace an existing ``dest``; when False an existing ``dest`` raises
            ``FileExistsError`` and is left untouched (the link is the atomic existence check).
        sync: Skip both fsyncs when False: only for a caller that makes many files durable at
            once with :func:`sync_filesystem` before anything refers to them (a backup, whose
            manifest is written last).
        before_rename: Called when the temp is complete, just before it is moved into place;
            what it raises removes the temp. A writer whose right to replace ``dest`` may lapse
            (a lease) checks it here; a successor that fenced it removes its temps
            (:func:`remove_temps_of`), so a check that passed before the lapse cannot be
            followed by a rename after the successor's takeover (the rename finds no temp).
        directory: ``dest``'s directory, open: it is written there even if the path to it
            leads elsewhere by now.
    """
    dir_fd = os.open(dest.parent, _DIRECTORY) if directory is None else os.dup(directory)
    try:
        temp = temp_path_for(dest)
        try:
            fd = open_regular_at(dir_fd, temp.name, os.O_RDWR | os.O_CREAT | os.O_EXCL, path=temp)
        except OSError as err:
            _raise_if_out_of_space(err, dest)  # no inode left for the temp
            raise
        try:
            try:
                if isinstance(content, bytes | bytearray | memoryview):
                    write_all(fd, content)
                else:
                    content(fd)
                if sync:
                    sync_file(fd, dest)
            finally:
                os.close(fd)
            if before_rename is not None:
                before_rename()
            if overwrite:
                os.replace(temp.name, dest.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            else:
                os.link(
                    temp.name,
                    dest.name,
                    src_dir_fd=dir_fd,
                    dst_dir_fd=dir_fd,
                    follow_symlinks=False,
                )
                os.unlink(temp.name, dir_fd=dir_fd)
        except BaseException as err:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(temp.name, dir_fd=dir_fd)
            if isinstance(err, OSError):
                _raise_if_out_of_space(err, dest)
            raise
        if sync:
            sync_file(dir_fd, dest.parent)
    finally:
        os.close(dir_fd)


def sync_filesystem(path: Path | int) -> None:
    """Make everything written to the file system holding ``path`` (or the open file
    ``path``) durable (``syncfs(2)``)."""
    fd = os.dup(path) if isinstance(path, int) else os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()  # no syncfs here: flush every file system instead
    finally:
        os.close(fd)


def libc_function(name: str, *argtypes: type) -> Callable[..., int] | None:
    """The C library's ``name`` returning an ``int`` (errno kept), or None where it has none.

    The symbols come from the process itself (``CDLL(None)``), which links the C library:
    ``ctypes.util.find_library`` would cost every process that imports hotcopy 2 MiB of
    modules to find the same file."""
    try:
        function = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    function.argtypes = argtypes
    function.restype = ctypes.c_int
    return function  # type: ignore[no-any-return]


_syncfs = libc_function("syncfs", ctypes.c_int)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a write may be short)."""
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def pwrite_all(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """``os.pwrite`` until every byte is written at ``offset``; a zero-byte write is EIO."""
    done = os.pwrite(fd, data, offset)  # nearly always all of it (EINTR is retried: PEP 475)
    if done < len(data):
        view = memoryview(data)
        while done < len(view):
            written = os.pwrite(fd, view[done:], offset + done)
            if written == 0:
                raise OSError(errno.EIO, "pwrite wrote nothing")
            done += written


def sweep_stale_temps(directory: Path) -> list[Path]:
    """Remove the temp files of ``directory`` that are provably ours and abandoned
    (:func:`is_abandoned_temp`); return what was removed. Anything else stays."""
    removed: list[Path] = []
    try:
        dir_fd = os.open(directory, _DIRECTORY)
    except FileNotFoundError:
        return removed
    try:
        for name in os.listdir(dir_fd):
            info = _our_temp(dir_fd, name)
            if info is None or not stat.S_ISREG(info.st_mode) or not _creator_dead(name):
                continue  # not ours, or its writer is alive and may still rename it into place
            try:
                os.unlink(name, dir_fd=dir_fd)
            except OSError as err:
                if err.errno != errno.ENOENT:
                    raise
            else:
                removed.append(directory / name)
    finally:
        os.close(dir_fd)
    return removed


def is_abandoned_temp(path: Path) -> bool:
    """Whether ``path`` is a temp (:func:`temp_path_for`) that this user made, a regular file
    or a directory, and whose creator is gone: the only kind of file hotcopy deletes unasked."""
    info = _our_temp(None, str(path))
    return (
        info is not None
        and (stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode))
        and _creator_dead(path.name)
    )


def temps_of(dest: Path) -> list[Path]:
    """The temps of ``dest`` in its directory that this user made, whatever their creator's
    state (a caller that has fenced their creator may remove them)."""
    try:
        names = os.listdir(dest.parent)
    except FileNotFoundError:
        return []
    found = []
    for name in sorted(names):
        if name.startswith(dest.name + TEMP_MARK) and _our_temp(None, str(dest.parent / name)):
            found.append(dest.parent / name)
    return found


def remove_temps_of(dest: Path) -> None:
    """Remove every temp of ``dest`` this user made, whether its writer is alive or not: for a
    successor fencing a writer that lost its lease, which may still be about to rename one of
    them over ``dest`` (see ``write_durably``'s ``before_rename``)."""
    for temp in temps_of(dest):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)


def is_temp_name(name: str) -> bool:
    """Whether ``name`` has the form of a temp's name (:func:`temp_path_for`), whoever made it."""
    return _TEMP_RE.search(name) is not None


def _our_temp(dir_fd: int | None, name: str) -> os.stat_result | None:
    """The ``lstat`` of ``name`` if it has a temp's name and is this user's, else None."""
    if not is_temp_name(name):
        return None
    try:
        info = os.lstat(name, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    return info if info.st_uid == os.geteuid() else None


def _creator_dead(name: str) -> bool:
    match = _TEMP_RE.search(name)
    assert match is not None
    writer = ProcessIdentity.of(int(match.group(1)))
    return writer is None or writer.start_ticks != int(match.group(2))
