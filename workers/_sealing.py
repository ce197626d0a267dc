"""Sealed objects: backup pieces compressed and encrypted on the client, in bounded memory.

A sealed object is a 30-byte header, then frames::

    header  magic b"HCS1" | version u8 (1) | flags u8 (1: compressed, 2: keyed) |
            key id (4 bytes; zeros unkeyed) | salt (16 random bytes) | chunk size u32
    frame   word u32 (top bit: final chunk; low 31 bits: payload length) | payload

All integers are big-endian. The plaintext is cut into chunks of exactly ``chunk size`` bytes
(the last one shorter, possibly empty: an empty plaintext is one empty final chunk); each is
zstd-compressed on its own when flagged (chunks stay independent and memory bounded), then:

- **keyed**: sealed with AES-256-GCM under a key of its own object (HKDF-SHA256 of the
  catalog's encryption key, salted with the object's salt); nonce = salt[:8] + the chunk
  index (u32); associated data = header + context length u32 + context + index u32 + final
  u8, where the *context* says what the object is (its name in the catalog, never stored in
  it). The payload is ciphertext + 16-byte tag. The header, what the object is, every chunk's
  place and which chunk ends the object are thus authenticated: a changed header, an object
  put where another belongs, a reordered, dropped, transplanted (another object has another
  salt, hence key) or truncated chunk fails its tag, and a stream ending without its final
  chunk, or going on past it, is refused.
- **unkeyed** (compression alone): the payload is the chunk + CRC32 of (the same associated
  data, chunk). That catches accidents, not forgery; an unkeyed catalog is checksummed.

Why a per-object key: with random 96-bit nonces under one key, collisions bound the number of
chunks one key may seal (about 2^32); here each object has its own key from a 128-bit salt,
so nonces need only be unique within an object, which the counter guarantees.

Key rotation: the key id (an HKDF output of the catalog key, separate from the encryption
key, so it tells nothing about it) is in every header: a reader with the wrong key is told
which key the object needs, not that it is damaged (a new key starts a new catalog path).
"""

from __future__ import annotations

import os
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import zstandard
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from hotcopy.storage._crc import bulk_crc32, crc32
from hotcopy.workers._errors import CatalogError

MAGIC = b"HCS1"
VERSION = 1
CHUNK_SIZE = 1 << 20
MAX_CHUNK_SIZE = 16 << 20  # a header asking for more is refused before anything is allocated
COMPRESSED, KEYED = 1, 2
HEADER = struct.Struct(">4sBB4s16sI")
_WORD = struct.Struct(">I")
_PLACE = struct.Struct(">IB")  # chunk index, final: appended to the header as associated data
_FINAL = 1 << 31
_TAG, _CRC = 16, 4
_MAX_CHUNKS = 1 << 32  # the nonce's counter


class SealError(CatalogError):
    """A sealed object cannot be opened: damaged, forged, truncated, or another key's."""


@dataclass(frozen=True)
class SealKeys:
    """Keys derived from a catalog key: ``encryption`` (AES-256) and its 4-byte ``key_id``."""

    encryption: bytes = field(repr=False)
    key_id: bytes


def _hkdf(key: bytes, info: bytes, *, salt: bytes | None = None) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=salt, info=info).derive(key)


def derive_keys(key: bytes) -> SealKeys:
    """The sealing keys of a catalog key (the bytes of its key file, >= 16 of them)."""
    if len(key) < 16:
        raise ValueError(f"a catalog key is at least 16 bytes, not {len(key)}")
    return SealKeys(
        encryption=_hkdf(key, b"hotcopy sealing v1: encryption"),
        key_id=_hkdf(key, b"hotcopy sealing v1: key id")[:4],
    )


def is_sealed(first_bytes: bytes) -> bool:
    """Whether an object starting with ``first_bytes`` (4 or more of them) is sealed."""
    return first_bytes[:4] == MAGIC


