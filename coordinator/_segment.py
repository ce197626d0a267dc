"""The shared memory segment: lease table and commit counters readable without a round trip.

The segment is a plain file under ``/dev/shm`` mapped with :mod:`mmap`, not a
``multiprocessing.shared_memory`` block, whose resource tracker unlinks the block when
its creator is SIGKILLed. The coordinator is the only writer of its tables. Python has no
atomic compare-and-swap on a mapping, so every record (header, lease slot, prefix slot)
starts with a sequence counter: the writer makes it odd, writes the record, makes it even
again; a reader retries while it is odd or changed under its feet (a seqlock).

After the tables comes the *commit board*: one 16-byte record per prefix slot, written by the
holder of that prefix's write lease, never by the coordinator (see :meth:`SegmentReader.post`).
Its pages are allocated when the segment is made, so that a post or a read never needs memory
that a full ``/dev/shm`` could refuse (a SIGBUS); where they cannot be, the segment is made
without a board, and readers look at the files whenever a write lease is held.

Layout (little-endian)::

    [0, 4096)                header: magic, version, seq, capacities, coordinator
                             identity, next fencing token, start times
    [4096, +LEASE_SLOTS*264) lease slots, one per granted lease
    [..., +PREFIX_SLOTS*224) prefix slots, an open-addressing hash table on crc32(prefix)
                             holding waiter counts and commit counters
    [page, +PREFIX_SLOTS*16) the commit board: per prefix slot, the fencing token and the
                             sequence number of the last commit its writer posted

Capacity is fixed when the segment is created (:data:`LEASE_SLOTS` concurrent leases,
:data:`PREFIX_SLOTS` distinct prefixes that ever had waiters or commits) and recorded in
the header, so readers never guess. The file only ever grows (never truncated in place):
a reader touching a page past the end of a shrunk file would die of SIGBUS, so an
incompatible old file is unlinked and replaced instead.
"""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import stat
import struct
import zlib
from pathlib import Path
from typing import Any, Final, NamedTuple

from ._errors import LeaseError

__all__ = ["LeaseRecord", "SegmentReader", "SegmentWriter"]

_log = logging.getLogger(__name__)

MAGIC: Final = b"HCSHM\x00\x00\x01"
VERSION: Final = 2  # 2: the commit board
PREFIX_SLOTS: Final = 16384
# One lease on every prefix the table counts (a consistent backup holds a write lease on each
# prefix at its cut) and 4096 more for everybody else. Pages of the segment are allocated as
# slots are first used: the low slots are taken first.
LEASE_SLOTS: Final = PREFIX_SLOTS + 4096
MAX_PREFIX: Final = 200

HEADER_SIZE: Final = 4096
_MAGIC = struct.Struct("<8sI")  # at 0
_SEQ = struct.Struct("<I")
_SEQ_UNPACK = _SEQ.unpack_from
_SEQ_PACK = _SEQ.pack_into
_HEADER_SEQ_AT: Final = 12
# lease slots, prefix slots, lease high-water mark, pid, start ticks, next token, boot id,
# started (monotonic), started (wall clock)
_HEADER = struct.Struct("<IIIIQQ16sdd")
_HEADER_AT: Final = 16
# The header's coordinator pid alone (one aligned word: read without the seqlock): 0 once the
# coordinator exited, when the segment's counters stop moving.
_PID = struct.Struct("<I")
_HEADER_PID_AT: Final = _HEADER_AT + 12
# Its own seqlocked record in the header page: the largest fencing token of a write or
# exclusive lease that expired (its holder alive, perhaps only stopped). Storage fences before
# changing a prefix whose files were last fenced below it (see storage/_log.py).
_EXPIRED = struct.Struct("<Q")
_EXPIRED_AT: Final = 512
# A flag (u32, only ever set): a prefix was refused a slot because the prefix table is full, so
# a prefix without a slot may have a writer whose counter is not shared (see Client.commit_seq).
_TABLE_FULL = struct.Struct("<I")
_TABLE_FULL_AT: Final = 1024

