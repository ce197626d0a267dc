"""The persistent key index of a main file (format 4): what lets a prefix open without a scan.

Every segment ends with an *index record* before its trailer: the runs this checkpoint wrote and
a *directory* naming every run of the index at that boundary, newest first. A run is a sorted
block of ``key -> op offset`` entries (offset 0: the key was deleted) with a hash table over
them; a lookup probes the runs newest first, and the first run that knows the key answers. Runs
pile up as a log-structured merge: a checkpoint's new run is merged with the run before it while
that one is not more than twice its size, so there are about log2(keys per checkpoint) runs and
every entry is rewritten that many times. Runs are only ever appended, inside segments, so the
main file stays append-only and its first L bytes at a boundary are exactly that commit's state
(index included); a compaction writes one run.

Readers read the file with ``pread`` (see :class:`FileRead`): processes share the page cache
instead of each holding the index, and a file cut short is an error, not a SIGBUS as through
a map. Nothing read is trusted unchecked: the directory and every run header
carry CRCs (checked at open), and the body of a run is covered by one CRC per 4 KiB page,
checked the first time this process touches the page. A slot names the op of its key and that
op's CRC, so a get reads a slot and then the op, which the caller's *confirm* checks against
the CRC and compares with the key (another key may share the hash: the probe goes on); only a
deletion's slot names its entry, whose key is compared.

Record: ``head (magic, record_len) | run... | directory | tail (dir_len, record_len, dir_crc,
magic; crc)``; the segment's trailer chains the tail's CRC after its batches' metadata CRCs.
Run: ``header (magic, count, slots, entries_len, pages, pages_crc; crc) | slots (key hash u32,
op crc u32, op offset u64 or, for a deletion, DELETION | entry offset + 1; 0 = empty) | entries
(op offset u64, op crc u32, key_len u16, key) | the keys' hashes, sorted (u32 each) | page CRCs
(u32 each)``. Directory: ``magic, live keys, runs | (offset, length, count, header crc)...``.

Format 3 had the same layout but for its slots (key hash u64, entry offset + 1 u64), under the
magics ``HCD1`` and ``HCR1``: such an index is read only to check it (its entries, its pages),
never looked up in; ``hotcopy migrate`` rewrites the file.
"""

from __future__ import annotations

import functools
import heapq
import os
import struct
import sys
from array import array
from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, TypeVar

from ._crc import crc32
from ._errors import CorruptFileError

PAGE = 4096
RECORD_MAGIC = 0x31584348  # b"HCX1"
_TAIL_MAGIC = 0x32584348  # b"HCX2"
_RUN_MAGIC = 0x32524348  # b"HCR2"
_DIR_MAGIC = 0x32444348  # b"HCD2"
_RUN_MAGIC_3 = 0x31524348  # b"HCR1": format 3's runs, read only to check them
_DIR_MAGIC_3 = 0x31444348  # b"HCD1"
_HEAD = struct.Struct("<IQ")  # magic, record length
_TAIL = struct.Struct("<IQII")  # directory length, record length, directory crc, magic; + crc
_RUN = struct.Struct("<IQQQII")  # magic, count, slots, entries length, pages, pages crc; + crc
_DIR = struct.Struct("<IQI")  # magic, live keys, runs
_DIR_RUN = struct.Struct("<QQQI")  # offset, length, count, header crc
_ENTRY = struct.Struct("<QIH")  # op offset, op crc, key length
_SLOT = struct.Struct("<IIQ")  # key hash (crc32), op crc, op offset or a deletion's entry
_DELETION = 1 << 63  # a slot's offset with this bit names a deletion's entry (+ 1), not an op
_U32 = struct.Struct("<I")
HEAD_SIZE = _HEAD.size
TAIL_SIZE = _TAIL.size + 4
RUN_HEAD_SIZE = _RUN.size + 4
_ITEMS_CHUNK = 256 * PAGE  # what an iteration of a run reads at once
_SLOT_WINDOW = 4  # slots a lookup reads at once (half of a run's slots are empty)
# A run newer than the oldest keeps its sorted key hashes in memory (4 bytes a key) once it was
# probed this often, if it holds at most this many keys: most gets then skip it without a read.
_FILTER_AFTER = 64
_FILTER_MAX = 1 << 18
# A run merges into the one before it while that one holds at most this many times its entries.
_MERGE_RATIO = 2