class _Chunks:
    """Seals or opens the chunks of one object, given its header."""

    def __init__(self, header: bytes, keys: SealKeys | None, context: bytes) -> None:
        _, _, flags, _, salt, self.chunk_size = HEADER.unpack(header)
        # What the object is (its name in the catalog) is authenticated with every chunk, so a
        # sealed object never passes for another: a manifest for the marker, a piece for another
        # prefix's or backup's.
        self.header, self.prefix = header + _WORD.pack(len(context)) + context, salt[:8]
        self.compressed = bool(flags & COMPRESSED)
        self.aead = None if keys is None else AESGCM(_hkdf(keys.encryption, b"object", salt=salt))
        self.compressor = zstandard.ZstdCompressor()
        self.decompressor = zstandard.ZstdDecompressor()
        extra = _CRC if keys is None else _TAG
        if self.compressed:  # zstd's worst case (ZSTD_COMPRESSBOUND) is under this
            extra += (self.chunk_size >> 8) + 256
        self.max_payload = self.chunk_size + extra

    def _place(self, index: int, final: bool) -> bytes:
        return self.header + _PLACE.pack(index, final)

    def seal(self, index: int, final: bool, plain: bytes) -> bytes:
        if index >= _MAX_CHUNKS:
            raise SealError(f"an object has at most {_MAX_CHUNKS} chunks; use larger ones")
        data = self.compressor.compress(plain) if self.compressed else plain
        place = self._place(index, final)
        if self.aead is not None:
            payload = self.aead.encrypt(self.prefix + _WORD.pack(index), data, place)
        else:
            payload = data + _WORD.pack(bulk_crc32(data, crc32(place)))
        assert len(payload) <= self.max_payload
        return _WORD.pack(len(payload) | (_FINAL if final else 0)) + payload

    def open(self, index: int, final: bool, payload: bytes) -> bytes:
        place = self._place(index, final)
        if self.aead is not None:
            try:
                data = self.aead.decrypt(self.prefix + _WORD.pack(index), payload, place)
            except InvalidTag:
                raise SealError(f"chunk {index} is damaged or forged (its tag fails)") from None
        else:
            data, crc = payload[:-_CRC], payload[-_CRC:]
            if len(crc) < _CRC or _WORD.unpack(crc)[0] != bulk_crc32(data, crc32(place)):
                raise SealError(f"chunk {index} is damaged (its CRC32 fails)")
        plain = data
        if self.compressed:
            try:  # the size is checked first: decompress() allocates what the frame claims
                size = zstandard.frame_content_size(data)
                if not 0 <= size <= self.chunk_size:
                    raise SealError(f"chunk {index} is damaged (it claims {size} bytes)")
                plain = self.decompressor.decompress(data, allow_extra_data=False)
            except zstandard.ZstdError as err:
                raise SealError(f"chunk {index} is damaged (cannot decompress: {err})") from err
        if len(plain) > self.chunk_size or (not final and len(plain) != self.chunk_size):
            raise SealError(f"chunk {index} holds {len(plain)} bytes; chunks are {self.chunk_size}")
        return plain


def _check_header(header: bytes, keys: SealKeys | None) -> None:
    if len(header) < HEADER.size or not is_sealed(header):
        raise SealError("not a sealed object (no hotcopy seal header, or truncated in it)")
    _, version, flags, key_id, _, chunk_size = HEADER.unpack(header)
    if version != VERSION:
        raise SealError(f"sealed in format version {version}; this hotcopy reads {VERSION}")
    if flags & ~(COMPRESSED | KEYED):
        raise SealError(f"unknown seal flags {flags:#04x}: damaged, or from a newer hotcopy")
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise SealError(f"the header's chunk size {chunk_size} is out of range: damaged")
    if flags & KEYED and (keys is None or key_id != keys.key_id):
        raise SealError(
            f"sealed with key id {key_id.hex()}; "
            + ("no key was given" if keys is None else f"this key is {keys.key_id.hex()}")
            + ": it needs another key (give the key file it was backed up with)"
        )
    if not flags & KEYED and keys is not None:
        # A key promises that only its holder wrote this; an unkeyed object could be anyone's.
        raise SealError("not encrypted, but a key was given: refused (it may be a substitute)")


def _new_header(keys: SealKeys | None, compress: bool, chunk_size: int) -> bytes:
    if not 1 <= chunk_size <= MAX_CHUNK_SIZE:
        raise ValueError(f"chunk_size must be 1 to {MAX_CHUNK_SIZE}, not {chunk_size}")
    flags = (COMPRESSED if compress else 0) | (KEYED if keys is not None else 0)
    key_id = bytes(4) if keys is None else keys.key_id
    return HEADER.pack(MAGIC, VERSION, flags, key_id, os.urandom(16), chunk_size)