LEASE_SLOT_SIZE: Final = 264
# state, mode, prefix length, pid, (pad), start ticks, client id, token, granted at,
# expires at (0 = no ttl), ttl seconds
_LEASE = struct.Struct("<BBHIIQQQddd")
_LEASE_PREFIX_AT: Final = 4 + _LEASE.size
_LEASE_WITH_PREFIX_PACK = struct.Struct(_LEASE.format + f"{MAX_PREFIX}s").pack_into
_EXPIRES = struct.Struct("<d")
_EXPIRES_AT: Final = 4 + 44

PREFIX_SLOT_SIZE: Final = 224
# used, (pad), prefix length, waiters, commit seq
_PREFIX = struct.Struct("<BBHIQ")
_PREFIX_PREFIX_AT: Final = 4 + _PREFIX.size

_SLOT_FREE: Final = 0
_SLOT_HELD: Final = 1

_READ_RETRIES: Final = 100_000


_POSTED = struct.Struct("<QQ")  # a board record: fencing token, commit sequence number


def _pages(size: int) -> int:
    return (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE * mmap.PAGESIZE


def _board_at(lease_slots: int, prefix_slots: int) -> int:
    return _pages(HEADER_SIZE + lease_slots * LEASE_SLOT_SIZE + prefix_slots * PREFIX_SLOT_SIZE)


def _segment_size(lease_slots: int, prefix_slots: int) -> int:
    return _board_at(lease_slots, prefix_slots) + _pages(prefix_slots * _POSTED.size)


class SegmentTorn(LeaseError):
    """A record stayed half-written (its writer died mid-update); retry after recovery."""


class LeaseRecord(NamedTuple):
    """One granted lease as recorded in the segment.

    Attributes:
        slot: Index of the lease slot.
        prefix: The leased prefix.
        mode: Mode code (see ``_protocol.MODE_CODES``).
        pid: Holder's pid.
        start_ticks: Holder's start time in clock ticks (with pid: its identity).
        client_id: Random id of the holder's client object (a process may have several).
        token: The fencing token.
        granted_at: ``time.monotonic()`` of the grant (CLOCK_MONOTONIC is system-wide).
        expires_at: Monotonic expiry time, 0.0 for no ttl.
        ttl: Seconds, 0.0 for none.
    """

    slot: int
    prefix: str
    mode: int
    pid: int
    start_ticks: int
    client_id: int
    token: int
    granted_at: float
    expires_at: float
    ttl: float


class HeaderRecord(NamedTuple):
    """The segment header.

    Attributes:
        lease_slots: Capacity of the lease table.
        prefix_slots: Capacity of the prefix table.
        lease_hwm: One past the highest lease slot ever used (readers scan below it).
        pid: Coordinator pid, 0 when none runs.
        start_ticks: Coordinator start time in clock ticks.
        next_token: The next fencing token the coordinator will hand out.
        boot: Boot id the coordinator ran under.
        started_monotonic: ``time.monotonic()`` at coordinator start.
        started_wall: ``time.time()`` at coordinator start.
    """

    lease_slots: int
    prefix_slots: int
    lease_hwm: int
    pid: int
    start_ticks: int
    next_token: int
    boot: bytes
    started_monotonic: float
    started_wall: float


class _SegmentBase:
    _mm: mmap.mmap
    lease_slots: int
    prefix_slots: int
    _lease_base: int
    _prefix_base: int

    def _layout(self, lease_slots: int, prefix_slots: int) -> None:
        self.lease_slots = lease_slots
        self.prefix_slots = prefix_slots
        self._lease_base = HEADER_SIZE
        self._prefix_base = HEADER_SIZE + lease_slots * LEASE_SLOT_SIZE

    def _read(self, at: int, record: struct.Struct, tail: int = 0) -> tuple[tuple[Any, ...], bytes]:
        """Read one seqlocked record at ``at``: its fields and ``tail`` bytes after them."""
        # Written for speed (a writer checks its lease several times per commit): one pass
        # when no writer is mid-record, as nearly always.
        mm = self._mm
        unpack = record.unpack_from
        attempt = 0
        while True:
            before = _SEQ_UNPACK(mm, at)[0]
            if not before & 1:
                fields = unpack(mm, at + 4)
                extra = mm[at + 4 + record.size : at + 4 + record.size + tail] if tail else b""
                if _SEQ_UNPACK(mm, at)[0] == before:
                    return fields, extra
            attempt += 1
            if attempt >= _READ_RETRIES:
                raise SegmentTorn(
                    f"shared memory record at offset {at} stays half-written", offset=at
                )
            if attempt > 64:
                os.sched_yield()  # the writer is mid-record: let it finish

    def header(self) -> HeaderRecord:
        """Read the header."""
        fields, _ = self._read(_HEADER_SEQ_AT, _HEADER)
        return HeaderRecord(*fields)

    def expired_token(self) -> int:
        """The largest token of a write or exclusive lease that expired (0: none did)."""
        fields, _ = self._read(_EXPIRED_AT, _EXPIRED)
        return int(fields[0])

    def lease_at(self, slot: int) -> LeaseRecord | None:
        """Read lease slot ``slot``; None if it is free."""
        fields, tail = self._read(self._lease_base + slot * LEASE_SLOT_SIZE, _LEASE, MAX_PREFIX)
        state, mode, plen, pid, _pad, ticks, client, token, granted, expires, ttl = fields
        if state != _SLOT_HELD:
            return None
        prefix = tail[: int(plen)].decode("ascii", "replace")
        return LeaseRecord(slot, prefix, mode, pid, ticks, client, token, granted, expires, ttl)

    def leases(self, *, skip_torn: bool = False) -> list[LeaseRecord]:
        """Read every granted lease. With ``skip_torn``, leave out a record that stays
        half-written (its writer was killed or stopped mid-record; a successor repairs it)
        instead of raising :class:`SegmentTorn`: what a display wants."""
        hwm = min(self.header().lease_hwm, self.lease_slots)
        out = []
        for slot in range(hwm):
            try:
                record = self.lease_at(slot)
            except SegmentTorn:
                if not skip_torn:
                    raise
                continue
            if record is not None:
                out.append(record)
        return out

    def lease_is_current(self, slot: int, token: int, now: float) -> bool:
        """Tell whether slot ``slot`` still holds ``token`` unexpired at monotonic ``now``."""
        return self.lease_held_until(slot, token) > now

    def lease_held_until(self, slot: int, token: int) -> float:
        """Until when slot ``slot`` holds ``token`` (``math.inf``: no ttl); 0.0 if it does not:
        the coordinator took the lease back (an expiry, its holder's death) or never gave it."""
        if not 0 <= slot < self.lease_slots:
            return 0.0
        try:
            fields, _ = self._read(self._lease_base + slot * LEASE_SLOT_SIZE, _LEASE)
        except SegmentTorn:
            return 0.0  # unknown means not current: fencing errs on the safe side
        if fields[0] != _SLOT_HELD or fields[7] != token:
            return 0.0
        expires: float = fields[9]
        return math.inf if expires == 0.0 else expires

    def _prefix_at(self, pslot: int) -> tuple[bool, str, int, int]:
        fields, tail = self._read(self._prefix_base + pslot * PREFIX_SLOT_SIZE, _PREFIX, MAX_PREFIX)
        used, _pad, plen, waiters, commit = fields
        prefix = tail[: int(plen)].decode("ascii", "replace")
        return bool(used), prefix, int(waiters), int(commit)

    def find_prefix(self, prefix: str) -> int | None:
        """Return the prefix slot of ``prefix``, or None if it has none."""
        return self.locate_prefix(prefix)[0]

    def locate_prefix(self, prefix: str) -> tuple[int | None, int | None]:
        """The prefix slot of ``prefix`` and None; or None and the free slot its probe ended
        at, which is the one ``prefix`` will be given (slots are taken in probe order and
        never freed): while :meth:`slot_unused` says so of it, ``prefix`` still has none."""
        start = zlib.crc32(prefix.encode("ascii")) % self.prefix_slots
        for probe in range(self.prefix_slots):
            pslot = (start + probe) % self.prefix_slots
            # An unlocked peek at the used byte first (a slot being made now is as good as
            # one not made yet).
            if self.slot_unused(pslot):
                return None, pslot
            used, name, _waiters, _commit = self._prefix_at(pslot)
            if not used:
                return None, pslot
            if name == prefix:
                return pslot, None
        return None, None

    def slot_unused(self, pslot: int) -> bool:
        """Whether prefix slot ``pslot`` was never given to a prefix (an unlocked peek)."""
        return self._mm[self._prefix_base + pslot * PREFIX_SLOT_SIZE + 4] == 0

    def coordinator_pid(self) -> int:
        """The pid of the coordinator serving this segment; 0 if none does any more."""
        return int(_PID.unpack_from(self._mm, _HEADER_PID_AT)[0])

    def prefix_table_full(self) -> bool:
        """Whether a prefix was ever refused a slot (its counter then is not shared)."""
        return bool(_TABLE_FULL.unpack_from(self._mm, _TABLE_FULL_AT)[0])

    def waiters_at(self, pslot: int) -> int:
        """Read how many requests queue on the prefix of slot ``pslot``."""
        fields, _ = self._read(self._prefix_base + pslot * PREFIX_SLOT_SIZE, _PREFIX)
        return int(fields[3])

    def prefixes(self, *, skip_torn: bool = False) -> list[tuple[int, str, int, int]]:
        """Return (slot, prefix, waiters, commit seq) of every used prefix slot
        (``skip_torn``: see :meth:`leases`)."""
        base = self._prefix_base
        mm = self._mm
        out = []
        for pslot in range(self.prefix_slots):
            # Cheap unlocked peek first: most slots are unused and stay so.
            if mm[base + pslot * PREFIX_SLOT_SIZE + 4] == 0:
                continue
            try:
                used, name, waiters, commit = self._prefix_at(pslot)
            except SegmentTorn:
                if not skip_torn:
                    raise
                continue
            if used:
                out.append((pslot, name, waiters, commit))
        return out


class SegmentReader(_SegmentBase):
    """A read-only mapping of a coordinator's segment (any process of the same user).

    Raises:
        FileNotFoundError: No segment exists (no coordinator ever ran since boot).
        LeaseError: The file is not a segment of a known version.
    """

    def __init__(self, path: Path) -> None:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)  # RDWR: for the board
        self._board: mmap.mmap | None = None
        try:
            info = os.fstat(fd)
            if info.st_uid != os.getuid() or not stat.S_ISREG(info.st_mode):
                # Only our own coordinator's table may be trusted for fencing decisions.
                raise LeaseError(f"{str(path)!r} is not a segment of this user: not trusted")
            self.inode = (info.st_dev, info.st_ino)
            if info.st_size < HEADER_SIZE:
                raise LeaseError(f"{str(path)!r} is not a hotcopy segment (too short)")
            self._mm = mmap.mmap(fd, info.st_size, access=mmap.ACCESS_READ)
            magic, version = _MAGIC.unpack_from(self._mm, 0)
            if magic != MAGIC or version != VERSION:
                self._mm.close()
                raise LeaseError(f"{str(path)!r} is not a hotcopy segment of version {VERSION}")
            (lease_slots, prefix_slots) = struct.unpack_from("<II", self._mm, _HEADER_AT)
            at = _board_at(lease_slots, prefix_slots)
            if info.st_size not in (at, _segment_size(lease_slots, prefix_slots)):
                self._mm.close()
                raise LeaseError(f"{str(path)!r} is not as long as its header says")
            if info.st_size > at:
                self._board = mmap.mmap(fd, info.st_size - at, offset=at)
        finally:
            os.close(fd)
        self._layout(lease_slots, prefix_slots)
        self.path = path

    def replaced(self) -> bool:
        """Whether the path it was mapped from names another file now (a coordinator's
        successor makes a new one where the old one was removed); not if it names none."""
        try:
            info = os.stat(self.path)
        except FileNotFoundError:
            return False
        return (info.st_dev, info.st_ino) != self.inode

    def state_at(self, pslot: int) -> tuple[int, bytes | None]:
        """The change counter of prefix slot ``pslot`` and, while it is odd, what the prefix's
        writer posted last (see :meth:`post`): ``b""`` while it is even, None if the segment
        has no board. (A reader's every get asks this: one call, one record read.)"""
        fields, _ = self._read(self._prefix_base + pslot * PREFIX_SLOT_SIZE, _PREFIX)
        counter = int(fields[4])
        if not counter & 1:
            return counter, b""
        board = self._board
        if board is None:
            return counter, None
        return counter, board[pslot * _POSTED.size : (pslot + 1) * _POSTED.size]

    def post(self, pslot: int, token: int, seq: int) -> None:
        """Post commit ``seq`` of the prefix of slot ``pslot``, made under the write lease of
        ``token``, for its readers: while that lease is held, the prefix's counter stays
        (odd), and a reader that finds the counter and the post as at its last look at the
        files knows that nothing was committed since.

        Each holder posts its own token with growing sequence numbers, so a post never
        repeats an earlier one: a board that reads as before was not written since. A read
        torn by a post in progress, or a late post of a holder fenced meanwhile, reads as a
        change, and only makes a reader look at the files. Without a board, nothing: no
        reader trusts an odd counter then."""
        if self._board is not None:
            _POSTED.pack_into(self._board, pslot * _POSTED.size, token, seq)

    def close(self) -> None:
        """Unmap the segment (idempotent)."""
        self._mm.close()
        if self._board is not None:
            self._board.close()

    def __enter__(self) -> SegmentReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class SegmentWriter(_SegmentBase):
    """The coordinator's read-write mapping; the only writer of the segment's tables.

    Opening an existing segment of the same version and capacity keeps its contents (a
    successor rebuilds its table from them); anything else is replaced by a fresh file.

    Attributes:
        recovered: True if an existing segment was adopted.
    """

    def __init__(
        self, path: Path, lease_slots: int = LEASE_SLOTS, prefix_slots: int = PREFIX_SLOTS
    ) -> None:
        self.path = path
        self._layout(lease_slots, prefix_slots)
        size = _segment_size(lease_slots, prefix_slots)
        fd = self._open_existing(path, size)
        self.recovered = fd is not None
        if fd is None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            fd = os.open(
                path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
            os.fchmod(fd, 0o600)  # the umask may have cleared bits we want, never added
            os.ftruncate(fd, size)
            at = _board_at(lease_slots, prefix_slots)
            try:
                os.posix_fallocate(fd, at, size - at)  # see the module: the board's pages now
            except OSError as err:
                _log.warning("no commit board: its pages cannot be had path=%s error=%s", path, err)
                os.ftruncate(fd, at)  # nobody maps it yet (its header is not written)
        try:
            self._mm = mmap.mmap(fd, os.fstat(fd).st_size)  # the tables, and the board if any
        finally:
            os.close(fd)
        if not self.recovered:
            _MAGIC.pack_into(self._mm, 0, MAGIC, VERSION)
            self.write_header(0, 0, 0, b"\0" * 16, 0, 0.0, 0.0)
        else:
            self._repair_torn()
        # The only writer caches each lease slot's counter instead of reading it back. A fresh
        # segment's are all 0: reading them would allocate every page of the table.
        self._lease_seq = (
            [
                _SEQ.unpack_from(self._mm, self._lease_base + slot * LEASE_SLOT_SIZE)[0]
                for slot in range(lease_slots)
            ]
            if self.recovered
            else [0] * lease_slots
        )
        self._lease_hwm = self.header().lease_hwm

    def _open_existing(self, path: Path, size: int) -> int | None:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as err:  # e.g. ELOOP on a planted symlink
            _log.warning("replacing unusable segment path=%s error=%s", path, err)
            return None
        info = os.fstat(fd)
        board_at = _board_at(self.lease_slots, self.prefix_slots)
        good = (
            stat.S_ISREG(info.st_mode)
            and info.st_uid == os.getuid()
            and info.st_size in (size, board_at)  # with its board, or without
        )
        if good:
            magic, version = _MAGIC.unpack(os.pread(fd, _MAGIC.size, 0))
            caps = struct.unpack("<II", os.pread(fd, 8, _HEADER_AT))
            good = (magic, version) == (MAGIC, VERSION) and caps == (
                self.lease_slots,
                self.prefix_slots,
            )
        if not good:
            os.close(fd)
            _log.warning("replacing incompatible segment path=%s", path)
            return None
        os.fchmod(fd, 0o600)
        return fd

    def _repair_torn(self) -> None:
        # A predecessor killed mid-record leaves an odd counter. A half-written lease was
        # never announced (grants are recorded before they are sent) and a half-cleared one
        # was being released, so both become free; prefix slots keep their fields.
        mm = self._mm
        for slot in range(self.lease_slots):
            at = self._lease_base + slot * LEASE_SLOT_SIZE
            (seq,) = _SEQ.unpack_from(mm, at)
            if seq & 1:
                mm[at + 4] = _SLOT_FREE
                _SEQ.pack_into(mm, at, seq + 1)
        for pslot in range(self.prefix_slots):
            at = self._prefix_base + pslot * PREFIX_SLOT_SIZE
            (seq,) = _SEQ.unpack_from(mm, at)
            if seq & 1:
                _SEQ.pack_into(mm, at, seq + 1)
        (seq,) = _SEQ.unpack_from(mm, _HEADER_SEQ_AT)
        if seq & 1:
            _SEQ.pack_into(mm, _HEADER_SEQ_AT, seq + 1)

    def close(self) -> None:
        """Unmap the segment (idempotent); the file stays for a successor."""
        self._mm.close()

    def unlink(self) -> None:
        """Remove the segment file (the owner only, when nothing in it is worth keeping)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)

    def _write(self, at: int, record: struct.Struct, *fields: object) -> None:
        mm = self._mm
        (seq,) = _SEQ.unpack_from(mm, at)
        _SEQ.pack_into(mm, at, (seq + 1) & 0xFFFFFFFF)
        record.pack_into(mm, at + 4, *fields)
        _SEQ.pack_into(mm, at, (seq + 2) & 0xFFFFFFFF)

    def write_header(
        self,
        pid: int,
        start_ticks: int,
        next_token: int,
        boot: bytes,
        lease_hwm: int,
        started_monotonic: float,
        started_wall: float,
    ) -> None:
        """Rewrite the header."""
        self._hdr = [pid, start_ticks, next_token, boot, started_monotonic, started_wall]
        self._lease_hwm = lease_hwm
        self._write_header()

    def _write_header(self) -> None:
        pid, ticks, token, boot, mono, wall = self._hdr
        self._write(
            _HEADER_SEQ_AT,
            _HEADER,
            self.lease_slots,
            self.prefix_slots,
            self._lease_hwm,
            pid,
            ticks,
            token,
            boot,
            mono,
            wall,
        )

    def record_expired(self, token: int) -> None:
        """Note that the lease of ``token`` expired (only ever raises the recorded token)."""
        if token > self.expired_token():
            self._write(_EXPIRED_AT, _EXPIRED, token)

    def set_next_token(self, next_token: int) -> None:
        """Record the next fencing token (called before the token is handed out)."""
        self._hdr[2] = next_token
        self._write_header()

    def write_lease(
        self,
        slot: int,
        prefix: bytes,
        mode: int,
        pid: int,
        start_ticks: int,
        client_id: int,
        token: int,
        granted_at: float,
        expires_at: float,
        ttl: float,
    ) -> None:
        """Record a granted lease in ``slot`` (before the grant is sent)."""
        if slot >= self._lease_hwm:
            self._lease_hwm = slot + 1
            self._write_header()
        mm = self._mm
        at = self._lease_base + slot * LEASE_SLOT_SIZE
        seq = self._lease_seq[slot]
        _SEQ_PACK(mm, at, seq + 1)
        _LEASE_WITH_PREFIX_PACK(
            mm, at + 4, _SLOT_HELD, mode, len(prefix), pid, 0, start_ticks, client_id,
            token, granted_at, expires_at, ttl, prefix,
        )  # fmt: skip
        seq = (seq + 2) & 0xFFFFFFFE
        _SEQ_PACK(mm, at, seq)
        self._lease_seq[slot] = seq

    def set_lease_expiry(self, slot: int, expires_at: float) -> None:
        """Move the expiry of the lease in ``slot`` (a renewal)."""
        mm = self._mm
        at = self._lease_base + slot * LEASE_SLOT_SIZE
        seq = self._lease_seq[slot]
        _SEQ_PACK(mm, at, seq + 1)
        _EXPIRES.pack_into(mm, at + _EXPIRES_AT, expires_at)
        seq = (seq + 2) & 0xFFFFFFFE
        _SEQ_PACK(mm, at, seq)
        self._lease_seq[slot] = seq

    def clear_lease(self, slot: int) -> None:
        """Free ``slot``: its token stops being current for every reader at once."""
        mm = self._mm
        at = self._lease_base + slot * LEASE_SLOT_SIZE
        seq = self._lease_seq[slot]
        _SEQ_PACK(mm, at, seq + 1)
        mm[at + 4] = _SLOT_FREE
        seq = (seq + 2) & 0xFFFFFFFE
        _SEQ_PACK(mm, at, seq)
        self._lease_seq[slot] = seq

    def allocate_prefix(self, prefix: bytes) -> int | None:
        """Return the slot of ``prefix``, creating it; None if the prefix table is full."""
        start = zlib.crc32(prefix) % self.prefix_slots
        for probe in range(self.prefix_slots):
            pslot = (start + probe) % self.prefix_slots
            used, name, _waiters, _commit = self._prefix_at(pslot)
            if not used:
                self.set_prefix_counters(pslot, prefix, 0, 0)
                return pslot
            if name.encode("ascii") == prefix:
                return pslot
        _TABLE_FULL.pack_into(self._mm, _TABLE_FULL_AT, 1)
        return None

    def set_prefix_counters(self, pslot: int, prefix: bytes, waiters: int, commit: int) -> None:
        """Write the name, waiter count and commit counter of prefix slot ``pslot``."""
        mm = self._mm
        at = self._prefix_base + pslot * PREFIX_SLOT_SIZE
        (seq,) = _SEQ.unpack_from(mm, at)
        _SEQ.pack_into(mm, at, (seq + 1) & 0xFFFFFFFF)
        _PREFIX.pack_into(mm, at + 4, 1, 0, len(prefix), waiters, commit)
        mm[at + _PREFIX_PREFIX_AT : at + _PREFIX_PREFIX_AT + len(prefix)] = prefix
        _SEQ.pack_into(mm, at, (seq + 2) & 0xFFFFFFFF)
