"""Hot copy of a prefix (the snapshot protocol of DESIGN.md) and restore of such a copy.

copy_prefix: hold a ``snapshot`` lease for the whole copy (so nothing may replace the main
file), take the ``write`` lease only for the checkpoint that fixes the cut ``[0, L)`` at commit
``S``, then byte-copy that range while writers go on appending beyond ``L``. The copy gets a fresh
salt in its header, so a WAL of the live prefix is never applied to it once it is restored.
"""

from __future__ import annotations

import errno
import os
import secrets
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import _format as fmt
from ._durable import sweep_stale_temps, write_durably
from ._errors import (
    CorruptFileError,
    DestinationExists,
    NotEnoughSpace,
    PrefixNotFound,
    SameFileError,
    StorageError,
)
from ._prefix import Cut, Prefix, wal_path
from ._verify import verify_file

if TYPE_CHECKING:
    from ._repository import Repository

DEFAULT_STEP = 4 << 20
Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class CopyResult:
    """What a copy holds: exactly commit ``seq`` of ``prefix``, ``length`` bytes."""

    path: str
    prefix: str
    length: int
    seq: int
    file_id: str  # hex; the same for every copy of one main file until it is rewritten
    crc32: int  # of the destination file's bytes
    seconds: float


def copy_prefix(
    repo: Repository,
    dest: str | os.PathLike[str],
    prefix: str,
    page_io_step_size: int = DEFAULT_STEP,
    progress: Progress | None = None,
) -> CopyResult:
    """Write a consistent, standalone copy of ``prefix`` to the new file ``dest``."""
    began = time.monotonic()
    if page_io_step_size <= 0:
        raise ValueError(f"page_io_step_size must be positive, not {page_io_step_size}")
    source = repo.prefix_path(prefix)
    if not source.exists():
        raise PrefixNotFound(f"prefix {prefix!r} does not exist in {repo.root}", prefix=prefix)
    dest = Path(dest).absolute()
    check_destination(source, dest)
    sweep_stale_temps(dest.parent)
    with repo.leases.lease(prefix, "snapshot", timeout=repo.lease_timeout) as _snapshot:
        cut, src_fd = _checkpoint_and_open(repo, prefix)
        try:
            _check_free_space(dest.parent, cut.length)
            header = fmt.unpack_main_header(os.pread(src_fd, fmt.HEADER_SIZE, 0))
            fresh = fmt.pack_main_header(replace(header, salt=secrets.randbits(64)))
            crc = 0

            def write(out_fd: int) -> None:
                nonlocal crc
                crc = copy_range(
                    src_fd,
                    out_fd,
                    fmt.HEADER_SIZE,
                    cut.length,
                    page_io_step_size,
                    progress,
                    first=fresh,
                )

            write_durably(dest, write, overwrite=False)
        finally:
            os.close(src_fd)
    return CopyResult(
        str(dest), prefix, cut.length, cut.seq, cut.file_id.hex(), crc, time.monotonic() - began
    )


def check_destination(source: Path, dest: Path) -> None:
    """Refuse a destination that is the source, exists, or has no directory; touch nothing."""
    try:
        dest_stat = os.stat(dest)  # follows symlinks: a link to the source is the source
    except FileNotFoundError:
        dest_stat = None
    if dest_stat is not None:
        source_stat = os.stat(source)
        if (dest_stat.st_dev, dest_stat.st_ino) == (source_stat.st_dev, source_stat.st_ino):
            raise SameFileError(
                f"destination {dest} is the prefix's own main file; copy it somewhere else",
                path=str(dest),
            )
        raise DestinationExists(
            f"destination {dest} exists; remove it or choose another name", path=str(dest)
        )
    if os.path.lexists(dest):
        raise DestinationExists(f"destination {dest} is a dangling symlink", path=str(dest))
    if not dest.parent.is_dir():
        raise StorageError(
            f"destination directory {dest.parent} does not exist; create it first",
            path=str(dest),
        )


def _check_free_space(directory: Path, needed: int) -> None:
    stat = os.statvfs(directory)
    free = stat.f_bavail * stat.f_frsize
    if free < needed:
        raise NotEnoughSpace(
            f"{directory} has {free} bytes free; the copy needs {needed}",
            path=str(directory),
            needed=needed,
            free=free,
        )


