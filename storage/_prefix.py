"""A prefix: one partition with its own commit history in ``<name>.hc`` + ``<name>.hc-wal``.

State lives in the files, never only in one process: every process keeps an in-memory key
index (values stay on disk and are read on demand) and catches up with what other processes
committed by reading what was appended since it last looked. Writers serialize on the prefix's
``write`` lease, held from a transaction's first change until commit or rollback; the physical
mutation of the files (WAL append, checkpoint) also happens under a kernel ``flock`` so that even
a writer whose lease was fenced while it was stopped cannot interleave bytes with its successor.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import operator
import os
import secrets
import signal
import time
import zlib
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from hotcopy.coordinator._errors import HotcopyError, LeaseFenced
from hotcopy.coordinator._process import own_pid
from sortedcontainers import SortedDict

from . import _format as fmt
from ._closing import close_later
from ._codec import check_text, decode_value, encode_value
from ._durable import pwrite_all, write_durably
from ._errors import (
    ClosedError,
    CorruptFileError,
    PrefixNotFound,
    ReadOnlyError,
    StorageError,
    TransactionConflict,
)
from ._files import open_dir, open_regular_at
from ._leases import ChangeFeed, HeldLease, LeaseProvider
from ._wal_space import reserve, tail_is_clear

DEFAULT_CHECKPOINT_BYTES = 4 << 20
_FOLLOW_CHUNK = 16 << 10  # bytes a view reads at once when it follows the WAL
_FULL_CHECK_EVERY = 1.0  # seconds a reader trusts an unchanged commit counter
# A write lease outlives a stopped or hung holder by at most this long (the client renews it
# in the background while the process runs); its commit is then refused (fencing).
DEFAULT_LEASE_TTL = 30.0
log = logging.getLogger(__name__)

# Test-only fault injection: HOTCOPY_FAULT=<point>[,<point>] SIGKILLs this process at that point,
# the first time it is reached, or the n-th time with HOTCOPY_FAULT_AFTER=<n> (so a crash test can
# let a process commit and checkpoint a while before it dies, with all its in-memory state).
# With HOTCOPY_FAULT_ONCE_FILE=<path>, only the first process to reach it across all processes.
_FAULTS = frozenset(filter(None, os.environ.get("HOTCOPY_FAULT", "").split(",")))
_FAULT_AFTER = int(os.environ.get("HOTCOPY_FAULT_AFTER", "1") or "1")
_fault_hits: dict[str, int] = {}


def _fault_due(point: str) -> bool:
    """Count a pass through ``point``; True when this pass is the one that must crash."""
    if point not in _FAULTS:
        return False
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] != _FAULT_AFTER:
        return False
    once = os.environ.get("HOTCOPY_FAULT_ONCE_FILE")
    if once:
        # Across processes (e.g. a pool's replacement workers): only the first to get here.
        try:
            os.close(os.open(once, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        except FileExistsError:
            return False
    return True


# Test-only broken builds, so the stress checker can show it catches real faults:
# HOTCOPY_TEST_BREAK=ack-before-write | copy-without-checkpoint | lease-granted-twice.
# Never set outside scripts/stress.py --break.
_BREAK = os.environ.get("HOTCOPY_TEST_BREAK", "")


def _fault(point: str) -> None:
    if _FAULTS and _fault_due(point):
        os.kill(os.getpid(), signal.SIGKILL)


# An index entry: the offset of the op in the main file, or (vtype, payload) held in memory
# for commits that are still only in the WAL.
_Entry = int | tuple[int, bytes]
_DELETED = None


class _WalBatch(NamedTuple):
    seq: int
    offset: int
    size: int
    meta_crc: int
    # CRC32 of the WAL's bytes from the end of its header to the end of this batch, as this
    # process wrote or checked them: a checkpoint proves its re-read of the whole WAL by one
    # comparison instead of checking every batch again.
    wal_crc: int
    # fmt.chain_meta_crc of the WAL's batches up to this one: the trailer of a segment made
    # of them all, without a pass over them (a WAL holds tens of thousands of small commits,
    # and a writer waits for this after a checkpoint).
    meta_chain: int


_SEQ_OF = operator.itemgetter(0)
_OFFSET_OF = operator.itemgetter(1)
_SIZE_OF = operator.itemgetter(2)


@dataclass(frozen=True)
class Cut:
    """A commit boundary of a main file: its first ``length`` bytes hold exactly commit ``seq``."""

    length: int
    seq: int
    file_id: bytes


def main_path(root: Path, name: str) -> Path:
    return root / f"{name}.hc"


def wal_path(root: Path, name: str) -> Path:
    return root / f"{name}.hc-wal"


def open_mutex(runtime_dir: Path, name: str) -> int:
    """A descriptor on the file whose ``flock`` serializes changes to a prefix's files."""
    mutex = runtime_dir / "locks" / f"{name}.m"
    locks = open_dir(mutex.parent, create=True)  # its policy mode: shared repositories too
    try:
        return open_regular_at(locks, mutex.name, os.O_RDWR | os.O_CREAT, path=mutex)
    finally:
        os.close(locks)


def append_segment(fd: int, data: bytes, start: int) -> int:
    """Write a checkpoint segment at ``start`` of a main file (over any debris), durably;
    return where it ends."""
    _fault("checkpoint:before-main-write")
    pwrite_all(fd, data, start)
    if os.fstat(fd).st_size > start + len(data):
        os.ftruncate(fd, start + len(data))  # debris of a crashed checkpoint
    _fault("checkpoint:after-main-write")
    os.fsync(fd)
    _fault("checkpoint:after-main-fsync")
    return start + len(data)


