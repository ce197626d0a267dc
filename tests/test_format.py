"""Unit tests of the on-disk framing (``hotcopy.storage._format``): headers, ops, batches,
trailers, segments, and the WAL-to-main-file match rule. Every checksum is shown to catch the
damage it is there for (a flip of every bit, a cut at every length)."""

from __future__ import annotations

import os
import random
import struct
import zlib
from pathlib import Path

import pytest
from hotcopy.storage import CorruptFileError
from hotcopy.storage import _format as fmt

pytestmark = pytest.mark.timeout(30)

REPO = bytes(range(100, 116))
MAIN = fmt.MainHeader(
    file_id=bytes(range(16)),
    salt=0x0123456789ABCDEF,
    created_ns=1_700_000_000,
    repository_id=REPO,
    prefix="users",
)
WAL = fmt.WalHeader(
    file_id=bytes(range(16)),
    main_salt=0x0123456789ABCDEF,
    base_len=fmt.HEADER_SIZE,
    base_seq=0,
    repository_id=REPO,
    prefix="users",
    fenced_through=7,
)


def _ops() -> list[bytes]:
    return [
        fmt.encode_op(fmt.OP_PUT, "alpha", 1, b'{"age":3}'),
        fmt.encode_op(fmt.OP_DELETE, "gone", 0, b""),
        fmt.encode_op(fmt.OP_PUT, "\udc80-surrogate-\u00e9", 0, bytes(range(40))),
        fmt.encode_op(fmt.OP_PUT, "", 0, b""),  # empty key, empty value
    ]


def _reader_over(tmp_path: Path, data: bytes, name: str = "f") -> tuple[int, fmt.FileReader]:
    path = tmp_path / name
    path.write_bytes(data)
    fd = os.open(path, os.O_RDONLY)
    return fd, fmt.FileReader(fd, 0, len(data))


def _parse_batch(tmp_path: Path, frame: bytes, *, load_values: bool) -> fmt.Batch | None:
    fd, reader = _reader_over(tmp_path, frame)
    try:
        return fmt.read_batch(reader, load_values=load_values)
    finally:
        os.close(fd)


def _parse_segment(tmp_path: Path, data: bytes, *, load_values: bool) -> fmt.Segment | None:
    fd, reader = _reader_over(tmp_path, data)
    try:
        return fmt.read_segment(reader, load_values=load_values)
    finally:
        os.close(fd)


# -- headers --------------------------------------------------------------------------------


def test_main_and_wal_headers_name_their_repository_and_prefix_and_round_trip() -> None:
    main_raw = fmt.pack_main_header(MAIN)
    wal_raw = fmt.pack_wal_header(WAL)
    assert len(main_raw) == len(wal_raw) == fmt.HEADER_SIZE == 512
    assert MAIN.size == WAL.size == fmt.HEADER_SIZE
    assert main_raw[:8] == fmt.MAIN_MAGIC and wal_raw[:8] == fmt.WAL_MAGIC
    assert fmt.unpack_main_header(main_raw) == MAIN
    assert fmt.unpack_wal_header(wal_raw) == WAL


@pytest.mark.parametrize("which", ["main", "wal"])
def test_every_flipped_header_byte_is_refused(which: str) -> None:
    raw = fmt.pack_main_header(MAIN) if which == "main" else fmt.pack_wal_header(WAL)
    unpack = fmt.unpack_main_header if which == "main" else fmt.unpack_wal_header
    for offset in range(fmt.HEADER_SIZE):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x01
        with pytest.raises(CorruptFileError):
            unpack(bytes(damaged))


