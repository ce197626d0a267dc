"""Space reserved ahead of WAL appends, so that a commit's fdatasync need not commit the journal.

An append that grows a file changes its size, and a journaling file system (ext4, XFS) must
commit its journal before ``fdatasync`` may return; a write into blocks the file already owns
needs only the data itself on disk. Reserving space ahead with ``fallocate`` makes nearly every
commit the second kind: one size change per reservation instead of one per commit (measured by
``scripts/bench_storage.py``: about 1.5x the commit rate of plain appends on ext4). PostgreSQL
pre-allocates its WAL segments for the same reason.

A reservation reads as zeros, and no batch starts with a zero byte, so readers stop there as
they stop at the end of a file. The bytes after the last whole batch are therefore zeros, or
the torn batch of a writer that died mid-append, which the next writer removes before it
appends (:func:`tail_is_clear`): a stale batch must never follow a newer one.
"""

from __future__ import annotations

import errno
import os

RESERVE_MIN = 64 << 10
RESERVE_MAX = 256 << 10  # also bounds what a new writer reads to check the tail
_PAGE = 4096
_NO_RESERVATION = (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.ENOSPC, errno.EFBIG)


def reserve(fd: int, size: int, end: int) -> int:
    """Reserve the WAL on ``fd`` (``size`` bytes now) to ``end`` and some beyond; its new size.

    The reservation grows with the WAL, from ``RESERVE_MIN`` up to ``RESERVE_MAX`` ahead. Where
    the file system cannot reserve (or has no room), nothing is reserved and appends grow the
    file as before.
    """
    ahead = min(max(end, RESERVE_MIN), RESERVE_MAX)
    target = -(-(end + ahead) // _PAGE) * _PAGE
    try:
        os.posix_fallocate(fd, size, target - size)
    except OSError as err:
        if err.errno not in _NO_RESERVATION:
            raise
        return size
    return target


def tail_is_clear(fd: int, start: int, end: int) -> bool:
    """True when bytes ``[start, end)`` are all zeros: reserved space and nothing torn.

    Only what the file system holds as data is read (``SEEK_DATA``): the rest of a reservation
    was never written and reads as zeros. Reading all of it (64-256 KiB) at every hand-over of
    the write lease was a quarter of the hand-over's time among 4 writers.
    """
    piece = _PAGE  # a tail that is not clear mostly shows it in its first bytes
    while (start := _next_data(fd, start, end)) < end:
        stop = _seek(fd, start, os.SEEK_HOLE, end)  # this range of data, holes after it skipped
        if stop <= start:  # the file changed between the two looks: read it all
            stop = end
        while start < stop:
            chunk = os.pread(fd, min(piece, stop - start), start)
            if not chunk:
                return True  # the file shrank meanwhile
            if chunk.count(0) != len(chunk):
                return False
            start += len(chunk)
            piece = min(piece * 4, RESERVE_MAX)
    return True


def written_end(fd: int, start: int, end: int) -> int:
    """Where the data the file system holds from ``start`` on ends for good (``SEEK_HOLE``,
    ``SEEK_DATA``), at most ``end``: after it, only space that reads as zeros, a reservation
    never written.

    A bound for reading ahead, never for what is read: a hole can lie inside a batch too (a
    sparse copy makes one of a value's blocks of zeros), and such holes are passed over. Data
    is what was written or is in the page cache, zeros read from a reservation included: a
    reader that reads ahead no further leaves the reservation uncached, and the next
    :func:`tail_is_clear` need not read it."""
    hole = _seek(fd, start, os.SEEK_HOLE, end)
    while hole < end:
        data = _seek(fd, hole, os.SEEK_DATA, end)
        if data >= end:
            return hole
        after = _seek(fd, data, os.SEEK_HOLE, end)
        if after <= hole:  # the file changed between the looks: no bound
            return end
        hole = after
    return end


def _seek(fd: int, offset: int, whence: int, end: int) -> int:
    """``lseek`` for data or a hole, at most ``end``; ``end`` past the file's end (``ENXIO``)
    or where the file system cannot tell."""
    try:
        return min(os.lseek(fd, offset, whence), end)
    except OSError:
        return end


def _next_data(fd: int, start: int, end: int) -> int:
    """Where the next data the file system holds begins, from ``start`` on; ``end`` if none
    before it. Where the file system cannot tell (any other error: reading will report a
    real one), ``start``: everything is data."""
    try:
        return min(os.lseek(fd, start, os.SEEK_DATA), end)
    except OSError as err:
        if err.errno == errno.ENXIO:  # nothing but space never written up to the file's end
            return end
        return start
