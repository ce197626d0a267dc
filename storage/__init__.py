"""hotcopy storage: repositories of prefixes, each a main file plus a write-ahead log.

Object API: :class:`Repository` and :class:`Prefix`. Module API (dbzero style): ``init``,
``open``, ``get_current_prefix``, ``commit``, ``close``. Persisted objects on top of the module
API (dbzero's prefixes and scoped types): ``@memo`` classes, ``list()``/``index()`` containers,
``@enum``, ``tags``/``find``, ``weak_proxy``/``expired``, ``fetch``, ``uuid``, ``get_prefix_of``.
"""

from ._api import close, commit, copy_prefix, get_current_prefix, init, open
from ._containers import MemoIndex, MemoList
from ._containers import make_index as index
from ._containers import make_list as list
from ._copy import CopyResult
from ._enums import EnumType, EnumValue, enum
from ._errors import (
    ClosedError,
    CorruptFileError,
    CrossPrefixReference,
    DestinationExists,
    EnumRedefined,
    InvalidPrefixName,
    NeedsMigration,
    NotEnoughSpace,
    NotRegularFile,
    ObjectNotFound,
    PrefixNotFound,
    ReadOnlyError,
    ReferenceError,
    RepositoryNotFound,
    SameFileError,
    ScopeError,
    SingletonExists,
    StorageError,
    TransactionConflict,
)
from ._leases import FileLeases, HeldLease, LeaseProvider
from ._log import Cut
from ._memo import memo, set_prefix
from ._objects import fetch, get_prefix_of, getrefcount, uuid, weak_proxy
from ._prefix import Prefix
from ._proxy import WeakProxy, expired
from ._repository import Repository, validate_prefix_name
from ._tags import Tags, find, tags
from ._verify import VerifyReport, verify_file

__all__ = [
    "ClosedError",
    "CopyResult",
    "CorruptFileError",
    "CrossPrefixReference",
    "Cut",
    "DestinationExists",
    "EnumRedefined",
    "EnumType",
    "EnumValue",
    "FileLeases",
    "HeldLease",
    "InvalidPrefixName",
    "LeaseProvider",
    "MemoIndex",
    "MemoList",
    "NeedsMigration",
    "NotEnoughSpace",
    "NotRegularFile",
    "ObjectNotFound",
    "Prefix",
    "PrefixNotFound",
    "ReadOnlyError",
    "ReferenceError",
    "Repository",
    "RepositoryNotFound",
    "SameFileError",
    "ScopeError",
    "SingletonExists",
    "StorageError",
    "Tags",
    "TransactionConflict",
    "VerifyReport",
    "WeakProxy",
    "close",
    "commit",
    "copy_prefix",
    "enum",
    "expired",
    "fetch",
    "find",
    "get_current_prefix",
    "get_prefix_of",
    "getrefcount",
    "index",
    "init",
    "list",
    "memo",
    "open",
    "set_prefix",
    "tags",
    "uuid",
    "validate_prefix_name",
    "verify_file",
    "weak_proxy",
]
