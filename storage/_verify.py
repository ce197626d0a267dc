"""End-to-end check of a main file: every checksum and every structural rule.

Opening a prefix trusts value bytes until they are read (each carries a CRC checked then);
``verify_file`` reads everything, so a single flipped bit anywhere is reported with the offset
of the first damaged record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from . import _format as fmt
from ._errors import CorruptFileError
from ._files import open_regular
from ._wal_space import tail_is_clear


@dataclass(frozen=True)
class VerifyReport:
    path: str
    ok: bool
    size: int
    segments: int
    seq: int  # the last commit in the file
    keys: int  # live keys at that commit
    error: str | None = None
    offset: int | None = None  # of the first damaged record
    wal_commits: int = 0  # commits beyond ``seq`` that only the WAL holds (verify_prefix)
    notes: tuple[str, ...] = ()  # findings that are not damage (a torn WAL tail, a stale WAL)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            wal = f" + {self.wal_commits} in the WAL" if self.wal_commits else ""
            notes = "".join(f"; {note}" for note in self.notes)
            return (
                f"{self.path}: ok, {self.size} bytes, {self.segments} segments, "
                f"commit {self.seq}{wal}, {self.keys} keys{notes}"
            )
        return f"{self.path}: DAMAGED at offset {self.offset}: {self.error}"


def verify_file(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a ``.hc`` main file completely; never raises for damage, only reports it."""
    path = Path(path)
    fd = open_regular(path)
    try:
        return verify_fd(str(path), fd)
    finally:
        os.close(fd)


def verify_prefix(main: str | os.PathLike[str], wal: str | os.PathLike[str]) -> VerifyReport:
    """Check a prefix's main file completely, then its WAL if it belongs to that file.

    A torn WAL tail (a commit that never returned, cut by a crash) and a WAL that belongs to
    another main file (left beside a restored copy) are not damage: recovery ignores both.
    """
    fd = open_regular(main)
    try:
        boundaries: dict[int, int] = {}
        report = verify_fd(str(main), fd, boundaries)
        if not report.ok:
            return report
        header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    finally:
        os.close(fd)
    try:
        wal_fd = open_regular(wal)
    except FileNotFoundError:
        return report
    try:
        return _verify_wal(report, header, boundaries, str(wal), wal_fd)
    finally:
        os.close(wal_fd)


def _verify_wal(
    report: VerifyReport,
    main: fmt.MainHeader,
    boundaries: dict[int, int],
    name: str,
    fd: int,
) -> VerifyReport:
    try:
        header = fmt.unpack_wal_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    except CorruptFileError as err:
        return replace(report, notes=(f"{name}: unusable WAL ignored ({err.message})",))
    if not fmt.wal_matches(header, main, boundaries):
        return replace(report, notes=(f"{name}: WAL of another main file, ignored",))
    size = os.fstat(fd).st_size
    reader = fmt.FileReader(fd, fmt.HEADER_SIZE, size)
    seq = report.seq
    commits = 0
    while reader.pos < size:
        start = reader.pos
        batch = fmt.read_batch(reader, load_values=True)
        if batch is None or batch.seq > seq + 1:
            if tail_is_clear(fd, start, size):
                break  # space reserved for the next commits
            tail = size - start
            note = f"{name}: torn tail of {tail} bytes at offset {start} (never acknowledged)"
            return replace(report, wal_commits=commits, notes=(note,))
        if batch.seq == seq + 1:
            seq += 1
            commits += 1
    return replace(report, wal_commits=commits)


def verify_fd(name: str, fd: int, boundaries: dict[int, int] | None = None) -> VerifyReport:
    """Check the main file on ``fd``; record its segment boundaries in ``boundaries``."""
    if boundaries is None:
        boundaries = {}
    size = os.fstat(fd).st_size
    live: dict[str, None] = {}
    segments = 0
    seq = 0

    def damaged(error: str, offset: int) -> VerifyReport:
        return VerifyReport(name, False, size, segments, seq, len(live), error, offset)

    try:
        header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
    except CorruptFileError as err:
        return damaged(err.message, err.fields.get("offset", 0))
    seq = header.base_seq
    boundaries[fmt.HEADER_SIZE] = seq
    reader = fmt.FileReader(fd, fmt.HEADER_SIZE, size)
    segment_start = reader.pos
    batches: list[fmt.Batch] = []
    while reader.pos < size:
        record_start = reader.pos
        if fmt.peek_is_trailer(reader):
            trailer = fmt.read_trailer(reader)
            if trailer is None:
                return damaged("segment trailer checksum mismatch", record_start)
            expected = fmt.segment_trailer(segment_start, batches) if batches else b""
            raw = os.pread(fd, fmt.TRAILER_SIZE, record_start)
            if raw != expected:
                return damaged("segment trailer does not match its batches", record_start)
            segments += 1
            segment_start = reader.pos
            boundaries[segment_start] = seq
            batches = []
            continue
        batch = fmt.read_batch(reader, load_values=True)
        if batch is None:
            return damaged("batch is damaged or torn (checksum or structure)", record_start)
        if batch.seq != seq + 1:
            return damaged(f"commit {batch.seq} follows commit {seq}", record_start)
        for op in batch.ops:
            if op.kind == fmt.OP_PUT:
                live[op.key] = None
            else:
                live.pop(op.key, None)
        seq = batch.seq
        batches.append(batch)
    if batches:
        return damaged("the last segment has no trailer (torn checkpoint)", segment_start)
    return VerifyReport(name, True, size, segments, seq, len(live))
