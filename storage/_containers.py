"""Persisted containers with their own identity: ``list()`` and ``index()``.

Each is a tree on its prefix (``_tree``) whose root is the container's record
(``{"class": "$list", "items": [...]}`` while small): appending or removing an item rewrites
its leaf and that record, whatever the size (an insert or delete inside a list also the nodes
above it whose later children move). Created on the current prefix, or, inside the
``__init__`` of a ``@memo`` object, on that object's prefix. Items are stored like attribute
values (strong references count, same prefix only). An empty, unreferenced container
assigned to an object of another prefix moves there (see ``_values._harden``).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator, MutableSequence
from typing import Any, overload

from . import _api
from ._memo import construction_prefix
from ._space import Handle, iter_refs, persisted_hash, refuse_copy, register_type
from ._tree import Tree
from ._values import decode, encode

LIST = "$list"
INDEX = "$index"

IndexKey = str | int | float | None


class _Container:
    __slots__ = ("__weakref__", "_hc_state")

    _hc_state: Handle
    _keyed = False

    __reduce_ex__ = refuse_copy
    __hash__ = persisted_hash  # agrees with a weak proxy's, which equals its target

    def _new(self, type_id: str, **fields: Any) -> None:
        space = _api.object_space()
        handle = space.new_handle(type_id)
        handle.prefix = construction_prefix() or space.current_name()
        space.create(handle, {"class": type_id, "items": [], **fields})
        space.track(self, handle)
        self._hc_state = handle

    @contextlib.contextmanager
    def _tree(self) -> Iterator[Tree]:
        """The container's tree for one operation, all of it read from one commit; a change
        is kept only if the operation calls ``flush()``."""
        handle = self._hc_state
        px = handle.space.prefix(handle.placed_prefix())
        with px.pinned():
            yield Tree(px, handle.key, handle.space.read(handle), keyed=self._keyed)

    def _decode(self, encoded: Any) -> Any:
        handle = self._hc_state
        return decode(encoded, handle.space, handle.placed_prefix())

    def _retarget(self, added: list[Any], removed: list[Any]) -> None:
        """Count the strong references gained and lost with these stored items."""
        handle = self._hc_state
        handle.space.retarget(handle.placed_prefix(), iter_refs(added), iter_refs(removed))

    def __len__(self) -> int:
        with self._tree() as tree:
            return len(tree)


class MemoList(_Container, MutableSequence[Any]):
    """A persisted list: a ``MutableSequence`` whose items are stored values.

    Create one with ``hotcopy.storage.list(iterable)``. ``append``, ``pop()`` and ``lst[i]``
    cost the same at any length; ``insert`` and ``del`` inside it nearly so.
    """

    __slots__ = ()

    def __init__(self, iterable: Iterable[Any] = ()) -> None:
        self._new(LIST)
        self.extend(iterable)

    @overload
    def __getitem__(self, index: int) -> Any: ...

    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...

    def __getitem__(self, index: int | slice) -> Any:
        with self._tree() as tree:
            if isinstance(index, slice):
                return [self._decode(item) for item in _slice(tree, index)]
            return self._decode(tree.get(_position(index, len(tree))))

    def __setitem__(self, index: Any, value: Any) -> None:
        if isinstance(index, slice):
            new = [encode(item, self._hc_state) for item in value]
            with self._tree() as tree:
                start, stop, step = index.indices(len(tree))
                if step == 1:
                    old = [tree.pop(start) for _ in range(start, stop)]
                    for offset, item in enumerate(new):
                        tree.insert(start + offset, item)
                else:
                    positions = range(start, stop, step)
                    if len(positions) != len(new):
                        raise ValueError(
                            f"attempt to assign sequence of size {len(new)} to extended slice "
                            f"of size {len(positions)}"
                        )
                    old = [tree.replace(p, item) for p, item in zip(positions, new, strict=True)]
                tree.flush()
        else:
            new = [encode(value, self._hc_state)]
            with self._tree() as tree:
                old = [tree.replace(_position(index, len(tree)), new[0])]
                tree.flush()
        self._retarget(new, old)

    def __delitem__(self, index: int | slice) -> None:
        with self._tree() as tree:
            if isinstance(index, slice):
                positions = sorted(range(*index.indices(len(tree))), reverse=True)
            else:
                positions = [_position(index, len(tree))]
            old = [tree.pop(position) for position in positions]
            tree.flush()
        self._retarget([], old)

    def __iter__(self) -> Iterator[Any]:
        # One read for the whole iteration: a consistent snapshot of the list.
        with self._tree() as tree:
            return iter([self._decode(item) for item in tree.items()])

    def insert(self, index: int, value: Any) -> None:
        encoded = encode(value, self._hc_state)
        with self._tree() as tree:
            size = len(tree)
            position = min(max(index + size if index < 0 else index, 0), size)  # as list.insert
            tree.insert(position, encoded)
            tree.flush()
        self._retarget([encoded], [])

    def append(self, value: Any) -> None:
        self.extend([value])

    def extend(self, values: Iterable[Any]) -> None:
        encoded = [encode(value, self._hc_state) for value in values]
        if encoded:
            with self._tree() as tree:
                for item in encoded:
                    tree.insert(len(tree), item)
                tree.flush()
            self._retarget(encoded, [])

    def index(self, value: Any, start: int = 0, stop: int | None = None) -> int:
        # One read of the list, not one per position as the mixin's would.
        snapshot = list(self)
        return snapshot.index(value, start, len(snapshot) if stop is None else stop)

    def count(self, value: Any) -> int:
        return list(self).count(value)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, MemoList):
            return other is self or list(other) == list(self)
        return list(self) == other if isinstance(other, list) else NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"hotcopy.list({list(self)!r})"


def _position(index: int, size: int) -> int:
    """``index`` (negative: from the end) as a position in ``range(size)``, as a list does."""
    position = index + size if index < 0 else index
    if not 0 <= position < size:
        raise IndexError("list index out of range")
    return position


def _slice(tree: Tree, index: slice) -> list[Any]:
    """The items ``index`` selects, reading only the nodes that hold them."""
    positions = range(*index.indices(len(tree)))
    if not positions:
        return []
    low, high = min(positions), max(positions)
    chunk = tree.slice(low, high + 1)
    return [chunk[position - low] for position in positions]


class MemoIndex(_Container):
    """A persisted ordered index: keys kept sorted, each with a value; a key may repeat.

    Keys are all ``str`` or all numbers (``int``/``float``, not ``bool``), and ``None``, which
    sorts before every other key; values are stored like attributes. Iteration yields values in
    key order (equal keys in insertion order). ``add`` and ``remove`` cost the same at any size.

    Example::

        idx = hotcopy.storage.index()
        idx.add(3, "c"); idx.add(1, "a"); idx.add(2, "b"); idx.add(None, "none")
        list(idx)            # ['none', 'a', 'b', 'c']
        idx.range(2, None)   # ['b', 'c']   (lo <= key < hi; a None bound: unbounded)
    """

    __slots__ = ()
    _keyed = True

    def __init__(self) -> None:
        self._new(INDEX, keys=None)

    def add(self, key: IndexKey, value: Any) -> None:
        """Insert ``value`` under ``key`` (after any equal keys)."""
        with self._tree() as tree:
            _check_key(key, tree)
            encoded = encode(value, self._hc_state)
            tree.insert_sorted([key, encoded])
            if key is not None:
                tree.header["keys"] = _kind(key)
            tree.flush()
        self._retarget([encoded], [])

    def remove(self, key: IndexKey, value: Any) -> None:
        """Remove the first ``value`` stored under ``key``; ``KeyError`` if there is none."""
        with self._tree() as tree:
            removed = None
            if _comparable(key, tree):
                removed = tree.remove_first(key, lambda item: self._decode(item[1]) == value)
            if removed is None:
                raise KeyError(f"index has no value {value!r} under key {key!r}")
            if not len(tree):
                tree.header["keys"] = None
            tree.flush()
        self._retarget([], [removed])

    def items(self, lo: IndexKey = None, hi: IndexKey = None) -> list[tuple[IndexKey, Any]]:
        """``(key, value)`` pairs with ``lo <= key < hi`` in key order (None: unbounded)."""
        with self._tree() as tree:
            return [(key, self._decode(encoded)) for key, encoded in tree.range(lo, hi)]

    def range(self, lo: IndexKey = None, hi: IndexKey = None) -> list[Any]:
        """Values with ``lo <= key < hi`` in key order (None: unbounded)."""
        return [value for _key, value in self.items(lo, hi)]

    def keys(self) -> list[IndexKey]:
        """Every key in order, repeats included."""
        with self._tree() as tree:
            return [key for key, _encoded in tree.items()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.range())

    def __bool__(self) -> bool:
        return len(self) > 0

    def __repr__(self) -> str:
        return f"hotcopy.index({self.items()!r})"


def _kind(key: object) -> str | None:
    """The kind of an index key: "str", "numbers", or None (for None, or a key of no kind)."""
    if isinstance(key, str):
        return "str"
    if isinstance(key, int | float) and not isinstance(key, bool):
        return "numbers"
    return None


def _keys_kind(tree: Tree) -> str | None:
    """The kind of the index's keys, None while it has none but None keys.

    Kept in the record (``"keys"``) from the first key that is not None until the index is
    empty again, so that no add looks for a key, and a kind stays while old first keys of it
    may still label nodes. An index stored before that field gets it from its lowest key.
    """
    if "keys" not in tree.header:
        tree.header["keys"] = _kind(
            next((k for k, _value in tree.scan(None) if k is not None), None)
        )
    kind: str | None = tree.header["keys"]
    return kind


def _comparable(key: object, tree: Tree) -> bool:
    """Whether ``key`` has a place among the keys of ``tree``."""
    if key is None:
        return True
    kind = _keys_kind(tree)
    return _kind(key) is not None and kind in (None, _kind(key))


def _check_key(key: object, tree: Tree) -> None:
    if key is not None and _kind(key) is None:
        raise TypeError(f"index keys are str, int, float or None, not {type(key).__name__}")
    if isinstance(key, float) and math.isnan(key):
        raise ValueError("an index key cannot be NaN: it has no place in the order")
    if not _comparable(key, tree):
        raise TypeError(
            f"this index has {_keys_kind(tree)} keys; {key!r} cannot be ordered among them"
        )


def _build_list(handle: Handle) -> MemoList:
    obj = MemoList.__new__(MemoList)
    obj._hc_state = handle
    return obj


def _build_index(handle: Handle) -> MemoIndex:
    obj = MemoIndex.__new__(MemoIndex)
    obj._hc_state = handle
    return obj


register_type(LIST, _build_list)
register_type(INDEX, _build_index)


def make_list(iterable: Iterable[Any] = ()) -> MemoList:
    """A new persisted list holding ``iterable``'s items, on the current prefix (inside a
    ``@memo`` class's ``__init__``: on that object's prefix).

    Exported as ``hotcopy.storage.list`` (dbzero's name).
    """
    return MemoList(iterable)


def make_index() -> MemoIndex:
    """A new, empty persisted ordered index (see :class:`MemoIndex`), on the current prefix
    (inside a ``@memo`` class's ``__init__``: on that object's prefix).

    Exported as ``hotcopy.storage.index``.
    """
    return MemoIndex()