def create_prefix_files(root: Path, name: str) -> None:
    """Create an empty prefix; ``FileExistsError`` if its main file exists."""
    header = fmt.MainHeader(secrets.token_bytes(16), secrets.randbits(64), time.time_ns())
    write_durably(main_path(root, name), fmt.pack_main_header(header), overwrite=False)
    wal = fmt.WalHeader(header.file_id, header.salt, fmt.HEADER_SIZE, 0)
    write_durably(wal_path(root, name), fmt.pack_wal_header(wal))


class Prefix(MutableMapping[str, Any]):
    """Dict-like view of one prefix. Not thread-safe: use one object per thread.

    Reads see the latest commit of any process; writes are buffered until :meth:`commit`.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        mode: str,
        leases: LeaseProvider,
        runtime_dir: Path,
        *,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        lease_timeout: float | None = None,
        lease_ttl: float | None = DEFAULT_LEASE_TTL,
    ) -> None:
        if mode not in ("r", "rw"):
            raise ValueError(f"mode must be 'r' or 'rw', not {mode!r}")
        self.name = name
        self.mode = mode
        self._root = root
        self._main_path = main_path(root, name)
        self._wal_path = wal_path(root, name)
        self._leases = leases
        self._checkpoint_bytes = checkpoint_bytes
        self._lease_timeout = lease_timeout
        self._lease_ttl = lease_ttl
        self._pid = own_pid()
        self._closed = False
        self._lease: HeldLease | None = None
        # The write lease kept between transactions (see HeldLease.park): a writer that
        # commits again soon skips the acquire round trip.
        self._parked: HeldLease | None = None
        self._pending: dict[str, tuple[int, bytes] | None] = {}
        # The oldest commit this object read at since its last commit or rollback: a write
        # built on it must not land on a newer state (no lost updates).
        self._read_seq: int | None = None
        # The provider's change counter when this view last looked at the files, and when:
        # the same even value means nothing was changed, so reads skip the file checks.
        self._feed = leases if isinstance(leases, ChangeFeed) else None
        self._seen_counter = -1
        self._checked_at = 0.0
        self._deferred = b""  # only under HOTCOPY_TEST_BREAK=ack-before-write
        self._main_fd = -1
        self._main_ino = -1
        self._header: fmt.MainHeader
        self._index: SortedDict = SortedDict()  # key -> _Entry, for the latest commit seen
        # Keys whose entry is still only in the WAL -> (their commit, their op's WAL offset).
        self._mem_seq: dict[str, tuple[int, int]] = {}
        self._seq = 0
        self._scanned_end = fmt.HEADER_SIZE  # main file read up to this segment boundary
        self._boundaries: dict[int, int] = {}  # segment end -> its commit seq
        self._wal_fd = -1
        self._wal_ino = -1
        self._wal_pos = fmt.HEADER_SIZE  # end of the last whole batch read from the WAL
        self._wal_size = fmt.HEADER_SIZE  # the file's size: space reserved beyond _wal_pos
        # The files are exactly as this writer's last commit left them (it has held the write
        # lease since): the next commit may skip the checks of _prepare_wal_for_append.
        self._files_as_left = False
        self._wal_valid = False
        self._wal_header: fmt.WalHeader
        # Every batch of the current WAL as this process wrote or read it, so a checkpoint
        # copies WAL bytes without parsing them again; False when it cannot be trusted.
        self._wal_index: list[_WalBatch] = []
        self._wal_index_ok = True
        self._wal_index_runs = True  # each indexed batch follows the one before, seq and bytes
        self._mutex_fd = -1
        if mode == "rw":
            # Whatever the lease provider, the mutation lock lives here (kernel-released).
            self._mutex_fd = open_mutex(runtime_dir, name)
        self._mutex = _Flock(self._mutex_fd)  # held by every change to the files
        try:
            if mode == "rw" and not self._main_path.exists():
                self._create()
            self._load()
        except BaseException:
            self._close_fds()
            raise

    # -- mapping API --------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._check_usable()
        if key in self._pending:
            pending = self._pending[key]
            if pending is _DELETED:
                raise KeyError(key)
            return decode_value(*pending)
        self._read_view()
        entry = self._index.get(key) if isinstance(key, str) else None
        if entry is None:
            raise KeyError(key)
        if isinstance(entry, int):
            vtype, payload = fmt.read_op_value(self._main_fd, entry)
        else:
            vtype, payload = entry
        return decode_value(vtype, payload)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        self._check_usable()
        if not isinstance(key, str):
            return False
        if key in self._pending:
            return self._pending[key] is not _DELETED
        self._read_view()
        return key in self._index

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_usable()
        _check_key(key)
        check_text(key, "key")  # here, not in _check_key: a key stored before can be deleted
        encoded = encode_value(value)
        self._begin()
        self._pending[key] = encoded

    def __delitem__(self, key: str) -> None:
        self._check_usable()
        _check_key(key)
        began = self._lease is None
        self._begin()
        if key not in self:
            if began and not self._pending:
                # Nothing changed: do not keep every other writer waiting on this lease.
                self._end_transaction()
            raise KeyError(key)
        self._pending[key] = _DELETED

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys())

    def __len__(self) -> int:
        return len(self._keys()) if self._pending else self._committed_len()

    def _committed_len(self) -> int:
        self._check_usable()
        self._read_view()
        return len(self._index)

    def _keys(self) -> list[str]:
        self._check_usable()
        self._read_view()
        keys: list[str] = list(self._index.keys())
        if not self._pending:
            return keys
        live = set(keys)
        for key, pending in self._pending.items():
            if pending is _DELETED:
                live.discard(key)
            else:
                live.add(key)
        return sorted(live)

    # -- transactions ---------------------------------------------------------------------

    @property
    def seq(self) -> int:
        """The commit sequence number this view is at (0 for a new prefix)."""
        self._check_usable()
        self._catch_up()
        return self._seq

    def commit(self) -> int:
        """Make the pending changes atomic and durable; return the new commit sequence number.

        Raises:
            LeaseFenced: this writer's lease was lost (TTL expired); nothing was written.
        """
        self._check_usable()
        lease = self._lease
        if lease is None:
            return self._seq
        if not self._pending:
            self._end_transaction()
            return self._seq
        try:
            with self._mutex:
                if not lease.is_current():
                    raise LeaseFenced(
                        f"commit to prefix {self.name!r} refused: the write lease (token "
                        f"{lease.token}) is no longer current; nothing was written",
                        prefix=self.name,
                        token=lease.token,
                    )
                base_seq = self._seq
                if not self._files_as_left:
                    self._prepare_wal_for_append()
                if self._seq != base_seq:
                    raise LeaseFenced(
                        f"commit to prefix {self.name!r} refused: another writer committed "
                        f"{self._seq - base_seq} transaction(s) under an overlapping lease; "
                        "nothing was written",
                        prefix=self.name,
                        token=lease.token,
                    )
                seq = self._seq + 1
                ops = [
                    fmt.encode_op(fmt.OP_DELETE, key, 0, b"")
                    if pending is _DELETED
                    else fmt.encode_op(fmt.OP_PUT, key, pending[0], pending[1])
                    for key, pending in self._pending.items()
                ]
                frame, meta_crc = fmt.encode_batch_with_meta(seq, lease.token, ops)
                _fault("commit:before-wal-write")
                if _fault_due("commit:torn-wal-write"):
                    os.pwrite(self._wal_fd, frame[: len(frame) // 2], self._wal_pos)
                    os.kill(os.getpid(), signal.SIGKILL)
                batch_at = self._wal_pos
                if _BREAK == "ack-before-write" and not self._deferred:
                    self._deferred = frame  # broken on purpose: acknowledged, written later
                    self._wal_index_ok = False
                else:
                    frame, self._deferred = self._deferred + frame, b""
                    end = self._wal_pos + len(frame)
                    if end > self._wal_size:
                        self._wal_size = reserve(self._wal_fd, self._wal_size, end)
                    self._files_as_left = False
                    pwrite_all(self._wal_fd, frame, self._wal_pos)
                    _fault("commit:after-wal-write")
                    os.fdatasync(self._wal_fd)
                    _fault("commit:after-wal-fsync")
                    self._wal_pos += len(frame)
                    self._wal_size = max(self._wal_size, self._wal_pos)
                    self._index_wal_batch(seq, batch_at, meta_crc, frame)
                op_at = batch_at + fmt.BATCH_SIZE
                for (key, pending), op in zip(self._pending.items(), ops, strict=True):
                    self._apply_in_memory(key, pending, seq, op_at)
                    op_at += len(op)
                self._seq = seq
                self._pending.clear()
                if self._wal_pos - fmt.HEADER_SIZE >= self._checkpoint_bytes:
                    self._files_as_left = self._auto_checkpoint()
                else:
                    self._files_as_left = not self._deferred
        finally:
            self._end_transaction()
        return seq

    def begin(self) -> None:
        """Start a transaction now: take the write lease before the first change.

        Changes made until :meth:`commit` or :meth:`rollback` then build on the latest commit
        as of this call, and no other writer can commit in between.
        """
        self._check_usable()
        self._begin()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[Prefix]:
        """``with prefix.transaction():`` — hold the write lease from before the first read;
        commit at the end of the block, roll back if it raises. No other writer can commit in
        between, so read-modify-write code never loses an update and never conflicts.
        """
        self.begin()
        try:
            yield self
        except BaseException:
            self.rollback()
            raise
        self.commit()

    def rollback(self) -> None:
        """Drop the pending changes and release the write lease."""
        self._check_usable()
        self._end_transaction()

    def checkpoint(self) -> Cut:
        """Move committed WAL batches into the main file and start a fresh WAL.

        Returns the boundary reached; its bytes ``[0, length)`` hold exactly commit ``seq``.
        Pending (uncommitted) changes are not included and stay pending.
        """
        cut, fd = self.checkpoint_and_open()
        os.close(fd)
        return cut

    def checkpoint_and_open(self) -> tuple[Cut, int]:
        """Checkpoint, and return the cut with a new descriptor on the main file it is in.

        The caller owns the descriptor. Holding it, the cut's bytes stay readable whatever
        happens to the path later (a compaction or restore replaces the file, never edits it).
        """
        self._check_usable()
        self._require_writable()
        lease = self._lease
        owned = lease is None
        if lease is None:
            lease, _ = self._take_write_lease()
        self._files_as_left = False  # whatever happens below, the next commit checks again
        try:
            with self._mutex:
                # Not just a catch-up: a checkpoint killed before its WAL reset left a segment
                # that was never fsynced nor value-checked; finish that first, so the cut
                # returned (what copy_prefix copies) is durable and sound.
                self._prepare_wal_for_append()
                if _BREAK == "copy-without-checkpoint":  # broken on purpose
                    cut = Cut(self._scanned_end, self._seq, self._header.file_id)
                    return cut, os.dup(self._main_fd)
                return self._checkpoint_locked(), os.dup(self._main_fd)
        finally:
            if owned:
                self._park(lease)

    def compact(self) -> Cut:
        """Rewrite the main file with only the live records of the latest commit.

        Runs under the ``exclusive`` lease; the new file (new file id, so incremental backups
        start a new chain) replaces the old one with ``os.replace``. Processes reading the old
        file keep a consistent view and move to the new one at their next read.
        """
        self._check_usable()
        self._require_writable()
        if self._lease is not None:
            raise StorageError(
                f"prefix {self.name!r} has a transaction in progress; commit or roll back first",
                prefix=self.name,
            )
        self._release_parked()  # our own parked write lease would queue our exclusive
        with (
            self._leases.lease(
                self.name, "exclusive", timeout=self._lease_timeout, ttl=self._lease_ttl
            ),
            self._mutex,
        ):
            self._catch_up(force=True)
            seq = self._seq
            if seq == 0:
                return Cut(self._scanned_end, seq, self._header.file_id)  # nothing committed
            header = fmt.MainHeader(
                secrets.token_bytes(16), secrets.randbits(64), time.time_ns(), seq - 1
            )
            end = 0

            def write(fd: int) -> None:
                nonlocal end
                end = self._write_compacted(fd, header, seq)

            write_durably(self._main_path, write)
            wal = fmt.WalHeader(header.file_id, header.salt, end, seq)
            write_durably(self._wal_path, fmt.pack_wal_header(wal))
            self._load()  # readers move too: the exclusive lease changed the prefix's counter
            return Cut(self._scanned_end, self._seq, self._header.file_id)

    def _write_compacted(self, fd: int, header: fmt.MainHeader, seq: int) -> int:
        """Write ``header`` and one segment holding every live record as commit ``seq``."""
        os.pwrite(fd, fmt.pack_main_header(header), 0)
        pos = fmt.HEADER_SIZE + fmt.BATCH_SIZE  # the batch header goes in last
        body_crc = 0
        n_ops = 0
        for key, entry in self._index.items():
            if isinstance(entry, int):
                vtype, payload = fmt.read_op_value(self._main_fd, entry)
            else:
                vtype, payload = entry
            op = fmt.encode_op(fmt.OP_PUT, key, vtype, payload)
            pwrite_all(fd, op, pos)
            body_crc = fmt.crc32(op, body_crc)
            pos += len(op)
            n_ops += 1
        body_len = pos - fmt.HEADER_SIZE - fmt.BATCH_SIZE
        pwrite_all(fd, fmt.encode_batch_header(seq, 0, n_ops, body_len, body_crc), fmt.HEADER_SIZE)
        batch = fmt.read_batch(fmt.FileReader(fd, fmt.HEADER_SIZE, pos), load_values=False)
        if batch is None:
            raise CorruptFileError("compacted batch failed to read back", offset=fmt.HEADER_SIZE)
        trailer = fmt.segment_trailer(fmt.HEADER_SIZE, [batch])
        pwrite_all(fd, trailer, pos)
        return pos + len(trailer)

    def close(self) -> None:
        """Roll back anything pending and release every resource; idempotent."""
        if self._closed:
            return
        if own_pid() == self._pid:
            try:
                self._end_transaction()
                self._release_parked()
            finally:
                self._close_fds()
        self._closed = True

    def __del__(self) -> None:
        # A fallback only: an abandoned transaction must not keep every other writer waiting.
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == own_pid():
            with contextlib.suppress(Exception):
                self.close()

    def __enter__(self) -> Prefix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"seq={self._seq}"
        return f"<Prefix {self.name!r} mode={self.mode!r} {state}>"

    # -- internals: lifecycle -------------------------------------------------------------

    def _check_usable(self) -> None:
        if self._closed:
            raise ClosedError(f"prefix {self.name!r} is closed", prefix=self.name)
        if own_pid() != self._pid:
            raise StorageError(
                f"prefix {self.name!r} was opened in process {self._pid}; "
                "open the repository again in this process",
                prefix=self.name,
            )

    def _require_writable(self) -> None:
        if self.mode != "rw":
            raise ReadOnlyError(
                f"prefix {self.name!r} is open read-only; open it with mode 'rw' to change it",
                prefix=self.name,
            )

    def _read_view(self) -> None:
        """Catch up before a read, and remember the state read for the next transaction."""
        self._catch_up()
        if self._lease is None and self._read_seq is None:
            self._read_seq = self._seq

    def _begin(self) -> None:
        self._require_writable()
        if self._lease is None:
            held_on = False
            if _BREAK == "lease-granted-twice":
                self._lease = _NoExclusion()  # broken on purpose: every writer gets it
            else:
                self._lease, held_on = self._take_write_lease()
            try:
                if not held_on:
                    self._files_as_left = False
                    self._catch_up(force=True)
                read_seq, self._read_seq = self._read_seq, None
                if read_seq is not None and read_seq != self._seq:
                    raise TransactionConflict(
                        f"prefix {self.name!r} changed (commit {read_seq} -> {self._seq}) since "
                        "this transaction read it; nothing was written. Retry, and use "
                        "`with prefix.transaction():` around read-modify-write code",
                        prefix=self.name,
                        read_seq=read_seq,
                        seq=self._seq,
                    )
            except BaseException:
                self._end_transaction()
                raise

    def _end_transaction(self) -> None:
        self._read_seq = None
        self._pending.clear()
        lease, self._lease = self._lease, None
        if lease is not None:
            self._park(lease)

    def _take_write_lease(self) -> tuple[HeldLease, bool]:
        """The parked write lease if it is still ours, else a new one; and which it is.

        A lease held on since our last transaction kept every other writer, and every
        checkpoint, compaction or restore, away: the files are as this view left them.
        """
        parked, self._parked = self._parked, None
        if parked is not None and parked.resume():
            return parked, True
        lease = self._leases.lease(
            self.name, "write", timeout=self._lease_timeout, ttl=self._lease_ttl
        )
        return lease, False

    def _park(self, lease: HeldLease) -> None:
        lease.park()
        self._parked = lease

    def _release_parked(self) -> None:
        parked, self._parked = self._parked, None
        if parked is not None:
            parked.release()

    def _create(self) -> None:
        lease = self._leases.lease(
            self.name, "write", timeout=self._lease_timeout, ttl=self._lease_ttl
        )
        try:
            if not self._main_path.exists():
                create_prefix_files(self._root, self.name)
        finally:
            lease.release()

    def _close_fds(self) -> None:
        for attr in ("_main_fd", "_wal_fd", "_mutex_fd"):
            fd = getattr(self, attr)
            if fd >= 0:
                os.close(fd)
                setattr(self, attr, -1)

    # -- internals: reading the files -----------------------------------------------------

    def _load(self) -> None:
        """(Re)build the view from the main file, then the WAL."""
        flags = os.O_RDWR if self.mode == "rw" else os.O_RDONLY
        try:
            fd = os.open(self._main_path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            raise PrefixNotFound(
                f"prefix {self.name!r} does not exist in {self._root}", prefix=self.name
            ) from None
        if self._main_fd >= 0:
            close_later(self._main_fd)  # replaced by a compaction or restore, mostly
        self._main_fd = fd
        self._main_ino = os.fstat(fd).st_ino
        self._header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
        # Filled as a plain dict and sorted once: a million sorted inserts cost seconds.
        plain: dict[str, _Entry] = {}
        self._index = plain
        self._mem_seq = {}
        self._seq = self._header.base_seq
        self._scanned_end = fmt.HEADER_SIZE
        self._boundaries = {fmt.HEADER_SIZE: self._header.base_seq}
        self._wal_ino = -1
        try:
            self._scan_main()
        finally:
            self._index = SortedDict(plain)
        self._sync_wal()

    def _catch_up(self, force: bool = False) -> None:
        """See what other processes committed. A writer mid-transaction already has it all.

        Without ``force``, an unchanged commit counter in the coordinator's shared memory
        answers "nothing new" without touching a file; the files are still checked at least
        every ``_FULL_CHECK_EVERY`` seconds, in case a publication was lost.
        """
        if self._lease is not None and not force:
            return
        if self._feed is not None and self._lease is None:  # a writer's counter is odd anyway
            now = time.monotonic()
            try:
                counter = self._feed.commit_seq(self.name)
            except HotcopyError:
                counter = -1  # no coordinator to ask: look at the files
            if (
                not force
                and counter == self._seen_counter
                and counter > 0
                and not counter & 1  # odd: a writer may be appending right now
                and now - self._checked_at < _FULL_CHECK_EVERY
            ):
                return
            self._seen_counter, self._checked_at = counter, now  # read before the files
        try:
            st = os.stat(self._main_path)
        except FileNotFoundError:
            raise PrefixNotFound(
                f"prefix {self.name!r} no longer exists in {self._root}", prefix=self.name
            ) from None
        if st.st_ino != self._main_ino:
            self._load()  # replaced by a compaction or a restore
            return
        if st.st_size > self._scanned_end:
            self._scan_main()
        self._sync_wal()

    def _scan_main(self) -> None:
        size = os.fstat(self._main_fd).st_size
        self._adopt_checkpoint_of_known_batches(size)
        reader = fmt.FileReader(self._main_fd, self._scanned_end, size)
        while reader.pos < size:
            segment = fmt.read_segment(reader, load_values=False)
            if segment is None:
                break  # a checkpoint in progress or torn by a crash: not part of any state
            for batch in segment.batches:
                self._apply_main_batch(batch)
            self._boundaries[segment.end] = segment.last_seq
            self._scanned_end = segment.end

    def _adopt_checkpoint_of_known_batches(self, size: int) -> None:
        """Take a segment another process checkpointed from WAL batches this view has indexed.

        Such a segment is those batches' WAL bytes back to back, closed by the trailer their
        metadata CRCs give; if the trailer found where it must be is exactly that one, the
        index moves to the main file by arithmetic instead of a parse of every batch (which
        costs a writer following a copier's checkpoint of a full WAL about half a second).
        Values stay checked against their CRCs whenever they are read.
        """
        if not self._wal_valid or self._wal_header.base_len != self._scanned_end:
            return
        wanted = self._indexed_after(self._boundaries[self._scanned_end])
        if wanted is None:
            return
        first, last = wanted[0], wanted[-1]
        start = self._scanned_end
        trailer = self._trailer_of(wanted, start)
        at = start + last.offset + last.size - first.offset
        if at + len(trailer) > size or os.pread(self._main_fd, len(trailer), at) != trailer:
            return  # not (only) our batches: parse it
        self._point_index_at_segment(wanted, start, at + len(trailer))

    def _point_index_at_segment(self, batches: list[_WalBatch], start: int, end: int) -> None:
        """The WAL ``batches`` now form the main-file segment ``[start, end)``: index it there."""
        first, last = batches[0], batches[-1]
        shift = start - first.offset
        moved = {
            key: wal_offset + shift
            for key, (seq, wal_offset) in self._mem_seq.items()
            if first.seq <= seq <= last.seq
        }
        if len(moved) == len(self._mem_seq):
            self._mem_seq = {}
        else:
            for key in moved:
                del self._mem_seq[key]
        # Every key of _mem_seq is in the index already, so only values change and the
        # SortedDict's key order stays valid: one dict update instead of a sorted insert per
        # key (this runs while a writer waits for its first commit after a checkpoint).
        dict.update(self._index, moved)
        self._boundaries[end] = last.seq
        self._scanned_end = end

    def _apply_main_batch(self, batch: fmt.Batch) -> None:
        if batch.seq <= self._seq:
            # Already applied from the WAL: point the index at the main file instead of memory.
            for op in batch.ops:
                entry = self._mem_seq.get(op.key)
                if entry is not None and entry[0] == batch.seq:
                    del self._mem_seq[op.key]
                    self._index[op.key] = op.offset
            return
        if batch.seq != self._seq + 1:
            raise CorruptFileError(
                f"prefix {self.name!r}: commit {batch.seq} follows {self._seq} in the main file",
                offset=batch.offset,
            )
        for op in batch.ops:
            if op.kind == fmt.OP_PUT:
                self._index[op.key] = op.offset
            else:
                self._index.pop(op.key, None)
            self._mem_seq.pop(op.key, None)
        self._seq = batch.seq

    def _apply_in_memory(
        self, key: str, value: tuple[int, bytes] | None, seq: int, wal_offset: int
    ) -> None:
        if value is None:
            self._index.pop(key, None)
            self._mem_seq.pop(key, None)
        else:
            self._index[key] = value
            self._mem_seq[key] = (seq, wal_offset)

    def _sync_wal(self) -> None:
        """Follow the WAL (re-opening it if a checkpoint replaced it) and apply new batches."""
        try:
            st = os.stat(self._wal_path)
        except FileNotFoundError:
            self._drop_wal()
            return
        if st.st_ino != self._wal_ino:
            self._open_wal()
        elif st.st_size == self._wal_pos:
            return  # nothing appended since we looked
        if not self._wal_valid or not fmt.batch_starts_at(self._wal_fd, self._wal_pos):
            return  # reserved space (zeros), a torn tail, or a write in progress
        # Small reads: what follows the last batch is mostly space reserved for the next ones.
        end = os.fstat(self._wal_fd).st_size
        reader = fmt.FileReader(self._wal_fd, self._wal_pos, end, chunk=_FOLLOW_CHUNK)
        while True:
            start = reader.pos
            batch = fmt.read_batch(reader, load_values=True)
            if batch is None or batch.seq > self._seq + 1:
                reader.pos = start
                break  # torn tail, a write in progress, or nothing more
            self._index_wal_batch(batch.seq, batch.offset, batch.meta_crc, batch.raw or b"")
            if batch.seq == self._seq + 1:
                for op in batch.ops:
                    value = None if op.kind == fmt.OP_DELETE else (op.vtype, op.value or b"")
                    self._apply_in_memory(op.key, value, batch.seq, op.offset)
                self._seq = batch.seq
            # batches at or below our sequence are already in the main file: skip them
        self._wal_pos = reader.pos

    def _index_wal_batch(self, seq: int, offset: int, meta_crc: int, frame: bytes) -> None:
        """Remember a whole, checked batch ``frame`` of the WAL at ``offset``."""
        index = self._wal_index
        if index:
            last = index[-1]
            wal_crc, chain = last.wal_crc, last.meta_chain
            if seq != last.seq + 1 or offset != last.offset + last.size:
                self._wal_index_runs = False
        else:
            wal_crc = chain = 0
        # tuple.__new__: a NamedTuple's own constructor is a Python function (once per commit).
        fields = (
            seq,
            offset,
            len(frame),
            meta_crc,
            zlib.crc32(frame, wal_crc),
            fmt.chain_meta_crc(meta_crc, chain),
        )
        index.append(tuple.__new__(_WalBatch, fields))

    def _indexed_after(self, main_seq: int) -> list[_WalBatch] | None:
        """The indexed WAL batches of commits ``main_seq`` + 1 .. ``_seq``, back to back;
        None when the index does not hold exactly those."""
        index = self._wal_index
        if not (self._wal_index_ok and index):
            return None
        if self._wal_index_runs and index[0].seq == main_seq + 1 and index[-1].seq == self._seq:
            return index  # the usual case, checked batch by batch as the index grew
        wanted = [batch for batch in index if batch.seq > main_seq]
        return wanted if _contiguous(wanted, main_seq + 1, self._seq) else None

    def _trailer_of(self, batches: list[_WalBatch], start: int) -> bytes:
        """The trailer that closes ``batches`` (from :meth:`_indexed_after`) as a segment."""
        last = batches[-1]
        if batches[0] is self._wal_index[0]:
            return fmt.encode_trailer(last.seq, start, len(batches), last.meta_chain)
        return fmt.trailer_for(start, [batch.meta_crc for batch in batches], last.seq)

    def _open_wal(self) -> None:
        self._drop_wal()
        flags = os.O_RDWR if self.mode == "rw" else os.O_RDONLY
        try:
            fd = os.open(self._wal_path, flags | os.O_CLOEXEC)
        except FileNotFoundError:
            return
        self._wal_fd = fd
        self._wal_ino = os.fstat(fd).st_ino
        self._wal_pos = fmt.HEADER_SIZE
        try:
            header = fmt.unpack_wal_header(os.pread(fd, fmt.HEADER_SIZE, 0))
        except CorruptFileError:
            return  # a WAL with a damaged header belongs to nobody: never applied
        if header.base_len > self._scanned_end:
            self._scan_main()  # a checkpoint landed after we looked at the main file
        self._wal_header = header
        self._wal_valid = fmt.wal_matches(header, self._header, self._boundaries)
        self._check_durable_prefix_readable(header)

    def _check_durable_prefix_readable(self, wal: fmt.WalHeader) -> None:
        """Tell damage from a torn tail: bytes a matching WAL proves durable must parse.

        A scan stops at the first segment it cannot read. After a crashed checkpoint that is
        the torn tail, beyond the WAL's ``base_len``. Before ``base_len`` it is damage to fsynced
        data: refuse it loudly rather than open (and later overwrite) an older state. A file
        that simply ends before ``base_len`` is an older copy of this file, not damage.
        """
        same_file = wal.file_id == self._header.file_id and wal.main_salt == self._header.salt
        unreadable = os.fstat(self._main_fd).st_size > self._scanned_end
        if same_file and unreadable and wal.base_len > self._scanned_end:
            raise CorruptFileError(
                f"prefix {self.name!r}: the main file is damaged at offset {self._scanned_end} "
                f"(its WAL shows it was durable up to {wal.base_len}); run `hotcopy verify` and "
                "restore the prefix from a backup",
                prefix=self.name,
                offset=self._scanned_end,
            )

    def _drop_wal(self) -> None:
        if self._wal_fd >= 0:
            # Replaced or deleted: closing it may free its blocks (see _closing), which is
            # no work for a writer that waits for its lease or a reader catching up.
            close_later(self._wal_fd)
        self._wal_fd = -1
        self._wal_ino = -1
        self._wal_pos = fmt.HEADER_SIZE
        self._wal_valid = False
        self._wal_index = []
        self._wal_index_ok = True
        self._wal_index_runs = True

    # -- internals: changing the files (write lease and mutation lock held) ---------------

    def _prepare_wal_for_append(self) -> None:
        """Leave a WAL that matches the main file and ends exactly where our view ends."""
        self._catch_up(force=True)
        if os.fstat(self._main_fd).st_size > self._scanned_end and not (
            self._wal_valid and self._wal_header.base_len <= self._scanned_end
        ):
            # Unreadable bytes that no matching WAL places beyond the durable boundary may be
            # damaged committed data: never write over them.
            raise CorruptFileError(
                f"prefix {self.name!r}: the main file has unreadable bytes from offset "
                f"{self._scanned_end} and no WAL shows they are an unfinished checkpoint; "
                "run `hotcopy verify` and restore the prefix from a backup",
                prefix=self.name,
                offset=self._scanned_end,
            )
        if not self._wal_valid:
            self._reset_wal()
            return
        if self._scanned_end > self._wal_header.base_len:
            self._recover_unsynced_checkpoint()
        size = os.fstat(self._wal_fd).st_size
        if size > self._wal_pos and not tail_is_clear(self._wal_fd, self._wal_pos, size):
            # A writer died mid-append: its torn batch was never acknowledged.
            os.ftruncate(self._wal_fd, self._wal_pos)
            os.fsync(self._wal_fd)
            size = self._wal_pos
        self._wal_size = size

    def _recover_unsynced_checkpoint(self) -> None:
        """A checkpoint crashed between appending to the main file and resetting the WAL.

        Its segments might not be durable, so check every byte of them; keep the good prefix
        (the WAL still holds everything after it) and make it durable.
        """
        reader = fmt.FileReader(self._main_fd, self._wal_header.base_len, self._scanned_end)
        good = reader.pos
        while reader.pos < self._scanned_end:
            if fmt.read_segment(reader, load_values=True) is None:
                break
            good = reader.pos
        if good < self._scanned_end:
            os.ftruncate(self._main_fd, good)
            os.fsync(self._main_fd)
            self._load()
            self._prepare_wal_for_append()
            return
        os.fsync(self._main_fd)
        self._reset_wal_after(self._scanned_end)

    def _reset_wal(self) -> None:
        self._reset_wal_after(self._scanned_end)

    def _reset_wal_after(self, boundary: int) -> None:
        """Start a fresh WAL continuing the main file from ``boundary``.

        Batches of the old WAL beyond the boundary are carried over, so nothing committed is
        dropped (they exist only when a checkpoint crashed before its WAL reset).
        """
        carried = b""
        if self._wal_valid and self._seq > self._boundaries[boundary]:
            carried = b"".join(
                batch.raw or b""
                for batch in self._wal_batches()
                if batch.seq > self._boundaries[boundary]
            )
        header = fmt.WalHeader(
            self._header.file_id, self._header.salt, boundary, self._boundaries[boundary]
        )
        write_durably(self._wal_path, fmt.pack_wal_header(header) + carried)
        self._sync_wal()  # opens the new WAL and indexes the carried batches (all applied)

    def _wal_batches(self) -> list[fmt.Batch]:
        reader = fmt.FileReader(self._wal_fd, fmt.HEADER_SIZE, self._wal_pos)
        batches = []
        while reader.pos < self._wal_pos:
            batch = fmt.read_batch(reader, load_values=True)
            if batch is None:
                raise CorruptFileError(
                    f"prefix {self.name!r}: WAL batch failed its checksum on re-read",
                    offset=reader.pos,
                )
            batches.append(batch)
        return batches

    def _auto_checkpoint(self) -> bool:
        """Checkpoint after a commit; False if it failed. The commit is already durable: a
        failure here is logged and left to the next checkpoint, never reported as a failed
        commit."""
        try:
            self._checkpoint_locked()
        except Exception as err:
            log.warning("automatic checkpoint failed prefix=%s error=%s", self.name, err)
            return False
        return True

    def _checkpoint_locked(self) -> Cut:
        main_seq = self._boundaries[self._scanned_end]
        if self._seq == main_seq:
            return Cut(self._scanned_end, self._seq, self._header.file_id)
        wanted = self._indexed_after(main_seq)
        if wanted is not None:
            return self._checkpoint_indexed(wanted)
        return self._checkpoint_parsed(main_seq)

    def _checkpoint_indexed(self, wanted: list[_WalBatch]) -> Cut:
        """Checkpoint from the WAL index: one read of the WAL, one CRC pass, no parsing."""
        first, last = wanted[0], wanted[-1]
        data = fmt.pread_exact(self._wal_fd, last.offset + last.size - first.offset, first.offset)
        # The usual case, the whole WAL since its header: the bytes read back must be the very
        # bytes we wrote or checked, one CRC for all. Otherwise (or to name the culprit) check
        # each batch's own CRCs.
        whole = first is self._wal_index[0] and first.offset == fmt.HEADER_SIZE
        if not whole or zlib.crc32(data) != last.wal_crc:
            bad = fmt.first_bad_frame(data, [batch.size for batch in wanted])
            if bad >= 0 or whole:
                culprit = wanted[max(bad, 0)]
                raise CorruptFileError(
                    f"prefix {self.name!r}: WAL batch {culprit.seq} failed its checksum on "
                    "re-read",
                    offset=culprit.offset,
                )
        start = self._scanned_end
        trailer = self._trailer_of(wanted, start)
        end = start + len(data) + len(trailer)
        append_segment(self._main_fd, data + trailer, start)
        self._point_index_at_segment(wanted, start, end)
        self._reset_wal_after(end)
        _fault("checkpoint:after-wal-reset")
        return Cut(end, self._seq, self._header.file_id)

    def _checkpoint_parsed(self, main_seq: int) -> Cut:
        """Checkpoint by parsing the WAL: for a WAL this process has not seen written whole."""
        batches = [batch for batch in self._wal_batches() if batch.seq > main_seq]
        start = self._scanned_end
        data = b"".join(batch.raw or b"" for batch in batches)
        data += fmt.segment_trailer(start, batches)
        append_segment(self._main_fd, data, start)
        self._scan_main()
        if self._scanned_end != start + len(data):
            raise CorruptFileError(
                f"prefix {self.name!r}: checkpoint segment failed to read back", offset=start
            )
        self._reset_wal_after(self._scanned_end)
        _fault("checkpoint:after-wal-reset")
        return Cut(self._scanned_end, self._seq, self._header.file_id)


class _NoExclusion:
    """The write lease of the lease-granted-twice broken build: excludes nobody."""

    token = 0

    def is_current(self) -> bool:
        return True

    def release(self) -> None:
        pass

    def park(self) -> None:
        pass

    def resume(self) -> bool:
        return False

    def __enter__(self) -> _NoExclusion:
        return self

    def __exit__(self, *exc: object) -> None:
        pass


class _Flock:
    """Hold an exclusive ``flock`` on an open descriptor for the length of a ``with`` block."""

    __slots__ = ("_fd",)

    def __init__(self, fd: int) -> None:
        self._fd = fd

    def __enter__(self) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self._fd, fcntl.LOCK_UN)


def _contiguous(batches: list[_WalBatch], first_seq: int, last_seq: int) -> bool:
    """Whether ``batches`` are exactly commits first_seq..last_seq, back to back in the WAL."""
    if not batches or batches[0].seq != first_seq or batches[-1].seq != last_seq:
        return False
    # Whole-list comparisons rather than a loop over pairs: this runs under the write lease,
    # over every batch of a WAL, in a checkpoint and in a writer catching up with one.
    seqs = list(map(_SEQ_OF, batches))
    if seqs != list(range(first_seq, last_seq + 1)):
        return False
    offsets = list(map(_OFFSET_OF, batches))
    ends = list(map(operator.add, offsets, map(_SIZE_OF, batches)))
    return offsets[1:] == ends[:-1]


def _check_key(key: object) -> None:
    if not isinstance(key, str):
        raise TypeError(f"keys must be str, not {type(key).__name__}")
    # Checked here, not only when the batch is encoded: at commit it would sink the whole
    # transaction. A character is at most 4 bytes in UTF-8: short keys need no encoding.
    if len(key) <= fmt.MAX_KEY_BYTES // 4:
        return
    size = len(key.encode("utf-8", "surrogatepass"))
    if size > fmt.MAX_KEY_BYTES:
        raise ValueError(f"key is {size} bytes in UTF-8; the limit is {fmt.MAX_KEY_BYTES}")
