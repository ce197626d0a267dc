"""The log of one prefix: its main file of checkpointed segments and the WAL of the commits since,
owned by one object that knows batches, not keys.

Everything that reads or changes a prefix's files goes through :class:`Log`: opening and
recovery, appending a commit, following what other processes appended, the one checkpoint,
fencing a writer that lost its lease while stopped, and the rules for where valid data ends.
:class:`~hotcopy.storage._prefix.Prefix` keeps the key index and transactions on top of it;
copies, verify, restore and salvage use it too.

**Where valid data ends** (the damage model, README "Damage"):

* The WAL holds commits ``base_seq + 1, + 2, ...`` back to back after its header. After the
  last whole batch come zeros (space reserved for the next ones) or, after a crash, one
  incomplete batch with nothing valid after it: a *torn tail*, never acknowledged, dropped.
  A batch that fails a checksum or a structural rule with a whole batch after it, a whole
  batch that does not follow, or a damaged header in front of batches is *damage*.
* The main file holds whole segments after its header. The WAL that matches it names the
  boundary it continues from (``base_len``): bytes after that boundary are an unfinished
  checkpoint, whose commits the WAL still holds (debris, a note); unreadable bytes before it,
  or a main file that ends before it, are damage.
* Every header names its repository and prefix, and the WAL the main file (id and salt) and the
  boundary it continues: a file of another prefix or repository is damage; a WAL of another
  main file of the same prefix (left beside a copy that replaced the main file) is ignored.
* Damage is reported with its file and offset; the prefix refuses to open and nothing ever
  writes over it. ``hotcopy salvage`` keeps what is provable (``_salvage``).

**A writer that lost its lease while stopped** cannot block anyone: no lock is held across a
change of the files. It cannot change the files after its successor took over either:

* Every change is checked against the lease just before it is made, and a lease is only lost
  by expiry, recorded by the coordinator (``expired_token``). The first holder granted after an
  expiry *fences* before it changes anything (:meth:`Log.prepare`): it removes the temps the
  stopped process may still rename into place, and checkpoints, which replaces the WAL. A
  stopped process's pending append then lands in a WAL nobody reads, its pending rename finds
  no temp, and its pending checkpoint write puts the very bytes the fence put at the very
  same offset (a checkpoint is determined by the WAL it reads: every whole batch, at its
  ``base_len``), so none of them changes anything.
* A commit whose lease lapsed between its write and the check after its ``fdatasync`` is
  settled by taking the lease again (:meth:`Log.settle`): it is acknowledged if whoever fenced
  first found it in the WAL, and refused, leaving no trace, if not.
"""

from __future__ import annotations

import contextlib
import os
import signal
import struct
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import NamedTuple, Protocol

from hotcopy.coordinator._errors import LeaseFenced

from . import _format as fmt
from . import _index
from ._closing import close_later
from ._crc import crc32
from ._durable import fsync_dir, pwrite_all, remove_temps_of, sync_file, write_durably
from ._errors import CorruptFileError, NeedsMigration, PrefixNotFound, StorageError, SyncFailed
from ._faults import BREAK, fault, fault_due
from ._files import open_regular
from ._leases import HeldLease
from ._wal_space import reserve, tail_is_clear, written_end

# Bytes a follower reads at once. Mostly reserved space (zeros) follows the few new batches,
# and a read costs by its size: 16 KiB took 16 us here, 2 KiB 3 us, for the one small batch a
# reader beside a busy writer finds at most follows; a longer run is read in more calls.
_FOLLOW_CHUNK = 2 << 10
_BATCH_MAGIC = struct.pack("<I", fmt.BATCH_MAGIC)


class Cut(NamedTuple):
    """A commit boundary of a main file: its first ``length`` bytes hold exactly commit ``seq``."""

    length: int
    seq: int
    file_id: bytes


def main_path(root: Path, name: str) -> Path:
    return root / f"{name}.hc"


def wal_path(root: Path, name: str) -> Path:
    return root / f"{name}.hc-wal"


class CommitUnconfirmed(StorageError):
    """A commit was written, but its lease lapsed before the write was confirmed and the lease
    could not be taken again to settle it; whether it is in the log shows when the prefix is
    next read (commit ``seq``)."""


class _Stale(Exception):
    """The WAL was replaced while this log read it: what it read after the replacement may be
    a fenced writer's late append. Nothing of the pass was delivered; read afresh."""


class _Diverged(Exception):
    """This log delivered a commit the files no longer hold (read from a WAL after a fence had
    read it): start over from the files, which hold what it delivered through ``through``."""

    def __init__(self, through: int) -> None:
        super().__init__(through)
        self.through = through


class LogSink(Protocol):
    """What a log tells the key index built on it, as it reads commits."""

    def reset(self) -> None:
        """The main file was (re)opened: forget everything; its commits follow from the start."""

    def apply_main(self, batch: fmt.Batch) -> None:
        """A new commit, read from the main file (values stay there, at their op offsets)."""

    def apply_wal(self, batch: fmt.Batch) -> None:
        """A new commit, read from the WAL (values loaded)."""

    def repoint(self, batch: fmt.Batch) -> None:
        """A commit already applied from the WAL, found in the main file."""

    def moved(self, first_seq: int, last_seq: int, shift: int) -> None:
        """WAL commits ``first_seq..last_seq`` are now in the main file, each op ``shift``
        bytes after its WAL offset."""


class IndexSink(Protocol):
    """What a log tells a view that reads checkpointed keys through the main file's index."""

    def reset(self) -> None:
        """The main file was (re)opened: forget every commit read from the WAL."""

    def apply_wal(self, batch: fmt.Batch) -> None:
        """A new commit, read from the WAL (values loaded)."""

    def indexed(self, seq: int) -> None:
        """:attr:`Log.index` now holds every commit up to ``seq``."""


class _WalBatch(NamedTuple):
    seq: int
    offset: int
    size: int
    meta_crc: int
    # CRC32 of the WAL's bytes from the end of its header to the end of this batch, as this
    # process wrote or checked them: a checkpoint proves its re-read of the whole WAL by one
    # comparison instead of checking every batch again.
    wal_crc: int
    # fmt.chain_meta_crc of the WAL's batches up to this one: the trailer of a segment made of
    # them all, without a pass over them (a writer waits for this after a checkpoint).
    meta_chain: int


class Damage(NamedTuple):
    path: str
    offset: int
    reason: str


class Salvaged(NamedTuple):
    """What :meth:`Log.salvage` kept and lost."""

    kept: int  # commits 1..kept are in the prefix
    lost: tuple[int, int] | None  # commits first..last were lost (now empty commits)
    damage: Damage | None  # None: nothing was damaged, nothing changed
    moved_aside: list[Path]


def _move_aside(path: Path) -> Path:
    """Give ``path`` a new name beside it (``<name>.damaged-<time>``); the old name is free."""
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    aside = path.with_name(f"{path.name}.damaged-{stamp}-{os.urandom(2).hex()}")
    os.link(path, aside)
    fsync_dir(path.parent)
    return aside


