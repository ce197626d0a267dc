"""Sealed objects: round trips, streaming, every attack refused, and bounded memory."""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
from hotcopy.workers._errors import CatalogError
from hotcopy.workers._sealing import (
    CHUNK_SIZE,
    HEADER,
    SealError,
    SealKeys,
    derive_keys,
    is_sealed,
    open_file,
    open_stream,
    seal_file,
)
from hypothesis import given, settings
from hypothesis import strategies as st

pytestmark = [pytest.mark.timeout(60)]

MIB = 1 << 20
KEYS = derive_keys(b"k" * 32)
OTHER_KEYS = derive_keys(b"o" * 32)


def seal_bytes(
    data: bytes, keys: SealKeys | None, *, compress: bool, chunk_size: int = CHUNK_SIZE
) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        src, dst = Path(tmp, "plain"), Path(tmp, "sealed")
        src.write_bytes(data)
        size = seal_file(src, dst, keys, compress=compress, chunk_size=chunk_size)
        sealed = dst.read_bytes()
    assert size == len(sealed)
    return sealed


def pieces_of(data: bytes, size: int) -> Iterator[bytes]:
    return (data[at : at + size] for at in range(0, len(data), size))


def open_bytes(sealed: bytes, keys: SealKeys | None, piece: int = 4096) -> bytes:
    return b"".join(open_stream(pieces_of(sealed, piece), keys))


def frames(sealed: bytes) -> list[bytes]:
    """The frames after the header, parsed independently of the module."""
    out, at = [], HEADER.size
    while at < len(sealed):
        (word,) = struct.unpack_from(">I", sealed, at)
        end = at + 4 + (word & 0x7FFFFFFF)
        out.append(sealed[at:end])
        at = end
    return out


def refused(sealed: bytes, keys: SealKeys | None) -> str:
    with pytest.raises(SealError) as caught:
        open_bytes(sealed, keys)
    return str(caught.value)


# Round trips