def test_headers_refuse_truncation_wrong_kind_and_future_version() -> None:
    raw = fmt.pack_main_header(MAIN)
    with pytest.raises(CorruptFileError, match="truncated"):
        fmt.unpack_main_header(raw[:63])
    with pytest.raises(CorruptFileError, match="truncated"):
        fmt.unpack_main_header(raw[:500])
    with pytest.raises(CorruptFileError, match="bad magic"):
        fmt.unpack_wal_header(raw)  # a main header is not a WAL header
    future = bytearray(raw[: fmt.HEADER_SIZE - 4])
    struct.pack_into("<H", future, 8, fmt.FORMAT_VERSION + 1)
    future += struct.pack("<I", fmt.crc32(future))  # a well-formed header of another version
    with pytest.raises(CorruptFileError, match="version"):
        fmt.unpack_main_header(bytes(future))


# -- ops and batches ------------------------------------------------------------------------


@pytest.mark.parametrize("load_values", [True, False])
def test_batch_round_trip(tmp_path: Path, load_values: bool) -> None:
    ops = _ops()
    frame = fmt.encode_batch(7, 42, ops)
    assert len(frame) == fmt.BATCH_SIZE + sum(len(op) for op in ops)
    batch = _parse_batch(tmp_path, frame, load_values=load_values)
    assert batch is not None
    assert (batch.seq, batch.token, batch.offset, batch.size) == (7, 42, 0, len(frame))
    assert [(op.kind, op.key, op.vtype, op.value_len) for op in batch.ops] == [
        (fmt.OP_PUT, "alpha", 1, 9),
        (fmt.OP_DELETE, "gone", 0, 0),
        (fmt.OP_PUT, "\udc80-surrogate-\u00e9", 0, 40),
        (fmt.OP_PUT, "", 0, 0),
    ]
    offsets = [op.offset for op in batch.ops]
    assert offsets[0] == fmt.BATCH_SIZE
    assert offsets == [fmt.BATCH_SIZE + sum(len(o) for o in ops[:i]) for i in range(len(ops))]
    if load_values:
        assert [op.value for op in batch.ops] == [b'{"age":3}', b"", bytes(range(40)), b""]
        assert batch.raw == frame
    else:
        assert all(op.value is None for op in batch.ops) and batch.raw is None


def test_op_value_is_read_back_by_offset_with_its_crc(tmp_path: Path) -> None:
    frame = fmt.encode_batch(1, 0, _ops())
    batch = _parse_batch(tmp_path, frame, load_values=False)
    assert batch is not None
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert fmt.read_op_value(fd, batch.ops[2].offset) == (0, bytes(range(40)))
    finally:
        os.close(fd)
    record = _ops()[0]
    assert fmt.decode_op_value(record) == (fmt.OP_PUT, 1, b'{"age":3}')
    with pytest.raises(CorruptFileError):
        fmt.decode_op_value(record[:-1] + b"X")


