"""Persisted containers with their own identity: ``list()`` and ``index()``.

Each is one record on its prefix (``{"class": "$list", "items": [...]}``), created on the current
prefix, or, inside the ``__init__`` of a ``@memo`` object, on that object's prefix. Items are
stored like attribute values (strong references count, same prefix only). An empty, unreferenced
container assigned to an object of another prefix moves there (see ``_values._harden``).
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Iterator, MutableSequence
from typing import Any, overload

from . import _api
from ._memo import construction_prefix
from ._space import Handle, iter_refs, persisted_hash, refuse_copy, register_type
from ._values import decode, encode

LIST = "$list"
INDEX = "$index"

IndexKey = str | int | float


class _Container:
    __slots__ = ("__weakref__", "_hc_state")

    _hc_state: Handle

    __reduce_ex__ = refuse_copy
    __hash__ = persisted_hash  # agrees with a weak proxy's, which equals its target

    def _new(self, type_id: str) -> None:
        space = _api.object_space()
        handle = space.new_handle(type_id)
        handle.prefix = construction_prefix() or space.current_name()
        space.create(handle, {"class": type_id, "items": []})
        space.track(self, handle)
        self._hc_state = handle

    def _read(self) -> list[Any]:
        items: list[Any] = self._hc_state.space.read(self._hc_state)["items"]
        return items

    def _decode(self, encoded: Any) -> Any:
        handle = self._hc_state
        return decode(encoded, handle.space, handle.placed_prefix())

    def _store(self, items: list[Any], added: Iterable[str], removed: Iterable[str]) -> None:
        handle = self._hc_state
        record = handle.space.read(handle)
        record["items"] = items
        handle.space.write(handle, record)
        handle.space.retarget(handle.placed_prefix(), added, removed)


class MemoList(_Container, MutableSequence[Any]):
    """A persisted list: a ``MutableSequence`` whose items are stored values.

    Create one with ``hotcopy.storage.list(iterable)``.
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
        items = self._read()
        if isinstance(index, slice):
            return [self._decode(item) for item in items[index]]
        return self._decode(items[index])

    def __setitem__(self, index: Any, value: Any) -> None:
        items = self._read()
        if isinstance(index, slice):
            new = [encode(item, self._hc_state) for item in value]
            old = items[index]
        else:
            new = encode(value, self._hc_state)
            old = items[index]
        items = self._read()  # re-read: encoding may have moved a container here
        items[index] = new
        self._store(items, iter_refs(new), iter_refs(old))

    def __delitem__(self, index: int | slice) -> None:
        items = self._read()
        old = items[index]
        del items[index]
        self._store(items, [], iter_refs(old))

    def __len__(self) -> int:
        return len(self._read())

    def __iter__(self) -> Iterator[Any]:
        # One read for the whole iteration: a consistent snapshot of the list.
        return iter([self._decode(item) for item in self._read()])

    def insert(self, index: int, value: Any) -> None:
        encoded = encode(value, self._hc_state)
        items = self._read()
        items.insert(index, encoded)
        self._store(items, iter_refs(encoded), [])

    def extend(self, values: Iterable[Any]) -> None:
        encoded = [encode(value, self._hc_state) for value in values]
        if encoded:
            items = self._read()
            items.extend(encoded)
            self._store(items, iter_refs(encoded), [])

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


class MemoIndex(_Container):
    """A persisted ordered index: keys kept sorted, each with a value; a key may repeat.

    Keys are all ``str`` or all numbers (``int``/``float``, not ``bool``); values are stored
    like attributes. Iteration yields values in key order (equal keys in insertion order).

    Example::

        idx = hotcopy.storage.index()
        idx.add(3, "c"); idx.add(1, "a"); idx.add(2, "b")
        list(idx)            # ['a', 'b', 'c']
        idx.range(2, None)   # ['b', 'c']   (lo <= key < hi; None: unbounded)
    """

    __slots__ = ()

    def __init__(self) -> None:
        self._new(INDEX)

    def add(self, key: IndexKey, value: Any) -> None:
        """Insert ``value`` under ``key`` (after any equal keys)."""
        items = self._read()
        _check_key(key, items)
        encoded = encode(value, self._hc_state)
        items = self._read()
        position = bisect.bisect_right(items, key, key=_key_of)
        items.insert(position, [key, encoded])
        self._store(items, iter_refs(encoded), [])

    def remove(self, key: IndexKey, value: Any) -> None:
        """Remove the first ``value`` stored under ``key``; ``KeyError`` if there is none."""
        items = self._read()
        low = bisect.bisect_left(items, key, key=_key_of) if _comparable(key, items) else 0
        for position in range(low, len(items)):
            stored_key, encoded = items[position]
            if stored_key != key:
                break
            if self._decode(encoded) == value:
                del items[position]
                self._store(items, [], iter_refs(encoded))
                return
        raise KeyError(f"index has no value {value!r} under key {key!r}")

    def items(
        self, lo: IndexKey | None = None, hi: IndexKey | None = None
    ) -> list[tuple[IndexKey, Any]]:
        """``(key, value)`` pairs with ``lo <= key < hi`` in key order (None: unbounded)."""
        items = self._read()
        start = 0 if lo is None else bisect.bisect_left(items, lo, key=_key_of)
        stop = len(items) if hi is None else bisect.bisect_left(items, hi, key=_key_of)
        return [(key, self._decode(encoded)) for key, encoded in items[start:stop]]

    def range(self, lo: IndexKey | None = None, hi: IndexKey | None = None) -> list[Any]:
        """Values with ``lo <= key < hi`` in key order (None: unbounded)."""
        return [value for _key, value in self.items(lo, hi)]

    def keys(self) -> list[IndexKey]:
        """Every key in order, repeats included."""
        return [key for key, _encoded in self._read()]

    def __iter__(self) -> Iterator[Any]:
        return iter(self.range())

    def __len__(self) -> int:
        return len(self._read())

    def __bool__(self) -> bool:
        return bool(self._read())

    def __repr__(self) -> str:
        return f"hotcopy.index({self.items()!r})"


def _key_of(item: list[Any]) -> Any:
    return item[0]


def _comparable(key: object, items: list[Any]) -> bool:
    return not items or isinstance(key, str) == isinstance(items[0][0], str)


def _check_key(key: object, items: list[Any]) -> None:
    if isinstance(key, bool) or not isinstance(key, str | int | float):
        raise TypeError(f"index keys are str, int or float, not {type(key).__name__}")
    if isinstance(key, float) and math.isnan(key):
        raise ValueError("an index key cannot be NaN: it has no place in the order")
    if not _comparable(key, items):
        kind = "str" if isinstance(items[0][0], str) else "numbers"
        raise TypeError(f"this index has {kind} keys; {key!r} cannot be ordered among them")


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