# A key (utf-8) and its *target*: 0 if deleted, else the offset of its op in the main file plus
# ``crc << 64``, the CRC of that op's header and key (see :func:`split`): the op an entry points
# to is checked against it, so a damaged op header is never taken for another value or type.
Entry = tuple[bytes, int]
_OFFSET_MASK = (1 << 64) - 1
T = TypeVar("T")
Read = Callable[[int, int], bytes]  # (size, offset) -> those bytes of the file, as os.pread
# ``confirm(read, key, op offset, op crc)``: what the op at that offset of the file ``read``
# reads (the one the slot came from) holds for ``key``, checked against the CRC (damage
# raises); None if it is the op of another key of the same hash.
Confirm = Callable[[Read, bytes, int, int], T | None]


class _Deleted:
    """What a run answers for a key it shows deleted (None: it does not know the key)."""


DELETED = _Deleted()


def target_of(offset: int, op_crc: int) -> int:
    return offset | op_crc << 64


def _little(values: array) -> bytes:  # type: ignore[type-arg]
    if sys.byteorder != "little":
        values.byteswap()
    return values.tobytes()


def encode_run(entries: list[Entry]) -> bytes:
    """A run of ``entries`` (sorted by key, keys unique, at least one)."""
    n_slots = 2 * len(entries)
    parts: list[bytes] = []
    slots = array("Q", bytes(16 * n_slots))  # (hash | op crc << 32, op offset) pairs
    pack = _ENTRY.pack
    pos = 0
    for key, target in entries:
        hashed = crc32(key)
        slot = hashed % n_slots
        while slots[2 * slot + 1]:
            slot = slot + 1 if slot + 1 < n_slots else 0
        slots[2 * slot] = hashed | (target >> 64) << 32
        slots[2 * slot + 1] = target & _OFFSET_MASK or _DELETION | (pos + 1)
        parts += (pack(target & _OFFSET_MASK, target >> 64, len(key)), key)
        pos += _ENTRY.size + len(key)
    hashes = array("I", sorted(crc32(key) for key, _ in entries))
    body = _little(slots) + b"".join(parts) + _little(hashes)
    pages = array("I", (crc32(body[at : at + PAGE]) for at in range(0, len(body), PAGE)))
    page_bytes = _little(pages)
    head = _RUN.pack(_RUN_MAGIC, len(entries), n_slots, pos, len(pages), crc32(page_bytes))
    return head + _U32.pack(crc32(head)) + body + page_bytes


class FileRead(functools.partial[bytes]):
    """``os.pread`` on a descriptor of its own: the page cache is shared by every process and
    a process holds none of it (where a map would count whole 2 MiB folios as each reader's
    memory), and an index read through it always reads the file it was opened on, even after
    that file was replaced. A short read shows as a damaged index (see ``KeyIndex.lookup``)."""

    def __new__(cls, fd: int) -> FileRead:
        return super().__new__(cls, os.pread, os.dup(fd))

    def __del__(self) -> None:
        os.close(self.args[0])


def bytes_reader(data: bytes, base: int = 0) -> Read:
    """Reads of ``data``, which lies at offset ``base`` of its file."""

    def read(size: int, offset: int) -> bytes:
        return data[offset - base : offset - base + size] if offset >= base else b""

    return read


