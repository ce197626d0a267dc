"""Binary layouts of the main file (``.hc``) and the write-ahead log (``.hc-wal``).

Both files start with a 512-byte header (64 bytes in format 1) and hold *batches* (one commit
each) in the same framing, so a checkpoint moves WAL batches into the main file byte for byte.
Little-endian throughout. Every header names the repository and the prefix its file belongs to.

Main file: ``header | segment | segment | ...``; a segment is what one checkpoint appended:
``batch... trailer``. A trailer ends every segment, so a main file cut at any trailer end is the
exact state at that trailer's commit (invariant 2). The trailer's ``meta_crc`` covers every
batch header, op header and key of its segment, which lets a prefix open without reading value
bytes; each value carries its own CRC, checked when it is read.

WAL: ``header | batch | batch | ...``. Its header names the main file it extends (file id, the
main file's salt) and the main-file boundary it starts from (``base_len``, ``base_seq``); a WAL
that does not match its main file is never applied (invariant 3; see ``_log``).

Batch: ``BATCH header (crc'd) | op... ``; op: ``OP header | key (utf-8) | value``.
"""

from __future__ import annotations

import functools
import os
import struct
from typing import NamedTuple

from . import _index
from ._crc import BULK, bulk_crc32, crc32
from ._errors import CorruptFileError
from ._index import Read

# Format 2 headers name the repository and prefix a file belongs to (so a swapped, foreign or
# shortened file is refused by name); format 1 files (64-byte headers, no names) are still read.
HEADER_SIZE = 512
V1_HEADER_SIZE = 64
# Format 3 ends every segment of the main file with a key index (``_index``): a prefix opens by
# reading it, not the file. Format 4 names each key's op in the index's hash slots (a get reads
# a slot and the op; format 3 read the key's entry between them). Files of formats 1 to 3 are
# only read to check and convert them (``hotcopy migrate``); see ``_log.Log``.
FORMAT_VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
MAIN_MAGIC = b"HCPXMAIN"
WAL_MAGIC = b"HCPXWAL1"
BATCH_MAGIC = 0x31424348  # b"HCB1"
TRAILER_MAGIC = 0x31544348  # b"HCT1"
MAX_NAME_BYTES = 200

_V1_HEADER = struct.Struct("<8sHHI16sQQQ4x")  # + crc32 = 64 bytes (main and WAL alike)
# magic, version, header size, flags, repository id, file id, salt, created, base seq, name len
_MAIN_HEADER = struct.Struct("<8sHHI16s16sQQQH")
# magic, version, header size, flags, repository id, main file id, main salt, base len, base seq,
# fenced through, name length
_WAL_HEADER = struct.Struct("<8sHHI16s16sQQQQH")
_CRC = struct.Struct("<I")
_BATCH = struct.Struct("<IQQIII")  # magic, seq, token, n_ops, body_len, body_crc; + crc32
_OP = struct.Struct("<BBHII")  # kind, vtype, key_len, value_len, value_crc
_KEY_LEN = struct.Struct("<H")
_TRAILER = struct.Struct("<IQQII")  # magic, last_seq, segment_start, n_batches, meta_crc; + crc32

BATCH_SIZE = _BATCH.size + 4
OP_SIZE = _OP.size
TRAILER_SIZE = _TRAILER.size + 4

OP_PUT = 1
OP_DELETE = 2

MAX_KEY_BYTES = 0xFFFF
MAX_VALUE_BYTES = 0xFFFFFFFF
# A checked body this long streams through its checks instead of being read whole; so does
# one whose ops average this much.
STREAM_ABOVE = 8 << 20
_STREAM_OP_BYTES = 16 << 10


class MainHeader(NamedTuple):
    file_id: bytes  # 16 bytes; changes only when the file is rewritten (compaction)
    salt: int  # 64 bits; a copy gets a new one, so a stale WAL never matches a restored copy
    created_ns: int
    base_seq: int = 0  # the commit the file starts from: 0, or S for a file rewritten at S - 1
    repository_id: bytes | None = None  # 16 bytes; None only in a format 1 file
    prefix: str | None = None  # the prefix's name; None only in a format 1 file
    version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        """Bytes of the header: where the first segment starts."""
        return HEADER_SIZE if self.version >= 2 else V1_HEADER_SIZE


