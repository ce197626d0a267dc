"""Durable file creation, written once and used by every path that creates a file.

A file is written to ``DEST.tmp-<pid>-<start>-<rand>`` opened ``O_EXCL``, fsynced, moved into
place (``os.replace``, or ``os.link`` when the destination must not exist yet), and the directory
is fsynced so the new name survives a power cut. A failure removes the temp. Temps whose creator
is dead are swept on open; the creator's (pid, start time) is in the name so a live writer's
temp is never taken for litter.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path

from hotcopy.coordinator._process import ProcessIdentity, own_pid

from ._errors import SyncFailed
from ._faults import fsync_fault

_TEMP_RE = re.compile(r"\.tmp-(\d+)-(\d+)-[0-9a-f]{8}$")


_OWN: ProcessIdentity | None = None


def _own_identity() -> tuple[int, int]:
    global _OWN
    if _OWN is None or _OWN.pid != own_pid():  # recomputed after fork
        _OWN = ProcessIdentity.current()
    return _OWN.pid, _OWN.start_ticks


def temp_path_for(dest: Path) -> Path:
    """A fresh temp name beside ``dest`` that names this process."""
    pid, ticks = _own_identity()
    return dest.with_name(f"{dest.name}.tmp-{pid}-{ticks}-{secrets.token_hex(4)}")


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
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        sync_file(fd, directory)
    finally:
        os.close(fd)


def write_durably(
    dest: Path,
    content: bytes | Callable[[int], None],
    *,
    overwrite: bool = True,
    mode: int = 0o644,
    sync: bool = True,
    before_rename: Callable[[], None] | None = None,
) -> None:
    """Create ``dest`` atomically and durably.

    Args:
        dest: Final path.
        content: The bytes, or a function that writes them to the given file descriptor.
        overwrite: Replace an existing ``dest``; when False an existing ``dest`` raises
            ``FileExistsError`` and is left untouched (the link is the atomic existence check).
        mode: Permission bits of the new file.
        sync: Skip both fsyncs when False: only for a caller that makes many files durable at
            once with :func:`sync_filesystem` before anything refers to them (a backup, whose
            manifest is written last).
        before_rename: Called when the temp is complete, just before it is moved into place;
            what it raises removes the temp. A writer whose right to replace ``dest`` may lapse
            (a lease) checks it here; a successor that fenced it removes its temps
            (:func:`remove_temps_of`), so a check that passed before the lapse cannot be
            followed by a rename after the successor's takeover (the rename finds no temp).
    """
    temp = temp_path_for(dest)
    fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
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
            os.replace(temp, dest)
        else:
            os.link(temp, dest)
            os.unlink(temp)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    if sync:
        fsync_dir(dest.parent)


def sync_filesystem(path: Path) -> None:
    """Make everything written to the file system holding ``path`` durable (``syncfs(2)``)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if _syncfs is None or _syncfs(fd) != 0:
            os.sync()  # no syncfs here: flush every file system instead
    finally:
        os.close(fd)


def _load_syncfs() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        function = libc.syncfs
    except (OSError, AttributeError):
        return None
    function.argtypes = (ctypes.c_int,)
    function.restype = ctypes.c_int
    return function


_syncfs = _load_syncfs()


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
    """Remove temps left by dead processes in ``directory``; return what was removed."""
    removed: list[Path] = []
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return removed
    for name in names:
        if not is_abandoned_temp(name):
            continue  # not a temp, or its writer is alive and may still rename it into place
        path = directory / name
        try:
            os.unlink(path)
        except OSError as err:
            if err.errno != errno.ENOENT:
                raise
        else:
            removed.append(path)
    return removed


def remove_temps_of(dest: Path) -> None:
    """Remove every temp of ``dest`` made by this user, whether its writer is alive or not.

    For a successor fencing a writer that lost its lease: that writer may still be about to
    rename one of these over ``dest`` (see ``write_durably``'s ``before_rename``).
    """
    stem = f"{dest.name}.tmp-"
    uid = os.getuid()
    for name in os.listdir(dest.parent):
        if name.startswith(stem) and _TEMP_RE.search(name):
            path = dest.parent / name
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_uid == uid:
                    os.unlink(path)


def is_abandoned_temp(name: str) -> bool:
    """Whether ``name`` is a temp name (:func:`temp_path_for`) whose creator is gone."""
    match = _TEMP_RE.search(name)
    if match is None:
        return False
    writer = ProcessIdentity.of(int(match.group(1)))
    return writer is None or writer.start_ticks != int(match.group(2))
