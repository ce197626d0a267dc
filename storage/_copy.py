"""Hot copies of a prefix (the snapshot protocol of DESIGN.md) and restores from them.

A snapshot holds a ``snapshot`` lease for its whole length (so nothing may replace the main
file), takes the ``write`` lease only for the checkpoint that fixes the cut ``[0, L)`` at commit
``S``, then byte-copies while writers go on appending beyond ``L``.

A *full* copy is ``[0, L)`` with a fresh salt in its header, so a WAL of the live prefix is never
applied to it once restored. A *delta* is the raw bytes ``[L_prev, L)``: valid only while the
main file is the very one the base was cut from (same file id and salt, the same bytes at the
boundary), because the main file is append-only between rewrites (invariant 2). A restore
concatenates a full copy and its deltas, checking every piece's checksum and then the whole
result before it replaces anything.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import sys
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import _format as fmt
from ._checkpoint import checkpoint_cut
from ._durable import pwrite_all, sweep_stale_temps, write_all, write_durably
from ._errors import (
    CorruptFileError,
    DestinationExists,
    NotEnoughSpace,
    PrefixNotFound,
    SameFileError,
    StorageError,
)
from ._files import open_regular
from ._prefix import DEFAULT_LEASE_TTL, Cut, Prefix, _fault, wal_path
from ._verify import VerifyReport, verify_fd
from ._writeback import Writeback

if TYPE_CHECKING:
    from ._repository import Repository

DEFAULT_STEP = 4 << 20
Progress = Callable[[int, int], None]
_THREAD_ABOVE = 16 << 20
_UNSYNCED_DEPTH = 8  # writeback pieces in flight for a copy that is not fsynced
_CHECKSUM_NICE = 10
_BOUNDARY_PROBE = fmt.TRAILER_SIZE  # the bytes just before a cut: the trailer closing it


@dataclass(frozen=True)
class BaseRef:
    """Where a previous snapshot of a prefix ended, to take a delta from."""

    file_id: str  # hex, of the source main file
    salt: int  # of the source main file (a restore or rewrite changes it)
    end: int
    boundary_crc: int  # CRC32 of the source bytes [end - 32, end)


@dataclass(frozen=True)
class CopyResult:
    """One snapshot file: a full copy (``start == 0``) or the delta ``[start, length)``."""

    path: str
    prefix: str
    kind: str  # "full" or "delta"
    start: int
    length: int  # the cut L: the copy holds exactly commit ``seq``
    seq: int
    file_id: str  # hex; the same for every copy of one main file until it is rewritten
    salt: int  # of the source main file
    size: int  # bytes written to ``path``
    crc32: int  # of the bytes of ``path``
    boundary_crc: int  # CRC32 of the source bytes [length - 32, length)
    seconds: float
    # Of ``seconds``, the time the cut waited for the write lease and then held it for the
    # checkpoint: writers wait at most this long for the copy (0.0 when the caller cut).
    cut_seconds: float = 0.0

    def base_ref(self) -> BaseRef:
        return BaseRef(self.file_id, self.salt, self.length, self.boundary_crc)


def copy_prefix(
    repo: Repository,
    dest: str | os.PathLike[str],
    prefix: str,
    page_io_step_size: int = DEFAULT_STEP,
    progress: Progress | None = None,
    *,
    base: BaseRef | None = None,
    cut: Cut | None = None,
    sync: bool = True,
    sweep_temps: bool = True,
) -> CopyResult:
    """Write a consistent snapshot of ``prefix`` to the new file ``dest``.

    With ``base``, write only the bytes appended since that earlier snapshot when the main
    file is still the one it was cut from; otherwise (and without ``base``) a full copy.
    With ``cut``, copy up to a cut the caller already took and protects (it holds the
    prefix's snapshot lease, as a consistent multi-prefix backup does): no lease, no checkpoint.
    With ``sync=False`` the copy is not fsynced: the caller syncs the file system before it
    relies on the copy (a backup does, once, before its manifest).
    With ``sweep_temps=False`` temps left in ``dest``'s directory by dead processes stay: for a
    caller that sweeps once after many copies into one directory (a backup does).
    """
    began = time.monotonic()
    if page_io_step_size <= 0:
        raise ValueError(f"page_io_step_size must be positive, not {page_io_step_size}")
    source = repo.prefix_path(prefix)
    if not source.exists():
        raise PrefixNotFound(f"prefix {prefix!r} does not exist in {repo.root}", prefix=prefix)
    dest = Path(dest).absolute()
    check_destination(source, dest)
    if sweep_temps:
        sweep_stale_temps(dest.parent)
    with contextlib.ExitStack() as stack:
        if cut is None:
            stack.enter_context(repo.leases.lease(prefix, "snapshot", timeout=repo.lease_timeout))
            # Under the snapshot lease the main file only grows, so its size now is a lower
            # bound of what the copy needs: refuse a copy that cannot fit before the checkpoint
            # changes the source's files (the exact check follows once the cut is known).
            least = source.stat().st_size - (base.end if base is not None else 0)
            _check_free_space(dest.parent, max(least, 0))
            cut, src_fd, unparsed, cut_seconds = _checkpoint_and_open(repo, prefix)
        else:
            src_fd, unparsed = _open_at_cut(source, cut), None
            cut_seconds = 0.0
        try:
            header = fmt.unpack_main_header(os.pread(src_fd, fmt.HEADER_SIZE, 0))
            boundary_crc = _crc_before(src_fd, cut.length)
            start = _delta_start(src_fd, header, cut, base)
            if unparsed is not None and start < unparsed.length:
                _check_segments(src_fd, prefix, max(start, fmt.HEADER_SIZE), unparsed)
            _check_free_space(dest.parent, cut.length - start)
            crc = 0

            def write(out_fd: int) -> None:
                nonlocal crc
                if start == 0:
                    fresh = fmt.pack_main_header(replace(header, salt=secrets.randbits(64)))
                    write_all(out_fd, fresh)
                    crc = zlib.crc32(fresh)
                    first = fmt.HEADER_SIZE
                else:
                    first = start
                crc = copy_range(
                    src_fd,
                    out_fd,
                    first,
                    cut.length,
                    page_io_step_size,
                    progress,
                    crc=crc,
                    sync=sync,
                )

            write_durably(dest, write, overwrite=False, sync=sync)
        finally:
            os.close(src_fd)
    return CopyResult(
        path=str(dest),
        prefix=prefix,
        kind="full" if start == 0 else "delta",
        start=start,
        length=cut.length,
        seq=cut.seq,
        file_id=header.file_id.hex(),
        salt=header.salt,
        size=cut.length - start,
        crc32=crc,
        boundary_crc=boundary_crc,
        seconds=time.monotonic() - began,
        cut_seconds=cut_seconds,
    )


def _open_at_cut(source: Path, cut: Cut) -> int:
    fd = os.open(source, os.O_RDONLY | os.O_CLOEXEC)
    header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    if header.file_id != cut.file_id or os.fstat(fd).st_size < cut.length:
        os.close(fd)
        raise StorageError(
            f"{source} is no longer the file the cut was taken from (was the prefix replaced "
            "without the snapshot lease held?)",
            path=str(source),
        )
    return fd


def _delta_start(src_fd: int, header: fmt.MainHeader, cut: Cut, base: BaseRef | None) -> int:
    """``base.end`` when the bytes before it are still the ones the base saw, else 0 (full)."""
    if (
        base is None
        or base.file_id != header.file_id.hex()
        or base.salt != header.salt
        or not fmt.HEADER_SIZE < base.end <= cut.length
        or _crc_before(src_fd, base.end) != base.boundary_crc
    ):
        return 0
    return base.end


def _crc_before(fd: int, end: int) -> int:
    start = max(end - _BOUNDARY_PROBE, 0)
    return zlib.crc32(os.pread(fd, end - start, start)) & 0xFFFFFFFF


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


def _checkpoint_and_open(repo: Repository, name: str) -> tuple[Cut, int, Cut | None, float]:
    """Checkpoint under the write lease and open the main file the cut belongs to; the part
    of the file that was not parsed on the way, up to a cut (None: all of it was; a
    :class:`Prefix` view parses every segment to build its key index, the plain checkpoint
    only the WAL batches it appends); and the seconds the cut waited for and held the write
    lease."""
    began = time.monotonic()
    open_prefix = repo.open_prefixes().get(name)
    if open_prefix is not None and open_prefix.mode == "rw":
        # Our own open prefix may hold the write lease (a transaction in progress): use it.
        return *open_prefix.checkpoint_and_open(), None, time.monotonic() - began
    plain = checkpoint_cut(
        repo.root,
        name,
        repo.leases,
        repo.runtime_dir,
        lease_timeout=repo.lease_timeout,
        lease_ttl=DEFAULT_LEASE_TTL,
    )
    if plain is not None:
        cut, unparsed, fd, lease_seconds = plain
        return cut, fd, unparsed, lease_seconds
    began = time.monotonic()  # an upper bound: opening the Prefix is not under the lease
    with Prefix(
        repo.root,
        name,
        "rw",
        repo.leases,
        repo.runtime_dir,
        lease_timeout=repo.lease_timeout,
    ) as prefix:
        return *prefix.checkpoint_and_open(), None, time.monotonic() - began


def _check_segments(fd: int, prefix: str, start: int, cut: Cut) -> None:
    """Refuse to copy ``[start, cut.length)`` unless it parses as whole segments ending at
    commit ``cut.seq``: a copy never records damaged metadata as a good snapshot. Values are
    skipped, as when a prefix opens (each carries its CRC, checked when read and by verify)."""
    reader = fmt.FileReader(fd, start, cut.length, chunk=fmt.FileReader.SMALL)
    seq: int | None = None
    while reader.pos < cut.length:
        at = reader.pos
        segment = fmt.read_segment(reader, load_values=False)
        if segment is None or (seq is not None and segment.batches[0].seq != seq + 1):
            raise CorruptFileError(
                f"prefix {prefix!r}: the main file is damaged at offset {at}; nothing copied. "
                "Run `hotcopy verify` on the repository and restore the prefix from a backup",
                prefix=prefix,
                offset=at,
            )
        seq = segment.last_seq
    if seq is not None and seq != cut.seq:
        raise CorruptFileError(
            f"prefix {prefix!r}: the main file holds commit {seq} at offset {cut.length}, "
            f"not {cut.seq}; nothing copied",
            prefix=prefix,
            offset=cut.length,
        )


def copy_range(
    src_fd: int,
    out_fd: int,
    start: int,
    end: int,
    step: int = DEFAULT_STEP,
    progress: Progress | None = None,
    *,
    crc: int = 0,
    sync: bool = True,
    paced: bool = True,
) -> int:
    """Append bytes ``[start, end)`` of ``src_fd`` to ``out_fd`` durably; return ``crc`` extended.

    The bytes move by ``copy_file_range`` (in the kernel) where the file systems allow it,
    ``step`` bytes at a time. Two things keep this close to ``cp`` + ``sync`` and gentle on live
    writers: the checksum is computed by a thread reading the (immutable) source range while
    the copy and its fsync run, and writeback of each copied step starts at once, so the final
    fsync is small and never holds the file system's journal for long behind a whole copy.
    With ``paced=False`` (no writer can be waiting, and the caller syncs later) the copy is
    left to the page cache as ``cp`` leaves it, where reading it back costs no disk read.
    """
    out_offset = os.fstat(out_fd).st_size
    total = end - start
    # A thread pays for itself only on copies long enough for the overlap to matter.
    checksum = _SourceChecksum(src_fd, start, end, crc, threaded=total >= _THREAD_ABOVE)
    # A copy that is not fsynced is one of the many of a backup, which syncs the file system
    # once before its manifest: waiting for each small file's first piece made a backup of
    # 1 MiB prefixes wait ~1.5 ms per prefix on the disk's latency. Its writeback still
    # starts at once, with more in flight.
    writeback: Writeback | None = None
    if paced:
        writeback = Writeback(out_fd) if sync else Writeback(out_fd, depth=_UNSYNCED_DEPTH)
    try:
        kernel_copy = True
        done = 0
        while done < total:
            size = min(step, total - done)
            copied = 0
            if kernel_copy:
                try:
                    copied = os.copy_file_range(
                        src_fd, out_fd, size, start + done, out_offset + done
                    )
                except OSError as err:
                    if err.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                        raise
                    kernel_copy = False
            if not kernel_copy:
                chunk = os.pread(src_fd, size, start + done)
                pwrite_all(out_fd, chunk, out_offset + done)
                copied = len(chunk)
            if copied == 0:
                raise CorruptFileError(
                    f"source ended at {start + done}, before {end}", offset=start + done
                )
            if writeback is not None:
                writeback.wrote(out_offset + done, copied)
            done += copied
            _fault("copy:after-step")
            if progress is not None:
                progress(done, total)
        if sync:
            os.fdatasync(out_fd)
    finally:
        result = checksum.result()
    return result


class _SourceChecksum:
    """CRC32 of a source range, computed by a thread (zlib releases the GIL on large data)
    while the copy runs, or in :meth:`result` when not ``threaded``."""

    def __init__(self, fd: int, start: int, end: int, crc: int, *, threaded: bool) -> None:
        self._fd = os.dup(fd)  # ours to close, whatever the caller does with theirs
        self._start, self._end = start, end
        self._crc = crc
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="hotcopy-crc", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self._thread is not None:
            _yield_cpu_to_others()
        try:
            pos = self._start
            while pos < self._end:
                chunk = os.pread(self._fd, min(DEFAULT_STEP, self._end - pos), pos)
                if not chunk:
                    raise CorruptFileError(f"source ended at {pos}, before {self._end}", offset=pos)
                self._crc = zlib.crc32(chunk, self._crc)
                pos += len(chunk)
        except BaseException as err:
            self._error = err
        finally:
            os.close(self._fd)

    def result(self) -> int:
        if self._thread is None:
            self._run()
        else:
            self._thread.join()
        if self._error is not None:
            raise self._error
        return self._crc & 0xFFFFFFFF


def _yield_cpu_to_others() -> None:
    """Lower the calling thread's CPU priority (Linux: nice is per thread).

    The checksum thread reads the page cache as fast as a core allows, long before the copy
    needs its result; at full priority it takes a core from a live writer and from the lease
    coordinator right when the copy starts, as the writer catches up with the copy's
    checkpoint (measured: its lease grant 15 ms late, its catch-up 2-3x slower). Niced it
    still has all the idle CPU it needs to finish well before the copy does.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _CHECKSUM_NICE)