class WalHeader(NamedTuple):
    file_id: bytes
    main_salt: int
    base_len: int  # the main-file boundary this WAL continues from
    base_seq: int  # the commit sequence at that boundary
    repository_id: bytes | None = None
    prefix: str | None = None
    # Leases of a token up to this were fenced before this WAL was made (their holders, perhaps
    # only stopped, can change nothing any more): see Log.prepare.
    fenced_through: int = 0
    version: int = FORMAT_VERSION

    @property
    def size(self) -> int:
        """Bytes of the header: where the first batch starts."""
        return HEADER_SIZE if self.version >= 2 else V1_HEADER_SIZE


def pack_main_header(header: MainHeader) -> bytes:
    if header.version == 1:  # a restored format 1 copy keeps its layout (offsets are absolute)
        body = _V1_HEADER.pack(
            MAIN_MAGIC, 1, 0, 0, header.file_id, header.salt, header.created_ns, header.base_seq
        )
        return body + _CRC.pack(crc32(body))
    name = _name_bytes(header.prefix)
    body = _MAIN_HEADER.pack(
        MAIN_MAGIC,
        header.version,
        HEADER_SIZE,
        0,
        _id_bytes(header.repository_id),
        header.file_id,
        header.salt,
        header.created_ns,
        header.base_seq,
        len(name),
    )
    return _finish(body + name)


def unpack_main_header(raw: bytes) -> MainHeader:
    version = _check_header(raw, MAIN_MAGIC, "main file")
    if version == 1:
        _, _, _, _, file_id, salt, created_ns, base_seq = _V1_HEADER.unpack_from(raw)
        return MainHeader(file_id, salt, created_ns, base_seq, version=1)
    fields = _MAIN_HEADER.unpack_from(raw)
    repository_id, file_id, salt, created_ns, base_seq, name_len = fields[4:]
    name = _name_of(raw, _MAIN_HEADER.size, name_len, "main file")
    return MainHeader(file_id, salt, created_ns, base_seq, repository_id, name, version=version)


def pack_wal_header(header: WalHeader) -> bytes:
    name = _name_bytes(header.prefix)
    body = _WAL_HEADER.pack(
        WAL_MAGIC,
        FORMAT_VERSION,
        HEADER_SIZE,
        0,
        _id_bytes(header.repository_id),
        header.file_id,
        header.main_salt,
        header.base_len,
        header.base_seq,
        header.fenced_through,
        len(name),
    )
    return _finish(body + name)


def unpack_wal_header(raw: bytes) -> WalHeader:
    version = _check_header(raw, WAL_MAGIC, "WAL")
    if version == 1:
        _, _, _, _, file_id, salt, base_len, base_seq = _V1_HEADER.unpack_from(raw)
        return WalHeader(file_id, salt, base_len, base_seq, version=1)
    fields = _WAL_HEADER.unpack_from(raw)
    repository_id, file_id, salt, base_len, base_seq, fenced_through, name_len = fields[4:]
    name = _name_of(raw, _WAL_HEADER.size, name_len, "WAL")
    return WalHeader(file_id, salt, base_len, base_seq, repository_id, name, fenced_through)


def _id_bytes(repository_id: bytes | None) -> bytes:
    if repository_id is None or len(repository_id) != 16:
        raise ValueError("a format 2 header needs a 16-byte repository id")
    return repository_id


def _name_bytes(prefix: str | None) -> bytes:
    name = (prefix or "").encode("ascii")
    if not 0 < len(name) <= MAX_NAME_BYTES:
        raise ValueError(f"a format 2 header needs a prefix name of 1-{MAX_NAME_BYTES} bytes")
    return name


def _name_of(raw: bytes, at: int, length: int, what: str) -> str:
    if not 0 < length <= MAX_NAME_BYTES:
        raise CorruptFileError(f"{what} header names a prefix of {length} bytes", offset=at)
    try:
        return raw[at : at + length].decode("ascii")
    except UnicodeDecodeError:
        raise CorruptFileError(f"{what} header names no valid prefix", offset=at) from None


def _finish(body: bytes) -> bytes:
    padded = body.ljust(HEADER_SIZE - _CRC.size, b"\0")
    return padded + _CRC.pack(crc32(padded))