class Log:
    """The files of prefix ``name`` under ``root``; see the module docstring.

    Args:
        repository_id: The repository's id (16 bytes): files naming another are refused. None
            only where no repository is known (a read-only check of loose files).
        writable: Open the files for writing (a writer, a copy's checkpoint).
        sink: Told every commit read (a key index).
        scan: Read the main file's segments (by default when there is a sink). Without, those
            before the WAL's boundary are not read at all: a copy's checkpoint needs only the
            boundary, and the copy checks every byte it copies.
        tolerant: Record damage (:attr:`damage`) and stop reading there instead of raising
            (salvage and verify, which report it).
        index_sink: Instead of ``sink``: keep :attr:`index`, the key index of the last boundary
            (format 4; older files are refused with :class:`NeedsMigration`), and tell the sink
            WAL commits and each new boundary. The main file is never scanned for keys.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        repository_id: bytes | None,
        *,
        writable: bool,
        sink: LogSink | None = None,
        scan: bool | None = None,
        tolerant: bool = False,
        index_sink: IndexSink | None = None,
    ) -> None:
        self.name = name
        self.main_path = main_path(root, name)
        self.wal_path = wal_path(root, name)
        self._repository_id = repository_id
        self._writable = writable
        self._sink = sink
        self._scan = sink is not None if scan is None else scan
        self._tolerant = tolerant
        self._index_sink = index_sink
        self._read: _index.FileRead | None = None  # how the main file's key index is read
        self._index = _index.KeyIndex.empty()
        self._index_end = -1  # the boundary the index is of
        self.damage: Damage | None = None
        # Set when following found that commits it delivered after this one were a fenced
        # writer's late append, which the files do not hold (a replica must not keep them).
        self.diverged_through: int | None = None
        self._main_fd = -1
        self._main_ino = -1
        self._header: fmt.MainHeader
        self._scanned_end = 0  # the end of the last whole segment read
        self._boundaries: dict[int, int] = {}  # segment end -> its commit
        self._seq = 0  # the last commit read (or appended)
        self._wal_fd = -1
        self._wal_ino = -1
        self._wal_header: fmt.WalHeader | None = None  # None: no WAL, or not read yet
        self._wal_applies = False  # the WAL continues this main file
        self._wal_pos = 0  # end of the last whole batch read from the WAL
        self._wal_size = 0  # the WAL's size: space reserved beyond _wal_pos
        self._wal_index: list[_WalBatch] = []  # every whole batch of the WAL, in order
        # The files are exactly as this writer's last change left them (it has held the write
        # lease since): the next commit skips the checks of prepare().
        self._files_as_left = False
        # Why this process writes the prefix no more (an fsync failed, its WAL is damaged).
        self._stopped: tuple[type[StorageError], str] | None = None
        self._fenced_through = 0
        self._watch: tuple[int, int | None] = (0, None)  # a commit settle() looks for
        self._deferred: tuple[int, bytes, int] | None = None  # HOTCOPY_TEST_BREAK only
        try:
            self._load()
        except BaseException:
            self.close()
            raise

    # -- what is known -----------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The last commit read or appended."""
        return self._seq

    @property
    def header(self) -> fmt.MainHeader:
        return self._header

    @property
    def index(self) -> _index.KeyIndex:
        """The key index of the last boundary read (with ``index_sink``)."""
        return self._index

    def index_at(self, end: int) -> _index.KeyIndex:
        """The key index at boundary ``end`` of the main file."""
        if end == self._index_end:
            return self._index
        if end <= self._header.size:
            return _index.KeyIndex.empty()
        if self._read is None:
            self._read = _index.FileRead(self._main_fd)
        try:
            return _index.open_index(self._read, end - fmt.TRAILER_SIZE, self._index)
        except CorruptFileError as err:
            raise self._error(
                self.main_path, int(err.fields.get("offset", end)), f"its key index: {err.message}"
            ) from None

    def _refresh_index(self) -> None:
        """Follow the last boundary with the index (``index_sink``)."""
        sink = self._index_sink
        if sink is None or self._index_end == self._scanned_end:
            return
        self._index = self.index_at(self._scanned_end)
        self._index_end = self._scanned_end
        sink.indexed(self._boundaries[self._scanned_end])

    @property
    def main_fd(self) -> int:
        """The main file: values of checkpointed commits are read at their op offsets."""
        return self._main_fd

    @property
    def wal_bytes(self) -> int:
        """Bytes of commits in the WAL (what the next checkpoint moves)."""
        return self._wal_pos - self._wal_header.size if self._wal_header is not None else 0

    @property
    def settled(self) -> bool:
        """Whether the files read are as a finished checkpoint leaves them: a WAL that holds
        no commit continues the main file exactly where its last whole segment ends. A
        checkpoint would then reach :meth:`cut` and change nothing."""
        header = self._wal_header
        return (
            self._wal_applies
            and header is not None
            and not self._wal_index
            and self._scanned_end == header.base_len
        )

    @property
    def files_as_left(self) -> bool:
        return self._files_as_left

    def cut(self) -> Cut:
        """The last boundary of the main file read."""
        return Cut(self._scanned_end, self._boundaries[self._scanned_end], self._header.file_id)

    def dup_main_fd(self) -> int:
        """A new descriptor on the main file, the caller's to close: holding it, the bytes of
        a cut stay readable whatever happens to the path (files are replaced, never edited)."""
        return os.dup(self._main_fd)

    def notes(self) -> list[str]:
        """Findings that are not damage: a torn WAL tail, debris, a WAL left by another file."""
        found = []
        if self._header.version < fmt.FORMAT_VERSION:
            found.append(older_format(self.main_path, self._header.version))
        header = self._wal_header
        if header is not None and not self._wal_applies:
            found.append(f"{self.wal_path}: WAL of another main file of this prefix, ignored")
        size = os.fstat(self._main_fd).st_size
        if self._wal_applies and header is not None and self._scanned_end > header.base_len:
            found.append(
                f"{self.main_path}: an unfinished checkpoint after offset {header.base_len} "
                "(its commits are in the WAL; the next checkpoint completes it)"
            )
        if size > self._scanned_end:
            found.append(
                f"{self.main_path}: {size - self._scanned_end} bytes of debris after offset "
                f"{self._scanned_end} left by an unfinished checkpoint (its commits are in the "
                "WAL; the next checkpoints write over it)"
            )
        if self._wal_fd >= 0 and self._wal_applies:
            end = os.fstat(self._wal_fd).st_size
            if end > self._wal_pos and not tail_is_clear(self._wal_fd, self._wal_pos, end):
                found.append(
                    f"{self.wal_path}: torn tail at offset {self._wal_pos} (a commit that never "
                    "returned; dropped)"
                )
        return found

    # -- reading ---------------------------------------------------------------------------

    def follow(self) -> None:
        """See what other processes appended or replaced since this log last looked."""
        while True:
            try:
                self._follow_once()
                break
            except _Stale:
                continue  # the WAL was replaced meanwhile: its successor tells what holds
            except _Diverged as err:
                self.diverged_through = err.through
                self._load()  # rebuild the view from the files
                break
        self._refresh_index()

    def _follow_once(self) -> None:
        try:
            st = os.stat(self.main_path)
        except FileNotFoundError:
            raise PrefixNotFound(
                f"prefix {self.name!r} no longer exists in {self.main_path.parent}",
                prefix=self.name,
            ) from None
        if st.st_ino != self._main_ino:
            self._load()  # replaced by a compaction or a restore
            return
        if st.st_size > self._scanned_end:
            self._scan_main(st.st_size)
        elif st.st_size < self._scanned_end:  # a main file is only ever appended to
            self._damaged(
                self.main_path, st.st_size, "the file was cut short below a commit read before"
            )
        self._follow_wal()

    def read_value(self, offset: int) -> tuple[int, bytes]:
        """``(vtype, value)`` of the op at ``offset`` of the main file, CRC-checked."""
        try:
            return fmt.read_op_value(self._main_fd, offset)
        except CorruptFileError as err:
            raise self._main_damaged(err, offset) from None

    def lookup(self, key: bytes) -> tuple[int, bytes] | None:
        """``(vtype, value)`` of ``key`` at the last boundary read (with ``index_sink``), or
        None if the main file does not hold it."""
        try:
            return self._index.lookup(key, fmt.read_keyed_op)
        except CorruptFileError as err:
            raise self._main_damaged(err) from None

    def holds(self, key: bytes) -> bool:
        """Whether the main file holds ``key`` at the last boundary read (its value unread)."""
        try:
            return self._index.lookup(key, fmt.op_puts) is not None
        except CorruptFileError as err:
            raise self._main_damaged(err) from None

    def _main_damaged(self, err: CorruptFileError, offset: int = 0) -> CorruptFileError:
        """``err``, found reading the main file, as the damage report users act on."""
        if "path" in err.fields:
            return err
        return self._error(self.main_path, int(err.fields.get("offset", offset)), err.message)

    def _load(self) -> None:
        """(Re)open the main file and read it, then the WAL."""
        while True:
            try:
                self._load_once()
                break
            except _Stale:
                continue  # a fence replaced the WAL while it was read: read the files again
            except BaseException:
                # A load that fails (damage, a foreign or older file) is done again at the
                # next look: a view half moved served the old file's index without a word,
                # and a writer's prepare fenced over commits it could not see.
                self._main_ino = -1
                raise
        self._refresh_index()

    def _main_header(self, fd: int) -> fmt.MainHeader:
        """The header of the main file open on ``fd``, if this view may take that file."""
        try:
            header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
        except CorruptFileError as err:
            reason = f"its header is damaged ({err.message})"
            if not self._tolerant:
                raise self._error(self.main_path, 0, reason) from None
            self._damaged(self.main_path, 0, reason)
            header = self._rebuilt_header(fd)
        self._check_identity(self.main_path, header.repository_id, header.prefix)
        if self._index_sink is not None and header.version < fmt.FORMAT_VERSION:
            raise NeedsMigration(
                f"prefix {self.name!r}: {older_format(self.main_path, header.version)}",
                prefix=self.name,
                version=header.version,
            )
        return header

    def _load_once(self) -> None:
        flags = os.O_RDWR if self._writable else os.O_RDONLY
        try:
            fd = open_regular(self.main_path, flags)
        except FileNotFoundError:
            raise PrefixNotFound(
                f"prefix {self.name!r} does not exist in {self.main_path.parent}",
                prefix=self.name,
            ) from None
        try:
            header = self._main_header(fd)
        except BaseException:
            # Not taken: this view keeps the file it had, and looks again next time (a view
            # half moved read the new file at the old one's offsets: "damaged").
            os.close(fd)
            raise
        if self._main_fd >= 0:
            close_later(self._main_fd)  # replaced by a compaction or restore, mostly
        self._read = None  # an index of the old file keeps reading the old file
        self._index_end = -1
        self._main_fd = fd
        self._main_ino = os.fstat(fd).st_ino
        self._header = header
        self._seq = header.base_seq
        self._scanned_end = header.size
        self._boundaries = {header.size: header.base_seq}
        for sink in (self._sink, self._index_sink):
            if sink is not None:
                sink.reset()
        if self._scan:
            self._scan_main(os.fstat(fd).st_size)
        self._open_wal(strict=True)
        if not self._wal_applies and not self._scan and self.damage is None:
            # No WAL names a boundary (a prefix whose creator died, a main file put back by
            # hand): the last whole segment is found by reading them all, once.
            self._scan_main(os.fstat(fd).st_size)

    def _rebuilt_header(self, fd: int) -> fmt.MainHeader:
        """A main header for salvage to read a file whose own header is damaged: the first
        commit after it tells where it starts; the WAL, if it names this prefix, tells which
        main file it continues (so its commits can still be kept)."""
        first = fmt.read_batch(
            fmt.FileReader(fd, fmt.HEADER_SIZE, os.fstat(fd).st_size), load_values=False
        )
        base_seq = first.seq - 1 if first is not None else 0
        file_id, salt = os.urandom(16), int.from_bytes(os.urandom(8))
        with contextlib.suppress(FileNotFoundError, StorageError):
            wal_fd = open_regular(self.wal_path)
            try:
                wal = fmt.unpack_wal_header(os.pread(wal_fd, fmt.HEADER_SIZE, 0))
                if wal.prefix in (None, self.name):
                    file_id, salt = wal.file_id, wal.main_salt
            finally:
                os.close(wal_fd)
        return fmt.MainHeader(
            file_id, salt, time.time_ns(), base_seq, self._repository_id, self.name
        )

    def _check_identity(self, path: Path, repository_id: bytes | None, prefix: str | None) -> None:
        if prefix is not None and prefix != self.name:
            raise self._error(path, 0, f"it belongs to prefix {prefix!r}, not {self.name!r}")
        if (
            repository_id is not None
            and self._repository_id is not None
            and repository_id != self._repository_id
        ):
            raise self._error(
                path,
                0,
                f"it belongs to repository {repository_id.hex()}, not {self._repository_id.hex()}",
            )

    def _scan_main(self, size: int) -> None:
        """Read the whole segments after the last one read (up to ``size``)."""
        self._adopt_known_checkpoint(size)
        reader = fmt.FileReader(self._main_fd, self._scanned_end, size)
        while reader.pos < size:
            start = reader.pos
            segment = fmt.read_segment(reader, load_values=False)
            if segment is None:
                break  # a checkpoint in progress, debris, or damage: see _check_main_tail
            first = segment.batches[0].seq
            if first != self._boundaries[start] + 1:
                self._damaged(
                    self.main_path,
                    start,
                    f"its segment starts at commit {first}, after commit {self._boundaries[start]}",
                )
                return
            for batch in segment.batches:
                self._deliver(batch, in_wal=False)
            self._boundaries[segment.end] = segment.last_seq
            self._scanned_end = segment.end

    def _adopt_known_checkpoint(self, size: int) -> None:
        """Take a segment another process checkpointed from WAL batches this log has read.

        Such a segment is those batches' WAL bytes back to back, closed by the trailer their
        metadata CRCs give; if the trailer found where it must be is exactly that one, the index
        moves to the main file by arithmetic instead of a parse of every batch (a writer
        following a copier's checkpoint of a full WAL would spend half a second parsing).
        Values stay checked against their CRCs whenever they are read.
        """
        header = self._wal_header
        index = self._wal_index
        if not (self._wal_applies and header and index and header.base_len == self._scanned_end):
            return
        first, last = index[0], index[-1]
        start = self._scanned_end
        at = start + last.offset + last.size - first.offset
        meta = last.meta_chain
        if self._header.version >= 3:
            record = fmt.read_index_record(fmt.FileReader(self._main_fd, at, size), check=False)
            if record is None:
                return  # not (only) our batches, or not written yet: parse it
            at, index_crc = record
            meta = fmt.chain_meta_crc(index_crc, meta)
        trailer = fmt.encode_trailer(last.seq, start, len(index), meta)
        if at + len(trailer) > size or os.pread(self._main_fd, len(trailer), at) != trailer:
            return  # not (only) our batches: parse it
        self._moved(index, start, at + len(trailer))

    def _moved(self, batches: list[_WalBatch], start: int, end: int) -> None:
        """The WAL ``batches`` now form the main-file segment ``[start, end)``."""
        first, last = batches[0], batches[-1]
        if self._sink is not None:
            self._sink.moved(first.seq, last.seq, start - first.offset)
        for boundary in [b for b in self._boundaries if start < b < end]:
            del self._boundaries[boundary]  # of an unfinished checkpoint written over
        self._boundaries[end] = last.seq
        self._scanned_end = end

    def _deliver(self, batch: fmt.Batch, *, in_wal: bool) -> None:
        if batch.seq == self._watch[0]:
            self._watch = (batch.seq, batch.token)
        if batch.seq <= self._seq:
            if not in_wal and self._sink is not None:
                self._sink.repoint(batch)  # applied from the WAL before; now checkpointed
            return
        if self._sink is not None:
            if in_wal:
                self._sink.apply_wal(batch)
            else:
                self._sink.apply_main(batch)
        elif in_wal and self._index_sink is not None:
            self._index_sink.apply_wal(batch)  # checkpointed ones are in the index
        self._seq = batch.seq

    def _open_wal(self, *, strict: bool) -> None:
        """(Re)open the WAL, check that it continues this main file, and read its batches."""
        self._drop_wal()
        flags = os.O_RDWR if self._writable else os.O_RDONLY
        try:
            fd = open_regular(self.wal_path, flags)
        except FileNotFoundError:
            return  # no WAL (a prefix created by a process that died before writing it)
        # No kernel read-ahead: it would bring the zeros of the reservation after the last
        # batch into the page cache, where they count as data (SEEK_DATA), and every look at
        # the tail (tail_is_clear) would read them again. Reads here are sized by the log.
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
        self._wal_fd = fd
        self._wal_ino = os.fstat(fd).st_ino
        try:
            header = fmt.unpack_wal_header(os.pread(fd, fmt.HEADER_SIZE, 0))
        except CorruptFileError as err:
            # It may hold commits that nothing else has: never taken for "no WAL".
            self._damaged(self.wal_path, 0, f"its header is damaged ({err.message})")
            return
        self._check_identity(self.wal_path, header.repository_id, header.prefix)
        self._wal_header = header
        self._wal_pos = header.size
        self._fenced_through = header.fenced_through
        if header.file_id != self._header.file_id or header.main_salt != self._header.salt:
            return  # of another main file of this prefix (replaced by a copy): never applied
        if header.base_len not in self._boundaries and not self._find_boundary(header):
            return
        self._wal_applies = True
        self._wal_size = os.fstat(fd).st_size
        self._read_wal(strict=strict)
        if strict:
            self._check_main_tail()

    def _find_boundary(self, header: fmt.WalHeader) -> bool:
        """Make sure the WAL's ``base_len`` is a boundary holding ``base_seq``; False after
        recording damage (tolerant)."""
        size = os.fstat(self._main_fd).st_size
        # A sink told every commit must be told those of a checkpoint that landed after this
        # log last scanned the main file: only before it read anything may it skip them.
        unread = self._scanned_end == self._header.size
        if (
            not self._scan
            and (self._sink is None or unread)
            and (self._scanned_end < header.base_len <= size)
        ):
            # Not scanning the main file: trust the boundary the trailer ending there proves.
            trailer = fmt.read_trailer(
                fmt.FileReader(self._main_fd, header.base_len - fmt.TRAILER_SIZE, header.base_len)
            )
            if trailer is not None and trailer.last_seq == header.base_seq:
                self._boundaries[header.base_len] = header.base_seq
                self._scanned_end = header.base_len
                self._seq = header.base_seq
                self._scan_main(size)  # an unfinished checkpoint after it, if any
                return True
        elif header.base_len > self._scanned_end and size > self._scanned_end:
            self._scan_main(size)  # a checkpoint landed after this log looked at the main file
            if header.base_len in self._boundaries:
                return True
        if self._boundaries.get(header.base_len) == header.base_seq:
            return True
        if header.base_len > size:
            reason = (
                f"it ends at offset {size}, but its WAL shows it was durable up to offset "
                f"{header.base_len} (commit {header.base_seq}): the main file was shortened"
            )
            self._damaged(self.main_path, size, reason)
        elif header.base_len > self._scanned_end:
            bad = _locate_damage(self._main_fd, self._scanned_end, size, 0)
            reason = (
                f"{bad.reason}, although its WAL shows it was durable up to offset "
                f"{header.base_len} (commit {header.base_seq})"
            )
            self._damaged(self.main_path, bad.offset, reason)
        else:
            reason = (
                f"it continues the main file from offset {header.base_len} (commit "
                f"{header.base_seq}), which is not a commit boundary of it"
            )
            self._damaged(self.wal_path, 0, reason)
        return False

    def _follow_wal(self) -> None:
        try:
            st = os.stat(self.wal_path)
        except FileNotFoundError:
            self._drop_wal()
            return
        if st.st_ino != self._wal_ino:
            # Replaced by a checkpoint, which put every commit of the old WAL in the main file
            # first: one this log read there but the main file lacks was appended to the old
            # WAL after the checkpoint read it (a fenced writer's late append).
            self._scan_main(os.fstat(self._main_fd).st_size)
            if self._wal_index and self._seq > self._boundaries[self._scanned_end]:
                raise _Diverged(self._boundaries[self._scanned_end])
            self._open_wal(strict=False)
        elif st.st_size != self._wal_pos:
            self._read_wal(strict=False)

    def _read_wal(self, *, strict: bool) -> None:
        """Read the whole batches after the last one read; ``strict``: tell a torn tail from
        damage there (following, a partial batch is a write in progress)."""
        if not self._wal_applies or self._wal_header is None:
            return
        if not strict and not fmt.batch_starts_at(self._wal_fd, self._wal_pos):
            return  # reserved space (zeros), a torn tail, or a write in progress
        self._read_batches(fmt.FileReader.CHUNK if strict else _FOLLOW_CHUNK)
        # Following, a batch that begins where reading stopped is a write in progress, unless
        # a whole batch follows it: damage, which a reader opening now would report too.
        if strict or fmt.batch_starts_at(self._wal_fd, self._wal_pos):
            self._check_wal_tail()

    def _read_batches(self, chunk: int = _FOLLOW_CHUNK) -> None:
        header = self._wal_header
        assert header is not None
        fd = self._wal_fd
        end = os.fstat(fd).st_size
        reader = fmt.FileReader(
            fd, self._wal_pos, end, chunk=chunk, ahead_to=written_end(fd, self._wal_pos, end)
        )
        expected = header.base_seq + len(self._wal_index) + 1
        batches: list[fmt.Batch] = []
        wrong = None
        while True:
            start = reader.pos
            batch = fmt.read_batch(reader, load_values=True)
            if batch is None:
                reader.pos = start
                break
            if batch.seq != expected + len(batches):
                reader.pos, wrong = start, batch.seq
                break
            batches.append(batch)
        if (batches or wrong is not None) and not self._wal_is_current():
            raise _Stale  # read after a fence replaced it: nothing of it is trusted
        for batch in batches:
            self._index_wal_batch(batch.seq, batch.offset, batch.meta_crc, batch.raw or b"")
            self._deliver(batch, in_wal=True)
        self._wal_pos = reader.pos
        if wrong is not None:
            self._damaged(
                self.wal_path,
                reader.pos,
                f"commit {wrong} where commit {expected + len(batches)} belongs",
            )

    def _wal_is_current(self) -> bool:
        """Whether the WAL path still names the file this log reads."""
        try:
            return os.stat(self.wal_path).st_ino == self._wal_ino
        except FileNotFoundError:
            return False

    def _check_wal_tail(self) -> bool:
        """Whether the WAL ends cleanly after its last whole batch (zeros, or a torn tail that
        can be dropped); damage after it is recorded or raised."""
        fd = self._wal_fd
        while True:
            end = os.fstat(fd).st_size
            if end <= self._wal_pos or tail_is_clear(fd, self._wal_pos, end):
                return True
            later = _valid_batch_after(fd, self._wal_pos, end, self._seq)
            sound = _sound_batch_at(fd, self._wal_pos, end)  # appended since this log looked
            if later is None and not sound and not _whole_but_damaged(fd, self._wal_pos, end):
                return False  # a torn tail (or, without the lease, a write in progress)
            # Read again, afresh: without the lease, a writer may have completed the batch
            # here since it was read (and appended the one after it), which is no damage.
            before = self._wal_pos
            self._read_batches()
            if self.damage is not None:
                return False
            if self._wal_pos != before:
                continue
            if later is None:
                reason = (
                    "the last batch is whole (its header checks, every part of it was "
                    "written) but fails its checksum: damage, not a torn write"
                )
            else:
                reason = (
                    f"the batch there fails its checksum or structure, and a whole batch "
                    f"(commit {later[1]}) follows at offset {later[0]}"
                )
            self._damaged(self.wal_path, self._wal_pos, reason)
            return False

    def _tail_is_clean(self) -> bool:
        """:meth:`_check_wal_tail`, reading on if the WAL is replaced meanwhile (which only a
        fenced writer's stale rename could do under a write lease: it finds no temp)."""
        while self._wal_applies:
            try:
                return self._check_wal_tail()
            except _Stale:
                self.follow()
        return True

    def _check_main_tail(self) -> None:
        """Bytes after the last whole segment are an unfinished checkpoint's only where the
        WAL holds its commits; and a checkpoint's whole segments there must be of them."""
        size = os.fstat(self._main_fd).st_size
        header = self._wal_header
        covered = self._wal_applies and header is not None and header.base_len <= self._scanned_end
        if size > self._scanned_end and not covered:
            bad = _locate_damage(self._main_fd, self._scanned_end, size, 0)
            reason = f"{bad.reason}; no WAL shows these bytes to be an unfinished checkpoint"
            self._damaged(self.main_path, bad.offset, reason)
            return
        if covered and header is not None and self._scanned_end > header.base_len:
            written = self._batches_between(header.base_len, self._scanned_end)
            held = [(b.seq, b.meta_crc) for b in self._wal_index[: len(written)]]
            if written != held:
                self._damaged(
                    self.main_path,
                    header.base_len,
                    "an unfinished checkpoint there does not match the WAL's commits",
                )

    def _batches_between(self, start: int, end: int) -> list[tuple[int, int]]:
        reader = fmt.FileReader(self._main_fd, start, end)
        found = []
        while reader.pos < end:
            segment = fmt.read_segment(reader, load_values=False)
            if segment is None:
                break
            found += [(batch.seq, batch.meta_crc) for batch in segment.batches]
        return found

    def _index_wal_batch(self, seq: int, offset: int, meta_crc: int, frame: bytes) -> None:
        """Remember a whole, checked batch ``frame`` of the WAL at ``offset``."""
        index = self._wal_index
        wal_crc, chain = (index[-1].wal_crc, index[-1].meta_chain) if index else (0, 0)
        # tuple.__new__: a NamedTuple's own constructor is a Python function (once per commit).
        fields = (
            seq,
            offset,
            len(frame),
            meta_crc,
            crc32(frame, wal_crc),
            fmt.chain_meta_crc(meta_crc, chain),
        )
        index.append(tuple.__new__(_WalBatch, fields))

    def _drop_wal(self) -> None:
        if self._wal_fd >= 0:
            # Replaced or deleted: closing it may free its blocks (see _closing), which is no
            # work for a writer that waits for its lease or a reader catching up.
            close_later(self._wal_fd)
        self._wal_fd = -1
        self._wal_ino = -1
        self._wal_header = None
        self._wal_applies = False
        self._wal_pos = 0
        self._wal_index = []

    # -- damage ------------------------------------------------------------------------------

    def _error(self, path: Path, offset: int, reason: str) -> CorruptFileError:
        root, name = path.parent, self.name
        return CorruptFileError(
            f"prefix {name!r}: {path} is damaged at offset {offset}: {reason}. Nothing was "
            f"written over it; run `hotcopy salvage {root} {name}` to keep what is provable "
            "(or restore the prefix from a backup)",
            prefix=name,
            path=str(path),
            offset=offset,
        )

    def _damaged(self, path: Path, offset: int, reason: str) -> None:
        """Record damage (tolerant) or raise it; callers stop reading that file there."""
        if not self._tolerant:
            raise self._error(path, offset, reason)
        if self.damage is None:
            self.damage = Damage(str(path), offset, reason)

    # -- changing the files (under a write or exclusive lease) -------------------------------

    def prepare(self, lease: HeldLease, expired: int) -> None:
        """Make the files ready for ``lease``'s holder to change them; once per grant.

        Follows what others did, refuses damage, fences when a lease has expired since the WAL
        was made (``expired``: the largest token of an expired lease, from the coordinator),
        finishes an unfinished checkpoint, and drops a torn WAL tail. A lease resumed after
        parking needs none of it: nobody else could change anything meanwhile.
        """
        self._check_writable()
        self._files_as_left = False
        self.follow()
        self._check_main_tail()
        header = self._wal_header
        clean = not self._wal_applies or self._tail_is_clean()
        unfinished = (
            self._wal_applies and header is not None and self._scanned_end > header.base_len
        )
        if expired > self._fenced_through:
            # A holder may be stopped with a change pending: make it land nowhere. Every
            # holder before this one had a smaller token, and all of them are fenced now.
            remove_temps_of(self.main_path)
            remove_temps_of(self.wal_path)
            self._fenced_through = max(lease.token - 1, 0)
            self._checkpoint(lease, always=True)
        elif unfinished or not self._wal_applies:
            self._checkpoint(lease, always=True)  # finish it, or a WAL for this main file
        elif not clean:
            # A writer died mid-append: its torn batch was never acknowledged. Removed, so that
            # nothing stale can follow the next batch.
            os.ftruncate(self._wal_fd, self._wal_pos)
            self._sync(self._wal_fd, self.wal_path, "prepare:wal-fsync")
        self._wal_size = os.fstat(self._wal_fd).st_size
        self._files_as_left = True

    def append(
        self,
        lease: HeldLease,
        seq: int,
        frame: bytes,
        meta_crc: int,
        announce: Callable[[], Callable[[], None]] | None = None,
    ) -> int:
        """Append the batch ``frame`` of commit ``seq`` to the WAL durably; its offset there.

        ``announce`` is called once the batch is in the file, before its fsync, and what it
        returns before the commit counts as made: it tells other processes to look.

        Raises:
            LeaseFenced: the lease is not current; nothing was written.
            CommitUnconfirmed: written, but the lease lapsed before the write was confirmed:
                call :meth:`settle` with the lease taken again.
            SyncFailed: the fdatasync failed; this process writes the prefix no more.
        """
        self._check_writable()
        if not lease.is_current():
            raise self._fenced(lease, "commit")
        at = self._wal_pos
        if BREAK == "ack-before-write" and self._deferred is None:
            # Broken on purpose (scripts/stress.py --break): acknowledged now, written later.
            self._deferred = (seq, frame, meta_crc)
            self._seq = seq
            self._files_as_left = False
            return at
        batches = [(seq, frame, meta_crc)]
        if self._deferred is not None:
            batches.insert(0, self._deferred)
            self._deferred = None
        data = b"".join(batch[1] for batch in batches)
        end = at + len(data)
        if end > self._wal_size:
            self._wal_size = reserve(self._wal_fd, self._wal_size, end)
        self._files_as_left = False
        fault("commit:before-wal-write")
        if fault_due("commit:torn-wal-write"):
            os.pwrite(self._wal_fd, data[: len(data) // 2], at)
            os.kill(os.getpid(), signal.SIGKILL)
        pwrite_all(self._wal_fd, data, at)
        fault("commit:after-wal-write")
        acknowledge = announce() if announce is not None else None
        self._sync(self._wal_fd, self.wal_path, "commit:wal-fsync", data_only=True)
        fault("commit:after-wal-fsync")
        if acknowledge is not None:
            acknowledge()
        if not lease.is_current():
            self._watch = (seq, None)
            raise CommitUnconfirmed(
                f"commit {seq} to prefix {self.name!r} was written after its lease lapsed",
                prefix=self.name,
                seq=seq,
            )
        for batch_seq, batch_frame, batch_meta in batches:
            self._index_wal_batch(batch_seq, at, batch_meta, batch_frame)
            at += len(batch_frame)
        self._wal_pos = end
        self._wal_size = max(self._wal_size, end)
        self._seq = seq
        self._files_as_left = True
        return end - len(frame)

    def settle(self, lease: HeldLease, expired: int, token: int) -> bool:
        """After :class:`CommitUnconfirmed`, with the lease taken again: whether the commit of
        ``token`` written then is in the log (whoever fenced first found it in the WAL)."""
        seq = self._watch[0]
        main_fd = os.dup(self._main_fd)  # the main file a fence would have checkpointed into
        base = self._wal_header.base_len if self._wal_header is not None else self._scanned_end
        try:
            self.prepare(lease, expired)  # reads the log as it is now (and fences, if due)
            found = self._watch[1]
            if not found:  # not read (or merged by a compaction, token 0): look where it was
                found = _token_in_main(main_fd, base, seq)
            return found == token
        finally:
            self._watch = (0, None)
            os.close(main_fd)

    def checkpoint(self, lease: HeldLease) -> Cut:
        """Move the WAL's commits into the main file and start a fresh WAL; the cut reached."""
        self._check_writable()
        if not self._files_as_left:
            raise StorageError(f"prefix {self.name!r}: checkpoint before prepare", prefix=self.name)
        return self._checkpoint(lease, always=False)

    def _checkpoint(self, lease: HeldLease, *, always: bool) -> Cut:
        """The one checkpoint: every whole batch of the WAL, as one segment at the WAL's
        ``base_len``, then a fresh WAL. What it writes is determined by the WAL it reads, so a
        stopped checkpointer's late write of the same segment changes nothing."""
        header = self._wal_header
        batches = self._wal_index if self._wal_applies else []
        base = header.base_len if self._wal_applies and header is not None else self._scanned_end
        if not batches and not always:
            return self.cut()
        self._files_as_left = False
        end, seq = base, self._boundaries[base]
        if batches:
            first, last = batches[0], batches[-1]
            data = fmt.pread_exact(
                self._wal_fd, last.offset + last.size - first.offset, first.offset
            )
            if crc32(data) != last.wal_crc:
                bad = max(fmt.first_bad_frame(data, [batch.size for batch in batches]), 0)
                err = self._error(
                    self.wal_path, batches[bad].offset, "a batch failed its checksum on re-read"
                )
                # Commits appended after a damaged one are not recovered without a salvage:
                # none is acknowledged any more.
                self._stopped = (
                    CorruptFileError,
                    f"finding {self.wal_path} damaged at offset {batches[bad].offset} (run "
                    f"`hotcopy salvage {self.wal_path.parent} {self.name}`)",
                )
                raise err
            record, trailer = self._segment_close(
                base, data, len(batches), last.meta_chain, last.seq
            )
            self._require(lease, "checkpoint")
            fault("checkpoint:before-main-write")
            pwrite_all(self._main_fd, data, base)
            fault("checkpoint:after-batches-write")
            pwrite_all(self._main_fd, record, base + len(data))
            fault("checkpoint:after-index-write")
            pwrite_all(self._main_fd, trailer, base + len(data) + len(record))
            fault("checkpoint:after-main-write")
            self._sync(self._main_fd, self.main_path, "checkpoint:main-fsync")
            fault("checkpoint:after-main-fsync")
            end, seq = base + len(data) + len(record) + len(trailer), last.seq
            self._moved(batches, base, end)
        self._new_wal(lease, end, seq)
        fault("checkpoint:after-wal-reset")
        self._refresh_index()
        self._files_as_left = True
        return Cut(end, seq, self._header.file_id)

    def _segment_close(
        self, start: int, data: bytes, n_batches: int, meta_chain: int, last_seq: int
    ) -> tuple[bytes, bytes]:
        """What closes the segment of the batch frames ``data`` at ``start`` (``meta_chain``:
        their metadata CRCs chained): its key index record (format 3 on) and its trailer."""
        version = self._header.version
        if version < 3:
            return b"", fmt.encode_trailer(last_seq, start, n_batches, meta_chain)
        if version < fmt.FORMAT_VERSION:
            # Its index record would have to be of its own format, which this version only
            # checks: nothing is written.
            raise NeedsMigration(
                f"prefix {self.name!r}: {self.main_path} is in format {version} and commits "
                f"wait in its WAL, which this version cannot move into it: run `hotcopy "
                f"migrate {self.main_path.parent}` first (it rewrites each prefix in format "
                f"{fmt.FORMAT_VERSION})",
                prefix=self.name,
                version=version,
            )
        entries = fmt.frame_entries(data, start)
        try:
            return close_segment(
                self.index_at(start),
                fmt.op_puts,
                (start, start + len(data)),
                n_batches,
                meta_chain,
                last_seq,
                entries,
            )
        except CorruptFileError as err:  # an op the index at ``start`` names
            raise self._main_damaged(err) from None

    def _new_wal(self, lease: HeldLease, base_len: int, base_seq: int) -> None:
        header = fmt.WalHeader(
            self._header.file_id,
            self._header.salt,
            base_len,
            base_seq,
            self._repository_id or self._header.repository_id,
            self.name,
            self._fenced_through,
        )
        self._replace(self.wal_path, fmt.pack_wal_header(header), lease)
        self._open_wal(strict=False)

    def _replace(
        self,
        path: Path,
        content: bytes | Callable[[int], None],
        lease: HeldLease,
        *,
        sync: bool = True,
    ) -> None:
        """Replace ``path`` durably, unless ``lease`` lapsed first (then LeaseFenced)."""
        try:
            write_durably(
                path,
                content,
                sync=sync,
                before_rename=lambda: self._require(lease, "replacement of its files"),
            )
        except FileNotFoundError:
            if not lease.is_current():  # a successor fenced us and removed our temp
                raise self._fenced(lease, "replacement of its files") from None
            raise
        except SyncFailed as err:
            self._fail(err)

    def _require(self, lease: HeldLease, what: str) -> None:
        if not lease.is_current():
            raise self._fenced(lease, what)

    def _fenced(self, lease: HeldLease, what: str) -> LeaseFenced:
        return LeaseFenced(
            f"{what} of prefix {self.name!r} refused: its lease (token {lease.token}) is no "
            "longer current; nothing was written",
            prefix=self.name,
            token=lease.token,
        )

    def _sync(self, fd: int, path: Path, point: str, *, data_only: bool = False) -> None:
        try:
            sync_file(fd, path, data_only=data_only, fault_point=point)
        except SyncFailed as err:
            self._fail(err)

    def _fail(self, err: SyncFailed) -> None:
        """An fsync failed: Linux reports a writeback error once and may drop the pages, so a
        later success would prove nothing. This process writes the prefix no more; the next
        opener reads what the files prove."""
        self._stopped = (SyncFailed, f"an fsync failed ({err.message})")
        raise SyncFailed(
            f"prefix {self.name!r}: {err.message}; this process stopped writing the prefix: "
            "close it and open it again to go on from what the files hold",
            prefix=self.name,
            path=err.fields.get("path"),
        ) from err

    def _check_writable(self) -> None:
        if self._stopped is not None:
            error, why = self._stopped
            raise error(
                f"prefix {self.name!r}: this process stopped writing the prefix after {why}; "
                "close it and open it again",
                prefix=self.name,
            )
        if not self._writable:
            raise StorageError(f"prefix {self.name!r} is open read-only", prefix=self.name)

    def salvage(self, lease: HeldLease) -> Salvaged:
        """Keep what is provable of a damaged prefix (a log opened ``tolerant``), under its
        exclusive ``lease``: the main file's whole segments before any damage in it (values
        checked too), and the WAL's batches before any damage in it when the WAL continues
        what is kept. Whole segments are never written over. The commits lost with the damage
        stay taken, as empty commits: a number is never handed out twice. Damaged files are
        moved aside under new names, never deleted."""
        self._check_writable()
        damage = self.damage or self._value_damage()
        if damage is None:
            return Salvaged(self._seq, None, None, [])
        remove_temps_of(self.main_path)  # fence, as prepare() would (exclusive: nobody else)
        remove_temps_of(self.wal_path)
        self._fenced_through = max(lease.token - 1, 0)
        header = self._wal_header
        in_main = damage.path == str(self.main_path)
        # Whole segments after the WAL's boundary that do not match it: the main file is
        # provable, the WAL (an older or foreign one) is what is wrong.
        wal_behind = (
            in_main and self._wal_applies and header is not None
            and header.base_len < self._scanned_end
        )  # fmt: skip
        rewrite = in_main and not wal_behind  # never write where damage is: a new main file
        kept_end = self._scanned_end
        if rewrite and 0 < damage.offset < kept_end:  # a damaged value inside whole segments
            kept_end = max(end for end in self._boundaries if end <= damage.offset)
        main_seq = self._boundaries[kept_end]
        usable = (
            self._wal_applies and header is not None and header.base_len <= kept_end
            and (not in_main or damage.offset == 0)  # a header rebuilt from the WAL's
        )  # fmt: skip
        kept_batches = [b for b in self._wal_index if b.seq > main_seq] if usable else []
        kept = main_seq + len(kept_batches)
        lost_last = max([kept, self._seq, *self._seqs_in_damage()])
        segment = self._salvaged_segment(kept_end, kept_batches, kept, lost_last, lease.token)
        aside = [_move_aside(self.wal_path)] if self._wal_fd >= 0 else []
        if not rewrite:
            end = kept_end
            if segment:
                self._require(lease, "salvage")
                pwrite_all(self._main_fd, segment, kept_end)
                self._sync(self._main_fd, self.main_path, "salvage:main-fsync")
                end += len(segment)
            self._new_wal(lease, end, lost_last)
        else:
            aside.append(_move_aside(self.main_path))
            fresh = self._header._replace(salt=int.from_bytes(os.urandom(8)))

            def write(fd: int) -> tuple[int, int]:
                pwrite_all(fd, fmt.pack_main_header(fresh), 0)
                at = fresh.size
                while at < kept_end:
                    chunk = os.pread(self._main_fd, min(4 << 20, kept_end - at), at)
                    pwrite_all(fd, chunk, at)
                    at += len(chunk)
                pwrite_all(fd, segment, kept_end)
                return kept_end + len(segment), lost_last

            install_files(self.main_path.parent, self.name, fresh, write, lease=lease)
        lost = (kept + 1, lost_last) if lost_last > kept else None
        return Salvaged(kept, lost, damage, aside)

    def _value_damage(self) -> Damage | None:
        """Damage a scan of keys does not see: a value of the main file's whole segments."""
        found = check_main_file(self._main_fd, end=self._scanned_end)
        if found.error is None or found.offset is None:
            return None
        self.damage = Damage(str(self.main_path), found.offset, found.error)
        return self.damage

    def _salvaged_segment(
        self, start: int, kept: list[_WalBatch], after: int, last: int, token: int
    ) -> bytes:
        """The segment salvage appends at ``start``: the WAL ``kept`` batches, then an empty
        commit for each lost number ``after + 1 .. last``; empty if there is neither."""
        frames, metas = [], []
        if kept:
            first, final = kept[0], kept[-1]
            frames.append(
                fmt.pread_exact(
                    self._wal_fd, final.offset + final.size - first.offset, first.offset
                )
            )
            metas = [batch.meta_crc for batch in kept]
        for seq in range(after + 1, last + 1):
            frame, meta = fmt.encode_batch_with_meta(seq, token, [])
            frames.append(frame)
            metas.append(meta)
        if not metas:
            return b""
        data = b"".join(frames)
        chain = crc32(struct.pack(f"<{len(metas)}I", *metas))
        record, trailer = self._segment_close(start, data, len(metas), chain, last)
        return data + record + trailer

    def _seqs_in_damage(self) -> list[int]:
        """The commits of every whole batch found in the damaged parts (what the damage cost)."""
        found = []
        size = os.fstat(self._main_fd).st_size
        if size > self._scanned_end:
            found += [b.seq for b in wal_batches_after(self._main_fd, self._scanned_end, size)]
        if self._wal_fd >= 0:
            start = self._wal_pos if self._wal_applies else 0
            end = os.fstat(self._wal_fd).st_size
            found += [b.seq for b in wal_batches_after(self._wal_fd, start, end)]
        return found

    def close(self) -> None:
        self._index = _index.KeyIndex.empty()
        self._read = None
        for attr in ("_main_fd", "_wal_fd"):
            fd = getattr(self, attr, -1)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)


# -- whole files: creation, replacement, checks ----------------------------------------------


def new_main_header(repository_id: bytes, name: str, base_seq: int = 0) -> fmt.MainHeader:
    """The header of a new main file (a new file id: a new chain of incremental backups)."""
    return fmt.MainHeader(
        os.urandom(16), int.from_bytes(os.urandom(8)), time.time_ns(), base_seq, repository_id, name
    )


def create_prefix_files(root: Path, name: str, repository_id: bytes) -> None:
    """Create an empty prefix; ``FileExistsError`` if its main file exists."""
    header = new_main_header(repository_id, name)
    write_durably(main_path(root, name), fmt.pack_main_header(header), overwrite=False)
    wal = fmt.WalHeader(header.file_id, header.salt, header.size, 0, repository_id, name)
    with contextlib.suppress(FileExistsError):  # left by a creator that died: never replaced
        write_durably(wal_path(root, name), fmt.pack_wal_header(wal), overwrite=False)


def install_files(
    root: Path,
    name: str,
    header: fmt.MainHeader,
    write_main: Callable[[int], tuple[int, int]],
    *,
    lease: HeldLease | None,
    sync: bool = True,
    wal_frames: bytes = b"",
) -> tuple[int, int]:
    """Make a new main file with ``header`` (written by ``write_main``, which returns the cut
    ``(length, seq)`` it wrote) and a fresh WAL the files of prefix ``name``: a compaction, a
    restore, a salvage. Returns that cut.

    ``wal_frames``: commits that follow the cut, as WAL batch frames (a restore rolled forward
    from a replica's log); checked before anything is written, they become the new WAL's.

    Under the prefix's exclusive ``lease``, whose holder may follow one that is stopped: both
    files are new (whatever a stopped holder writes goes to the old ones), its temps go first
    (see :class:`Log`), and every rename checks the lease. Without a lease (a staged restore
    into a directory nobody else knows) none of it is needed.
    """
    main, wal = main_path(root, name), wal_path(root, name)
    check = None
    fenced = 0
    if lease is not None:
        held: HeldLease = lease

        def check() -> None:
            if not held.is_current():
                raise LeaseFenced(
                    f"replacement of prefix {name!r} refused: its lease is no longer current",
                    prefix=name,
                    token=held.token,
                )

        remove_temps_of(main)
        remove_temps_of(wal)
        fenced = max(lease.token - 1, 0)
    cut = (0, 0)

    def write(fd: int) -> None:
        nonlocal cut
        cut = write_main(fd)
        if wal_frames:
            check_frames(wal_frames, cut[1])

    write_durably(main, write, sync=sync, before_rename=check)
    fresh = fmt.WalHeader(
        header.file_id, header.salt, cut[0], cut[1], header.repository_id, name, fenced
    )
    write_durably(wal, fmt.pack_wal_header(fresh) + wal_frames, sync=sync, before_rename=check)
    return cut


def close_segment(
    previous: _index.KeyIndex,
    confirm: _index.Confirm[object],
    span: tuple[int, int],
    n_batches: int,
    meta_chain: int,
    last_seq: int,
    entries: dict[bytes, int],
) -> tuple[bytes, bytes]:
    """The key index record and the trailer that close a segment whose batches lie in
    ``span`` (``previous``: the index at its start, whose ops ``confirm`` reads; ``entries``:
    the keys the batches change, see :func:`~hotcopy.storage._format.frame_entries`)."""
    start, end = span
    record = _index.encode_record(previous, sorted(entries.items()), end, confirm)
    meta = fmt.chain_meta_crc(_index.record_crc(record), meta_chain)
    return record, fmt.encode_trailer(last_seq, start, n_batches, meta)


def write_compacted(
    fd: int, header: fmt.MainHeader, seq: int, records: Iterator[tuple[str, int, bytes]]
) -> int:
    """Write ``header`` and one segment holding ``records`` (key, vtype, value; sorted by key)
    as commit ``seq`` to the new main file on ``fd``; where it ends."""
    os.pwrite(fd, fmt.pack_main_header(header), 0)
    start = header.size
    pos = start + fmt.BATCH_SIZE  # the batch header goes in last
    body_crc = 0
    n_ops = 0
    entries = {}
    for key, vtype, payload in records:
        op = fmt.encode_op(fmt.OP_PUT, key, vtype, payload)
        pwrite_all(fd, op, pos)
        encoded = key.encode("utf-8", "surrogatepass")
        entries[encoded] = _index.target_of(pos, crc32(op[: fmt.OP_SIZE + len(encoded)]))
        body_crc = crc32(op, body_crc)
        pos += len(op)
        n_ops += 1
    body_len = pos - start - fmt.BATCH_SIZE
    pwrite_all(fd, fmt.encode_batch_header(seq, 0, n_ops, body_len, body_crc), start)
    batch = fmt.read_batch(fmt.FileReader(fd, start, pos), load_values=False)
    if batch is None:
        raise CorruptFileError("compacted batch failed to read back", offset=start)
    chain = fmt.chain_meta_crc(batch.meta_crc)
    record, trailer = close_segment(
        _index.KeyIndex.empty(),
        fmt.op_puts,
        (start, pos),
        1,
        chain,
        seq,
        entries,
    )
    pwrite_all(fd, record + trailer, pos)
    return pos + len(record) + len(trailer)


class _Records:
    """The live records of the last commit a log reads (a :class:`LogSink`): the offset of
    each one in the main file, or its value read from the WAL."""

    def __init__(self) -> None:
        self.live: dict[str, int | tuple[int, bytes]] = {}

    def reset(self) -> None:
        self.live = {}

    def apply_main(self, batch: fmt.Batch) -> None:
        for op in batch.ops:
            if op.kind == fmt.OP_PUT:
                self.live[op.key] = op.offset
            else:
                self.live.pop(op.key, None)

    def apply_wal(self, batch: fmt.Batch) -> None:
        for op in batch.ops:
            if op.kind == fmt.OP_PUT:
                self.live[op.key] = (op.vtype, op.value or b"")
            else:
                self.live.pop(op.key, None)

    def repoint(self, batch: fmt.Batch) -> None:
        pass  # the value read from the WAL is the same

    def moved(self, first_seq: int, last_seq: int, shift: int) -> None:
        pass


def migrate_files(root: Path, name: str, repository_id: bytes, lease: HeldLease) -> int | None:
    """Rewrite prefix ``name`` in the current format under its exclusive ``lease``, as a
    compaction would (every live record as one commit, a new file id): the format it was in,
    or None if it was current. Damage is refused (salvage first)."""
    records = _Records()
    log = Log(root, name, repository_id, writable=True, sink=records)
    try:
        version = log.header.version
        if version >= fmt.FORMAT_VERSION:
            return None
        seq = log.seq
        header = new_main_header(repository_id, name, max(seq - 1, 0))

        def values() -> Iterator[tuple[str, int, bytes]]:
            for key in sorted(records.live):
                entry = records.live[key]
                yield (key, *(log.read_value(entry) if isinstance(entry, int) else entry))

        def write(fd: int) -> tuple[int, int]:
            if seq == 0:
                pwrite_all(fd, fmt.pack_main_header(header), 0)
                return header.size, 0
            return write_compacted(fd, header, seq, values()), seq

        install_files(root, name, header, write, lease=lease)
        return version
    finally:
        log.close()


def older_format(main: Path, version: int) -> str:
    """What to tell of the main file ``main`` of the older format ``version``."""
    return (
        f"{main} is in format {version}, which this version of hotcopy reads only to convert "
        f"it: run `hotcopy migrate {main.parent}` (it rewrites each prefix in format "
        f"{fmt.FORMAT_VERSION}, with a key index)"
    )


def main_file_format(path: Path) -> int:
    """The format of the main file at ``path``, from its header."""
    fd = open_regular(path)
    try:
        return fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0)).version
    finally:
        os.close(fd)


