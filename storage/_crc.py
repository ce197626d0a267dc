"""CRC-32 (zlib's polynomial, so every stored checksum stays what it was): the one place every
checksum of the formats, of copies and of backups comes from.

Bulk data (a copy's or a restore's checks, backup pieces, large records) goes through
zlib-ng's implementation of the same function, at SIMD speed: on this project's VM 18 GiB/s
against zlib's 3.5 GiB/s. With zlib's, a copy's checks and its CRC took longer on one core than
the disk took to write the bytes. It is loaded at the first bulk checksum, so a client process
that only commits and reads small records maps nothing more (its memory is a target of its
own); small data stays with zlib's, called directly.
"""

from __future__ import annotations

from collections.abc import Callable
from zlib import crc32

__all__ = ["BULK", "bulk_crc32", "crc32"]

BULK = 64 << 10  # data at least this long is bulk

_Crc = Callable[[bytes | bytearray | memoryview, int], int]
_fast: _Crc | None = None


def bulk_crc32(data: bytes | bytearray | memoryview, value: int = 0) -> int:
    """``crc32(data, value)`` for large data."""
    global _fast
    if _fast is None:
        try:
            from zlib_ng.zlib_ng import crc32 as fast
        except ImportError:  # a platform without its wheel: the same values, at zlib's speed
            fast = crc32
        _fast = fast
    return _fast(data, value)