def _checkpoint_and_open(repo: Repository, name: str) -> tuple[Cut, int]:
    """Checkpoint under the write lease and open the main file the cut belongs to."""
    open_prefix = repo.open_prefixes().get(name)
    if open_prefix is not None and open_prefix.mode == "rw":
        # Our own open prefix may hold the write lease (a transaction in progress): use it.
        return open_prefix.checkpoint_and_open()
    with Prefix(
        repo.root,
        name,
        "rw",
        repo.leases,
        repo.runtime_dir,
        lease_timeout=repo.lease_timeout,
    ) as prefix:
        return prefix.checkpoint_and_open()


def copy_range(
    src_fd: int,
    out_fd: int,
    start: int,
    end: int,
    step: int,
    progress: Progress | None = None,
    *,
    first: bytes = b"",
) -> int:
    """Copy ``first`` then bytes ``[start, end)`` of ``src_fd`` to ``out_fd``; return the CRC32.

    The bytes move by ``copy_file_range`` (in the kernel) where the file systems allow it,
    ``step`` bytes at a time; each step is read back from the page cache for the checksum.
    """
    crc = zlib.crc32(first)
    if first:
        _write_all(out_fd, first)
    total = end - start
    out_offset = len(first)
    kernel_copy = True
    done = 0
    while done < total:
        size = min(step, total - done)
        copied = 0
        if kernel_copy:
            try:
                copied = os.copy_file_range(src_fd, out_fd, size, start + done, out_offset + done)
            except OSError as err:
                if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                kernel_copy = False
        if kernel_copy:
            if copied == 0:
                raise CorruptFileError(
                    f"source ended at {start + done}, before the cut at {end}", offset=start + done
                )
            chunk = os.pread(src_fd, copied, start + done)
        else:
            chunk = os.pread(src_fd, size, start + done)
            if not chunk:
                raise CorruptFileError(
                    f"source ended at {start + done}, before the cut at {end}", offset=start + done
                )
            os.lseek(out_fd, out_offset + done, os.SEEK_SET)
            _write_all(out_fd, chunk)
        crc = zlib.crc32(chunk, crc)
        done += len(chunk)
        if progress is not None:
            progress(len(first) + done, len(first) + total)
    return crc & 0xFFFFFFFF


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def restore_prefix_file(
    repo: Repository, source: str | os.PathLike[str], prefix: str, *, force: bool = False
) -> int:
    """Make the standalone copy ``source`` the content of ``prefix``; return its commit.

    The copy is verified completely first; nothing changes if it is damaged. The replacement
    happens under the prefix's ``exclusive`` lease, so no process of this repository reads half
    a restore, and gets a fresh salt and WAL so nothing of the old history is applied to it.
    """
    source = Path(source)
    report = verify_file(source)
    if not report.ok:
        raise CorruptFileError(
            f"{source} is damaged at offset {report.offset}: {report.error}; nothing restored",
            offset=report.offset,
        )
    target = repo.prefix_path(prefix)
    if target.exists() and not force:
        raise DestinationExists(
            f"prefix {prefix!r} exists in {repo.root}; use force to replace it", path=str(target)
        )
    with repo.leases.lease(prefix, "exclusive", timeout=repo.lease_timeout):
        src_fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
        try:
            header = fmt.unpack_main_header(os.pread(src_fd, fmt.HEADER_SIZE, 0))
            fresh_header = replace(header, salt=secrets.randbits(64))
            fresh = fmt.pack_main_header(fresh_header)
            _check_free_space(target.parent, report.size)

            def write(out_fd: int) -> None:
                copy_range(src_fd, out_fd, fmt.HEADER_SIZE, report.size, DEFAULT_STEP, first=fresh)

            write_durably(target, write)
        finally:
            os.close(src_fd)
        wal = fmt.WalHeader(fresh_header.file_id, fresh_header.salt, report.size, report.seq)
        write_durably(wal_path(repo.root, prefix), fmt.pack_wal_header(wal))
    return report.seq