class MainCheck(NamedTuple):
    """What a complete check of a main file's bytes found."""

    size: int
    segments: int
    seq: int  # the last commit of the whole segments
    keys: int  # live keys at that commit
    end: int  # where the whole segments end
    boundaries: dict[int, int]
    error: str | None = None  # the first damage, at ``end``
    offset: int | None = None


def check_main_file(fd: int, *, end: int | None = None) -> MainCheck:
    """Check every byte of the main file on ``fd`` (up to ``end``): header, every checksum
    (values included), every structural rule, and that the key index of the last boundary
    (format 3 on) holds exactly the live keys, each at its last put. Stops at the first damage and
    reports it."""
    size = os.fstat(fd).st_size if end is None else end
    try:
        header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    except CorruptFileError as err:
        return MainCheck(size, 0, 0, 0, 0, {}, err.message, int(err.fields.get("offset", 0)))
    live: dict[str, int] = {}
    targets: dict[str, int] = {}  # what the key index must say of each key (format 3 on)
    boundaries = {header.size: header.base_seq}
    seq, at, segments = header.base_seq, header.size, 0
    for item in iter_segments(fd, header.size, size, header.base_seq, values=False):
        if isinstance(item, Damage):
            return MainCheck(
                size, segments, seq, len(live), at, boundaries, item.reason, item.offset
            )
        if header.version >= 3 and item.index_end is None:
            reason = "a segment without its key index"
            return MainCheck(size, segments, seq, len(live), at, boundaries, reason, item.start)
        for batch in item.batches:
            for op in batch.ops:
                if op.kind == fmt.OP_PUT:
                    live[op.key] = op.offset
                else:
                    live.pop(op.key, None)
                if header.version >= 3:
                    targets[op.key] = fmt.index_target(op) if op.kind == fmt.OP_PUT else 0
        seq, at, segments = item.last_seq, item.end, segments + 1
        boundaries[at] = seq
    if header.version >= 3 and segments:
        wrong = _index_mismatch(
            fd, at, {key: targets[key] for key in live}, format_3=header.version == 3
        )
        if wrong is not None:
            return MainCheck(size, segments, seq, len(live), at, boundaries, wrong, at)
    return MainCheck(size, segments, seq, len(live), at, boundaries)


