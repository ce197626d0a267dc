"""The dbzero-style module API: one current repository and one current prefix per process.

``hc.init(root)``, ``hc.open(name, mode)``, ``hc.commit()``, ``hc.close()`` act on process-wide
state, for applications that treat the store as their ambient database. It is a thin layer over
:class:`Repository` that behaves as dbzero's module does where the two differ: ``close()``
commits what is pending (``Prefix.close()`` rolls it back), and closing the current prefix makes
the one opened before it current again. Persisted objects (``@memo``, ``list()``, ``index()``)
live in the object space of the current repository, which ``init`` and ``close`` start and end.
"""

from __future__ import annotations

import os
from typing import Any

from ._copy import DEFAULT_STEP, CopyResult
from ._prefix import Prefix
from ._repository import Repository, validate_prefix_name
from ._space import ObjectSpace

_repository: Repository | None = None
# The prefixes opened with open(), oldest first. The current prefix is the newest one still
# open, so closing it makes the one opened before it current again (dbzero's prefix history).
_opened: list[Prefix] = []
_space: ObjectSpace | None = None


def init(root: str | os.PathLike[str], **options: Any) -> Repository:
    """Create or open the repository at ``root`` and make it current (closing any previous,
    which commits what is pending on it: see :func:`close`)."""
    global _repository, _space
    close()
    _repository = Repository.init(root, **options)
    _space = ObjectSpace(_repository, get_current_prefix)
    return _repository


def open(name: str, mode: str = "rw") -> Prefix:
    """Open (creating with ``"rw"``) prefix ``name`` and make it the current prefix."""
    prefix = _require_repository().open_prefix(name, mode)
    if not _opened or _opened[-1] is not prefix:
        _opened.append(prefix)
    return prefix


def get_current_prefix() -> Prefix:
    """The prefix opened last that is still open; ``RuntimeError`` when there is none."""
    while _opened and _opened[-1].closed:
        _opened.pop()
    if not _opened:
        raise RuntimeError("no prefix is open: call hotcopy.storage.open(name) first")
    return _opened[-1]


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
    object_space().collect_garbage()
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


def close(prefix: str | None = None) -> None:
    """Close prefix ``prefix``, or, without one, the repository and every prefix opened in it.

    As dbzero's ``close()`` does, what is pending on the prefixes being closed is committed
    first (after deleting the objects whose last handle went and that nothing keeps alive, as
    :func:`commit` does): closing never loses a change. If one prefix's commit fails, the others
    still commit and close, and the first error is raised after. Closing the current prefix
    makes the prefix opened before it current again. A prefix that is not open is ignored.

    (``Prefix.close()`` and ``Repository.close()`` of the object API do the opposite: they roll
    back what was not committed.)
    """
    global _repository, _opened, _space
    repository, space = _repository, _space
    if repository is None or space is None:
        return
    if prefix is not None:
        one = repository.open_prefixes().get(validate_prefix_name(prefix))
        if one is not None:
            try:
                _commit_to_close(space, [one])
            finally:
                one.close()
        return
    _repository, _opened, _space = None, [], None
    try:
        _commit_to_close(space, list(repository.open_prefixes().values()))
    finally:
        repository.close()


def _commit_to_close(space: ObjectSpace, prefixes: list[Prefix]) -> None:
    space.collect_garbage({prefix.name for prefix in prefixes})
    failed: BaseException | None = None
    for prefix in sorted(prefixes, key=lambda prefix: prefix.name):
        try:
            prefix.commit()  # a no-op for a read-only prefix or without pending changes
        except Exception as err:  # the others' changes must not be lost with this one's
            if failed is None:
                failed = err
    if failed is not None:
        raise failed


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