def magic_damaged(raw: bytes, magic: bytes) -> bool:
    """Whether the header ``raw``, whose first bytes are not ``magic``, is one whose magic was
    damaged: with ``magic`` put back, its own checksum matches (a foreign file's would not, but
    for one in four billion)."""
    if len(raw) < 10:
        return False
    (version,) = struct.unpack_from("<H", raw, 8)
    size = HEADER_SIZE if version >= 2 else V1_HEADER_SIZE
    if version not in READABLE_VERSIONS or len(raw) < size:
        return False
    (stored,) = _CRC.unpack_from(raw, size - 4)
    return bool(crc32(magic + raw[len(magic) : size - 4]) == stored)


def _check_header(raw: bytes, magic: bytes, what: str) -> int:
    """The header's format version, once its magic, version and checksum are checked."""
    if len(raw) < V1_HEADER_SIZE:
        raise CorruptFileError(f"{what} header is truncated ({len(raw)} bytes)", offset=0)
    if raw[:8] != magic:
        if magic_damaged(raw, magic):
            raise CorruptFileError(
                f"{what} header's magic is damaged (the checksum of the rest of the header "
                "shows it is one)",
                offset=0,
            )
        raise CorruptFileError(f"not a hotcopy {what} (bad magic)", offset=0)
    (version,) = struct.unpack_from("<H", raw, 8)
    if version not in READABLE_VERSIONS:
        raise CorruptFileError(f"{what} format version {version} is not supported", offset=8)
    size = HEADER_SIZE if version >= 2 else V1_HEADER_SIZE
    if len(raw) < size:
        raise CorruptFileError(f"{what} header is truncated ({len(raw)} bytes)", offset=0)
    (stored,) = _CRC.unpack_from(raw, size - 4)
    if crc32(raw[: size - 4]) != stored:
        raise CorruptFileError(f"{what} header checksum mismatch", offset=0)
    return int(version)


def encode_op(kind: int, key: str, vtype: int, payload: bytes) -> bytes:
    key_bytes = key.encode("utf-8", "surrogatepass")
    if len(key_bytes) > MAX_KEY_BYTES:
        raise ValueError(f"key is {len(key_bytes)} bytes; the limit is {MAX_KEY_BYTES}")
    if len(payload) > MAX_VALUE_BYTES:
        raise ValueError(f"value is {len(payload)} bytes; the limit is {MAX_VALUE_BYTES}")
    return _OP.pack(kind, vtype, len(key_bytes), len(payload), crc32(payload)) + key_bytes + payload


def encode_batch(seq: int, token: int, ops: list[bytes]) -> bytes:
    return encode_batch_with_meta(seq, token, ops)[0]


def encode_batch_with_meta(seq: int, token: int, ops: list[bytes]) -> tuple[bytes, int]:
    """The batch frame of encoded ``ops``, and its metadata CRC (as :func:`read_batch` gives)."""
    body = b"".join(ops)
    head = encode_batch_header(seq, token, len(ops), len(body), crc32(body))
    meta = crc32(head)
    for op in ops:  # each op's header and key (a slice of bytes: cheaper than a memoryview)
        meta = crc32(op[: OP_SIZE + _KEY_LEN.unpack_from(op, 2)[0]], meta)
    return head + body, meta


def first_bad_frame(data: bytes | memoryview, sizes: list[int]) -> int:
    """Check the batch frames of these ``sizes`` lying back to back in ``data`` (read back from
    a WAL) for a valid header and body CRC; the index of the first bad one, or -1.

    One function for thousands of small frames: a checkpoint of a full WAL checks them all
    under the write lease, where every microsecond per frame is a writer's wait.
    """
    view = memoryview(data)
    unpack_batch = _BATCH.unpack_from
    unpack_crc = _CRC.unpack_from
    head_size = _BATCH.size
    checksum = crc32
    at = 0
    for number, size in enumerate(sizes):
        if size < BATCH_SIZE or at + size > len(view):
            return number
        magic, _, _, _, body_len, body_crc = unpack_batch(view, at)
        if (
            magic != BATCH_MAGIC
            or size != BATCH_SIZE + body_len
            or checksum(view[at : at + head_size]) != unpack_crc(view, at + head_size)[0]
            or checksum(view[at + BATCH_SIZE : at + size]) != body_crc
        ):
            return number
        at += size
    return -1