def _index_mismatch(fd: int, end: int, live: dict[str, int], *, format_3: bool) -> str | None:
    """Why the key index at boundary ``end`` does not hold exactly ``live`` (key -> target),
    or None."""
    try:
        index = _index.open_index(_index.FileRead(fd), end - fmt.TRAILER_SIZE, format_3=format_3)
        if not format_3:  # (its entries are never looked up through a slot)
            for run in index.runs:  # hidden entries too: a slot answers for any key of its hash
                run.check_ops(fmt.op_puts)
        found = {key.decode("utf-8", "surrogatepass"): at for key, at in index.items()}
        counted = index.live
    except CorruptFileError as err:
        return f"its key index is damaged: {err.message}"
    if found != live:
        missing = sorted(set(live) - set(found))[:3]
        extra = sorted(set(found) - set(live))[:3]
        moved = sorted(key for key in set(live) & set(found) if live[key] != found[key])[:3]
        return (
            f"its key index does not match the data (missing {missing}, extra {extra}, "
            f"pointing elsewhere {moved})"
        )
    if counted != len(live):
        return f"its key index counts {counted} live keys, the data {len(live)}"
    return None


def iter_segments(
    fd: int,
    start: int,
    end: int,
    after_seq: int | None,
    *,
    shift: int = 0,
    index_structure: bool = True,
    values: bool = True,
    digest: fmt.RangeCrc | None = None,
) -> Iterator[fmt.Segment | Damage]:
    """The whole segments of ``[start, end)`` of a main file, every checksum checked (values
    too), each following the one before (and commit ``after_seq``, when given); a
    :class:`Damage` ends them where one does not parse or follow. ``shift``: see
    :func:`~hotcopy.storage._format.read_segment` (a delta's bytes). Without
    ``index_structure`` a key index is checked by its checksums only (what a copy needs), not
    entry by entry through its table (what ``verify`` does); without ``values`` the ops keep
    none (each checked all the same). ``digest`` is told every byte read (see
    :class:`~hotcopy.storage._format.RangeCrc`)."""
    reader = fmt.FileReader(fd, start, end, digest=digest)
    seq = after_seq
    while reader.pos < end:
        at = reader.pos
        segment = fmt.read_segment(
            reader,
            load_values=True,
            shift=shift,
            keep_raw=False,
            keep_values=values,
            index_structure=index_structure,
        )
        if segment is None:
            yield _locate_damage(fd, at, end, shift, index_structure=index_structure)
            return
        if seq is not None and segment.batches[0].seq != seq + 1:
            yield Damage("", at, f"commit {segment.batches[0].seq} follows commit {seq}")
            return
        seq = segment.last_seq
        yield segment


