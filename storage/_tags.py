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
from ._space import TAG, handle_of, instances
from ._tree import MemberSet

Tag = str | EnumValue


def tag_key(value: object) -> str:
    """The stored form of a tag: ``s:<text>`` or ``e:<enum type id>.<value>``."""
    if isinstance(value, str):
        return "s:" + value
    if isinstance(value, EnumValue):
        return f"e:{value.type_id}.{value.name}"
    raise TypeError(f"a tag is a str or an enum value, not {type(value).__name__}")


def _tag_value(key: str, prefix: str) -> Tag:
    """The tag stored as ``key`` on an object of ``prefix`` (an enum value belongs to it)."""
    if key.startswith("s:"):
        return key[2:]
    type_id, name = key[2:].rsplit(".", 1)
    return enum_type(type_id).value(name, prefix)


class Tags:
    """The tags of one object: ``tags(obj).add(Role.ADMIN)``, ``"x" in tags(obj)``."""

    def __init__(self, obj: Any) -> None:
        # The object itself, not only its handle, is held: ``hc.tags(found_again).remove(t)``
        # must not let the object's last handle go before the tag does, or the finalizer sees a
        # tagged object, keeps it, and nothing ever collects it once untagged.
        self._obj = obj
        self._handle = handle_of(obj)

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
        keys = self._handle.space.read(self._handle)["tags"]
        return iter([_tag_value(key, self._handle.placed_prefix()) for key in keys])

    def __len__(self) -> int:
        return len(self._handle.space.read(self._handle)["tags"])

    def __repr__(self) -> str:
        return f"<tags {list(self)!r}>"


def tags(obj: Any) -> Tags:
    """The tags of a persisted object (placing it first if it is still in ``__init__``)."""
    handle = handle_of(obj)
    if handle.prefix is None:
        place(obj, handle, None)
    return Tags(obj)


def find(*query: type | Tag, prefix: str | None = None) -> list[Any]:
    """The objects matching every term of ``query``: instances of each class given (subclasses
    included) that carry each tag given.

    Looks on ``prefix``, else the first class's ``@memo(prefix=...)``, else the current prefix.
    With a tag, objects come in the order the first tag was given to them; with classes only,
    each class's instances oldest first (a class, then its subclasses defined in this process).

    Example::

        hc.find(User)                    # every live User (and subclass) instance
        hc.find(User, Role.ADMIN)        # those tagged Role.ADMIN
        hc.find("active", "paid")        # any object with both tags
    """
    classes = [term for term in query if isinstance(term, type)]
    keys = [tag_key(term) for term in query if not isinstance(term, type)]
    if not query:
        raise TypeError("find() needs a class or a tag, e.g. find(User) or find(User, 'active')")
    space = _api.object_space()
    if prefix is None:
        scopes = [memo_info(cls).prefix for cls in classes if "__hc_memo__" in cls.__dict__]
        prefix = next((scope for scope in scopes if scope is not None), None)
    name = prefix if prefix is not None else space.current_name()
    px = space.prefix(name)
    with px.pinned():
        if keys:
            found = MemberSet(px, TAG + keys[0]).members()
            for key in keys[1:]:
                others = set(MemberSet(px, TAG + key).members())
                found = [uuid for uuid in found if uuid in others]
        else:
            found = [uuid for type_id in _type_ids(classes[0]) for uuid in instances(px, type_id)]
        objects = [space.load(name, uuid) for uuid in found]
    return [obj for obj in objects if all(isinstance(obj, cls) for cls in classes)]


def _type_ids(cls: type) -> list[str]:
    """The type ids of ``cls`` and of its subclasses known to this process, if ``@memo``."""
    found: list[str] = []
    pending, seen = [cls], set()
    while pending:
        klass = pending.pop(0)
        if klass in seen:
            continue
        seen.add(klass)
        if "__hc_memo__" in klass.__dict__ and memo_info(klass).type_id not in found:
            found.append(memo_info(klass).type_id)
        pending.extend(type.__subclasses__(klass))
    return found
