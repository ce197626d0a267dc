"""hotcopy storage: repositories of prefixes, each a main file plus a write-ahead log.

Object API: :class:`Repository` and :class:`Prefix`. Module API (dbzero style): ``init``,
``open``, ``get_current_prefix``, ``commit``, ``close``.
"""

from ._api import close, commit, get_current_prefix, init, open
from ._errors import (
    ClosedError,
    CorruptFileError,
    InvalidPrefixName,
    PrefixNotFound,
    ReadOnlyError,
    RepositoryNotFound,
    StorageError,
)
from ._leases import FileLeases, HeldLease, LeaseProvider
from ._prefix import Cut, Prefix
from ._repository import Repository, validate_prefix_name
from ._verify import VerifyReport, verify_file

__all__ = [
    "ClosedError",
    "CorruptFileError",
    "Cut",
    "FileLeases",
    "HeldLease",
    "InvalidPrefixName",
    "LeaseProvider",
    "Prefix",
    "PrefixNotFound",
    "ReadOnlyError",
    "Repository",
    "RepositoryNotFound",
    "StorageError",
    "VerifyReport",
    "close",
    "commit",
    "get_current_prefix",
    "init",
    "open",
    "validate_prefix_name",
    "verify_file",
]