def _locate_damage(
    fd: int, start: int, end: int, shift: int, *, index_structure: bool = True
) -> Damage:
    """The first bad record of the segment at ``start`` that does not parse, and why."""
    reader = fmt.FileReader(fd, start, end)
    batches: list[fmt.Batch] = []
    index_crc = None
    while reader.pos < end:
        at = reader.pos
        if fmt.peek_is_trailer(reader):
            if fmt.read_trailer(reader) is None:
                return Damage("", at, "a segment trailer fails its checksum")
            if not batches:
                return Damage("", at, "a segment trailer closes no batch")
            expected = fmt.segment_trailer(start + shift, batches, index_crc)
            if os.pread(fd, fmt.TRAILER_SIZE, at) != expected:
                return Damage("", at, "a segment trailer does not match its batches")
            break
        if batches and index_crc is None and fmt.peek_is_index(reader):
            record = fmt.read_index_record(
                reader, check=True, shift=shift, structure=index_structure
            )
            if record is None:
                return Damage("", at, "the segment's key index fails its checksums or structure")
            index_crc = record[1]
            continue
        batch = fmt.read_batch(reader, load_values=True)
        if batch is None:
            return Damage("", at, "a batch fails its checksum or structure, or is cut short")
        if batches and batch.seq != batches[-1].seq + 1:
            return Damage("", at, f"commit {batch.seq} follows commit {batches[-1].seq}")
        batches.append(batch)
    return Damage("", start, "a segment without its trailer (an unfinished checkpoint)")


