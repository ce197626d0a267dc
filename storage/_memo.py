"""``@memo`` classes: instances whose attributes live in their prefix, not in memory.

An instance keeps only its handle (``_hc_state``) in ``__dict__``; every attribute read and
write goes to its record, so other processes' commits are seen and writes are buffered in the
prefix's transaction until ``commit()``. Methods, properties and other descriptors of the class
work as usual; plain class attributes act as defaults.

Placement (which prefix an instance lives on) is decided at the first attribute write, or at the
end of ``__init__`` if it writes none: ``set_prefix(self, name)`` if it was called, else the
class's ``prefix=``, else the current prefix.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple, TypeVar, cast, overload

from . import _api
from ._errors import ScopeError
from ._repository import validate_prefix_name
from ._space import Handle, handle_of, iter_refs, persisted_hash, refuse_copy, register_type
from ._values import decode, encode

T = TypeVar("T", bound=type)
_MISSING = object()
# The @memo objects whose __init__ is running, innermost last (per process: like a Prefix, the
# object layer is not thread-safe).
_constructing: list[tuple[Any, Handle]] = []


class MemoInfo(NamedTuple):
    """What ``@memo`` recorded about a class (``cls.__hc_memo__``)."""

    type_id: str
    prefix: str | None
    singleton: bool


@overload
def memo(cls: T, /) -> T: ...


@overload
def memo(
    *, prefix: str | None = None, singleton: bool = False, type_id: str | None = None
) -> Callable[[T], T]: ...


def memo(
    cls: T | None = None,
    /,
    *,
    prefix: str | None = None,
    singleton: bool = False,
    type_id: str | None = None,
) -> T | Callable[[T], T]:
    """Make a class persisted: ``@memo``, ``@memo(prefix="settings")``, ``@memo(singleton=True)``.

    Args:
        prefix: Put every instance on this prefix whatever the current prefix is (opened
            ``"rw"`` on demand; the current prefix is not changed). None: the current prefix,
            or the one ``set_prefix(self, name)`` names first thing in ``__init__``.
        singleton: At most one instance per prefix, found again with ``fetch(cls)``.
        type_id: The name records store for the class (default ``module:qualname``). Give one
            when the class may move or be defined under another module name (``__main__``).
    """
    if prefix is not None:
        validate_prefix_name(prefix)

    def decorate(cls: T) -> T:
        for name in ("__setattr__", "__getattribute__", "__delattr__", "__slots__"):
            if name in cls.__dict__:
                raise TypeError(
                    f"@memo class {cls.__qualname__} must not define {name}: its attributes "
                    "are stored by hotcopy"
                )
        info = MemoInfo(type_id or f"{cls.__module__}:{cls.__qualname__}", prefix, singleton)
        cls.__hc_memo__ = info  # type: ignore[attr-defined]
        cls.__init__ = _wrap_init(cls.__init__)  # type: ignore[misc]
        cls.__getattribute__ = _memo_getattribute  # type: ignore[method-assign,assignment]
        cls.__setattr__ = _memo_setattr  # type: ignore[method-assign,assignment]
        cls.__delattr__ = _memo_delattr  # type: ignore[method-assign,assignment]
        if "__reduce_ex__" not in cls.__dict__ and "__reduce__" not in cls.__dict__:
            cls.__reduce_ex__ = refuse_copy  # type: ignore[method-assign]
        eq: object = cls.__eq__  # typed as object: mypy cannot compare the two signatures
        hash_: object = cls.__hash__
        if eq is object.__eq__ and hash_ is object.__hash__:
            # Equality stays identity (one Python object per record); the hash is the record
            # id's so that it agrees with a weak proxy's, which equals its target.
            cls.__hash__ = persisted_hash  # type: ignore[method-assign,assignment]
        register_type(info.type_id, functools.partial(_instantiate, cls), cls)
        return cls

    return decorate if cls is None else decorate(cls)


def memo_info(cls: type) -> MemoInfo:
    """The ``@memo`` settings of ``cls`` itself (a subclass must be decorated on its own)."""
    info = cls.__dict__.get("__hc_memo__")
    if not isinstance(info, MemoInfo):
        raise TypeError(
            f"{cls.__qualname__} is not a @memo class"
            + (": decorate the subclass with @memo too" if hasattr(cls, "__hc_memo__") else "")
        )
    return info


def _instantiate(cls: type[Any], handle: Handle) -> Any:
    obj = cast(Any, cls).__new__(cls)  # a loaded object is rebuilt from its record, not by __init__
    object.__setattr__(obj, "_hc_state", handle)
    return obj


def _wrap_init(init: Callable[..., None]) -> Callable[..., None]:
    @functools.wraps(init)
    def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
        if "_hc_state" in self.__dict__:
            init(self, *args, **kwargs)  # a subclass's __init__ calling super().__init__()
            return
        info = memo_info(type(self))
        space = _api.object_space()
        handle = space.new_handle(info.type_id, singleton=info.singleton)
        object.__setattr__(self, "_hc_state", handle)
        _constructing.append((self, handle))
        try:
            init(self, *args, **kwargs)
            if handle.prefix is None:
                place(self, handle, None)
        except BaseException:
            if handle.prefix is not None:
                _undo_creation(handle)
            raise
        finally:
            _constructing.pop()

    return __init__


def construction_prefix() -> str | None:
    """The prefix of the innermost ``@memo`` object being constructed, or None outside any.

    Containers created in an ``__init__`` start on that object's prefix (dbzero: "this index
    starts on the 'document-archive' prefix"); an object not placed yet is placed now, on the
    prefix its first attribute would have chosen (set_prefix can no longer come after this).
    """
    if not _constructing:
        return None
    obj, handle = _constructing[-1]
    if handle.prefix is None:
        place(obj, handle, None)
    return handle.placed_prefix()


def place(obj: Any, handle: Handle, prefix: str | None) -> None:
    """Decide ``obj``'s prefix and write its first record there."""
    info = memo_info(type(obj))
    if prefix is None:
        prefix = info.prefix
    if prefix is None:
        try:
            prefix = handle.space.current_name()
        except RuntimeError:
            raise RuntimeError(
                f"cannot place a new {type(obj).__qualname__}: no prefix is current. Open one "
                "with hotcopy.storage.open(name), scope the class with @memo(prefix=...), or "
                "call hotcopy.storage.set_prefix(self, name) first thing in __init__"
            ) from None
    handle.prefix = prefix
    try:
        handle.space.create(handle, {"class": info.type_id, "attrs": {}})
    except BaseException:
        handle.prefix = None
        raise
    handle.space.track(obj, handle)