def encode_batch_header(seq: int, token: int, n_ops: int, body_len: int, body_crc: int) -> bytes:
    head = _BATCH.pack(BATCH_MAGIC, seq, token, n_ops, body_len, body_crc)
    return head + _CRC.pack(crc32(head))


def encode_trailer(last_seq: int, segment_start: int, n_batches: int, meta_crc: int) -> bytes:
    body = _TRAILER.pack(TRAILER_MAGIC, last_seq, segment_start, n_batches, meta_crc)
    return body + _CRC.pack(crc32(body))


class Op(NamedTuple):  # a tuple: built once per op read, where a dataclass costs 3x as much
    kind: int
    key: str
    vtype: int
    value_len: int
    value_crc: int
    offset: int  # of the op header in its file
    value: bytes | None  # present when the reader was asked to load values

    @property
    def size(self) -> int:
        return OP_SIZE + len(self.key.encode("utf-8", "surrogatepass")) + self.value_len


class Batch(NamedTuple):
    seq: int
    token: int
    offset: int
    size: int
    ops: list[Op]
    meta_crc: int  # crc of the header and of every op header and key, chained
    raw: bytes | None = None  # the whole frame, when values were loaded


def index_target(op: Op) -> int:
    """What a key index records for the put ``op`` (see ``_index.Entry``)."""
    key = op.key.encode("utf-8", "surrogatepass")
    head = _OP.pack(op.kind, op.vtype, len(key), op.value_len, op.value_crc)
    return _index.target_of(op.offset, crc32(key, crc32(head)))


def decode_op_value(record: bytes) -> tuple[int, int, bytes]:
    """Split an in-memory op record into ``(kind, vtype, value)``, checking the value's CRC."""
    kind, vtype, key_len, value_len, value_crc = _OP.unpack_from(record)
    start = OP_SIZE + key_len
    value = record[start : start + value_len]
    if len(value) != value_len or crc32(value) != value_crc:
        raise CorruptFileError("value checksum mismatch in memory", offset=0)
    return kind, vtype, value


# What a get reads at an op's offset first: all of a small op in one call. Any more costs a
# get microseconds (a 4 KiB read took 6 us here, 480 bytes 2 us: the copy, and a bytes object
# too large for Python's small-object allocator); a larger value is read in a second call.
_OP_FIRST_READ = 480


def read_op_value(fd: int, offset: int) -> tuple[int, bytes]:
    """Read the op at ``offset`` of a file and return ``(vtype, value)``, CRC-checked."""
    head = os.pread(fd, _OP_FIRST_READ, offset)
    if len(head) < OP_SIZE:
        raise CorruptFileError("op header is truncated", offset=offset)
    return _op_value(functools.partial(os.pread, fd), offset, head)


# The confirms of a key index lookup (see ``_index.Confirm``): ``read`` reads the file the
# index slot was read from, so that a file replaced meanwhile (a compaction) is never mixed in.
def read_keyed_op(
    read: Read, key: bytes, offset: int, op_crc: int
) -> tuple[int, bytes] | None:
    """``(vtype, value)`` of the op at ``offset`` if it puts ``key``, None if it puts another
    key; its header and key must have CRC ``op_crc``, its value its own (a key index slot
    names an op by offset and CRC, and another key may share the slot's hash)."""
    head = _keyed_op_head(read, key, offset, op_crc)
    return None if head is None else _op_value(read, offset, head)


def op_puts(read: Read, key: bytes, offset: int, op_crc: int) -> bool | None:
    """True if the op at ``offset`` puts ``key``, None if another key; checked as by
    :func:`read_keyed_op`, but for its value (whether a key is there, not what it holds)."""
    return None if _keyed_op_head(read, key, offset, op_crc) is None else True


def _keyed_op_head(read: Read, key: bytes, offset: int, op_crc: int) -> bytes | None:
    """The first bytes of the op at ``offset`` if it puts ``key``, None if another key."""
    head = read(_OP_FIRST_READ, offset)
    start = OP_SIZE + _OP.unpack_from(head)[2] if len(head) >= OP_SIZE else 0
    record = head[:start] if start <= len(head) else _read_upto(read, start, offset)
    if not start or head[0] != OP_PUT or crc32(record) != op_crc:
        raise CorruptFileError("the record the key index points to is damaged", offset=offset)
    return head if record[OP_SIZE:] == key else None


