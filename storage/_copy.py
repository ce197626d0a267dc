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
import functools
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

from . import _format as fmt
from ._crc import crc32
from ._durable import pwrite_all, sweep_stale_temps, write_all, write_durably
from ._errors import (
    CorruptFileError,
    DestinationExists,
    NotEnoughSpace,
    PrefixNotFound,
    SameFileError,
    StorageError,
)
from ._faults import BREAK, fault
from ._files import open_regular
from ._leases import HeldLease, expired_token
from ._log import Cut, Damage, Log, check_frames, install_files, iter_segments
from ._writeback import RateLimit, Writeback

if TYPE_CHECKING:
    from ._repository import Repository

DEFAULT_STEP = 4 << 20
Progress = Callable[[int, int], None]
_THREAD_ABOVE = 16 << 20
_DIRECT_ABOVE = 16 << 20  # a fsynced copy this long writes past the page cache (see _direct)
_UNSYNCED_DEPTH = 8  # writeback pieces in flight for a copy that is not fsynced
_CHECKSUM_NICE = 10
_BOUNDARY_PROBE = fmt.TRAILER_SIZE  # the bytes just before a cut: the trailer closing it


class BaseRef(NamedTuple):
    """Where a previous snapshot of a prefix ended, to take a delta from."""

    file_id: str  # hex, of the source main file
    salt: int  # of the source main file (a restore or rewrite changes it)
    end: int
    boundary_crc: int  # CRC32 of the source bytes [end - 32, end)


