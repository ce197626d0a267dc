"""Attribute and item values of persisted objects: Python value <-> tagged JSON.

JSON types are stored as they are. Everything else is a one-key object whose key starts with
``$``::

    {"$bytes": "<base64>"}                       bytes
    {"$ref": "<uuid>"}                           a strong reference (same prefix only)
    {"$weak": {"prefix": "p", "uuid": "u"}}      a weak proxy (any prefix)
    {"$enum": {"type": "<type id>", "value": "ADMIN"}}
    {"$dict": {...}}                             a plain dict that has a key starting with "$"
    {"$tuple": [...]}, {"$set": [...]}, {"$frozenset": [...]}
    {"$class": "<type id>"}                      a @memo class (code, not an object: any prefix)

Plain lists, dicts, tuples and sets are stored by value: mutating the list a read returned
changes nothing stored; assign it back, or use ``hotcopy.storage.list()``. They read back as the
type they were (a tuple as a tuple, a set as a set, at any depth). Other types are refused rather
than silently turned into something else.
"""

from __future__ import annotations

import base64
import math
from typing import Any

from . import _codec as codec
from ._enums import EnumValue, enum_type
from ._errors import CrossPrefixReference, StorageError
from ._proxy import WeakProxy
from ._space import (
    COLLECTION_TAGS,
    CONTAINER_TYPES,
    Handle,
    ObjectSpace,
    class_type_id,
    handle_of,
    stored_class,
)
from ._tree import size

_SCALARS = (str, int, bool, type(None))
_NESTED = (list, dict, *COLLECTION_TAGS)
_COLLECTIONS: dict[str, type] = {tag: kind for kind, tag in COLLECTION_TAGS.items()}


# Half the codec's limit: the record wraps the value and "$dict" may wrap every level, and this
# recursion (and decode's) takes two frames a level.
MAX_DEPTH = codec.MAX_DEPTH // 2


class _TooDeep(Exception):
    pass


def encode(value: Any, owner: Handle, path: str = "value") -> Any:
    """Encode ``value`` to be held by the (placed) object ``owner``; ``path`` names it in errors.

    Raises:
        CrossPrefixReference: ``value`` (or something inside it) is an object of another prefix
            that cannot be moved to ``owner``'s prefix.
        TypeError: a value of a type that cannot be stored.
        ValueError: a value that is not JSON text once encoded (see ``_codec``), or lists and
            dicts nested deeper than :data:`MAX_DEPTH`.
    """
    try:
        return _encode(value, owner, path, 1)
    except _TooDeep:
        raise codec.too_deep(path, MAX_DEPTH) from None


def _encode(value: Any, owner: Handle, path: str, depth: int) -> Any:
    kind = type(value)
    if kind in _SCALARS:
        return value
    if kind is float:
        if not math.isfinite(value):
            raise ValueError(f"{path}: {value!r} is not a JSON number; store it as a str")
        return value
    if kind is bytes:
        return {"$bytes": base64.b64encode(value).decode("ascii")}
    if kind in _NESTED and depth > MAX_DEPTH:
        raise _TooDeep
    if kind is list:
        return [_encode(item, owner, f"{path}[{i}]", depth + 1) for i, item in enumerate(value)]
    if kind in COLLECTION_TAGS:
        # Two levels: stored as a list inside a one-key dict, each counted by the codec's limit.
        items = [_encode(item, owner, f"{path}[{i}]", depth + 2) for i, item in enumerate(value)]
        return {COLLECTION_TAGS[kind]: items}
    if kind is dict:
        out = {}
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{path}: dict keys must be str, not {type(key).__name__}")
            out[key] = _encode(item, owner, f"{path}[{key!r}]", depth + 1)
        return {"$dict": out} if any(key.startswith("$") for key in out) else out
    if isinstance(value, WeakProxy):
        return {"$weak": {"prefix": value._hc_prefix, "uuid": value._hc_uuid}}
    if isinstance(value, EnumValue):
        return {"$enum": {"type": value.type_id, "value": value.name}}
    type_id = class_type_id(value) if isinstance(value, type) else None
    if type_id is not None:
        return {"$class": type_id}
    try:
        target = handle_of(value)
    except TypeError:
        raise TypeError(
            f"{path}: {kind.__name__} is not storable; use JSON types, tuples, sets, bytes, "
            "@memo objects and classes, hotcopy.storage.list()/index(), enum values or "
            "weak_proxy(obj)"
        ) from None
    return {"$ref": _strong_target(target, owner, path)}


def _strong_target(target: Handle, owner: Handle, path: str) -> str:
    if target.space is not owner.space:
        raise StorageError(
            f"{path}: the {target.type_id} object comes from a repository that was closed or "
            "re-opened; fetch it again from the current one",
            uuid=target.uuid,
        )
    source_prefix = owner.placed_prefix()
    target_prefix = target.placed_prefix()
    target.space.read(target)  # ReferenceError for a handle whose object is gone: no dangling ref
    if target_prefix == source_prefix:
        return target.uuid
    if target.type_id in CONTAINER_TYPES and _harden(target, source_prefix):
        return target.uuid
    if target.type_id in CONTAINER_TYPES:
        what = "a non-empty or referenced container"  # an empty, unreferenced one just moves
    else:
        what = f"a {target.type_id} object"
    raise CrossPrefixReference(
        f"{path}: an object on prefix {source_prefix!r} cannot hold a strong reference to "
        f"{what} on prefix {target_prefix!r}; link across prefixes with "
        "hotcopy.storage.weak_proxy(obj)",
        source_prefix=source_prefix,
        target_prefix=target_prefix,
        uuid=target.uuid,
    )


def _harden(container: Handle, prefix: str) -> bool:
    """Auto-hardening: move an empty, unreferenced, untagged container to ``prefix``.

    Such a container carries nothing but its identity, so moving it (same uuid) loses nothing
    and keeps an object and its containers on one prefix. Returns False when it is not movable.
    """
    space = container.space
    old = container.placed_prefix()
    source = space.prefix(old)
    record = source.get(container.key)
    if record is None or size(record) or record.get("refs") or record.get("tags"):
        return False
    del source[container.key]
    container.prefix = prefix
    space.prefix(prefix)[container.key] = record
    space.moved(container, old)
    return True


def decode(encoded: Any, space: ObjectSpace, prefix: str) -> Any:
    """Invert :func:`encode` for a value held by an object of ``prefix``."""
    if isinstance(encoded, list):
        return [decode(item, space, prefix) for item in encoded]
    if not isinstance(encoded, dict):
        return encoded
    if len(encoded) == 1:
        ((tag, inner),) = encoded.items()
        if tag == "$ref":
            return space.load(prefix, inner)
        if tag == "$bytes":
            return base64.b64decode(inner)
        if tag == "$weak":
            return WeakProxy(space, inner["prefix"], inner["uuid"])
        if tag == "$enum":
            return enum_type(inner["type"]).value(inner["value"], prefix)
        if tag in _COLLECTIONS:
            return _COLLECTIONS[tag](decode(item, space, prefix) for item in inner)
        if tag == "$class":
            return stored_class(inner)
        if tag == "$dict":
            encoded = inner
    return {key: decode(item, space, prefix) for key, item in encoded.items()}
