"""hotcopy storage: repositories of prefixes, each a main file plus a write-ahead log.

Object API: :class:`Repository` and :class:`Prefix`. Module API (dbzero style): ``init``,
``open``, ``get_current_prefix``, ``commit``, ``close``.
"""

from ._api import close, commit, copy_prefix, get_current_prefix, init, open
from ._copy import CopyResult
from ._errors import (
    ClosedError,
    CorruptFileError,
    DestinationExists,
    InvalidPrefixName,
    NotEnoughSpace,
    PrefixNotFound,
    ReadOnlyError,
    RepositoryNotFound,
    SameFileError,
    StorageError,
    TransactionConflict,
)
from ._leases import FileLeases, HeldLease, LeaseProvider
from ._prefix import Cut, Prefix
from ._repository import Repository, validate_prefix_name
from ._verify import VerifyReport, verify_file

__all__ = [
    "ClosedError",
    "CopyResult",
    "CorruptFileError",
    "Cut",
    "DestinationExists",
    "FileLeases",
    "HeldLease",
    "InvalidPrefixName",
    "LeaseProvider",
    "NotEnoughSpace",
    "Prefix",
    "PrefixNotFound",
    "ReadOnlyError",
    "Repository",
    "RepositoryNotFound",
    "SameFileError",
    "StorageError",
    "TransactionConflict",
    "VerifyReport",
    "close",
    "commit",
    "copy_prefix",
    "get_current_prefix",
    "init",
    "open",
    "validate_prefix_name",
    "verify_file",
]
