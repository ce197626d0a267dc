"""Storage errors: the ``StorageError`` sub-root of hotcopy's exception tree."""

from __future__ import annotations

import builtins

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


class NeedsMigration(StorageError):
    """A prefix's files are of an older format, read only to convert them (``hotcopy migrate``)."""


class NotRegularFile(StorageError, OSError):
    """A path where hotcopy expects a data file is a link, FIFO, socket, device or directory."""


class SyncFailed(StorageError, OSError):
    """An fsync failed: what was written since the last good one may be lost (never retried)."""


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


class CrossPrefixReference(StorageError, ValueError):
    """An object would hold a strong reference to an object on another prefix.

    Fields ``source_prefix`` and ``target_prefix`` name both sides; link across prefixes with
    ``weak_proxy(obj)`` instead.
    """


class ObjectNotFound(StorageError, KeyError):
    """No object with this id (or no singleton of this class) exists on the prefix."""


# dbzero's name; it shadows the builtin it subclasses, so `except ReferenceError` catches both.
class ReferenceError(StorageError, builtins.ReferenceError):
    """The object a handle or weak proxy points to was deleted (or its prefix restored to a
    state without it). ``uuid`` names the object and ``prefix`` its prefix."""


class ScopeError(StorageError, RuntimeError):
    """An object's prefix was chosen too late or twice (``set_prefix`` not first in
    ``__init__``), or against its class's static scope."""


class SingletonExists(StorageError, ValueError):
    """A singleton class already has its instance on the prefix; use ``fetch(Cls)``."""


class EnumRedefined(StorageError, ValueError):
    """An ``@enum`` was defined again under the same type id with other values or another
    prefix; the first definition stays. Fields ``type_id`` and ``prefix`` name it."""