def _token_in_main(fd: int, start: int, seq: int) -> int | None:
    """The token of commit ``seq`` in the main file on ``fd``, looking from boundary ``start``."""
    end = os.fstat(fd).st_size
    reader = fmt.FileReader(fd, start, end)
    while reader.pos < end:
        segment = fmt.read_segment(reader, load_values=False)
        if segment is None:
            return None
        for batch in segment.batches:
            if batch.seq == seq:
                return batch.token
    return None


_SECTOR = 512  # the unit a disk writes whole, or not at all


def _whole_but_damaged(fd: int, start: int, end: int) -> bool:
    """Whether the bytes at ``start`` are a batch whose header checks and whose every part was
    written, yet which fails its checksum: damaged, where a torn write would have left a part
    of it as the zeros of reserved space (its end, or a whole sector) or cut the file short."""
    size = fmt.frame_size(os.pread(fd, fmt.BATCH_SIZE, start))
    if size is None or start + size > end:
        return False
    frame = fmt.pread_upto(fd, size, start)
    if len(frame) < size:
        return False  # the file was cut short meanwhile (a writer removed a torn tail)
    if _sound_batch_at(fd, start, start + size):
        return False  # whole and sound: not damaged (see _check_wal_tail)
    if not frame[-8:].strip(b"\0"):
        return False  # its end never written
    first = -(-start // _SECTOR) * _SECTOR
    for sector in range(first, start + size - _SECTOR + 1, _SECTOR):
        if not frame[sector - start : sector - start + _SECTOR].strip(b"\0"):
            return False  # a sector of it never written
    return True


def _tail_reader(fd: int, start: int, end: int) -> fmt.FileReader:
    """A reader of a WAL's tail that reads ahead only what was written: the zeros of a
    reservation it read would stay in the page cache as data, and every later look at the
    tail (:func:`tail_is_clear`) would read them again."""
    return fmt.FileReader(fd, start, end, ahead_to=written_end(fd, start, end))


def _sound_batch_at(fd: int, start: int, end: int) -> bool:
    """Whether the bytes at ``start`` are a whole batch that passes every check."""
    return fmt.read_batch(_tail_reader(fd, start, end), load_values=True) is not None


def _valid_batch_after(fd: int, start: int, end: int, last_seq: int) -> tuple[int, int] | None:
    """The offset and commit of a whole, valid batch that follows commit ``last_seq`` anywhere
    in ``[start + 1, end)``: what tells damage from a torn tail. None if there is none.
    Without the lease, a writer may cut the file short meanwhile: only what is left counts.
    A batch begins with its magic, so it begins in what was written."""
    data = fmt.pread_upto(fd, written_end(fd, start, end) - start, start)
    at = data.find(_BATCH_MAGIC, 1)
    while at >= 0:
        reader = _tail_reader(fd, start + at, end)
        batch = fmt.read_batch(reader, load_values=True)
        if batch is not None and batch.seq > last_seq:
            return start + at, batch.seq
        at = data.find(_BATCH_MAGIC, at + 1)
    return None


def wal_batches_after(fd: int, start: int, end: int) -> Iterator[fmt.Batch]:
    """Every whole, valid batch found anywhere in ``[start, end)`` of a WAL (salvage counts
    what damage cost with it)."""
    data = fmt.pread_exact(fd, end - start, start)
    at = data.find(_BATCH_MAGIC)
    while at >= 0:
        batch = fmt.read_batch(fmt.FileReader(fd, start + at, end), load_values=True)
        if batch is not None:
            yield batch
            at = data.find(_BATCH_MAGIC, at + batch.size)
        else:
            at = data.find(_BATCH_MAGIC, at + 1)


def committed_frames(fd: int, start: int, end: int, after_seq: int) -> Iterator[tuple[int, bytes]]:
    """``(seq, frame)`` of each commit after ``after_seq`` in the whole segments of ``[start,
    end)`` of a main file: its batch exactly as the WAL held it, every checksum checked (a
    replicator catching up with commits checkpointed before it read them)."""
    reader = fmt.FileReader(fd, start, end)
    while reader.pos < end:
        at = reader.pos
        segment = fmt.read_segment(reader, load_values=True, keep_raw=True)
        if segment is None:
            raise CorruptFileError("no whole segment where a commit boundary was", offset=at)
        for batch in segment.batches:
            if batch.seq > after_seq:
                yield batch.seq, batch.raw or b""


def check_frames(data: bytes, after_seq: int) -> int:
    """Check that ``data`` is whole WAL batch frames of the commits after ``after_seq``, one
    after another, every checksum right; the last commit.

    Raises:
        CorruptFileError: where they are not.
    """
    reader = fmt.FileReader.of_bytes(data)
    seq = after_seq
    while reader.pos < len(data):
        at = reader.pos
        batch = fmt.read_batch(reader, load_values=True, keep_raw=False)
        if batch is None:
            raise CorruptFileError("a commit fails its checksum or is cut short", offset=at)
        if batch.seq != seq + 1:
            raise CorruptFileError(f"commit {batch.seq} where commit {seq + 1} belongs", offset=at)
        seq = batch.seq
    return seq
