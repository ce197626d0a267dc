"""The dbzero-style module API: one current repository and one current prefix per process.

``hc.init(root)``, ``hc.open(name, mode)``, ``hc.commit()``, ``hc.close()`` act on process-wide
state, for applications that treat the store as their ambient database. Everything here is a
thin layer over :class:`Repository`; the semantics are the same.
"""

from __future__ import annotations

import os
from typing import Any

from ._copy import DEFAULT_STEP, CopyResult
from ._prefix import Prefix
from ._repository import Repository

_repository: Repository | None = None
_current: Prefix | None = None


def init(root: str | os.PathLike[str], **options: Any) -> Repository:
    """Create or open the repository at ``root`` and make it current (closing any previous)."""
    global _repository, _current
    close()
    _repository = Repository.init(root, **options)
    _current = None
    return _repository


def open(name: str, mode: str = "rw") -> Prefix:
    """Open (creating with ``"rw"``) prefix ``name`` and make it the current prefix."""
    global _current
    _current = _require_repository().open_prefix(name, mode)
    return _current


def get_current_prefix() -> Prefix:
    """The prefix opened last; ``RuntimeError`` when none is open."""
    if _current is None or _current._closed:
        raise RuntimeError("no prefix is open: call hotcopy.storage.open(name) first")
    return _current


def commit() -> int:
    """Commit the current prefix; return its commit sequence number."""
    return get_current_prefix().commit()


def copy_prefix(
    file_name: str | os.PathLike[str],
    prefix: str | None = None,
    page_io_step_size: int = DEFAULT_STEP,
) -> CopyResult:
    """Copy ``prefix`` (default: the current prefix) consistently to the new file ``file_name``.

    Raises:
        RuntimeError: no prefix is given and none is open.
    """
    repository = _require_repository()
    if prefix is None:
        prefix = get_current_prefix().name
    return repository.copy_prefix(file_name, prefix, page_io_step_size)


def close() -> None:
    """Close the current repository and every prefix opened through it."""
    global _repository, _current
    repository, _repository, _current = _repository, None, None
    if repository is not None:
        repository.close()


def _require_repository() -> Repository:
    if _repository is None:
        raise RuntimeError("no repository: call hotcopy.storage.init(root) first")
    return _repository
