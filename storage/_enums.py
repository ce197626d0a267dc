"""Scoped enums: ``@enum(values=[...], prefix="user-roles")``.

An enum's definition lives in code; its values are stored by name wherever they are used (as
attribute values or tags), as ``{"$enum": {"type": ..., "value": ...}}``. Being values rather
than objects, they may be used on any prefix. Where they belong (``get_prefix_of``), as in
dbzero: a scoped enum's values to its ``prefix``; an unscoped enum's value to the prefix that
was current when it was taken (``Color.RED``), or, read from an object, to that object's prefix.
Values of one enum are equal (and hash alike) whatever prefix they belong to.
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

from . import _api
from ._errors import EnumRedefined, StorageError
from ._repository import validate_prefix_name

_types: dict[str, EnumType] = {}


class EnumValue:
    """One value of an enum, e.g. ``Role.ADMIN``: equal to (and hashed as) the same value
    of the same enum, whatever ``prefix`` it belongs to (None: taken with no prefix open)."""

    __slots__ = ("enum", "name", "prefix")

    enum: EnumType
    name: str
    prefix: str | None

    def __init__(self, enum: EnumType, name: str, prefix: str | None) -> None:
        object.__setattr__(self, "enum", enum)
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "prefix", prefix)

    @property
    def type_id(self) -> str:
        return self.enum.type_id

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("enum values are immutable")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, EnumValue):
            return NotImplemented
        return (self.type_id, self.name) == (other.type_id, other.name)

    def __hash__(self) -> int:
        return hash((self.type_id, self.name))

    def __reduce__(self) -> tuple[object, ...]:
        return (_value, (self.type_id, self.name, self.prefix))

    def __repr__(self) -> str:
        return f"{self.enum.__name__}.{self.name}"

    def __str__(self) -> str:
        return self.name


class EnumType:
    """What ``@enum`` turns a class into: its values as attributes, in definition order."""

    def __init__(self, name: str, type_id: str, values: Iterable[str], prefix: str | None) -> None:
        self.__name__ = name
        self.type_id = type_id
        self.prefix = prefix
        # Scoped: the values of its prefix. Unscoped: values of no prefix, and _on_prefix has
        # those taken on a prefix, made once each (so Color.RED is Color.RED on one prefix).
        self._values: dict[str, EnumValue] = {}
        self._on_prefix: dict[tuple[str, str], EnumValue] = {}
        for value in values:
            if not isinstance(value, str) or not value.isidentifier() or value.startswith("_"):
                raise ValueError(
                    f"enum {name}: value {value!r} must be a str that is a Python identifier "
                    "not starting with '_'"
                )
            if value in self._values:
                raise ValueError(f"enum {name}: value {value!r} is listed twice")
            self._values[value] = EnumValue(self, value, prefix)
        if not self._values:
            raise ValueError(f"enum {name}: give at least one value, e.g. values=['A', 'B']")

    def value(self, name: str, prefix: str | None = None) -> EnumValue:
        """The value ``name``, belonging to ``prefix`` (a scoped enum's to its own prefix)."""
        try:
            value = self._values[name]
        except KeyError:
            raise StorageError(
                f"enum {self.__name__} has no value {name!r} (stored data names a value the "
                "code no longer defines; add it back to values=[...])",
                type_id=self.type_id,
            ) from None
        if self.prefix is not None or prefix is None:
            return value
        on_prefix = self._on_prefix.get((prefix, name))
        if on_prefix is None:
            on_prefix = self._on_prefix[prefix, name] = EnumValue(self, name, prefix)
        return on_prefix

    def __getattr__(self, name: str) -> EnumValue:
        if name not in self.__dict__.get("_values", ()):
            raise AttributeError(f"enum {self.__name__} has no value {name!r}")
        return self.value(name, _current_prefix())

    def __iter__(self) -> Iterator[EnumValue]:
        current = _current_prefix()
        return iter([self.value(name, current) for name in self._values])

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, EnumValue) and value.type_id == self.type_id

    def __repr__(self) -> str:
        return f"<enum {self.__name__} {list(self._values)}>"


def enum(
    *, values: Iterable[str], prefix: str | None = None, type_id: str | None = None
) -> Callable[[type], EnumType]:
    """Class decorator making an enum whose values belong to ``prefix`` (None: the current one).

    Defining an enum again under the same type id with other values or another prefix raises
    :class:`EnumRedefined` (the same definition again is fine).

    Args:
        values: The value names, Python identifiers.
        prefix: The prefix the enum is scoped to.
        type_id: The name stored data uses for the enum (default ``module:qualname``).
    """
    if prefix is not None:
        validate_prefix_name(prefix)
    names = list(values)

    def decorate(cls: type) -> EnumType:
        tid = type_id or f"{cls.__module__}:{cls.__qualname__}"
        made = EnumType(cls.__name__, tid, names, prefix)
        made.__doc__ = cls.__doc__
        first = _types.get(tid)
        # The same definition again (a module reloaded, a notebook cell run twice) replaces the
        # first; another one would change what the values stored under this type id mean.
        if first is not None and ([v.name for v in first], first.prefix) != (names, prefix):
            raise EnumRedefined(
                f"enum {tid!r} is defined already, with values {[v.name for v in first]} on "
                f"prefix {first.prefix!r}; defining it again with values {names} on prefix "
                f"{prefix!r} is refused, as the values stored under it would change meaning. "
                "Give the new enum its own type_id=..., or restart the process to change it",
                type_id=tid,
                prefix=prefix,
            )
        _types[tid] = made
        return made

    return decorate


def enum_type(type_id: str) -> EnumType:
    """The enum registered as ``type_id`` (importing its module if need be)."""
    if type_id not in _types and ":" in type_id:
        with contextlib.suppress(ImportError):
            importlib.import_module(type_id.split(":", 1)[0])
    try:
        return _types[type_id]
    except KeyError:
        raise StorageError(
            f"no enum is registered as {type_id!r}: import the module that defines it first",
            type_id=type_id,
        ) from None


def _value(type_id: str, name: str, prefix: str | None = None) -> EnumValue:
    return enum_type(type_id).value(name, prefix)


def _current_prefix() -> str | None:
    """The current prefix's name, which an unscoped enum's value taken now belongs to."""
    try:
        return _api.get_current_prefix().name
    except RuntimeError:
        return None  # no prefix open: the value belongs to none yet