class CopyResult(NamedTuple):
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
    rate_limit: float | None = None,
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
    With ``rate_limit`` (bytes per second) the bytes are copied no faster than that on
    average (the cut, under the write lease, is never slowed).
    """
    began = time.monotonic()
    pace = RateLimit(rate_limit) if rate_limit is not None else None
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
            # With the repository's TTL too: the copy reads through its own descriptor on a
            # file that is replaced, never edited, so a stopped copy needs keep nobody waiting.
            stack.enter_context(
                repo.leases.lease(
                    prefix, "snapshot", timeout=repo.lease_timeout, ttl=repo.lease_ttl
                )
            )
            # Under the snapshot lease the main file only grows, so its size now is a lower
            # bound of what the copy needs: refuse a copy that cannot fit before the checkpoint
            # changes the source's files (the exact check follows once the cut is known).
            least = source.stat().st_size - (base.end if base is not None else 0)
            _check_free_space(dest.parent, max(least, 0))
            cut, src_fd, cut_seconds = _checkpoint_and_open(repo, prefix)
        else:
            src_fd, cut_seconds = _open_at_cut(source, cut), 0.0
        try:
            header = fmt.unpack_main_header(os.pread(src_fd, fmt.HEADER_SIZE, 0))
            boundary_crc = _crc_before(src_fd, cut.length)
            start = _delta_start(src_fd, header, cut, base)
            _check_free_space(dest.parent, cut.length - start)
            crc = 0

            def write(out_fd: int) -> None:
                nonlocal crc
                if start == 0:
                    fresh = fmt.pack_main_header(
                        header._replace(salt=int.from_bytes(os.urandom(8)))
                    )
                    write_all(out_fd, fresh)
                    crc = crc32(fresh)
                    first, after = header.size, header.base_seq
                else:
                    first, after = start, None
                crc = copy_range(
                    src_fd,
                    out_fd,
                    first,
                    cut.length,
                    page_io_step_size,
                    progress,
                    crc=crc,
                    sync=sync,
                    verify=functools.partial(_verify_source, cut=cut, after=after, prefix=prefix),
                    rate=pace,
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
    fd = open_regular(source)
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
    return crc32(os.pread(fd, end - start, start)) & 0xFFFFFFFF


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


def _checkpoint_and_open(repo: Repository, name: str) -> tuple[Cut, int, float]:
    """Checkpoint under the write lease and open the main file the cut belongs to; and the
    seconds the cut waited for and held the write lease (what writers may wait for it)."""
    began = time.monotonic()
    open_prefix = repo.open_prefixes().get(name)
    if open_prefix is not None and open_prefix.mode == "rw":
        # Our own open prefix may hold the write lease (a transaction in progress): use it.
        return *open_prefix.checkpoint_and_open(), time.monotonic() - began
    # The log reads the WAL ahead, before the lease is asked for, while writers go on: a WAL
    # only grows until a checkpoint replaces it, so under the lease only what was appended
    # since needs reading (a full WAL of small commits takes a hundred milliseconds to parse,
    # every one of which a writer would wait). No key index: the copy checks what it copies.
    log = Log(repo.root, name, repo.id_bytes, writable=True)
    try:
        if log.settled:
            # Nothing to checkpoint: the main file's last boundary is the latest commit, and
            # under the caller's snapshot lease the file only grows. So no write lease: a
            # copy of an idle prefix (as the last backup left it) never waits for a writer
            # that holds the lease but has committed nothing since, nor costs a hand-over.
            return log.cut(), log.dup_main_fd(), 0.0
        asked = time.monotonic()
        with repo.leases.lease(
            name, "write", timeout=repo.lease_timeout, ttl=repo.lease_ttl
        ) as lease:
            cut, fd = _cut_under(log, lease, repo)
        return cut, fd, time.monotonic() - asked
    finally:
        log.close()


def cut_prefix(repo: Repository, name: str, lease: HeldLease) -> tuple[Cut, int]:
    """Checkpoint prefix ``name`` under ``lease``, its write lease that the caller holds (and
    keeps); the cut, and a descriptor on the main file it is in (the caller's to close)."""
    log = Log(repo.root, name, repo.id_bytes, writable=True)
    try:
        return _cut_under(log, lease, repo)
    finally:
        log.close()


def _cut_under(log: Log, lease: HeldLease, repo: Repository) -> tuple[Cut, int]:
    log.prepare(lease, expired_token(repo.leases))
    if BREAK == "copy-without-checkpoint":  # broken on purpose: claims the WAL's commits
        cut = Cut(log.cut().length, log.seq, log.header.file_id)
    else:
        cut = log.checkpoint(lease)
    return cut, log.dup_main_fd()


def checked_segments(
    fd: int, start: int, end: int, after: int | None, digest: fmt.RangeCrc, *, shift: int = 0
) -> Iterator[fmt.Segment | Damage]:
    """The segments of a range being copied, each byte checked against its checksum once and
    told to ``digest``: no values kept, and a key index checked by its page CRCs (its build is
    ``verify``'s to check)."""
    return iter_segments(
        fd, start, end, after, shift=shift, index_structure=False, values=False, digest=digest
    )


def _verify_source(
    fd: int,
    start: int,
    end: int,
    digest: fmt.RangeCrc,
    *,
    cut: Cut,
    after: int | None,
    prefix: str,
) -> None:
    """Refuse to copy ``[start, end)`` unless it is whole segments, every checksum right
    (values too), following commit ``after`` (when known) and ending at the cut's commit."""
    seq = after
    for item in checked_segments(fd, start, end, after, digest):
        if isinstance(item, Damage):
            raise CorruptFileError(
                f"prefix {prefix!r}: the main file is damaged at offset {item.offset} "
                f"({item.reason}); nothing copied. Run `hotcopy verify` on the repository, then "
                "`hotcopy salvage` or restore the prefix from a backup",
                prefix=prefix,
                offset=item.offset,
            )
        seq = item.last_seq
    if start < end and seq != cut.seq:
        raise CorruptFileError(
            f"prefix {prefix!r}: the main file holds commit {seq} at offset {end}, not "
            f"{cut.seq}; nothing copied",
            prefix=prefix,
            offset=end,
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
    verify: Callable[[int, int, int, fmt.RangeCrc], None] | None = None,
    rate: RateLimit | None = None,
) -> int:
    """Append bytes ``[start, end)`` of ``src_fd`` to ``out_fd`` durably; return ``crc`` extended.

    ``verify(fd, start, end, digest)``, when given, checks the source's own checksums of the
    range on the way, telling ``digest`` what it reads, so that the check and the CRC are one
    pass over the bytes: a copy never records damage as a good copy.
    ``rate`` paces the steps (an operator's rate limit).

    The checksum is computed by a thread reading the (immutable) source range while the copy
    and its fsync run. A long copy that is fsynced here (a hot copy, a restore in place) writes
    past the page cache (:func:`~hotcopy.storage._direct.copy_direct`), so its fsync is small
    and never holds the file system's journal behind a whole copy. Otherwise, and for what
    that leaves, the bytes move by ``copy_file_range`` (in the kernel) where the file systems
    allow it, ``step`` bytes at a time, with writeback of each step started at once. With
    ``paced=False`` (no writer can be waiting, and the caller syncs later) the copy is left to
    the page cache as ``cp`` leaves it, where reading it back costs no disk read.
    """
    out_offset = os.fstat(out_fd).st_size
    total = end - start
    if rate is not None:
        step = min(step, rate.smooth_step())
    # A thread pays for itself only on copies long enough for the overlap to matter.
    checksum = _SourceChecksum(
        src_fd, start, end, crc, threaded=total >= _THREAD_ABOVE, verify=verify
    )
    # A copy that is not fsynced is one of the many of a backup, which syncs the file system
    # once before its manifest: waiting for each small file's first piece made a backup of
    # 1 MiB prefixes wait ~1.5 ms per prefix on the disk's latency. Its writeback still
    # starts at once, with more in flight.
    writeback: Writeback | None = None
    if paced:
        writeback = Writeback(out_fd) if sync else Writeback(out_fd, depth=_UNSYNCED_DEPTH)
    done = 0

    def stepped(copied: int) -> None:
        nonlocal done
        if rate is not None:
            rate.wrote(copied)
        done += copied
        fault("copy:after-step")
        if progress is not None:
            progress(done, total)

    try:
        if sync and paced and rate is None and total >= _DIRECT_ABOVE:
            from ._direct import copy_direct  # threads, queues and maps a client never loads

            copy_direct(src_fd, out_fd, start, out_offset, total, stepped)
        kernel_copy = True
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
            stepped(copied)
        if sync:
            os.fdatasync(out_fd)
    finally:
        result = checksum.result()
    return result


class _SourceChecksum:
    """CRC32 of a source range (and its check, when asked), computed by a thread (which
    releases the GIL on large data) while the copy runs, or in :meth:`result` when not
    ``threaded``."""

    def __init__(
        self,
        fd: int,
        start: int,
        end: int,
        crc: int,
        *,
        threaded: bool,
        verify: Callable[[int, int, int, fmt.RangeCrc], None] | None,
    ) -> None:
        self._fd = os.dup(fd)  # ours to close, whatever the caller does with theirs
        self._start, self._end = start, end
        self._crc = crc
        self._verify = verify
        self._error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if threaded:
            self._thread = threading.Thread(target=self._run, name="hotcopy-crc", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        if self._thread is not None:
            _yield_cpu_to_others()
        try:
            digest = fmt.RangeCrc(self._fd, self._start, self._crc)
            if self._verify is not None:
                self._verify(self._fd, self._start, self._end, digest)
            self._crc = digest.through(self._end)
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


class Piece(NamedTuple):
    """One file of a restore chain, with the size and CRC32 its catalog recorded, and the
    SHA-256 of an authenticated catalog: checked on the very descriptor the bytes are copied
    from, so a file replaced after a check is never the one restored. A standalone copy has no
    CRC recorded (None): its own checksums, every one checked, are what it is held to."""

    path: Path
    size: int
    crc32: int | None
    sha256: str | None = None


# A piece at most this long is read ahead whole (see read_ahead); a longer one is read in order
# by its copy, whose reads the kernel's own read-ahead keeps ahead of.
_READ_AHEAD_UP_TO = 64 << 20


def read_ahead(pieces: Sequence[Piece]) -> None:
    """Ask the kernel to start reading ``pieces`` (the next prefix of a restore) into the page
    cache, so that a restore of many small prefixes reads the next one from the disk while it
    checks and writes this one, as ``cp -r`` never does. Only a hint: a piece that cannot be
    opened as a regular file here is left to the restore, which reports it."""
    for piece in pieces:
        if piece.size > _READ_AHEAD_UP_TO:
            continue
        try:
            fd = open_regular(piece.path)
        except (OSError, StorageError):
            continue
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_WILLNEED)
        finally:
            os.close(fd)


def restore_prefix_file(
    repo: Repository, source: str | os.PathLike[str], prefix: str, *, force: bool = False
) -> int:
    """Make the standalone copy ``source`` the content of ``prefix``; return its commit."""
    source = Path(os.path.realpath(source))  # the caller named it: a link to a copy is fine
    target = repo.prefix_path(prefix)
    with contextlib.suppress(FileNotFoundError):
        if os.path.samestat(os.stat(source), os.stat(target)):
            raise SameFileError(
                f"{source} is the prefix's own main file; restore from a copy of it "
                "(`hotcopy copy`), never from the live file, whose newest commits are in its WAL",
                path=str(source),
            )
    fd = open_regular(source)
    try:
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    return restore_chain(repo, [Piece(source, size, None)], prefix, force=force)


def restore_chain(
    repo: Repository,
    pieces: Sequence[Piece],
    prefix: str,
    *,
    force: bool = False,
    expect_seq: int | None = None,
    progress: Progress | None = None,
    staged: bool = False,
    then: bytes = b"",
) -> int:
    """Rebuild ``prefix`` from a full copy followed by its deltas; return its commit.

    ``then``: the commits that follow the chain's last one, as WAL batch frames (a replica's
    log, see ``hotcopy.workers._replicate``): they become the restored prefix's WAL.

    Every piece must match its recorded size and CRC32 and the result must pass a complete
    check (and hold commit ``expect_seq`` when given) before anything changes. The main file
    is replaced under the prefix's ``exclusive`` lease, so no process of this repository reads
    half a restore; it names this repository and prefix, gets a fresh salt and a fresh WAL, so
    nothing of the old history applies to it.

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
            f"prefix {prefix!r} exists in {repo.root}; use --force to replace it",
            path=str(target),
        )
    total = sum(piece.size for piece in pieces)
    _check_free_space(target.parent, total)
    sync = not staged
    with contextlib.ExitStack() as opened:
        # Each piece is opened once: its header, its checks and its copy read one file.
        fds = [open_regular(piece.path) for piece in pieces]
        for fd in fds:
            opened.callback(os.close, fd)
        return _restore_from(repo, pieces, fds, prefix, target, total, sync, staged,
                             expect_seq, progress, then)  # fmt: skip


def _restore_from(
    repo: Repository,
    pieces: Sequence[Piece],
    fds: list[int],
    prefix: str,
    target: Path,
    total: int,
    sync: bool,
    staged: bool,
    expect_seq: int | None,
    progress: Progress | None,
    then: bytes,
) -> int:
    original = fmt.unpack_main_header(os.pread(fds[0], fmt.HEADER_SIZE, 0))
    # A format 1 copy keeps its layout (its offsets are absolute); anything newer is stamped
    # with this repository and prefix.
    header = original._replace(salt=int.from_bytes(os.urandom(8)))
    if original.version != 1:
        header = header._replace(repository_id=repo.id_bytes, prefix=prefix)

    # Staged, no writer of the repository can wait behind the copy's writeback, and the
    # caller syncs the whole staging directory once. A small prefix's writeback is started
    # anyway: in a bulk restore the disk would otherwise sit idle between the reads of one
    # prefix and the next, and write everything at the final sync (measured: about 10 % faster
    # for 1,000 prefixes of 1 MiB). A large one is left to the page cache: its writeback
    # would break up its one long sequential read (measured: slower for 1 GiB).
    paced = sync or total < _DIRECT_ABOVE

    def write(out_fd: int) -> tuple[int, int]:
        write_all(out_fd, fmt.pack_main_header(header))
        done = 0
        seq = original.base_seq
        for number, (piece, src_fd) in enumerate(zip(pieces, fds, strict=True)):
            if os.fstat(src_fd).st_size != piece.size:
                raise CorruptFileError(
                    f"{piece.path} is {os.fstat(src_fd).st_size} bytes, not {piece.size}; "
                    "nothing restored",
                    offset=0,
                )
            start, crc = 0, 0
            if number == 0:
                start = original.size
                crc = crc32(os.pread(src_fd, start, 0))
            # Each piece is checked as it is read for its CRC, in the checksum thread and
            # overlapped with the copy: whole segments, every checksum, each following the
            # last. A piece lands at the offset it had in the main file it came from
            # (``done``), so the result is never read back to be checked again.
            checked = _PieceCheck(piece, seq, shift=done if number else 0)
            crc = copy_range(
                src_fd,
                out_fd,
                start,
                piece.size,
                DEFAULT_STEP,
                _shifted(progress, done + start, total),
                crc=crc,
                sync=sync,
                paced=paced,
                verify=checked,
            )
            if piece.crc32 is not None and crc != piece.crc32:
                raise CorruptFileError(
                    f"{piece.path} fails its checksum; nothing restored", offset=0
                )
            seq = checked.seq
            done += piece.size
        if expect_seq is not None and seq != expect_seq:
            raise CorruptFileError(
                f"the rebuilt prefix {prefix!r} holds commit {seq}, not {expect_seq}; "
                "nothing restored",
                offset=done,
            )
        return done, seq

    lease = None
    with contextlib.ExitStack() as stack:
        if not staged:
            lease = stack.enter_context(
                repo.leases.lease(
                    prefix, "exclusive", timeout=repo.lease_timeout, ttl=repo.lease_ttl
                )
            )
        # Readers move to the restored file: the exclusive lease changed the prefix's counter.
        _, seq = install_files(
            repo.root,
            prefix,
            header,
            write,
            lease=lease,
            sync=sync,
            wal_frames=then,
        )
    return check_frames(then, seq) if then else seq


class _PieceCheck:
    """Checks one piece of a restore chain (``verify`` of :func:`copy_range`): its bytes are
    whole segments, every checksum right, following commit ``after``; ``seq`` is the commit
    it ends at. ``shift``: the piece's offset in the main file it came from (a delta's)."""

    def __init__(self, piece: Piece, after: int, *, shift: int) -> None:
        self._piece = piece
        self._shift = shift
        self.seq = after

    def __call__(self, fd: int, start: int, end: int, digest: fmt.RangeCrc) -> None:
        if self._piece.sha256 is not None:  # the whole file, from the copy's own descriptor
            import hashlib  # only restores from keyed catalogs: a client never loads it
            import hmac

            sha = hashlib.sha256()
            pos = 0
            while pos < end:
                chunk = os.pread(fd, min(DEFAULT_STEP, end - pos), pos)
                if not chunk:
                    break
                sha.update(chunk)
                digest.saw(pos, chunk)
                pos += len(chunk)
            if not hmac.compare_digest(sha.hexdigest(), self._piece.sha256):
                raise CorruptFileError(
                    f"{self._piece.path} fails its SHA-256 (the file is damaged or was "
                    "replaced); nothing restored",
                    offset=0,
                )
        for item in checked_segments(fd, start, end, self.seq, digest, shift=self._shift):
            if isinstance(item, Damage):
                raise CorruptFileError(
                    f"{self._piece.path} is damaged at offset {item.offset}: {item.reason}; "
                    "nothing restored",
                    offset=item.offset,
                )
            self.seq = item.last_seq


def _shifted(progress: Progress | None, offset: int, total: int) -> Progress | None:
    """Report one piece's progress as progress through the whole restore."""
    if progress is None:
        return None
    report = progress
    return lambda done, _: report(offset + done, total)
