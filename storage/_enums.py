"""Scoped enums: ``@enum(values=[...], prefix="user-roles")``.

An enum's definition lives in code; its values are stored by name wherever they are used (as
attribute values or tags), as ``{"$enum": {"type": ..., "value": ...}}``. Being values rather
than objects, they may be used on any prefix; the enum's ``prefix`` is where the enum and its
values belong (``get_prefix_of(Role)``, ``get_prefix_of(Role.ADMIN)``).
"""

from __future__ import annotations

import contextlib
import importlib
from collections.abc import Callable, Iterable, Iterator

from ._errors import StorageError
from ._repository import validate_prefix_name

_types: dict[str, EnumType] = {}


class EnumValue:
    """One value of a scoped enum, e.g. ``Role.ADMIN``. Hashable; equal only to itself."""

    __slots__ = ("enum", "name")

    enum: EnumType
    name: str

    def __init__(self, enum: EnumType, name: str) -> None:
        object.__setattr__(self, "enum", enum)
        object.__setattr__(self, "name", name)

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
        return (_value, (self.type_id, self.name))

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
        self._values: dict[str, EnumValue] = {}
        for value in values:
            if not isinstance(value, str) or not value.isidentifier() or value.startswith("_"):
                raise ValueError(
                    f"enum {name}: value {value!r} must be a str that is a Python identifier "
                    "not starting with '_'"
                )
            if value in self._values:
                raise ValueError(f"enum {name}: value {value!r} is listed twice")
            self._values[value] = EnumValue(self, value)
        if not self._values:
            raise ValueError(f"enum {name}: give at least one value, e.g. values=['A', 'B']")

    def value(self, name: str) -> EnumValue:
        try:
            return self._values[name]
        except KeyError:
            raise StorageError(
                f"enum {self.__name__} has no value {name!r} (stored data names a value the "
                "code no longer defines; add it back to values=[...])",
                type_id=self.type_id,
            ) from None

    def __getattr__(self, name: str) -> EnumValue:
        try:
            return self.__dict__["_values"][name]  # type: ignore[no-any-return]
        except KeyError:
            raise AttributeError(f"enum {self.__name__} has no value {name!r}") from None

    def __iter__(self) -> Iterator[EnumValue]:
        return iter(self._values.values())

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, value: object) -> bool:
        return isinstance(value, EnumValue) and value.enum is self

    def __repr__(self) -> str:
        return f"<enum {self.__name__} {list(self._values)}>"


def enum(
    *, values: Iterable[str], prefix: str | None = None, type_id: str | None = None
) -> Callable[[type], EnumType]:
    """Class decorator making an enum whose values belong to ``prefix`` (None: the current one).

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


def _value(type_id: str, name: str) -> EnumValue:
    return enum_type(type_id).value(name)
