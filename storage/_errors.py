"""Storage errors: the ``StorageError`` sub-root of hotcopy's exception tree."""

from __future__ import annotations

from hotcopy.coordinator._errors import HotcopyError


class StorageError(HotcopyError):
    """A repository, prefix or file could not be used as asked."""


class InvalidPrefixName(StorageError, ValueError):
    """A prefix name breaks the naming rule; nothing was touched."""


class PrefixNotFound(StorageError, FileNotFoundError):
    """The prefix has no main file in this repository."""


class RepositoryNotFound(StorageError, FileNotFoundError):
    """The directory holds no hotcopy repository (no ``hotcopy.json``)."""


class CorruptFileError(StorageError):
    """A file failed a checksum or structural check; ``offset`` names the first bad byte."""


class ReadOnlyError(StorageError, PermissionError):
    """A change was attempted on a prefix opened with mode ``"r"``."""


class ClosedError(StorageError):
    """The repository or prefix was closed by its owner (you), not lost to a fault."""


class DestinationExists(StorageError, FileExistsError):
    """A copy or restore would overwrite a file; nothing was written."""


class SameFileError(StorageError, ValueError):
    """The destination is the source itself (same device and inode); nothing was written."""


class NotEnoughSpace(StorageError, OSError):
    """The destination's file system has less free space than the copy needs."""


class TransactionConflict(StorageError):
    """Another process committed after this transaction's reads; nothing was written."""