def _undo_creation(handle: Handle) -> None:
    """``__init__`` raised after the object was placed: take its record back out."""
    space = handle.space
    record = space.prefix(handle.placed_prefix()).get(handle.key)
    if record is not None:
        released = space.destroy(handle.placed_prefix(), handle.uuid, record)
        space.collect(handle.placed_prefix(), released)


def set_prefix(obj: Any, prefix: str | None) -> None:
    """Place ``obj`` on ``prefix`` (created or opened ``"rw"``); the first statement of
    ``__init__``, before any attribute is set. ``None`` means no dynamic scope (as in dbzero):
    the class's ``@memo(prefix=...)``, else the current prefix.

    Raises:
        ScopeError: called after the object was placed (an attribute was set, or ``__init__``
            returned), or naming another prefix than the class's ``@memo(prefix=...)``.
    """
    handle = handle_of(obj)
    if prefix is not None:
        validate_prefix_name(prefix)
    cls_name = type(obj).__qualname__
    if handle.prefix is not None:
        raise ScopeError(
            f"set_prefix({cls_name}, {prefix!r}) came too late: the object is already on "
            f"prefix {handle.prefix!r}. Call set_prefix(self, name) as the first statement of "
            f"{cls_name}.__init__, before any attribute is set",
            prefix=prefix,
            placed=handle.prefix,
        )
    scope = memo_info(type(obj)).prefix
    if scope is not None and prefix is not None and scope != prefix:
        raise ScopeError(
            f"{cls_name} is scoped to prefix {scope!r} by @memo(prefix=...); set_prefix cannot "
            f"move its instances to {prefix!r}. Drop prefix= from @memo to scope dynamically",
            prefix=prefix,
            placed=scope,
        )
    place(obj, handle, prefix)


def _class_attr(cls: type, name: str) -> Any:
    for klass in cls.__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name]
    return _MISSING


def _is_internal(name: str) -> bool:
    return name.startswith("_hc_") or (name.startswith("__") and name.endswith("__"))


def _memo_getattribute(self: Any, name: str) -> Any:
    if _is_internal(name):
        return object.__getattribute__(self, name)
    attr = _class_attr(type(self), name)
    if attr is not _MISSING and hasattr(type(attr), "__get__"):
        return object.__getattribute__(self, name)  # methods, properties: never stored
    handle: Handle = object.__getattribute__(self, "_hc_state")
    if handle.prefix is not None:
        attrs = handle.space.read(handle)["attrs"]
        if name in attrs:
            return decode(attrs[name], handle.space, handle.prefix)
    return object.__getattribute__(self, name)  # class default, __getattr__ or AttributeError


def _memo_setattr(self: Any, name: str, value: Any) -> None:
    if _is_internal(name):
        object.__setattr__(self, name, value)
        return
    attr = _class_attr(type(self), name)
    if attr is not _MISSING and hasattr(type(attr), "__set__"):
        object.__setattr__(self, name, value)  # a property setter stores through us again
        return
    if attr is not _MISSING and hasattr(type(attr), "__get__"):
        raise TypeError(
            f"{type(self).__qualname__}.{name} is a method; a stored attribute cannot shadow it"
        )
    handle: Handle = object.__getattribute__(self, "_hc_state")
    if handle.prefix is None:
        place(self, handle, None)
    space = handle.space
    space.read(handle)  # the object must still exist before encoding may move a container
    # Encoding may move an empty container to this prefix (auto-hardening): read after it.
    encoded = encode(value, handle, f"{type(self).__qualname__}.{name}")
    record = space.read(handle)
    old = record["attrs"].get(name, _MISSING)
    record["attrs"][name] = encoded
    space.write(handle, record)
    space.retarget(
        handle.placed_prefix(), iter_refs(encoded), [] if old is _MISSING else iter_refs(old)
    )


def _memo_delattr(self: Any, name: str) -> None:
    if _is_internal(name):
        object.__delattr__(self, name)
        return
    handle: Handle = object.__getattribute__(self, "_hc_state")
    if handle.prefix is None:
        raise AttributeError(name)
    record = handle.space.read(handle)
    if name not in record["attrs"]:
        raise AttributeError(f"{type(self).__qualname__} object has no attribute {name!r}")
    old = record["attrs"].pop(name)
    handle.space.write(handle, record)
    handle.space.retarget(handle.prefix, [], iter_refs(old))