def _op_value(read: Read, offset: int, head: bytes) -> tuple[int, bytes]:
    """``(vtype, value)`` of the op at ``offset`` whose first bytes read are ``head``."""
    _, vtype, key_len, value_len, value_crc = _OP.unpack_from(head)
    start = OP_SIZE + key_len
    if start + value_len <= len(head):
        value = head[start : start + value_len]
    else:
        value = _read_exact(read, value_len, offset + start)
    if crc32(value) != value_crc:
        raise CorruptFileError("value checksum mismatch", offset=offset + start)
    return vtype, value


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    return _read_exact(functools.partial(os.pread, fd), size, offset)


def _read_exact(read: Read, size: int, offset: int) -> bytes:
    data = _read_upto(read, size, offset)
    if len(data) != size:
        raise CorruptFileError("file ends inside a value", offset=offset + len(data))
    return data


def pread_upto(fd: int, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset``; fewer where the file ends (or ended meanwhile)."""
    return _read_upto(functools.partial(os.pread, fd), size, offset)


def _read_upto(read: Read, size: int, offset: int) -> bytes:
    """Up to ``size`` bytes at ``offset``; fewer only where the file ends."""
    parts = []
    while size:
        # One call where it can (Linux reads at most 2 GiB - 4 KiB at once): joining parts
        # copies a large record once more.
        chunk = read(min(size, 0x7FFFF000), offset)
        if not chunk:
            break
        parts.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(parts)


class RangeCrc:
    """The CRC32 of a file's bytes from ``start`` on, from reads made anyway: a
    :class:`FileReader` checking a range tells it what it read, in file order, and
    :meth:`through` reads only what no reader did. So a copy's checks and the CRC it records
    are one pass over the bytes."""

    def __init__(self, fd: int, start: int, crc: int = 0) -> None:
        self._fd = fd
        self._end = start  # the CRC covers [start, _end)
        self._crc = crc

    def saw(self, offset: int, data: bytes) -> None:
        """``data`` was read at ``offset``."""
        if offset > self._end:
            self.through(offset)
        seen = self._end - offset
        if seen < len(data):
            self._crc = bulk_crc32(memoryview(data)[seen:], self._crc)
            self._end = offset + len(data)

    def through(self, end: int) -> int:
        """The CRC of ``[start, end)``, reading what was not seen."""
        if self._end > end:
            raise ValueError(f"the CRC already covers {self._end} bytes, past {end}")
        while self._end < end:
            chunk = os.pread(self._fd, min(FileReader.CHUNK * 4, end - self._end), self._end)
            if not chunk:
                raise CorruptFileError(
                    f"the file ended at {self._end}, before {end}", offset=self._end
                )
            self._crc = bulk_crc32(chunk, self._crc)
            self._end += len(chunk)
        return self._crc & 0xFFFFFFFF


class FileReader:
    """Sequential reads over ``[pos, end)`` of a file with a large buffer; skips are free."""

    CHUNK = 1 << 20
    SMALL = 4096

    def __init__(
        self,
        fd: int,
        pos: int,
        end: int,
        *,
        chunk: int = CHUNK,
        digest: RangeCrc | None = None,
        ahead_to: int | None = None,
    ) -> None:
        """``chunk``: bytes read ahead; a walk that skips most bytes wants ``SMALL``.
        ``digest``: told every read (see :class:`RangeCrc`). ``ahead_to``: read ahead no
        further than this, only what a record needs (a WAL's reservation, kept out of the
        page cache: see ``_wal_space.written_end``)."""
        self.fd = fd
        self.pos = pos
        self.end = end
        self._ahead_to = end if ahead_to is None else ahead_to
        self._chunk = chunk
        self._digest = digest
        self._buf = b""
        self._buf_start = pos
        self._after_large = False

    @classmethod
    def of_bytes(cls, data: bytes) -> FileReader:
        """A reader over ``data`` in memory (batch frames away from their file)."""
        reader = cls(-1, 0, len(data))
        reader._buf = data
        return reader

    def read(self, size: int) -> bytes | None:
        """The next ``size`` bytes, or None when the file ends first."""
        if self.pos + size > self.end:
            return None
        offset = self.pos - self._buf_start
        if offset < 0 or offset + size > len(self._buf):
            # After a skip past the buffer (a value not loaded) or a record at least a chunk
            # long (read exactly), read a little: the next record is a header, and a full
            # chunk would drag in most of the next value too, to be read again with it.
            skipped = self.pos > self._buf_start + len(self._buf)
            small = skipped or self._after_large
            ahead = min(self.SMALL if small else self._chunk, self._ahead_to - self.pos)
            want = min(max(size, ahead), self.end - self.pos)
            self._after_large = size >= self._chunk
            self._buf = pread_upto(self.fd, want, self.pos)
            if self._digest is not None:
                self._digest.saw(self.pos, self._buf)
            self._buf_start = self.pos
            offset = 0
            if len(self._buf) < size:
                # The file shrank after ``end`` was taken (a writer truncated a torn WAL tail or
                # checkpoint debris meanwhile): that is where it ends now, not damage.
                self.end = self.pos + len(self._buf)
                return None
        self.pos += size
        return self._buf[offset : offset + size]

    def skip(self, size: int) -> bool:
        if self.pos + size > self.end:
            return False
        self.pos += size
        return True


def read_batch(
    reader: FileReader, *, load_values: bool, keep_raw: bool = True, keep_values: bool = True
) -> Batch | None:
    """Parse the batch at the reader's position, or None if it is torn or not a batch.

    With ``load_values`` the body CRC is checked (it covers every op header, key and value
    byte), each op keeps its value unless not ``keep_values`` (a check wants none) and, with
    ``keep_raw``, the whole frame is kept; without, values are skipped (their own CRCs are
    checked when they are read).
    """
    start = reader.pos
    head = reader.read(BATCH_SIZE)
    if head is None:
        return None
    magic, seq, token, n_ops, body_len, body_crc = _BATCH.unpack_from(head)
    (head_crc,) = _CRC.unpack_from(head, _BATCH.size)
    if magic != BATCH_MAGIC or crc32(head[: _BATCH.size]) != head_crc:
        return None
    body_end = reader.pos + body_len
    if body_end > reader.end:
        return None
    # A body that is checked and not kept streams through its CRC op by op, a piece of each
    # value at a time, when it is large (a check never holds a whole large commit in memory)
    # or made of large values (then streaming costs less than reading it whole; for many
    # small ops, the Python work per op costs more).
    stream = (
        load_values
        and not keep_values
        and not keep_raw
        and body_len >= BULK
        and (body_len >= STREAM_ABOVE or body_len >= _STREAM_OP_BYTES * n_ops)
    )
    if load_values and not stream:
        body_bytes = reader.read(body_len)
        check = bulk_crc32 if body_len >= BULK else crc32
        if body_bytes is None or check(body_bytes) != body_crc:
            return None
        return _parse_body(head, body_bytes, start, seq, token, n_ops, keep_raw, keep_values)
    meta = crc32(head)
    body = 0  # the CRC of the body so far, when streamed
    ops: list[Op] = []
    for _ in range(n_ops):
        op_offset = reader.pos
        op_head = reader.read(OP_SIZE)
        if op_head is None:
            return None
        kind, vtype, key_len, value_len, value_crc = _OP.unpack_from(op_head)
        key_bytes = reader.read(key_len)
        if key_bytes is None or kind not in (OP_PUT, OP_DELETE):
            return None
        meta = crc32(key_bytes, crc32(op_head, meta))
        if not stream:
            if not reader.skip(value_len):
                return None
        else:
            body = crc32(key_bytes, crc32(op_head, body))
            left = value_len
            if left > body_end - reader.pos:
                return None
            while left:
                piece = reader.read(min(left, FileReader.CHUNK))
                if piece is None:
                    return None
                body = bulk_crc32(piece, body)
                left -= len(piece)
        try:
            key = key_bytes.decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        ops.append(Op(kind, key, vtype, value_len, value_crc, op_offset, None))
    if reader.pos != body_end or (stream and body != body_crc):
        return None
    return Batch(seq, token, start, reader.pos - start, ops, meta)


def _parse_body(
    head: bytes,
    body: bytes,
    start: int,
    seq: int,
    token: int,
    n_ops: int,
    keep_raw: bool,
    keep_values: bool,
) -> Batch | None:
    """The batch whose header ``head`` and checked ``body`` were read at ``start``: its ops
    parsed from memory in one pass (a reader following a writer parses every commit)."""
    meta = crc32(head)
    ops: list[Op] = []
    unpack = _OP.unpack_from
    at = 0
    offset = start + BATCH_SIZE
    for _ in range(n_ops):
        if at + OP_SIZE > len(body):
            return None
        kind, vtype, key_len, value_len, value_crc = unpack(body, at)
        key_end = at + OP_SIZE + key_len
        value_end = key_end + value_len
        if value_end > len(body) or kind not in (OP_PUT, OP_DELETE):
            return None
        meta = crc32(body[at:key_end], meta)
        try:
            key = body[at + OP_SIZE : key_end].decode("utf-8", "surrogatepass")
        except UnicodeDecodeError:
            return None
        value = body[key_end:value_end] if keep_values else None
        ops.append(Op(kind, key, vtype, value_len, value_crc, offset + at, value))
        at = value_end
    if at != len(body):
        return None
    raw = head + body if keep_raw else None
    return Batch(seq, token, start, BATCH_SIZE + len(body), ops, meta, raw)


class Trailer(NamedTuple):
    last_seq: int
    segment_start: int
    n_batches: int
    meta_crc: int


def read_trailer(reader: FileReader) -> Trailer | None:
    raw = reader.read(TRAILER_SIZE)
    if raw is None:
        return None
    magic, last_seq, segment_start, n_batches, meta_crc = _TRAILER.unpack_from(raw)
    (stored,) = _CRC.unpack_from(raw, _TRAILER.size)
    if magic != TRAILER_MAGIC or crc32(raw[: _TRAILER.size]) != stored:
        return None
    return Trailer(last_seq, segment_start, n_batches, meta_crc)


def frame_size(head: bytes) -> int | None:
    """The size of the batch frame whose header ``head`` (``BATCH_SIZE`` bytes) is, or None
    if it is not a valid batch header."""
    if len(head) < BATCH_SIZE:
        return None
    magic, _, _, _, body_len, _ = _BATCH.unpack_from(head)
    if magic != BATCH_MAGIC or crc32(head[: _BATCH.size]) != _CRC.unpack_from(head, _BATCH.size)[0]:
        return None
    return BATCH_SIZE + int(body_len)


def batch_starts_at(fd: int, offset: int) -> bool:
    """Whether the bytes at ``offset`` begin with a batch's magic (one small read)."""
    raw = os.pread(fd, 4, offset)
    return len(raw) == 4 and struct.unpack("<I", raw)[0] == BATCH_MAGIC


def peek_is_trailer(reader: FileReader) -> bool:
    raw = reader.read(4)
    if raw is None:
        return False
    reader.pos -= 4
    return bool(struct.unpack("<I", raw)[0] == TRAILER_MAGIC)


class Segment:
    """The batches of one segment of a main file, as they are read."""

    __slots__ = ("batches", "end", "index_crc", "index_end", "start")

    def __init__(self, start: int, end: int) -> None:
        self.start = start
        self.end = end
        self.batches: list[Batch] = []
        # The key index record before the trailer (format 3): where it ends, its tail's CRC.
        self.index_end: int | None = None
        self.index_crc: int | None = None

    @property
    def last_seq(self) -> int:
        return self.batches[-1].seq


def peek_is_index(reader: FileReader) -> bool:
    raw = reader.read(_index.HEAD_SIZE)
    if raw is None:
        return False
    reader.pos -= len(raw)
    return _index.record_length(raw) is not None


def read_index_record(
    reader: FileReader, *, check: bool, shift: int = 0, structure: bool = True
) -> tuple[int, int] | None:
    """Read the index record at the reader's position: ``(its end, its tail CRC)``, or None if
    it is damaged or cut short. ``check``: every page of the runs it wrote too, not only its
    tail, and with ``structure`` every entry through its run's table (``shift``: see
    :func:`read_segment`)."""
    start = reader.pos
    head = reader.read(_index.HEAD_SIZE)
    length = _index.record_length(head or b"")
    if length is None:
        return None
    try:
        if check:
            raw = reader.read(length - _index.HEAD_SIZE)
            if raw is None:
                return None
            record = (head or b"") + raw
            return reader.pos, _index.check_record(record, start + shift, structure=structure)
        if not reader.skip(length - _index.HEAD_SIZE - _index.TAIL_SIZE):
            return None
        tail = reader.read(_index.TAIL_SIZE)
        if tail is None:
            return None
        found, _, crc = _index.read_record_tail(_index.bytes_reader(tail), len(tail))
        if found != -(length - _index.TAIL_SIZE):
            return None
        return reader.pos, crc
    except CorruptFileError:
        return None


def read_segment(
    reader: FileReader,
    *,
    load_values: bool,
    shift: int = 0,
    keep_raw: bool = True,
    keep_values: bool = True,
    index_structure: bool = True,
) -> Segment | None:
    """Parse one checkpoint segment, or None if it is torn, damaged or absent.

    ``shift``: where the reader's offset 0 lies in the main file (a delta holds main-file bytes
    from its start on; its trailers name main-file offsets). With ``load_values``, every page
    of the key index record is checked too, and with ``index_structure`` every entry of it.
    """
    start = reader.pos
    segment = Segment(start, start)
    meta = 0
    while not peek_is_trailer(reader):
        if segment.batches and peek_is_index(reader):
            record = read_index_record(
                reader, check=load_values, shift=shift, structure=index_structure
            )
            if record is None or not peek_is_trailer(reader):
                return None
            segment.index_end, segment.index_crc = record
            meta = chain_meta_crc(segment.index_crc, meta)
            break
        batch = read_batch(
            reader, load_values=load_values, keep_raw=keep_raw, keep_values=keep_values
        )
        if batch is None:
            return None
        if segment.batches and batch.seq != segment.batches[-1].seq + 1:
            return None
        segment.batches.append(batch)
        meta = crc32(_CRC.pack(batch.meta_crc), meta)
    trailer = read_trailer(reader)
    if (
        trailer is None
        or not segment.batches
        or trailer.segment_start != start + shift
        or trailer.n_batches != len(segment.batches)
        or trailer.last_seq != segment.last_seq
        or trailer.meta_crc != meta
    ):
        return None
    segment.end = reader.pos
    return segment


def segment_trailer(
    segment_start: int, batches: list[Batch], index_crc: int | None = None
) -> bytes:
    """The trailer that closes a segment of ``batches`` starting at ``segment_start`` (and an
    index record whose tail has CRC ``index_crc``, in format 3)."""
    return trailer_for(
        segment_start, [batch.meta_crc for batch in batches], batches[-1].seq, index_crc
    )


def chain_meta_crc(meta_crc: int, chain: int = 0) -> int:
    """The trailer's metadata CRC of a run of batches, extended by one more batch's (or, last,
    by the CRC of the segment's index record).

    Kept as batches are indexed, it gives the trailer of the run at once
    (``encode_trailer(last_seq, start, count, chain)``) instead of a pass over every batch.
    """
    return crc32(_CRC.pack(meta_crc), chain)


def trailer_for(
    segment_start: int, meta_crcs: list[int], last_seq: int, index_crc: int | None = None
) -> bytes:
    """The trailer of a segment whose batches have these metadata CRCs."""
    # The CRC of the metadata CRCs back to back, packed in one call: a segment may hold
    # tens of thousands of batches, and a writer waits for this under the write lease.
    meta = crc32(struct.pack(f"<{len(meta_crcs)}I", *meta_crcs))
    if index_crc is not None:
        meta = chain_meta_crc(index_crc, meta)
    return encode_trailer(last_seq, segment_start, len(meta_crcs), meta)


def frame_entries(data: bytes | memoryview, at: int) -> dict[bytes, int]:
    """The keys the batch frames back to back in ``data`` change, each with the offset its last
    op will have once ``data`` lies at offset ``at`` of the main file (0: deleted); what the
    segment's key index records. The frames were checked before."""
    view = memoryview(data)
    entries: dict[bytes, int] = {}
    unpack_batch, unpack_op = _BATCH.unpack_from, _OP.unpack_from
    pos = 0
    while pos < len(view):
        _, _, _, n_ops, body_len, _ = unpack_batch(view, pos)
        op = pos + BATCH_SIZE
        for _ in range(n_ops):
            kind, _, key_len, value_len, _ = unpack_op(view, op)
            key = bytes(view[op + OP_SIZE : op + OP_SIZE + key_len])
            entries[key] = (
                _index.target_of(at + op, crc32(view[op : op + OP_SIZE + key_len]))
                if kind == OP_PUT
                else 0
            )
            op += OP_SIZE + key_len + value_len
        pos += BATCH_SIZE + body_len
    return entries
