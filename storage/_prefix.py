"""A prefix: one partition with its own commit history, as a dict-like view.

The files and everything about them belong to the prefix's :class:`~hotcopy.storage._log.Log`;
a :class:`Prefix` reads checkpointed keys through the main file's key index (mapped, shared by
every process), keeps only the commits still in the WAL in memory, and runs transactions.
Writers serialize on the prefix's ``write`` lease, held from a transaction's first change until
commit or rollback; state lives in the files, never only in one process, and every process
follows what the others commit without reopening.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, ItemsView, Iterator, MutableMapping, ValuesView
from pathlib import Path
from typing import Any

from hotcopy.coordinator._errors import ClientClosed, HotcopyError, LeaseFenced, WouldBlock
from hotcopy.coordinator._process import own_pid

from . import _format as fmt
from . import _leases
from ._codec import check_text, decode_value, encode_value
from ._errors import (
    ClosedError,
    CorruptFileError,
    ReadOnlyError,
    StorageError,
    TransactionConflict,
)
from ._faults import BREAK
from ._leases import (
    ChangeFeed,
    HeldLease,
    LeaseProvider,
    expired_token,
    post_commit,
)
from ._log import CommitUnconfirmed, Cut, Log, create_prefix_files, install_files, write_compacted

# A process that opens a prefix replays the WAL, and a reader holds its commits in memory:
# 1 MiB of small commits replays in 25-40 ms (4 MiB took 130-150), and a writer's commit rate
# measured the same at both sizes (6.6-6.8k/s on 200k keys, /work/tmp/s20/cpb.py).
DEFAULT_CHECKPOINT_BYTES = 1 << 20
# A writer that closes with at least this much in the WAL checkpoints first (see close): what
# it leaves (a hundred small commits) costs the next process to open the prefix under a
# millisecond to replay (64 KiB cost up to 6 ms in bench_peers); a few commits, such as one
# CLI put, are left to the next checkpoint rather than cost one each.
CLOSE_CHECKPOINT_BYTES = 16 << 10
# A write lease outlives a stopped or hung holder by at most this long (the client renews it
# in the background while the process runs); its commit is then refused (fencing).
DEFAULT_LEASE_TTL = 30.0
log = logging.getLogger(__name__)

_DELETED = None  # a pending deletion
# What a look at the pending changes answers for a key they do not change (not None: that is
# a deletion). One look, not `in` and then `[]`: another thread may commit in between.
_UNCHANGED: tuple[int, bytes] = (-1, b"")


class _LiveItems(ItemsView[str, Any]):
    """A prefix's pairs, each read as it is when the iteration reaches it: a key deleted
    since the keys were listed is passed over, never a KeyError halfway through."""

    def __init__(self, prefix: Prefix) -> None:
        super().__init__(prefix)
        self._prefix = prefix

    def __iter__(self) -> Iterator[tuple[str, Any]]:
        for key in self._prefix:
            try:
                value = self._prefix[key]
            except KeyError:
                continue
            yield key, value


class _LiveValues(ValuesView[Any]):
    def __init__(self, prefix: Prefix) -> None:
        super().__init__(prefix)
        self._prefix = prefix

    def __iter__(self) -> Iterator[Any]:
        for _, value in _LiveItems(self._prefix):
            yield value


class Prefix(MutableMapping[str, Any]):
    """Dict-like view of one prefix, meant for one thread: open one per thread
    (:meth:`Repository.open_view`). Threads that share one anyway (the module API's current
    prefix) take turns to follow the files, commit, checkpoint and compact, each lease taken
    after the view's lock, so they never damage the prefix, never take each other's reads for
    damage and never deadlock; but they share one transaction, which may conflict, and a read
    racing another thread's commit may fail with a plain Python error.

    Reads see the latest commit of any process; writes are buffered until :meth:`commit`.
    A view opened read-only (``"r"``) refuses changes (:class:`ReadOnlyError`), unless it is
    ``writable_on_demand``: then its first change reopens it for writing (``"rw"``) in place.
    """

    def __init__(
        self,
        root: Path,
        name: str,
        mode: str,
        leases: LeaseProvider,
        repository_id: bytes,
        *,
        checkpoint_bytes: int = DEFAULT_CHECKPOINT_BYTES,
        lease_timeout: float | None = None,
        lease_ttl: float | None = DEFAULT_LEASE_TTL,
        writable_on_demand: bool = False,
    ) -> None:
        if mode not in ("r", "rw"):
            raise ValueError(f"mode must be 'r' or 'rw', not {mode!r}")
        self.name = name
        self.mode = mode
        # Read-only until the first change, which reopens it for writing instead of being
        # refused: how the object layer opens the prefixes it only needs to read from so far.
        self.writable_on_demand = writable_on_demand
        self._root = root
        self._repository_id = repository_id
        self._leases = leases
        self._checkpoint_bytes = checkpoint_bytes
        self._lease_timeout = lease_timeout
        self._lease_ttl = lease_ttl
        self._pid = own_pid()
        # Threads sharing this view (the module API's current prefix is shared so) take turns
        # to follow the files, change the transaction, commit, checkpoint and compact: each
        # advances the log's state, and two at once would see each other's half-read batch as
        # damage. Taken before any lease, so that the order is always the same.
        self._mutex = threading.RLock()
        self._closed = False
        self._lease: HeldLease | None = None
        # The write lease kept between transactions (see HeldLease.park): a writer that
        # commits again soon skips the acquire round trip.
        self._parked: HeldLease | None = None
        self._pending: dict[str, tuple[int, bytes] | None] = {}
        # The oldest commit this object read at since its last commit or rollback: a write
        # built on it must not land on a newer state (no lost updates).
        self._read_seq: int | None = None
        # The provider's change counter and commit board (see ChangeFeed) when this view last
        # looked at the files, and when: the same values mean no commit since, so reads skip
        # the file checks.
        self._feed = leases if isinstance(leases, ChangeFeed) else None
        # The counter while the lease parked here was ours: the same value means it still is.
        self._parked_counter: int | None = None
        self._pins = 0  # inside pinned(): reads do not move to newer commits
        self._seen: tuple[int, bytes | None] = (-1, None)
        self._checked_at = 0.0
        # Commits still only in the WAL (newer than the log's index): key -> its value, or
        # None where deleted; and the commit of each key's last change there.
        self._mem: dict[str, tuple[int, bytes] | None] = {}
        self._mem_seq: dict[str, int] = {}
        self._mem_live: int | None = None  # what _mem adds to the index's live keys; None: unknown
        self._log: Log
        if mode == "rw" and not (root / f"{name}.hc").exists():
            self._create()
        self._log = Log(root, name, repository_id, writable=mode == "rw", index_sink=self)

    # -- commits in the WAL, as the log reads them (IndexSink) ----------------------------

    def reset(self) -> None:
        self._mem = {}
        self._mem_seq = {}
        self._mem_live = None  # until the log's index is of this file (indexed)

    def apply_wal(self, batch: fmt.Batch) -> None:
        for op in batch.ops:
            value = None if op.kind == fmt.OP_DELETE else (op.vtype, op.value or b"")
            self._apply_in_memory(op.key, value, batch.seq)

    def indexed(self, seq: int) -> None:
        if len(self._mem_seq) and min(self._mem_seq.values()) <= seq:
            kept = {key: at for key, at in self._mem_seq.items() if at > seq}
            self._mem = {key: self._mem[key] for key in kept}
            self._mem_seq = kept
        self._mem_live = None

    def _apply_in_memory(self, key: str, value: tuple[int, bytes] | None, seq: int) -> None:
        # Counted when len() asks: a lookup per key would slow every commit for a rare call.
        self._mem_live = None
        self._mem[key] = value
        self._mem_seq[key] = seq

    def _committed(self, key: str) -> tuple[int, bytes] | None:
        """The latest committed value of ``key`` (vtype, payload), or None."""
        encoded = key.encode("utf-8", "surrogatepass")
        while True:
            mem, index = self._mem, self._log.index  # one look each: a catch-up replaces them
            if key in mem:
                return mem[key]
            try:
                found = self._log.lookup(encoded)
            except CorruptFileError:
                if self._still_at(mem, index):
                    raise
                continue  # read while another thread moved the view: damage it was not
            if found is not None or self._still_at(mem, index):
                return found

    def _still_at(self, mem: dict[str, tuple[int, bytes] | None], index: object) -> bool:
        """Whether this view is still at the state (commits in memory, index) a lookup without
        its lock read, once another thread's catch-up is over: a compaction's or restore's
        drops the commits in memory before it reads the new index, and a key looked up
        between the two is in neither."""
        with self._mutex:
            return self._mem is mem and self._log.index is index

    # -- mapping API --------------------------------------------------------------------

    def __getitem__(self, key: str) -> Any:
        self._check_usable()
        pending = self._pending.get(key, _UNCHANGED)
        if pending is not _UNCHANGED:
            if pending is _DELETED:
                raise KeyError(key)
            return decode_value(*pending)
        self._read_view()
        entry = self._committed(key) if isinstance(key, str) else None
        if entry is None:
            raise KeyError(key)
        return decode_value(*entry)

    def get(self, key: str, default: Any = None) -> Any:
        try:
            return self[key]
        except KeyError:
            return default

    def __contains__(self, key: object) -> bool:
        self._check_usable()
        if not isinstance(key, str):
            return False
        pending = self._pending.get(key, _UNCHANGED)
        if pending is not _UNCHANGED:
            return pending is not _DELETED
        self._read_view()
        while True:
            mem, index = self._mem, self._log.index  # as in _committed
            if key in mem:
                return mem[key] is not None
            held = _in_index(self._log, key)
            if held or self._still_at(mem, index):
                return held

    def __setitem__(self, key: str, value: Any) -> None:
        self._check_usable()
        _check_key(key)
        check_text(key, "key")  # here, not in _check_key: a key stored before can be deleted
        encoded = encode_value(value)
        with self._mutex:  # not while another thread commits the transaction they share
            self._begin()
            self._pending[key] = encoded

    def __delitem__(self, key: str) -> None:
        self._check_usable()
        _check_key(key)
        with self._mutex:
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

    def items(self) -> ItemsView[str, Any]:
        """Every key with its value as it is when the iteration reaches it (reads see the
        latest commit); a key deleted since the keys were listed is passed over. Every pair
        of one commit: iterate inside :meth:`pinned`."""
        return _LiveItems(self)

    def values(self) -> ValuesView[Any]:
        """The values, as :meth:`items` reads them."""
        return _LiveValues(self)

    def __len__(self) -> int:
        return len(self._keys()) if self._pending else self._committed_len()

    def _committed_len(self) -> int:
        self._check_usable()
        self._read_view()
        with self._mutex:  # one state: another thread's catch-up changes both parts
            if self._mem_live is None:
                self._mem_live = sum(
                    (value is not None) - _in_index(self._log, key)
                    for key, value in self._mem.items()
                )
            return self._log.index.live + self._mem_live

    def _keys(self) -> list[str]:
        self._check_usable()
        self._read_view()
        with self._mutex:  # one state: another thread's commit or catch-up changes both parts
            mem = self._mem
            keys = [
                name
                for name in (
                    key.decode("utf-8", "surrogatepass") for key, _ in self._log.index.items()
                )
                if name not in mem
            ]
            keys += [key for key, value in mem.items() if value is not None]
        keys.sort()  # two sorted runs: a linear merge
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
        return self._log.seq

    def commit(self) -> int:
        """Make the pending changes atomic and durable; return the new commit sequence number.

        Raises:
            LeaseFenced: this writer's lease was lost (TTL expired) before its commit was
                written, or while it was written and a successor took over first; nothing of
                it is in the prefix.
            SyncFailed: an fsync failed; this process writes the prefix no more.
        """
        self._check_usable()
        with self._mutex:
            return self._commit()

    def _commit(self) -> int:
        lease = self._lease
        if lease is None:
            return self._log.seq
        if not self._pending:
            self._end_transaction()
            return self._log.seq
        try:
            seq = self._log.seq + 1
            ops = [
                fmt.encode_op(fmt.OP_DELETE, key, 0, b"")
                if pending is _DELETED
                else fmt.encode_op(fmt.OP_PUT, key, pending[0], pending[1])
                for key, pending in self._pending.items()
            ]
            frame, meta_crc = fmt.encode_batch_with_meta(seq, lease.token, ops)
            try:
                self._log.append(lease, seq, frame, meta_crc, self._poster(lease, seq))
            except CommitUnconfirmed:
                self._settle(lease, seq)  # raises LeaseFenced if it is not in the log
                self._pending.clear()
                return seq
            for key, pending in self._pending.items():
                self._apply_in_memory(key, pending, seq)
            self._pending.clear()
            if self._log.wal_bytes >= self._checkpoint_bytes:
                self._auto_checkpoint(lease)
        finally:
            self._end_transaction()
        return seq

    def _poster(self, lease: HeldLease, seq: int) -> Callable[[], Callable[[], None]] | None:
        """What posts commit ``seq`` on the board for readers once it is written (see
        Log.append and ChangeFeed)."""
        feed = self._feed
        if feed is None:
            return None
        return lambda: post_commit(feed, self.name, lease.token, seq)

    def _settle(self, lost: HeldLease, seq: int) -> None:
        """Our lease lapsed between our write and the check after it (we were stopped): take
        the lease again and look whether whoever fenced first kept the commit."""
        self._lease = None
        lost.release()
        try:
            lease = self._leases.lease(
                self.name, "write", timeout=self._lease_timeout, ttl=self._lease_ttl
            )
        except HotcopyError as err:
            raise CommitUnconfirmed(
                f"commit {seq} to prefix {self.name!r} was written just as its lease lapsed, "
                f"and the lease could not be taken again to settle it ({err}); reopen the "
                f"prefix and look whether commit {seq} holds your changes",
                prefix=self.name,
                seq=seq,
            ) from err
        self._lease = lease
        if not self._log.settle(lease, expired_token(self._leases), lost.token):
            raise LeaseFenced(
                f"commit to prefix {self.name!r} refused: its lease (token {lost.token}) "
                "lapsed while the process was stopped and another writer took over; nothing "
                "of it is in the prefix",
                prefix=self.name,
                token=lost.token,
            )

    def begin(self) -> None:
        """Start a transaction now: take the write lease before the first change.

        Changes made until :meth:`commit` or :meth:`rollback` then build on the latest commit
        as of this call, and no other writer can commit in between.
        """
        self._check_usable()
        with self._mutex:
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

    @contextlib.contextmanager
    def pinned(self) -> Iterator[Prefix]:
        """``with prefix.pinned():`` — every read in the block sees the same commit, the
        latest as the block starts, though other processes commit meanwhile.

        For a structure kept in several records (the nodes of a persisted list): read outside
        a block, its first record could come from one commit and the next from a newer one.
        Writes in the block take the write lease as usual, which raises
        :class:`TransactionConflict` if the view they read is no longer the latest; a
        checkpoint or compaction in the block moves the view to the newest commit.
        """
        self._check_usable()
        self._read_view()
        self._pins += 1
        try:
            yield self
        finally:
            self._pins -= 1

    def rollback(self) -> None:
        """Drop the pending changes and release the write lease."""
        self._check_usable()
        with self._mutex:
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
        with self._mutex:  # before any lease, as everywhere: one order, no deadlock
            lease = self._lease
            owned = lease is None
            if lease is None:
                lease = self._take_write_lease(self._lease_timeout)
            try:
                if BREAK == "copy-without-checkpoint":  # broken on purpose: claims WAL commits
                    cut = Cut(self._log.cut().length, self._log.seq, self._log.header.file_id)
                    return cut, self._log.dup_main_fd()
                return self._log.checkpoint(lease), self._log.dup_main_fd()
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
        with self._mutex:  # before the exclusive lease, as every lease: one order
            return self._compact()

    def _compact(self) -> Cut:
        if self._lease is not None:
            raise StorageError(
                f"prefix {self.name!r} has a transaction in progress; commit or roll back first",
                prefix=self.name,
            )
        self._release_parked()  # our own parked write lease would queue our exclusive
        with self._leases.lease(
            self.name, "exclusive", timeout=self._lease_timeout, ttl=self._lease_ttl
        ) as lease:
            self._log.prepare(lease, expired_token(self._leases))
            seq = self._log.seq
            if seq == 0:
                return self._log.cut()  # nothing committed
            header = fmt.MainHeader(
                os.urandom(16),
                int.from_bytes(os.urandom(8)),
                time.time_ns(),
                seq - 1,
                self._repository_id,
                self.name,
            )

            def write(fd: int) -> tuple[int, int]:
                return write_compacted(fd, header, seq, self._records()), seq

            install_files(self._root, self.name, header, write, lease=lease)
            self._catch_up(force=True)  # readers move too: the exclusive lease changed the counter
            return self._log.cut()

    def _records(self) -> Iterator[tuple[str, int, bytes]]:
        """Every live record of the latest commit read, in key order."""
        for key in self._keys():
            entry = self._committed(key)
            if entry is not None:
                yield key, *entry

    def close(self) -> None:
        """Roll back anything pending (changes not committed are lost) and release every
        resource; idempotent. (The module API's ``hotcopy.storage.close()`` commits instead.)

        A writer checkpoints first if the WAL holds ``CLOSE_CHECKPOINT_BYTES`` or more and
        the write lease is free at once."""
        if self._closed:
            return
        if own_pid() == self._pid:
            try:
                self._end_transaction()
                self._checkpoint_on_close()
                self._release_parked()
            finally:
                if hasattr(self, "_log"):
                    self._log.close()
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def in_transaction(self) -> bool:
        """Whether a transaction holds the write lease (changes pending, or begun)."""
        return self._lease is not None

    def __del__(self) -> None:
        # A fallback only: an abandoned transaction must not keep every other writer waiting.
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == own_pid():
            with contextlib.suppress(Exception):
                self.close()

    def __enter__(self) -> Prefix:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # A prefix is identified by its repository and name, as dbzero's are: two prefixes holding
    # the same items are still two prefixes (Mapping's __eq__ would compare the items).
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Prefix):
            return NotImplemented
        return (self._repository_id, self.name) == (other._repository_id, other.name)

    def __hash__(self) -> int:
        return hash((self._repository_id, self.name))

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"seq={self._log.seq}"
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
        if self.mode == "rw":
            return
        if not self.writable_on_demand:
            raise ReadOnlyError(
                f"prefix {self.name!r} is open read-only; open it with mode 'rw' to change it",
                prefix=self.name,
            )
        self.open_for_writing()

    def open_for_writing(self) -> None:
        """Reopen a read-only view for writing (``"rw"``), in place; a no-op if it is one.

        What this view read so far still counts: a change built on it is refused with
        :class:`TransactionConflict` if another process committed since, as in any writer.
        """
        self._check_usable()
        if self.mode == "rw":
            return
        self._log.close()
        try:
            self._log = Log(
                self._root, self.name, self._repository_id, writable=True, index_sink=self
            )
        except BaseException:
            self._closed = True  # its old files are closed: this view cannot read any more
            raise
        self.mode = "rw"
        self.writable_on_demand = False

    def _read_view(self) -> None:
        """Catch up before a read, and remember the state read for the next transaction."""
        self._catch_up()
        if self._lease is None and self._read_seq is None:
            self._read_seq = self._log.seq

    def _begin(self) -> None:
        self._require_writable()
        if self._lease is None:
            if BREAK == "lease-granted-twice":
                self._lease = _NoExclusion()  # broken on purpose: every writer gets it
            else:
                self._lease = self._take_write_lease(self._lease_timeout)
            try:
                read_seq, self._read_seq = self._read_seq, None
                if read_seq is not None and read_seq != self._log.seq:
                    raise TransactionConflict(
                        f"prefix {self.name!r} changed (commit {read_seq} -> {self._log.seq}) "
                        "since this transaction read it; nothing was written. Retry, and use "
                        "`with prefix.transaction():` around read-modify-write code",
                        prefix=self.name,
                        read_seq=read_seq,
                        seq=self._log.seq,
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

    def _take_write_lease(self, timeout: float | None) -> HeldLease:
        """The parked write lease if it is still ours, else a new one, files prepared.

        A lease held on since our last transaction kept every other writer, and every
        checkpoint, compaction or restore, away: the files are as this view left them.
        """
        parked, self._parked = self._parked, None
        if parked is not None and parked.resume():
            lease = parked
            if self._log.files_as_left:
                return lease
        else:
            lease = self._leases.lease(self.name, "write", timeout=timeout, ttl=self._lease_ttl)
        try:
            self._log.prepare(lease, expired_token(self._leases))
        except BaseException:
            lease.release()
            raise
        return lease

    def _park(self, lease: HeldLease) -> None:
        self._parked_counter = None
        try:
            # The counter of our grant, if the lease is still ours once it is read (a holder
            # stopped here may have lost it, and the counter be another writer's).
            counter = self._state()[0]
            self._parked_counter = counter if counter >= 0 and lease.is_current() else None
        finally:  # parked whatever happened: a lease neither parked nor released blocks all
            lease.park()
            self._parked = lease

    def _release_parked(self) -> None:
        parked, self._parked = self._parked, None
        if parked is not None:
            parked.release()

    def _checkpoint_on_close(self) -> None:
        """Leave the WAL's commits in the main file, as SQLite's last connection does: the
        next process to open the prefix then reads an index instead of replaying a WAL. Never
        waits for the lease: a writer still at work checkpoints in its turn."""
        files = getattr(self, "_log", None)  # None: __init__ failed before it was made
        if self.mode != "rw" or files is None or files.wal_bytes < CLOSE_CHECKPOINT_BYTES:
            return
        try:
            lease = self._take_write_lease(timeout=0)
        except WouldBlock:
            return  # another writer holds it: its close checkpoints
        except ClientClosed:
            return  # the repository was closed first: the next writer checkpoints
        except Exception as err:  # optional work: closing must not fail for it
            log.warning("checkpoint at close skipped prefix=%s error=%s", self.name, err)
            return
        try:
            self._auto_checkpoint(lease)
        finally:
            lease.release()

    def _create(self) -> None:
        lease = self._leases.lease(
            self.name, "write", timeout=self._lease_timeout, ttl=self._lease_ttl
        )
        try:
            if not (self._root / f"{self.name}.hc").exists():
                create_prefix_files(self._root, self.name, self._repository_id)
        finally:
            lease.release()

    def _auto_checkpoint(self, lease: HeldLease) -> None:
        """Checkpoint after a commit. The commit is already durable: a failure here is logged
        and left to the next checkpoint, never reported as a failed commit (an fsync failure
        stops this process writing the prefix, at its next change)."""
        try:
            self._log.checkpoint(lease)
        except Exception as err:
            log.warning("automatic checkpoint failed prefix=%s error=%s", self.name, err)

    # -- internals: following the files ---------------------------------------------------

    def _state(self) -> tuple[int, bytes | None]:
        """The prefix's change counter and what its writer posted (see ChangeFeed), ``(-1,
        None)`` if they cannot be read; the post as ``b""`` while the lease parked here is
        still ours (nobody else commits then)."""
        feed = self._feed
        if feed is None:
            return -1, None
        try:
            state = feed.commit_state(self.name)  # (-1, None) where it cannot tell
        except HotcopyError:
            return -1, None
        if self._parked is not None and state[0] == self._parked_counter:
            return state[0], b""
        return state

    def _catch_up(self, force: bool = False) -> None:
        """See what other processes committed. A writer mid-transaction already has it all.

        Without ``force``, an unchanged commit counter in the coordinator's shared memory
        answers "nothing new" without touching a file: an even one always (no writer holds the
        lease), an odd one if it is our own parked lease, or with the commit board unchanged
        too (the holder posts every commit there, see ``_leases.ChangeFeed``); the files are
        still checked at least every ``TRUST_COUNTER_FOR`` seconds, in case a post was lost.
        """
        if (self._lease is not None or self._pins) and not force:
            return
        if self._feed is not None and self._lease is None:
            now = time.monotonic()
            seen = self._state()
            if (
                not force
                and seen == self._seen
                and seen[0] >= 0
                and seen[1] is not None
                and now - self._checked_at < _leases.TRUST_COUNTER_FOR
            ):
                return
            with self._mutex:
                self._log.follow()
                # Read before the files, kept only once they are followed: another thread
                # that finds them unchanged must find the files followed too.
                self._seen, self._checked_at = seen, now
            return
        with self._mutex:
            self._log.follow()


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


def _in_index(log: Log, key: str) -> bool:
    return log.holds(key.encode("utf-8", "surrogatepass"))