@dataclass(frozen=True)
class Piece:
    """One file of a restore chain, with the size and CRC32 its catalog recorded."""

    path: Path
    size: int
    crc32: int


def restore_prefix_file(
    repo: Repository, source: str | os.PathLike[str], prefix: str, *, force: bool = False
) -> int:
    """Make the standalone copy ``source`` the content of ``prefix``; return its commit."""
    source = Path(source)
    with open(open_regular(source), "rb") as file:  # no FIFO hang, no link followed
        size = os.fstat(file.fileno()).st_size
        crc = zlib.crc32(file.read(fmt.HEADER_SIZE))
        while chunk := file.read(DEFAULT_STEP):
            crc = zlib.crc32(chunk, crc)
    return restore_chain(repo, [Piece(source, size, crc & 0xFFFFFFFF)], prefix, force=force)


def restore_chain(
    repo: Repository,
    pieces: Sequence[Piece],
    prefix: str,
    *,
    force: bool = False,
    expect_seq: int | None = None,
    progress: Progress | None = None,
    staged: bool = False,
) -> int:
    """Rebuild ``prefix`` from a full copy followed by its deltas; return its commit.

    Every piece must match its recorded size and CRC32 and the result must pass a complete
    verify (and hold commit ``expect_seq`` when given) before anything changes. The main file
    is replaced under the prefix's ``exclusive`` lease, so no process of this repository reads
    half a restore, and gets a fresh salt and WAL so nothing of the old history applies to it.

    ``staged``: ``repo`` is a staging directory that goes live only when the caller renames
    it into place, after making everything in it durable at once with
    :func:`~hotcopy.storage._durable.sync_filesystem`; so nothing is fsynced here, and no
    lease is taken (no other process knows the directory).
    """
    if not pieces:
        raise ValueError("a restore needs at least a full copy")
    target = repo.prefix_path(prefix)
    if target.exists() and not force:
        raise DestinationExists(
            f"prefix {prefix!r} exists in {repo.root}; use force to replace it", path=str(target)
        )
    total = sum(piece.size for piece in pieces)
    _check_free_space(target.parent, total)
    sync = not staged
    report: VerifyReport | None = None
    fresh_header: fmt.MainHeader | None = None

    def write(out_fd: int) -> None:
        nonlocal report, fresh_header
        done = 0
        for number, piece in enumerate(pieces):
            with open(open_regular(piece.path), "rb") as file:
                src_fd = file.fileno()
                if os.fstat(src_fd).st_size != piece.size:
                    raise CorruptFileError(
                        f"{piece.path} is {os.fstat(src_fd).st_size} bytes, not {piece.size}; "
                        "nothing restored",
                        offset=0,
                    )
                start, crc = 0, 0
                if number == 0:
                    original = os.pread(src_fd, fmt.HEADER_SIZE, 0)
                    fresh_header = replace(
                        fmt.unpack_main_header(original), salt=secrets.randbits(64)
                    )
                    write_all(out_fd, fmt.pack_main_header(fresh_header))
                    start, crc = fmt.HEADER_SIZE, zlib.crc32(original)
                step = _shifted(progress, done + start, total)
                crc = copy_range(
                    src_fd,
                    out_fd,
                    start,
                    piece.size,
                    DEFAULT_STEP,
                    step,
                    crc=crc,
                    sync=sync,
                    # Staged, no writer of the repository can wait behind the copy's
                    # writeback, and the verify below reads the copy from the page cache.
                    paced=sync,
                )
                if crc != piece.crc32:
                    raise CorruptFileError(
                        f"{piece.path} fails its checksum; nothing restored", offset=0
                    )
                done += piece.size
        report = verify_fd(str(target), out_fd)
        if not report.ok:
            raise CorruptFileError(
                f"the rebuilt prefix {prefix!r} is damaged at offset {report.offset}: "
                f"{report.error}; nothing restored",
                offset=report.offset,
            )
        if expect_seq is not None and report.seq != expect_seq:
            raise CorruptFileError(
                f"the rebuilt prefix {prefix!r} holds commit {report.seq}, not {expect_seq}; "
                "nothing restored",
                offset=report.size,
            )

    with (
        contextlib.nullcontext()
        if staged
        else repo.leases.lease(prefix, "exclusive", timeout=repo.lease_timeout)
    ):
        write_durably(target, write, sync=sync)
        assert report is not None and fresh_header is not None
        wal = fmt.WalHeader(fresh_header.file_id, fresh_header.salt, report.size, report.seq)
        # Readers move to the restored file: the exclusive lease changed the prefix's counter.
        write_durably(wal_path(repo.root, prefix), fmt.pack_wal_header(wal), sync=sync)
    return report.seq


def _shifted(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """Report one piece's progress as progress through the whole restore."""
    if progress is None:
        return None
    report = progress
    return lambda done, _: report(offset + done, total)