@pytest.mark.parametrize("keys", [KEYS, None], ids=["keyed", "unkeyed"])
@pytest.mark.parametrize("compress", [True, False], ids=["zstd", "raw"])
@pytest.mark.parametrize("size", [0, 1, CHUNK_SIZE, CHUNK_SIZE + 1, 5 * MIB])
def test_round_trip(tmp_path: Path, size: int, compress: bool, keys: SealKeys | None) -> None:
    data = random.Random(size).randbytes(size)
    src, sealed, plain = tmp_path / "src", tmp_path / "sealed", tmp_path / "plain"
    src.write_bytes(data)
    sealed_size = seal_file(src, sealed, keys, compress=compress)
    assert sealed_size == sealed.stat().st_size
    assert is_sealed(sealed.read_bytes()[:4])
    assert open_file(sealed, plain, keys) == size
    assert plain.read_bytes() == data
    n_chunks = max(1, -(-size // CHUNK_SIZE))
    assert len(frames(sealed.read_bytes())) == n_chunks
    if not compress:  # the overhead is exactly the header and a word and a tag per chunk
        assert sealed_size == HEADER.size + size + n_chunks * (4 + (16 if keys else 4))
    if keys is not None and size >= 64:  # encrypted: the plaintext is nowhere in the object
        assert data[:64] not in sealed.read_bytes()


@pytest.mark.parametrize("keys", [KEYS, None], ids=["keyed", "unkeyed"])
def test_compression_makes_compressible_data_smaller(keys: SealKeys | None) -> None:
    data = b"".join(b"row %08d: status=ok value=%d\n" % (i, i % 97) for i in range(150_000))
    packed = seal_bytes(data, keys, compress=True)
    assert len(packed) < len(data) // 4
    assert len(seal_bytes(data, keys, compress=False)) > len(data)
    assert open_bytes(packed, keys) == data


def test_each_object_is_sealed_afresh() -> None:
    """A fresh salt per object: the same file sealed twice shares no ciphertext."""
    data = bytes(3000)
    one, two = (seal_bytes(data, KEYS, compress=False, chunk_size=1000) for _ in range(2))
    assert one[: HEADER.size - 20] == two[: HEADER.size - 20]  # magic .. key id
    assert one[HEADER.size - 20 : HEADER.size - 4] != two[HEADER.size - 20 : HEADER.size - 4]
    # ciphertexts without their tags (a tag covers the header, so it differs anyway): equal
    # plaintext chunks give different ciphertext, within an object and across objects
    first, second = ([frame[4:-16] for frame in frames(sealed)] for sealed in (one, two))
    assert first[0] != first[1]
    assert all(a != b for a, b in zip(first, second, strict=True))


# Streaming


def test_open_stream_fed_one_byte_at_a_time() -> None:
    data = random.Random(1).randbytes(5000)
    sealed = seal_bytes(data, KEYS, compress=True, chunk_size=1024)
    assert open_bytes(sealed, KEYS, piece=1) == data


def test_open_stream_fed_large_pieces() -> None:
    data = random.Random(2).randbytes(17 * MIB + 5)
    sealed = seal_bytes(data, KEYS, compress=False)
    chunks = list(open_stream(pieces_of(sealed, 7 * MIB), KEYS))
    assert b"".join(chunks) == data
    assert max(len(chunk) for chunk in chunks) == CHUNK_SIZE  # yielded chunk by chunk


def test_open_stream_skips_empty_pieces() -> None:
    sealed = seal_bytes(b"abc", KEYS, compress=True)
    assert b"".join(open_stream([b"", sealed[:5], b"", sealed[5:], b""], KEYS)) == b"abc"


# Attacks: every one refused with a SealError, which is a CatalogError

DATA = random.Random(3).randbytes(900)  # four chunks of 256 bytes, the last one 132


@pytest.fixture(params=[True, False], ids=["zstd", "raw"])
def sealed(request: pytest.FixtureRequest) -> bytes:
    out = seal_bytes(DATA, KEYS, compress=request.param, chunk_size=256)
    assert len(frames(out)) == 4
    return out


@pytest.mark.parametrize("keys", [KEYS, None], ids=["keyed", "unkeyed"])
def test_every_flipped_bit_is_detected(keys: SealKeys | None) -> None:
    """Header, length words, ciphertext and tags (CRCs unkeyed): every bit of every byte."""
    sealed = seal_bytes(DATA, keys, compress=True, chunk_size=256)
    for at in range(len(sealed)):
        for bit in range(8):
            damaged = bytearray(sealed)
            damaged[at] ^= 1 << bit
            with pytest.raises(SealError):
                open_bytes(bytes(damaged), keys)


def test_every_truncation_is_detected(sealed: bytes) -> None:
    boundaries = set()
    at = HEADER.size
    for frame in frames(sealed):
        boundaries.add(at)
        at += len(frame)
    for length in range(len(sealed)):
        message = refused(sealed[:length], KEYS)
        if length in boundaries:
            assert "without the final one" in message
        elif length >= HEADER.size:
            assert "truncated" in message


def test_dropped_chunks_are_detected(sealed: bytes) -> None:
    head, parts = sealed[: HEADER.size], frames(sealed)
    assert "without the final one" in refused(head + b"".join(parts[:-1]), KEYS)
    assert "damaged or forged" in refused(head + b"".join(parts[1:]), KEYS)
    assert "damaged or forged" in refused(head + b"".join(parts[:1] + parts[2:]), KEYS)


def test_truncation_marked_final_is_detected(sealed: bytes) -> None:
    """Cutting after a chunk and setting its final bit fails: the flag is authenticated."""
    head, parts = sealed[: HEADER.size], frames(sealed)
    for index in range(len(parts) - 1):
        marked = bytes([parts[index][0] | 0x80]) + parts[index][1:]
        message = refused(head + b"".join([*parts[:index], marked]), KEYS)
        assert f"chunk {index} is damaged or forged" in message
    unmarked = bytes([parts[-1][0] & 0x7F]) + parts[-1][1:]
    assert "damaged or forged" in refused(head + b"".join([*parts[:-1], unmarked]), KEYS)


def test_swapped_chunks_are_detected(sealed: bytes) -> None:
    head, parts = sealed[: HEADER.size], frames(sealed)
    assert "chunk 0 is damaged or forged" in refused(
        head + b"".join([parts[1], parts[0], *parts[2:]]), KEYS
    )
    last = len(parts) - 1  # the last chunk, renumbered: refused too
    swapped = [*parts[:-2], parts[-1], parts[-2]]
    assert f"chunk {last - 1} is damaged or forged" in refused(head + b"".join(swapped), KEYS)


def test_chunk_from_another_object_is_detected(sealed: bytes) -> None:
    other = seal_bytes(DATA, KEYS, compress=is_compressed(sealed), chunk_size=256)
    head, parts, theirs = sealed[: HEADER.size], frames(sealed), frames(other)
    for index in range(len(parts)):
        transplanted = [*parts[:index], theirs[index], *parts[index + 1 :]]
        message = refused(head + b"".join(transplanted), KEYS)
        assert f"chunk {index} is damaged or forged" in message
    # the other object's header with our chunks, too
    assert "damaged or forged" in refused(other[: HEADER.size] + b"".join(parts), KEYS)


def is_compressed(sealed: bytes) -> bool:
    return bool(sealed[5] & 1)


def test_appended_bytes_are_detected(sealed: bytes) -> None:
    assert "trailing bytes" in refused(sealed + b"\0", KEYS)
    assert "trailing bytes" in refused(sealed + frames(sealed)[0], KEYS)
    assert "trailing bytes" in refused(sealed + sealed, KEYS)


def test_wrong_key_says_another_key(sealed: bytes) -> None:
    message = refused(sealed, OTHER_KEYS)
    assert f"sealed with key id {KEYS.key_id.hex()}" in message
    assert f"this key is {OTHER_KEYS.key_id.hex()}" in message
    assert "another key" in message


def test_no_key_for_a_keyed_object(sealed: bytes) -> None:
    message = refused(sealed, None)
    assert f"sealed with key id {KEYS.key_id.hex()}; no key was given" in message


def test_unkeyed_object_refused_when_a_key_is_given() -> None:
    """Without the key, one can write an unkeyed object; a reader with the key refuses it."""
    forged = seal_bytes(b"forged", None, compress=True)
    assert "not encrypted, but a key was given" in refused(forged, KEYS)


def test_header_fields_are_checked(sealed: bytes) -> None:
    def with_field(offset: int, value: bytes) -> bytes:
        return sealed[:offset] + value + sealed[offset + len(value) :]

    assert "not a sealed object" in refused(b"PLAIN" + sealed[5:], KEYS)
    assert "format version 2" in refused(with_field(4, b"\x02"), KEYS)
    assert "unknown seal flags" in refused(with_field(5, bytes([sealed[5] | 0x80])), KEYS)
    too_big = struct.pack(">I", 1 << 30)
    assert "chunk size 1073741824 is out of range" in refused(with_field(26, too_big), KEYS)
    assert "chunk size 0 is out of range" in refused(with_field(26, bytes(4)), KEYS)


def test_huge_length_claim_refused_before_reading_it(sealed: bytes) -> None:
    claim = sealed[: HEADER.size] + struct.pack(">I", 0x7FFFFFFF)

    def endless() -> Iterator[bytes]:
        yield claim
        raise AssertionError("read past a length it should have refused")

    with pytest.raises(SealError, match="claims 2147483647 bytes"):
        b"".join(open_stream(endless(), KEYS))


def test_open_file_leaves_nothing_on_failure(tmp_path: Path, sealed: bytes) -> None:
    (tmp_path / "sealed").write_bytes(sealed[:-1])
    with pytest.raises(SealError) as caught:
        open_file(tmp_path / "sealed", tmp_path / "plain", KEYS)
    assert isinstance(caught.value, CatalogError)
    assert not (tmp_path / "plain").exists()


# Keys and small functions


def test_derive_keys() -> None:
    assert derive_keys(b"k" * 32) == KEYS
    assert len(KEYS.encryption) == 32 and len(KEYS.key_id) == 4
    assert KEYS.key_id != OTHER_KEYS.key_id and KEYS.encryption != OTHER_KEYS.encryption
    assert KEYS.encryption != b"k" * 32 and KEYS.key_id not in KEYS.encryption
    assert KEYS.encryption.hex() not in repr(KEYS) and "encryption" not in repr(KEYS)
    with pytest.raises(ValueError, match="at least 16 bytes"):
        derive_keys(b"short")


def test_is_sealed() -> None:
    assert not is_sealed(b"") and not is_sealed(b"HCS") and not is_sealed(b"HCPXMAIN")
    assert is_sealed(b"HCS1") and is_sealed(seal_bytes(b"", None, compress=True))


def test_seal_file_checks_chunk_size(tmp_path: Path) -> None:
    (tmp_path / "src").write_bytes(b"x")
    for bad in (0, 17 * MIB):
        with pytest.raises(ValueError, match="chunk_size"):
            seal_file(tmp_path / "src", tmp_path / "dst", KEYS, compress=False, chunk_size=bad)


# Property


@settings(max_examples=150, deadline=None)
@given(
    data=st.binary(max_size=6000),
    chunk_size=st.integers(1, 2048),
    compress=st.booleans(),
    keyed=st.booleans(),
    piece=st.integers(1, 9000),
    damage=st.integers(0, 1 << 30),
)
def test_property_round_trip_and_damage(
    data: bytes, chunk_size: int, compress: bool, keyed: bool, piece: int, damage: int
) -> None:
    keys = KEYS if keyed else None
    sealed = seal_bytes(data, keys, compress=compress, chunk_size=chunk_size)
    assert open_bytes(sealed, keys, piece) == data
    assert len(frames(sealed)) == max(1, -(-len(data) // chunk_size))
    damaged = bytearray(sealed)
    damaged[damage % len(sealed)] ^= 1 << (damage % 8)
    with pytest.raises(SealError):
        open_bytes(bytes(damaged), keys, piece)
    with pytest.raises(SealError):
        open_bytes(sealed[: damage % len(sealed)], keys, piece)


# Memory

MEMORY_PROBE = textwrap.dedent(
    """
    import json, os, resource, sys
    from hotcopy.workers._sealing import derive_keys, open_file, seal_file
    tmp, compress = sys.argv[1], sys.argv[2] == "zstd"
    src, sealed, plain = (os.path.join(tmp, name) for name in ("src", "sealed", "plain"))
    with open(src, "wb") as out:
        for i in range(64):
            out.write(os.urandom(1 << 19) + bytes(1 << 19))  # half random, half compressible
    keys = derive_keys(os.urandom(32))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    seal_file(src, sealed, keys, compress=compress)
    after_seal = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    open_file(sealed, plain, keys)
    after_open = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open(src, "rb") as a, open(plain, "rb") as b:
        while True:
            x, y = a.read(1 << 20), b.read(1 << 20)
            assert x == y
            if not x:
                break
    print(json.dumps({"seal_kib": after_seal - before, "open_kib": after_open - after_seal}))
    """
)


@pytest.mark.parametrize("compress", ["zstd", "raw"])
def test_memory_stays_bounded(tmp_path: Path, compress: str) -> None:
    run = subprocess.run(
        [sys.executable, "-c", MEMORY_PROBE, str(tmp_path), compress],
        capture_output=True,
        text=True,
        timeout=50,
        check=True,
    )
    growth = json.loads(run.stdout)
    assert growth["seal_kib"] < 32 * 1024, growth  # ru_maxrss is in KiB on Linux
    assert growth["open_kib"] < 32 * 1024, growth
    assert os.path.getsize(tmp_path / "plain") == 64 * MIB


def test_what_a_sealed_object_opens_to_is_bounded_when_asked() -> None:
    sealed = seal_bytes(bytes(3 << 20), None, compress=True)
    assert len(b"".join(open_stream([sealed], None, 3 << 20))) == 3 << 20
    with pytest.raises(SealError, match="more than the 3145727 bytes"):
        b"".join(open_stream([sealed], None, (3 << 20) - 1))