class Run:
    """One run of an index, at ``offset`` of its file, read through ``read``.

    Each 4 KiB page of its body is checked against its CRC the first time this process reads
    from it (a whole-page read); afterwards only the bytes needed are read.
    """

    def __init__(
        self, read: Read, offset: int, length: int, count: int, *, format_3: bool = False
    ) -> None:
        head = read(RUN_HEAD_SIZE, offset)
        if len(head) != RUN_HEAD_SIZE:
            raise CorruptFileError("an index run is cut short", offset=offset)
        if crc32(head[: _RUN.size]) != _U32.unpack_from(head, _RUN.size)[0]:
            raise CorruptFileError("an index run header fails its checksum", offset=offset)
        magic, found, n_slots, entries_len, n_pages, pages_crc = _RUN.unpack_from(head)
        self.header_crc = crc32(head)
        self.count = found
        self.ref = RunRef(offset, length, found, self.header_crc)
        body = offset + RUN_HEAD_SIZE
        body_len = 16 * n_slots + entries_len + 4 * found
        self.format_3 = format_3  # checked, never looked up in (see the module)
        if (
            magic != (_RUN_MAGIC_3 if format_3 else _RUN_MAGIC)
            or found != count
            or n_slots != 2 * count
            or n_pages != -(-body_len // PAGE)
            or RUN_HEAD_SIZE + body_len + 4 * n_pages != length
        ):
            raise CorruptFileError("an index run does not match its directory", offset=offset)
        self.offset = offset
        self.length = length
        self._read = read
        self._body = body
        self._slots = n_slots
        self._entries_at = body + 16 * n_slots
        self._entries_end = self._hashes_at = self._entries_at + entries_len
        self._end = body + body_len
        self._filter: bytearray | None = None  # see may_hold
        # The filter has a bit for each value of a hash's top bits, at least 32 bits a key
        # (4 bytes, a false positive in 32 or fewer).
        self._filter_shift = 32 - max(5, (32 * found - 1).bit_length())
        self._probes = 0
        # The page CRCs, checked as a whole (4 bytes per 4 KiB of run).
        self._page_crcs = read(4 * n_pages, self._end)
        if crc32(self._page_crcs) != pages_crc:
            raise CorruptFileError("an index run's page checksums are damaged", offset=offset)
        self._checked: set[int] = set()

    def reads(self, read: Read) -> bool:
        """Whether this run reads through ``read`` (the same open file)."""
        return self._read is read

    def _check_page(self, page: int, data: bytes) -> None:
        if crc32(data) != _U32.unpack_from(self._page_crcs, 4 * page)[0]:
            raise CorruptFileError(
                "an index page fails its checksum", offset=self._body + page * PAGE
            )
        self._checked.add(page)

    def _get(self, pos: int, size: int) -> bytes:
        """``size`` bytes of the body at ``pos``, every page they touch checked."""
        if pos < self._body or pos + size > self._end:
            raise CorruptFileError("an index read points outside its run", offset=pos)
        first = (pos - self._body) // PAGE
        last = (pos + size - 1 - self._body) // PAGE
        for page in range(first, last + 1):
            if page not in self._checked:
                at = self._body + page * PAGE
                self._check_page(page, self._read(min(PAGE, self._end - at), at))
        data = self._read(size, pos)
        if len(data) != size:
            raise CorruptFileError("the key index runs past the end of its file", offset=pos)
        return data

    def check_pages_again(self) -> None:
        """Check every page again before it is next relied on: the file may have been damaged
        since (a follower keeps a run across checkpoints, see :func:`open_index`)."""
        self._checked = set()

    def lookup(self, key: bytes, hashed: int, confirm: Confirm[T]) -> T | _Deleted | None:
        """What ``confirm`` makes of ``key``'s op (``hashed``: its crc32), :data:`DELETED` if
        this run shows it deleted, or None if the run does not know it."""
        if self.format_3:
            raise CorruptFileError("a format 3 index run in a format 4 index", offset=self.offset)
        # The hot path of every get: locals, and a pread straight from a page checked before.
        n_slots, body, checked, read = self._slots, self._body, self._checked, self._read
        slot = hashed % n_slots
        while True:
            at = body + 16 * slot  # a slot never straddles a page
            if (at - body) // PAGE not in checked:
                self._get(at, 16)
            # The next few slots in one read, within the page: a probe rarely needs more.
            count = min(_SLOT_WINDOW, n_slots - slot, (PAGE - (at - body) % PAGE) // 16)
            window = read(16 * count, at)
            if len(window) != 16 * count:
                raise CorruptFileError("the key index runs past the end of its file", offset=at)
            for found, op_crc, offset in _SLOT.iter_unpack(window):
                if not offset:
                    return None
                if found == hashed:
                    if not offset & _DELETION:
                        if offset >= self.offset:  # ops lie before the index naming them
                            raise CorruptFileError("an index slot names no op", offset=at)
                        value = confirm(read, key, offset, op_crc)
                        if value is not None:
                            return value
                    elif self._holds_deletion(key, offset ^ _DELETION):
                        return DELETED
            slot += count
            if slot == n_slots:
                slot = 0

    def _holds_deletion(self, key: bytes, entry: int) -> bool:
        """Whether the entry at ``entry`` - 1 of the entries is the deletion of ``key``."""
        at = self._entries_at + entry - 1
        # Another key's entry, of the same hash, may end before this key would.
        want = min(_ENTRY.size + len(key), self._entries_end - at)
        if want < _ENTRY.size:
            raise CorruptFileError("an index entry lies outside its run", offset=at)
        raw = self._get(at, want)  # every page it spans checked
        offset, _, key_len = _ENTRY.unpack_from(raw)
        if key_len != len(key) or raw[_ENTRY.size :] != key:
            return False
        if offset:
            raise CorruptFileError("a deletion's slot names a live entry", offset=at)
        return True

    def items(self) -> Iterator[Entry]:
        """Every entry, in key order (read in large pieces, each page checked)."""
        unpack = _ENTRY.unpack_from
        page = (self._entries_at - self._body) // PAGE
        at = self._body + page * PAGE  # the file offset just after ``data``
        data, base = b"", at  # bytes read and not yet parsed, and their file offset
        pos, end = self._entries_at, self._entries_end  # the next entry, the end of them all
        while pos < end:
            rel = pos - base
            if rel + _ENTRY.size > len(data) or rel + _ENTRY.size + unpack(data, rel)[2] > len(
                data
            ):
                if at >= self._end:
                    raise CorruptFileError("an index run ends inside an entry", offset=pos)
                size = min(_ITEMS_CHUNK, self._end - at)
                chunk = self._read(size, at)
                for start in range(0, size, PAGE):
                    self._check_page(page, chunk[start : start + PAGE])
                    page += 1
                kept = min(rel, len(data))  # what was parsed goes; ``data`` ends at ``at``
                data, base = data[kept:] + chunk, base + kept
                at += size
                continue
            offset, op_crc, key_len = unpack(data, rel)
            rel += _ENTRY.size
            yield data[rel : rel + key_len], offset | op_crc << 64
            pos += _ENTRY.size + key_len
        if pos != end:
            raise CorruptFileError("an index run ends inside an entry", offset=pos)

    def may_hold(self, hashed: int) -> bool:
        """False only if no key of this run has crc32 ``hashed`` (from a filter built from the
        run's stored hashes once this run was probed often enough, if it is small enough)."""
        bits = self._filter
        if bits is None:
            self._probes += 1
            if self._probes < _FILTER_AFTER or self.count > _FILTER_MAX:
                return True
            hashes = array("I", self._get(self._hashes_at, 4 * self.count))
            if sys.byteorder != "little":
                hashes.byteswap()
            bits = self._filter = _bit_filter(hashes, self._filter_shift)
        at = hashed >> self._filter_shift
        return bool(bits[at >> 3] >> (at & 7) & 1)

    def check_all(self) -> None:
        """Check every page and that the entries are sorted and each found through the table."""
        before = None
        seen = 0
        hashes = []
        wanted = []  # the slot each entry must have, its two u64 as one int
        pos = 0
        for key, target in self.items():
            hashes.append(crc32(key))
            if before is not None and key <= before:
                raise CorruptFileError("an index run is not sorted", offset=self.offset)
            if self.format_3:
                wanted.append(hashes[-1] << 64 | pos + 1)
            else:
                ref = target & _OFFSET_MASK or _DELETION | (pos + 1)
                wanted.append((hashes[-1] | (target >> 64) << 32) << 64 | ref)
                if self.lookup(key, hashes[-1], _exactly(target)) is not (
                    True if target else DELETED
                ):
                    raise CorruptFileError(
                        "an index run's table misses an entry", offset=self.offset
                    )
            pos += _ENTRY.size + len(key)
            before = key
            seen += 1
        if seen != self.count:
            raise CorruptFileError("an index run holds a wrong count", offset=self.offset)
        stored = array("I", self._get(self._hashes_at, 4 * self.count))
        if sys.byteorder != "little":
            stored.byteswap()
        if stored.tolist() != sorted(hashes):
            raise CorruptFileError("an index run's sorted hashes are wrong", offset=self.offset)
        # The slots are the entries', one for one: another slot could name an older op of a
        # key and answer before the key's own slot (a probe finds every entry's, above).
        slots = array("Q", self._get(self._body, 16 * self._slots))
        if sys.byteorder != "little":
            slots.byteswap()
        used = [word << 64 | ref for word, ref in zip(slots[::2], slots[1::2], strict=True) if ref]
        used.sort()
        wanted.sort()
        if used != wanted:
            raise CorruptFileError("an index run's table holds other slots", offset=self.offset)
        self.check_pages()

    def check_ops(self, confirm: Confirm[object]) -> None:
        """Check that every live entry names an op of its own key: a get takes the first slot
        of its hash whose op puts the key, whoever's entry it is."""
        for key, target in self.items():
            if target and confirm(self._read, key, target & _OFFSET_MASK, target >> 64) is None:
                raise CorruptFileError("an index entry names another key's op", offset=self.offset)

    def check_pages(self) -> None:
        """Check every page against its CRC: what tells damage, at the speed of a CRC (its
        structure, which only a wrong build gets wrong, is :meth:`check_all`'s)."""
        for page in range(-(-(self._end - self._body) // PAGE)):
            if page not in self._checked:
                at = self._body + page * PAGE
                self._check_page(page, self._read(min(PAGE, self._end - at), at))


def _exactly(target: int) -> Confirm[bool]:
    """A confirm that takes only the op ``target`` names (for checking a run's table)."""

    def confirm(read: Read, key: bytes, offset: int, op_crc: int) -> bool | None:
        return True if offset | op_crc << 64 == target else None

    return confirm


def _bit_filter(hashes: array[int], shift: int) -> bytearray:
    """A bit for each value of ``hash >> shift``, set where a hash has it."""
    bits = bytearray(max(1, (1 << (32 - shift)) >> 3))
    for hashed in hashes:
        at = hashed >> shift
        bits[at >> 3] |= 1 << (at & 7)
    return bits


class RunRef(NamedTuple):
    offset: int
    length: int
    keys: int
    header_crc: int


class KeyIndex:
    """The index at one boundary of a main file: its runs, newest first, and the live keys."""

    def __init__(self, runs: list[Run], live: int) -> None:
        self.runs = runs
        self.live = live
        # The oldest run holds most keys and is probed at once; a newer one only where its
        # filter says it may hold the key.
        self._newer = runs[:-1]
        self._oldest = runs[-1] if runs else None

    @classmethod
    def empty(cls) -> KeyIndex:
        return cls([], 0)

    def lookup(self, key: bytes, confirm: Confirm[T]) -> T | None:
        """What ``confirm`` makes of ``key``'s op, or None if the index shows it deleted or
        does not know it."""
        hashed = crc32(key)
        try:
            for run in self._newer:
                if run.may_hold(hashed):
                    found = run.lookup(key, hashed, confirm)
                    if found is not None:
                        return None if found is DELETED else found  # type: ignore[return-value]
            oldest = self._oldest
            found = None if oldest is None else oldest.lookup(key, hashed, confirm)
            return None if found is DELETED else found  # type: ignore[return-value]
        except struct.error:  # a read cut short: the file ends inside the index
            raise CorruptFileError("the key index runs past the end of its file") from None

    def items(self) -> Iterator[Entry]:
        """Live entries in key order (the newest run that knows a key decides)."""
        return _merged([run.items() for run in self.runs])


def _merged(sources: list[Iterable[Entry]]) -> Iterator[Entry]:
    """Merge sorted ``sources`` (newest first): the live entry of each key, the newest one's."""
    ranked = [_ranked(source, rank) for rank, source in enumerate(sources)]
    last = None
    for key, _, target in heapq.merge(*ranked):
        if key == last:
            continue
        last = key
        if target:
            yield key, target


def _ranked(source: Iterable[Entry], rank: int) -> Iterator[tuple[bytes, int, int]]:
    for key, target in source:
        yield key, rank, target


def read_record_tail(read: Read, end: int) -> tuple[int, int, int]:
    """``(record start, directory offset, tail crc)`` of the index record ending at ``end``."""
    at = end - TAIL_SIZE
    raw = read(TAIL_SIZE, at)
    if (
        len(raw) != TAIL_SIZE
        or crc32(raw[: _TAIL.size]) != _U32.unpack_from(raw, _TAIL.size)[0]
    ):
        raise CorruptFileError("an index record's tail fails its checksum", offset=at)
    dir_len, record_len, _, magic = _TAIL.unpack_from(raw)
    start = end - record_len
    if magic != _TAIL_MAGIC or record_len < HEAD_SIZE + dir_len + TAIL_SIZE:
        raise CorruptFileError("an index record's tail is not one", offset=at)
    return start, at - dir_len, crc32(raw)


def _directory(read: Read, record_end: int) -> tuple[list[RunRef], int, int, bool]:
    """The runs (newest first) and live keys named by the record ending at ``record_end``, the
    record's start, and whether it is of format 3."""
    start, dir_at, _ = read_record_tail(read, record_end)
    if start < 0:
        raise CorruptFileError("an index record's length runs past its file", offset=record_end)
    tail_at = record_end - TAIL_SIZE
    _, _, dir_crc, _ = _TAIL.unpack_from(read(_TAIL.size, tail_at))
    raw = read(tail_at - dir_at, dir_at)
    if crc32(raw) != dir_crc or len(raw) < _DIR.size:
        raise CorruptFileError("an index directory fails its checksum", offset=dir_at)
    magic, live, n_runs = _DIR.unpack_from(raw)
    if magic not in (_DIR_MAGIC, _DIR_MAGIC_3) or len(raw) != _DIR.size + n_runs * _DIR_RUN.size:
        raise CorruptFileError("an index directory is not one", offset=dir_at)
    refs = [
        RunRef(*_DIR_RUN.unpack_from(raw, _DIR.size + i * _DIR_RUN.size)) for i in range(n_runs)
    ]
    for ref in refs:
        if ref.offset + ref.length > dir_at:
            raise CorruptFileError("an index directory names a run after it", offset=dir_at)
    return refs, live, start, magic == _DIR_MAGIC_3


def _run(read: Read, ref: RunRef, format_3: bool) -> Run:
    run = Run(read, ref.offset, ref.length, ref.keys, format_3=format_3)
    if run.header_crc != ref.header_crc:
        raise CorruptFileError("an index run is not the one its directory names", offset=ref.offset)
    return run


def open_index(
    read: Read, record_end: int, known: KeyIndex | None = None, *, format_3: bool = False
) -> KeyIndex:
    """The index whose record ends at ``record_end`` (just before a segment's trailer), of
    format 4 (or with ``format_3``, of that format: to check its entries, not to look up).

    ``known``: an index read before; its runs that read the same file and that the directory
    names again are kept, with their page CRCs and filters (a follower opens the index after
    every checkpoint, and most runs stay); their pages are checked again as they are read,
    so that damage done to the file since is found, as by a reader that opened it now."""
    refs, live, _, found_3 = _directory(read, record_end)
    if found_3 != format_3:
        raise CorruptFileError(
            f"the key index is of format {3 if found_3 else 4}, its file of {3 if format_3 else 4}"
        )
    kept = {run.ref: run for run in known.runs if run.reads(read)} if known else {}
    for run in kept.values():
        run.check_pages_again()
    return KeyIndex([kept.get(ref) or _run(read, ref, format_3) for ref in refs], live)


def encode_record(
    previous: KeyIndex, new: list[Entry], start: int, confirm: Confirm[object]
) -> bytes:
    """The index record a segment gets at offset ``start``: ``previous`` (the index at the
    segment's start, whose ops ``confirm`` reads) with the ``new`` entries (sorted) of its
    batches.

    Determined by its inputs alone (a stopped checkpointer that writes it late writes the very
    same bytes)."""
    live = previous.live
    for key, target in new:
        live += (target != 0) - (previous.lookup(key, confirm) is not None)
    pending: list[list[Entry] | Run] = list(previous.runs)
    if new:
        pending.insert(0, new)
    while len(pending) >= 2 and _count(pending[1]) <= _MERGE_RATIO * _count(pending[0]):
        newer, older = pending[0], pending[1]
        merged = dict(_entries(older))
        merged.update(_entries(newer))  # older keys in order, then the new ones: two sorted runs
        entries = sorted(merged.items())
        if len(pending) == 2:  # nothing older: a deletion has nothing left to hide
            entries = [entry for entry in entries if entry[1]]
        pending[:2] = [entries]
    if pending and not _count(pending[-1]):
        pending.pop()  # everything deleted
    parts = []
    pos = start + HEAD_SIZE
    refs = []
    for run in pending:
        if isinstance(run, Run):
            refs.append(_DIR_RUN.pack(run.offset, run.length, run.count, run.header_crc))
            continue
        block = encode_run(run)
        parts.append(block)
        refs.append(_DIR_RUN.pack(pos, len(block), len(run), crc32(block[:RUN_HEAD_SIZE])))
        pos += len(block)
    directory = _DIR.pack(_DIR_MAGIC, live, len(refs)) + b"".join(refs)
    record_len = HEAD_SIZE + sum(map(len, parts)) + len(directory) + TAIL_SIZE
    tail = _TAIL.pack(len(directory), record_len, crc32(directory), _TAIL_MAGIC)
    return (
        _HEAD.pack(RECORD_MAGIC, record_len)
        + b"".join(parts)
        + directory
        + tail
        + _U32.pack(crc32(tail))
    )


def _count(run: list[Entry] | Run) -> int:
    return run.count if isinstance(run, Run) else len(run)


def _entries(run: list[Entry] | Run) -> Iterable[Entry]:
    return run.items() if isinstance(run, Run) else run


def record_crc(record: bytes) -> int:
    """The CRC a segment's trailer chains for this index record (its tail's)."""
    return crc32(record[-TAIL_SIZE:])


def record_length(head: bytes) -> int | None:
    """The length of the index record whose first ``HEAD_SIZE`` bytes are ``head``, or None."""
    if len(head) < HEAD_SIZE:
        return None
    magic, length = _HEAD.unpack_from(head)
    return int(length) if magic == RECORD_MAGIC and length >= HEAD_SIZE + TAIL_SIZE else None


def check_record(raw: bytes, start: int, *, structure: bool = True) -> int:
    """Check the index record ``raw`` (at file offset ``start``): the runs it wrote, page by
    page, and with ``structure`` each entry through its run's table too; the runs it names from
    before must lie before it. Its tail CRC."""
    read = bytes_reader(raw, start)
    end = start + len(raw)
    found_start, _, tail_crc = read_record_tail(read, end)
    if found_start != start:
        raise CorruptFileError("an index record's length does not match its place", offset=start)
    refs, _, _, format_3 = _directory(read, end)
    for ref in refs:
        if ref.offset >= start:
            run = _run(read, ref, format_3)
            if structure:
                run.check_all()
            else:
                run.check_pages()
    return tail_crc
