"""A checkpoint for a copy: the cut of a prefix without building its key index.

A copy needs the cut ``(L, S)`` and a descriptor on the main file, not the key index a
:class:`Prefix` builds on open by scanning the whole main file (most of the time of a small
prefix's copy, and of an incremental backup of large ones). Under the ``write`` lease and
the mutation lock, in the plain shape of a prefix (a WAL that matches the main file and starts
exactly at its end, which a real trailer closes) the cut follows from the WAL alone: its
header gives the boundary, its whole batches are what the checkpoint appends. Anything else
(a crashed checkpoint's unsynced segment or debris, a WAL of another file, a damaged one)
returns None and the caller checkpoints through a :class:`Prefix`, which repairs it.

The segment written is byte for byte the one :meth:`Prefix.checkpoint` writes (WAL batches
back to back and their trailer), at the same fault points, so the writers that follow a
checkpoint by arithmetic and the crash tests see no difference.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from . import _format as fmt
from ._closing import close_later
from ._durable import write_durably
from ._errors import CorruptFileError, PrefixNotFound
from ._leases import LeaseProvider
from ._prefix import (
    _BREAK,
    Cut,
    _fault,
    _Flock,
    append_segment,
    main_path,
    open_mutex,
    wal_path,
)


def checkpoint_cut(
    root: Path,
    name: str,
    leases: LeaseProvider,
    runtime_dir: Path,
    *,
    lease_timeout: float | None,
    lease_ttl: float | None,
) -> tuple[Cut, Cut, int, float] | None:
    """Checkpoint ``name`` under its write lease; the cut, the cut it started from, a
    descriptor on its main file, and the seconds spent waiting for and holding the lease (what
    writers may wait for). Between the two cuts is the segment this checkpoint appended from
    WAL batches it read whole (every checksum checked); nothing before the first was parsed.

    None when the prefix's files are not in the plain shape (nothing was changed then): the
    caller checkpoints through a :class:`Prefix`, which repairs whatever is unusual.
    """
    # The WAL's batches are read before the lease is asked for, while writers go on: a WAL
    # only grows until a checkpoint replaces it, so under the lease only what was appended
    # since needs reading (a full WAL of small commits takes a hundred milliseconds to parse,
    # every one of which a writer would wait).
    ahead = _WalReader.open(wal_path(root, name))
    mutex_fd = open_mutex(runtime_dir, name)
    try:
        asked = time.monotonic()
        with leases.lease(name, "write", timeout=lease_timeout, ttl=lease_ttl), _Flock(mutex_fd):
            result = _checkpoint_plain(root, name, ahead)
        return None if result is None else (*result, time.monotonic() - asked)
    finally:
        os.close(mutex_fd)
        if ahead is not None:
            # By the closing thread: the WAL may be replaced now, and its last close frees
            # its blocks (see _closing), which no caller should wait for.
            close_later(ahead.fd)


class _WalReader:
    """A WAL's whole batches, read (values checked) up to ``pos``, and more on demand."""

    def __init__(self, fd: int, header: fmt.WalHeader) -> None:
        self.fd = fd
        self.header = header
        self.batches: list[fmt.Batch] = []
        self.pos = fmt.HEADER_SIZE
        # Kept as batches are read, so that under the write lease nothing passes over them
        # all again: whether they are commits base_seq + 1, + 2, ... in order (the WAL a
        # checkpoint leaves), and the metadata CRC of the trailer that closes them.
        self.in_order = True
        self.meta_chain = 0
        self.read_on()

    @classmethod
    def open(cls, wal: Path) -> _WalReader | None:
        """The WAL at ``wal`` read as far as it is whole; None if absent or unusable."""
        try:
            fd = os.open(wal, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        try:
            return cls(fd, fmt.unpack_wal_header(os.pread(fd, fmt.HEADER_SIZE, 0)))
        except (CorruptFileError, OSError):
            os.close(fd)
            return None

    def is_current(self, wal: Path) -> bool:
        """Whether ``wal`` is still the file read (no checkpoint replaced it meanwhile)."""
        try:
            return os.stat(wal).st_ino == os.fstat(self.fd).st_ino
        except FileNotFoundError:
            return False

    def read_on(self) -> None:
        """Read the whole batches appended since; a torn tail (never acknowledged) ends them."""
        reader = fmt.FileReader(self.fd, self.pos, os.fstat(self.fd).st_size)
        batches = self.batches
        while (batch := fmt.read_batch(reader, load_values=True)) is not None:
            if batch.seq != self.header.base_seq + len(batches) + 1:
                self.in_order = False
            self.meta_chain = fmt.chain_meta_crc(batch.meta_crc, self.meta_chain)
            batches.append(batch)
            self.pos = reader.pos


def _checkpoint_plain(
    root: Path, name: str, ahead: _WalReader | None
) -> tuple[Cut, Cut, int] | None:
    try:
        main_fd = os.open(main_path(root, name), os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise PrefixNotFound(f"prefix {name!r} does not exist in {root}", prefix=name) from None
    keep = False
    try:
        wal = wal_path(root, name)
        fresh = None  # ours to close: the caller closes what it read ahead
        if ahead is None or not ahead.is_current(wal):
            ahead = fresh = _WalReader.open(wal)  # replaced meanwhile: read it all, now
            if ahead is None:
                return None
        else:
            ahead.read_on()
        try:
            result = _checkpoint_fd(main_fd, wal, ahead)
        finally:
            if fresh is not None:
                close_later(fresh.fd)
        keep = result is not None
        return None if result is None else (*result, main_fd)
    finally:
        if not keep:
            os.close(main_fd)


def _checkpoint_fd(main_fd: int, wal: Path, ahead: _WalReader) -> tuple[Cut, Cut] | None:
    if _BREAK == "copy-without-checkpoint":
        return None  # the broken build (scripts/stress.py --break) lives in Prefix alone
    header = fmt.unpack_main_header(os.pread(main_fd, fmt.HEADER_SIZE, 0))
    wal_header, batches = ahead.header, ahead.batches
    base_len, base_seq = wal_header.base_len, wal_header.base_seq
    if (
        wal_header.file_id != header.file_id
        or wal_header.main_salt != header.salt
        or os.fstat(main_fd).st_size != base_len
        or not _is_boundary(main_fd, header, base_len, base_seq)
    ):
        return None
    if not ahead.in_order:
        return None  # not the WAL a checkpoint leaves: let a full view sort it out
    base = Cut(base_len, base_seq, header.file_id)
    if not batches:
        return base, base
    last_seq = batches[-1].seq
    data = b"".join([batch.raw or b"" for batch in batches])
    trailer = fmt.encode_trailer(last_seq, base_len, len(batches), ahead.meta_chain)
    end = append_segment(main_fd, data + trailer, base_len)
    fresh_wal = fmt.WalHeader(header.file_id, header.salt, end, last_seq)
    write_durably(wal, fmt.pack_wal_header(fresh_wal))
    _fault("checkpoint:after-wal-reset")
    return Cut(end, last_seq, header.file_id), base


def _is_boundary(fd: int, header: fmt.MainHeader, length: int, seq: int) -> bool:
    """Whether the main file's first ``length`` bytes end a segment holding commit ``seq``."""
    if length == fmt.HEADER_SIZE:
        return seq == header.base_seq
    if length < fmt.HEADER_SIZE + fmt.BATCH_SIZE + fmt.TRAILER_SIZE:
        return False
    trailer = fmt.read_trailer(fmt.FileReader(fd, length - fmt.TRAILER_SIZE, length))
    return (
        trailer is not None
        and trailer.last_seq == seq
        and fmt.HEADER_SIZE <= trailer.segment_start < length - fmt.TRAILER_SIZE
    )
