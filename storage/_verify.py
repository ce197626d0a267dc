"""End-to-end checks: every checksum and every structural rule of a main file, a copy, or a
prefix's two files together.

Opening a prefix trusts value bytes until they are read (each carries a CRC checked then); a
check reads everything, so a single flipped bit anywhere is reported with the file and the
offset of the first damaged record. What is damage and what is not (a torn WAL tail, the
debris of an unfinished checkpoint, a WAL left beside a copy that replaced its main file) is
the log's rule (``_log``), applied here as everywhere else.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

from . import _format as fmt
from ._errors import CorruptFileError
from ._files import open_regular
from ._log import Log, check_main_file, main_path


class VerifyReport(NamedTuple):
    path: str  # the file checked, or the damaged one
    ok: bool
    size: int
    segments: int
    seq: int  # the last commit in the main file
    keys: int  # live keys at the last commit
    error: str | None = None
    offset: int | None = None  # of the first damaged record
    wal_commits: int = 0  # commits beyond ``seq`` that only the WAL holds (verify_prefix)
    notes: tuple[str, ...] = ()  # findings that are not damage (a torn WAL tail, debris)

    def to_json(self) -> dict[str, Any]:
        return self._asdict()

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
    """Check a standalone ``.hc`` file (a copy, a full backup) completely: it must be whole
    segments to its last byte. Never raises for damage, only reports it."""
    path = Path(path)
    fd = open_regular(path)
    try:
        found = check_main_file(fd)
    finally:
        os.close(fd)
    error, offset = found.error, found.offset
    if error is None and found.end != found.size:
        error, offset = "bytes after the last whole segment", found.end
    return VerifyReport(
        str(path), error is None, found.size, found.segments, found.seq, found.keys, error, offset
    )


class _Keys:
    """Counts the live keys as a log reads its commits (a sink for :class:`Log`)."""

    def __init__(self) -> None:
        self.live: set[str] = set()

    def reset(self) -> None:
        self.live = set()

    def apply_main(self, batch: fmt.Batch) -> None:
        for op in batch.ops:
            if op.kind == fmt.OP_PUT:
                self.live.add(op.key)
            else:
                self.live.discard(op.key)

    apply_wal = apply_main

    def repoint(self, batch: fmt.Batch) -> None:
        pass

    def moved(self, first_seq: int, last_seq: int, shift: int) -> None:
        pass


def verify_prefix(
    root: str | os.PathLike[str], name: str, repository_id: bytes | None = None
) -> VerifyReport:
    """Check prefix ``name`` of the repository at ``root``: its main file completely, its WAL
    and how the two fit together. A torn WAL tail, an unfinished checkpoint and a WAL of
    another main file are notes, not damage: recovery deals with each."""
    root = Path(root)
    main = main_path(root, name)
    keys = _Keys()
    try:
        log = Log(root, name, repository_id, writable=False, sink=keys, tolerant=True)
    except CorruptFileError as err:  # a file of another prefix or repository, a bad header
        offset = int(err.fields.get("offset", 0))
        return VerifyReport(
            err.fields.get("path", str(main)), False, 0, 0, 0, 0, err.message, offset
        )
    try:
        size = os.fstat(log.main_fd).st_size
        if log.damage is not None:
            return VerifyReport(
                log.damage.path,
                False,
                size,
                0,
                0,
                0,
                f"{log.damage.reason} (run `hotcopy salvage {root} {name}` to keep what is "
                "provable)",
                log.damage.offset,
            )
        found = check_main_file(log.main_fd, end=log.cut().length)
        if found.error is not None:
            return VerifyReport(
                str(main), False, size, found.segments, found.seq, 0, found.error, found.offset
            )
        return VerifyReport(
            str(main),
            True,
            size,
            found.segments,
            found.seq,
            len(keys.live),
            wal_commits=log.seq - found.seq,
            notes=tuple(log.notes()),
        )
    finally:
        log.close()
