"""The dbzero-style module API: one current repository and one current prefix per process.

``hc.init(root)``, ``hc.open(name, mode)``, ``hc.commit()``, ``hc.close()`` act on process-wide
state, for applications that treat the store as their ambient database. Everything here is a
thin layer over :class:`Repository`; the semantics are the same. Persisted objects (``@memo``,
``list()``, ``index()``) live in the object space of the current repository, which ``init`` and
``close`` start and end.
"""

from __future__ import annotations

import os
from typing import Any

from ._copy import DEFAULT_STEP, CopyResult
from ._prefix import Prefix
from ._repository import Repository
from ._space import ObjectSpace

_repository: Repository | None = None
_current: Prefix | None = None
_space: ObjectSpace | None = None


def init(root: str | os.PathLike[str], **options: Any) -> Repository:
    """Create or open the repository at ``root`` and make it current (closing any previous)."""
    global _repository, _current, _space
    close()
    _repository = Repository.init(root, **options)
    _current = None
    _space = ObjectSpace(_repository, get_current_prefix)
    return _repository


def open(name: str, mode: str = "rw") -> Prefix:
    """Open (creating with ``"rw"``) prefix ``name`` and make it the current prefix."""
    global _current
    _current = _require_repository().open_prefix(name, mode)
    return _current


def get_current_prefix() -> Prefix:
    """The prefix opened last; ``RuntimeError`` when none is open."""
    if _current is None or _current.closed:
        raise RuntimeError("no prefix is open: call hotcopy.storage.open(name) first")
    return _current


def commit() -> int:
    """Commit every open prefix with pending changes; return the current prefix's commit number.

    Scoped objects write to prefixes other than the current one, so one ``commit()`` makes all
    of it durable: first objects whose last handle was dropped and that nothing keeps alive are
    deleted, then each prefix commits in name order, the current one last. Each prefix's commit
    is atomic on its own; there is no atomicity across prefixes.

    Raises:
        RuntimeError: no repository, or no current prefix.
    """
    current = get_current_prefix()
    if _space is not None:
        _space.collect_garbage()
    for _name, prefix in sorted(_require_repository().open_prefixes().items()):
        if prefix is not current:
            prefix.commit()  # a no-op without pending changes
    return current.commit()


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
    global _repository, _current, _space
    repository, _repository, _current, _space = _repository, None, None, None
    if repository is not None:
        repository.close()


def object_space() -> ObjectSpace:
    """The object space of the current repository; ``RuntimeError`` without one."""
    if _space is None:
        raise RuntimeError(
            "no repository: call hotcopy.storage.init(root) before using persisted objects"
        )
    return _space


def _require_repository() -> Repository:
    if _repository is None:
        raise RuntimeError("no repository: call hotcopy.storage.init(root) first")
    return _repository
