"""End-to-end check of a main file: every checksum and every structural rule.

Opening a prefix trusts value bytes until they are read (each carries a CRC checked then);
``verify_file`` reads everything, so a single flipped bit anywhere is reported with the offset
of the first damaged record.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import _format as fmt
from ._errors import CorruptFileError


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

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        if self.ok:
            return (
                f"{self.path}: ok, {self.size} bytes, {self.segments} segments, "
                f"commit {self.seq}, {self.keys} keys"
            )
        return f"{self.path}: DAMAGED at offset {self.offset}: {self.error}"


def verify_file(path: str | os.PathLike[str]) -> VerifyReport:
    """Check a ``.hc`` main file completely; never raises for damage, only reports it."""
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _verify_fd(str(path), fd)
    finally:
        os.close(fd)


def _verify_fd(name: str, fd: int) -> VerifyReport:
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