def seal_bytes(
    data: bytes, keys: SealKeys | None, *, compress: bool, context: bytes = b""
) -> bytes:
    """``data`` (a manifest, a marker: small) sealed as :func:`seal_file` seals a file."""
    header = _new_header(keys, compress, CHUNK_SIZE)
    chunks = _Chunks(header, keys, context)
    cuts = [data[at : at + CHUNK_SIZE] for at in range(0, len(data), CHUNK_SIZE)] or [b""]
    last = len(cuts) - 1
    return header + b"".join(chunks.seal(i, i == last, cut) for i, cut in enumerate(cuts))


def seal_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: SealKeys | None,
    *,
    compress: bool,
    chunk_size: int = CHUNK_SIZE,
    context: bytes = b"",
) -> int:
    """Write ``src`` sealed (encrypted when ``keys``, compressed when ``compress``) to ``dst``
    (a staging file, not fsynced); returns its size. ``context``: what the object is (its
    name), authenticated with it: opening it needs the same."""
    header = _new_header(keys, compress, chunk_size)
    chunks = _Chunks(header, keys, context)
    with open(src, "rb") as source, open(dst, "wb") as out:
        out.write(header)
        index, chunk = 0, source.read(chunk_size)
        while True:  # one chunk read ahead: the last one is sealed as final
            following = source.read(chunk_size) if len(chunk) == chunk_size else b""
            out.write(chunks.seal(index, not following, chunk))
            if not following:
                return out.tell()
            index, chunk = index + 1, following


class _Feed:
    """Exact reads over an iterable of arbitrary-sized byte strings."""

    def __init__(self, pieces: Iterable[bytes]) -> None:
        self.pieces, self.buffer = iter(pieces), bytearray()

    def take(self, n: int) -> bytes:
        """The next ``n`` bytes; fewer only at the end."""
        while len(self.buffer) < n:
            piece = next(self.pieces, None)
            if piece is None:
                break
            self.buffer += piece
        with memoryview(self.buffer) as view:
            data = bytes(view[:n])
        del self.buffer[:n]  # CPython drops a bytearray's front without copying the rest
        return data


def open_stream(
    pieces: Iterable[bytes],
    keys: SealKeys | None,
    limit: int | None = None,
    context: bytes = b"",
) -> Iterator[bytes]:
    """The plaintext of the sealed object read from ``pieces``, chunk by chunk; more than
    ``limit`` bytes of it is refused (a compressed object is small; what it opens to is not).

    Every chunk yielded is authentic, but the object is whole only once the stream ends
    without a ``SealError``: on one, discard what was read."""
    feed = _Feed(pieces)
    header = feed.take(HEADER.size)
    _check_header(header, keys)
    chunks = _Chunks(header, keys, context)
    index = opened = 0
    while True:
        word = feed.take(_WORD.size)
        if not word:
            raise SealError(f"truncated: ends after {index} chunks, without the final one")
        if len(word) < _WORD.size:
            raise SealError(f"truncated in chunk {index}'s length")
        final, size = bool(_WORD.unpack(word)[0] & _FINAL), _WORD.unpack(word)[0] & (_FINAL - 1)
        if size > chunks.max_payload:
            raise SealError(f"chunk {index} claims {size} bytes, over {chunks.max_payload}")
        payload = feed.take(size)
        if len(payload) < size:
            raise SealError(f"truncated in chunk {index}: {len(payload)} of {size} bytes")
        plain = chunks.open(index, final, payload)
        opened += len(plain)
        if limit is not None and opened > limit:
            raise SealError(f"opens to more than the {limit} bytes expected: damaged or forged")
        if plain:
            yield plain
        if final:
            break
        index += 1
    if feed.take(1):
        raise SealError(f"trailing bytes after the final chunk ({index}): damaged or appended")


def open_file(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    keys: SealKeys | None,
    limit: int | None = None,
    context: bytes = b"",
) -> int:
    """Write the plaintext of the sealed file ``src`` to ``dst``; returns its size. On a
    ``SealError``, ``dst`` is removed (nothing unproved is left behind)."""
    with open(src, "rb") as source, open(dst, "wb") as out:
        try:
            chunks = iter(lambda: source.read(CHUNK_SIZE), b"")
            for plain in open_stream(chunks, keys, limit, context):
                out.write(plain)
        except SealError:
            os.unlink(dst)
            raise
        return out.tell()
