"""Tags: labels (``str`` or scoped enum values) on persisted objects, and lookup by tag.

A tag lives on the tagged object's prefix, twice: in the object's record (``"tags"``) and in
the tag's member set ``tag/<tag key>`` (a ``_tree.MemberSet``: the uuids in tagging order),
which :func:`find` reads without scanning. A tagged object is kept alive by its tags (dbzero
counts them as references).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from . import _api
from ._enums import EnumValue, enum_type
from ._memo import memo_info, place
from ._space import TAG, Handle, handle_of
from ._tree import MemberSet

Tag = str | EnumValue


def tag_key(value: object) -> str:
    """The stored form of a tag: ``s:<text>`` or ``e:<enum type id>.<value>``."""
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, EnumValue):
        return f"e:{value.type_id}.{value.name}"
    raise TypeError(f"a tag is a str or an enum value, not {type(value).__name__}")


def _tag_value(key: str) -> Tag:
    if key.startswith("s:"):
        return key[2:]
    type_id, name = key[2:].rsplit(".", 1)
    return enum_type(type_id).value(name)


class Tags:
    """The tags of one object: ``tags(obj).add(Role.ADMIN)``, ``"x" in tags(obj)``."""

    def __init__(self, handle: Handle) -> None:
        self._handle = handle

    def add(self, *values: Tag) -> None:
        """Add tags; adding one the object already has changes nothing."""
        self._change([tag_key(value) for value in values], add=True)

    def remove(self, *values: Tag) -> None:
        """Remove tags; removing one the object does not have changes nothing."""
        self._change([tag_key(value) for value in values], add=False)

    def _change(self, keys: list[str], *, add: bool) -> None:
        handle = self._handle
        space = handle.space
        record = space.read(handle)
        prefix = space.prefix(handle.placed_prefix())
        changed = False
        for key in keys:
            if (key in record["tags"]) == add:
                continue
            changed = True
            if add:
                record["tags"].append(key)
                MemberSet(prefix, TAG + key).add(handle.uuid)
            else:
                record["tags"].remove(key)
                MemberSet(prefix, TAG + key).remove(handle.uuid)
        if changed:
            space.write(handle, record)

    def __contains__(self, value: object) -> bool:
        return tag_key(value) in self._handle.space.read(self._handle)["tags"]

    def __iter__(self) -> Iterator[Tag]:
        return iter([_tag_value(key) for key in self._handle.space.read(self._handle)["tags"]])

    def __len__(self) -> int:
        return len(self._handle.space.read(self._handle)["tags"])

    def __repr__(self) -> str:
        return f"<tags {list(self)!r}>"


def tags(obj: Any) -> Tags:
    """The tags of a persisted object (placing it first if it is still in ``__init__``)."""
    handle = handle_of(obj)
    if handle.prefix is None:
        place(obj, handle, None)
    return Tags(handle)


def find(cls: type, *values: Tag, prefix: str | None = None) -> list[Any]:
    """Objects of ``cls`` (subclasses included) carrying every tag in ``values``.

    Looks on ``prefix``, else the class's ``@memo(prefix=...)``, else the current prefix; in
    the order the first tag was given to them.

    Example::

        hc.tags(user).add(Role.ADMIN)
        hc.find(User, Role.ADMIN)  # [user]
    """
    if not values:
        raise TypeError("find() needs at least one tag, e.g. find(User, 'active')")
    space = _api.object_space()
    if prefix is None and "__hc_memo__" in cls.__dict__:
        prefix = memo_info(cls).prefix
    name = prefix if prefix is not None else space.current_name()
    px = space.prefix(name)
    keys = [tag_key(value) for value in values]
    with px.pinned():
        found = MemberSet(px, TAG + keys[0]).members()
        for key in keys[1:]:
            others = set(MemberSet(px, TAG + key).members())
            found = [uuid for uuid in found if uuid in others]
        objects = [space.load(name, uuid) for uuid in found]
    return [obj for obj in objects if isinstance(obj, cls)]