def test_every_bit_flip_in_a_batch_makes_read_batch_refuse_it(tmp_path: Path) -> None:
    frame = fmt.encode_batch(3, 9, _ops())
    path = tmp_path / "batch"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    try:
        for bit in range(len(frame) * 8):
            damaged = bytearray(frame)
            damaged[bit // 8] ^= 1 << (bit % 8)
            os.pwrite(fd, damaged, 0)
            reader = fmt.FileReader(fd, 0, len(frame))
            assert fmt.read_batch(reader, load_values=True) is None, f"bit {bit} went unnoticed"
    finally:
        os.close(fd)


def test_a_batch_cut_at_any_length_is_refused(tmp_path: Path) -> None:
    frame = fmt.encode_batch(3, 9, _ops())
    for length in range(len(frame)):
        for load_values in (True, False):
            assert _parse_batch(tmp_path, frame[:length], load_values=load_values) is None


def test_encode_op_refuses_a_key_over_the_limit() -> None:
    with pytest.raises(ValueError, match="key"):
        fmt.encode_op(fmt.OP_PUT, "k" * (fmt.MAX_KEY_BYTES + 1), 0, b"")
    assert fmt.encode_op(fmt.OP_PUT, "k" * fmt.MAX_KEY_BYTES, 0, b"")


def test_file_reader_treats_a_file_that_shrank_as_its_end_not_as_damage(tmp_path: Path) -> None:
    # A reader takes the WAL's size, then a writer truncates a torn tail before the reader reads
    # it: the reader must see "no whole batch here", not a CorruptFileError.
    frame = fmt.encode_batch(1, 0, _ops())
    fd, _ = _reader_over(tmp_path, frame[:20])
    try:
        for end in (len(frame), 2 * len(frame), len(frame) + (2 << 20)):
            assert fmt.read_batch(fmt.FileReader(fd, 0, end), load_values=True) is None
            assert fmt.read_batch(fmt.FileReader(fd, 0, end), load_values=False) is None
            assert fmt.read_segment(fmt.FileReader(fd, 0, end), load_values=False) is None
    finally:
        os.close(fd)


# -- trailers and segments --------------------------------------------------------------------


def _segment_body(seqs: list[int]) -> bytes:
    return b"".join(
        fmt.encode_batch(seq, seq * 10, [fmt.encode_op(fmt.OP_PUT, f"k{seq}", 0, b"v" * seq)])
        for seq in seqs
    )


def _segment_bytes(tmp_path: Path, seqs: list[int]) -> bytes:
    body = _segment_body(seqs)
    fd, reader = _reader_over(tmp_path, body, "body")
    try:
        batches = []
        while reader.pos < len(body):
            batch = fmt.read_batch(reader, load_values=False)
            assert batch is not None
            batches.append(batch)
    finally:
        os.close(fd)
    return body + fmt.segment_trailer(0, batches)


def test_trailer_round_trip_and_checksum(tmp_path: Path) -> None:
    raw = fmt.encode_trailer(5, 64, 3, 0xDEADBEEF)
    assert len(raw) == fmt.TRAILER_SIZE
    fd, reader = _reader_over(tmp_path, raw)
    try:
        assert fmt.peek_is_trailer(reader) and reader.pos == 0
        assert fmt.read_trailer(reader) == fmt.Trailer(5, 64, 3, 0xDEADBEEF)
    finally:
        os.close(fd)
    for offset in range(len(raw)):
        damaged = bytearray(raw)
        damaged[offset] ^= 0x10
        fd, reader = _reader_over(tmp_path, bytes(damaged))
        try:
            assert fmt.read_trailer(reader) is None
        finally:
            os.close(fd)


@pytest.mark.parametrize("load_values", [True, False])
def test_segment_round_trip(tmp_path: Path, load_values: bool) -> None:
    data = _segment_bytes(tmp_path, [4, 5, 6])
    segment = _parse_segment(tmp_path, data, load_values=load_values)
    assert segment is not None
    assert (segment.start, segment.end, segment.last_seq) == (0, len(data), 6)
    assert [b.seq for b in segment.batches] == [4, 5, 6]


def test_a_chained_metadata_crc_gives_the_trailer_of_the_whole_run() -> None:
    """Writers and copies keep the trailer's CRC as batches come (fmt.chain_meta_crc) instead
    of passing over them all under the write lease: it must be the very trailer."""
    meta_crcs = [int.from_bytes(os.urandom(4), "little") for _ in range(1000)]
    chain = 0
    for count, meta_crc in enumerate(meta_crcs, 1):
        chain = fmt.chain_meta_crc(meta_crc, chain)
        if count in (1, 2, 999, 1000):
            assert fmt.encode_trailer(7 + count, 4096, count, chain) == fmt.trailer_for(
                4096, meta_crcs[:count], 7 + count
            )


def test_segment_rules_gaps_wrong_start_and_missing_trailer(tmp_path: Path) -> None:
    assert _parse_segment(tmp_path, _segment_bytes(tmp_path, [1, 3]), load_values=True) is None
    body = _segment_body([1, 2])
    assert _parse_segment(tmp_path, body, load_values=False) is None  # torn: no trailer
    good = _segment_bytes(tmp_path, [1, 2])
    fd, reader = _reader_over(tmp_path, b"\0" * 100 + good, "shifted")
    try:
        reader.pos = 100  # the trailer names segment_start 0, not 100
        assert fmt.read_segment(reader, load_values=True) is None
    finally:
        os.close(fd)
    trailer_only = fmt.encode_trailer(0, 0, 0, 0)
    assert _parse_segment(tmp_path, trailer_only, load_values=True) is None  # empty segment


def test_segment_meta_crc_covers_every_header_and_key_but_not_value_bytes(tmp_path: Path) -> None:
    """Without loading values, a flip anywhere but in value bytes is caught by the trailer; a
    flip in value bytes is caught when that value is read (each value carries its own CRC)."""
    data = _segment_bytes(tmp_path, [1, 2, 3])
    segment = _parse_segment(tmp_path, data, load_values=False)
    assert segment is not None
    value_bytes = set()
    for batch in segment.batches:
        for op in batch.ops:
            start = op.offset + fmt.OP_SIZE + len(op.key.encode())
            value_bytes.update(range(start, start + op.value_len))
    assert value_bytes
    path = tmp_path / "seg"
    path.write_bytes(data)
    fd = os.open(path, os.O_RDWR)
    try:
        for offset in range(len(data)):
            os.pwrite(fd, bytes([data[offset] ^ 0x04]), offset)
            parsed = fmt.read_segment(fmt.FileReader(fd, 0, len(data)), load_values=False)
            strict = fmt.read_segment(fmt.FileReader(fd, 0, len(data)), load_values=True)
            assert strict is None, f"offset {offset}"
            if offset in value_bytes:
                assert parsed is not None
                op = next(
                    op
                    for b in parsed.batches
                    for op in b.ops
                    if op.offset + fmt.OP_SIZE + len(op.key)
                    <= offset
                    < op.offset + fmt.OP_SIZE + len(op.key) + op.value_len
                )
                with pytest.raises(CorruptFileError):
                    fmt.read_op_value(fd, op.offset)
            else:
                assert parsed is None, f"offset {offset} went unnoticed"
            os.pwrite(fd, bytes([data[offset]]), offset)
    finally:
        os.close(fd)


# -- the WAL/main match rule (invariant 3) --------------------------------------------------------


def test_format_1_headers_are_read_as_64_bytes_without_names() -> None:
    v1 = MAIN._replace(repository_id=None, prefix=None, version=1)
    raw = fmt.pack_main_header(v1)
    assert len(raw) == fmt.V1_HEADER_SIZE == 64
    header = fmt.unpack_main_header(raw + b"segments follow")
    assert header == v1 and header.size == 64 and header.prefix is None
    with pytest.raises(ValueError, match="repository id"):
        fmt.pack_main_header(MAIN._replace(repository_id=None))
    with pytest.raises(ValueError, match="prefix name"):
        fmt.pack_wal_header(WAL._replace(prefix="x" * 201))


def test_a_range_crc_fed_overlapping_reads_with_gaps_is_the_crc_of_the_range(
    tmp_path: Path,
) -> None:
    """What a reader tells a RangeCrc may overlap what it told before, or skip ahead; the CRC
    is still exactly that of the range, each byte counted once."""
    data = os.urandom(200_000)
    path = tmp_path / "f"
    path.write_bytes(data)
    rng = random.Random(7)
    fd = os.open(path, os.O_RDONLY)
    try:
        for _ in range(200):
            start = rng.randrange(0, 1000)
            end = rng.randrange(start, len(data))
            digest = fmt.RangeCrc(fd, start, crc=zlib.crc32(b"before"))
            at = rng.randrange(0, start + 1)  # a read may begin before the range, as a sha does
            while at < end:
                size = rng.randrange(1, 9000)
                digest.saw(at, data[at : min(at + size, end)])
                at = max(0, at + rng.randrange(-size, 2 * size))  # back over it, or past a gap
                if at >= end:
                    break
            assert digest.through(end) == zlib.crc32(data[start:end], zlib.crc32(b"before"))
    finally:
        os.close(fd)
