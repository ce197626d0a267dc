"""The object space: persisted objects of one repository, their records, identity and lifetime.

Every persisted object (a ``@memo`` instance, a ``list()`` or an ``index()``) is one JSON record
under ``obj/<uuid>`` on its prefix::

    {"class": "<type id>", "refs": 2, "tags": [...], "attrs": {...}}      # a @memo object
    {"class": "$list", "refs": 1, "tags": [], "items": [...]}            # a small container
    {"class": "$list", "refs": 1, "tags": [], "root": 7, "size": 900, "next": 9}  # larger

A container's record is the header of its tree (``_tree``): items inline while they fit in one
node, else its nodes are records of their own. A prefix also keeps, per class, the uuids of its
instances (``instances/<type id>``, a ``_tree.MemberSet``) for ``find(cls)``.

``refs`` counts the strong references other records of the same prefix hold to it. The space
keeps one Python object per record (an identity map of weak references) and decides lifetime:
an object with no strong references, no tags and no singleton slot is kept only while this
process holds a handle to it; when the last handle goes, it is deleted by the next
``hotcopy.storage.commit()`` (dbzero's ``del obj; db0.commit()``). Finalizers only *note* a
dropped handle: a garbage collector pass may run in the middle of a prefix operation, so the
deletion itself waits for the commit.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import weakref
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from ._errors import (
    ObjectNotFound,
    ReferenceError,
    SingletonExists,
    StorageError,
    TransactionConflict,
)
from ._tree import MemberSet, Tree

if TYPE_CHECKING:
    from ._prefix import Prefix
    from ._repository import Repository

OBJ = "obj/"
SINGLETON = "singleton/"
TAG = "tag/"
INSTANCES = "instances/"
# Present once every @memo object of the prefix is in its class's instance set: a prefix
# written before instance sets existed gets them at its first new object (see _add_instance).
INSTANCES_COMPLETE = INSTANCES  # the bare namespace: no type id is empty
CONTAINER_TYPES = frozenset({"$list", "$index"})
# Plain collections other than list and dict, stored as {tag: [items]} (see _values).
COLLECTION_TAGS: dict[type, str] = {tuple: "$tuple", set: "$set", frozenset: "$frozenset"}

# type id -> builds the Python object for a record from its handle (set by @memo, containers).
_builders: dict[str, Callable[[Handle], Any]] = {}
# type id <-> @memo class: a class is a storable value, stored by its type id.
_classes: dict[str, type] = {}
_class_ids: dict[type, str] = {}


def register_type(type_id: str, build: Callable[[Handle], Any], cls: type | None = None) -> None:
    """Make records of class ``type_id`` loadable (and ``cls``, a ``@memo`` class, storable as a
    value); a later registration replaces an earlier one (a class redefined under the same
    name, as in a notebook or a reloaded module)."""
    _builders[type_id] = build
    if cls is not None:
        _classes[type_id] = cls
        _class_ids[cls] = type_id


def class_type_id(cls: type) -> str | None:
    """The type id of a ``@memo`` class, or None for any other class."""
    return _class_ids.get(cls)


def stored_class(type_id: str) -> type:
    """The ``@memo`` class registered as ``type_id`` (importing its module if need be)."""
    _builder(type_id)  # imports the module, or raises naming the type id
    cls = _classes.get(type_id)
    if cls is None:
        raise StorageError(f"{type_id!r} is not a @memo class", type_id=type_id)
    return cls


def _builder(type_id: str) -> Callable[[Handle], Any]:
    build = _builders.get(type_id)
    if build is None and ":" in type_id:
        # Records name their class as "module:qualname": importing the module runs its @memo.
        with contextlib.suppress(ImportError):
            importlib.import_module(type_id.split(":", 1)[0])
        build = _builders.get(type_id)
    if build is None:
        raise StorageError(
            f"no class is registered as {type_id!r}: import the module that defines it (or "
            "give the class the same @memo(type_id=...) it was stored with) before loading",
            type_id=type_id,
        )
    return build


class Handle:
    """What a Python object knows about its record. ``prefix`` is None until it is placed."""

    __slots__ = ("collectable", "prefix", "singleton", "space", "type_id", "uuid")

    def __init__(
        self,
        space: ObjectSpace,
        uuid: str,
        type_id: str,
        prefix: str | None = None,
        singleton: bool = False,
        collectable: bool = True,
    ) -> None:
        self.space = space
        self.uuid = uuid
        self.type_id = type_id
        self.prefix = prefix
        self.singleton = singleton
        # As last seen in the record: no refs, no tags, not a singleton. Only such objects
        # are noted for collection when their last handle goes.
        self.collectable = collectable

    @property
    def key(self) -> str:
        return OBJ + self.uuid

    def placed_prefix(self) -> str:
        if self.prefix is None:
            raise StorageError(
                f"the {self.type_id} object is not on any prefix yet: it is still in __init__ "
                "before its first attribute or set_prefix()",
                uuid=self.uuid,
            )
        return self.prefix


def collectable(record: dict[str, Any]) -> bool:
    return record.get("refs", 0) == 0 and not record.get("tags") and not record.get("singleton")


_COLLECTION_TAG_NAMES = frozenset(COLLECTION_TAGS.values())


def iter_refs(encoded: Any) -> Iterator[str]:
    """The uuids of the strong references (``{"$ref": uuid}``) inside an encoded value."""
    if isinstance(encoded, list):
        for item in encoded:
            yield from iter_refs(item)
    elif isinstance(encoded, dict):
        if len(encoded) == 1:
            ((tag, inner),) = encoded.items()
            if tag == "$ref":
                yield inner
                return
            if tag in _COLLECTION_TAG_NAMES:
                yield from iter_refs(inner)
                return
            if tag == "$dict":
                encoded = inner
            elif tag.startswith("$"):
                return  # $bytes, $weak, $enum, $class hold no strong reference
        for item in encoded.values():
            yield from iter_refs(item)


class ObjectSpace:
    """The persisted objects of one repository as seen by this process.

    Args:
        repository: Where the prefixes are.
        current_prefix: Returns the current prefix (raises ``RuntimeError`` when none is open).
    """

    def __init__(self, repository: Repository, current_prefix: Callable[[], Prefix]) -> None:
        self.repository = repository
        self._current_prefix = current_prefix
        self._live: dict[tuple[str, str], weakref.ref[Any]] = {}
        self._prune_at = 1024  # dead entries of _live are swept when it grows past this
        self._doomed: set[tuple[str, str]] = set()

    # -- prefixes ---------------------------------------------------------------------------

    def current_name(self) -> str:
        return self._current_prefix().name

    def prefix(self, name: str) -> Prefix:
        """The open prefix ``name``. One that is not open is opened read-only, as dbzero opens
        the prefix of an object accessed after its prefix was closed, and reopened for writing
        in place at its first change; one that does not exist yet is created (``"rw"``).

        Opening does not change the current prefix: scoped objects are fire-and-forget.
        """
        prefix = self.repository.open_prefixes().get(name)
        if prefix is not None:
            return prefix
        if self.repository.prefix_path(name).exists():
            return self.repository.open_prefix(name, "r", writable_on_demand=True)
        return self.repository.open_prefix(name, "rw")

    # -- identity and lifetime --------------------------------------------------------------

    def new_handle(self, type_id: str, *, singleton: bool = False) -> Handle:
        return Handle(self, os.urandom(16).hex(), type_id, singleton=singleton)

    def track(self, obj: Any, handle: Handle) -> None:
        """Enter a placed object in the identity map and watch for its last handle going."""
        if len(self._live) >= self._prune_at:
            # The finalizer never edits _live (it may run in the middle of an edit of it), so
            # dead entries are swept here, in amortized O(1).
            self._live = {key: ref for key, ref in self._live.items() if ref() is not None}
            self._prune_at = max(1024, 2 * len(self._live))
        self._live[(handle.placed_prefix(), handle.uuid)] = weakref.ref(obj)
        # Not at exit: no commit follows then, so there is nothing to note.
        weakref.finalize(obj, self._dropped, handle).atexit = False

    def moved(self, handle: Handle, old_prefix: str) -> None:
        ref = self._live.pop((old_prefix, handle.uuid), None)
        if ref is not None:
            self._live[(handle.placed_prefix(), handle.uuid)] = ref

    def live(self, prefix: str, uuid: str) -> Any:
        """The Python object this process holds for the record, or None."""
        ref = self._live.get((prefix, uuid))
        return None if ref is None else ref()

    def _dropped(self, handle: Handle) -> None:
        # A finalizer: runs wherever the last handle went, perhaps mid-way through a prefix
        # operation, so it only notes the object for the next collect_garbage().
        if handle.prefix is not None and handle.collectable and not self.repository.closed:
            self._doomed.add((handle.prefix, handle.uuid))

    def load(self, prefix: str, uuid: str, *, verify: bool = False) -> Any:
        """The object ``uuid`` of ``prefix`` (the one already in memory, if any).

        With ``verify``, check the record exists even when the object is in memory: another
        process (or a restore) may have deleted it since.
        """
        obj = self.live(prefix, uuid)
        if obj is not None and not verify:
            return obj
        record = self.prefix(prefix).get(OBJ + uuid)
        if record is None:
            raise ObjectNotFound(
                f"no object {uuid} on prefix {prefix!r}: it was deleted, never committed, or "
                "lives on another prefix (pass prefix=...)",
                uuid=uuid,
                prefix=prefix,
            )
        if obj is not None:
            return obj
        handle = Handle(
            self,
            uuid,
            record["class"],
            prefix,
            singleton=bool(record.get("singleton")),
            collectable=collectable(record),
        )
        obj = _builder(handle.type_id)(handle)
        self.track(obj, handle)
        return obj

    def exists(self, prefix: str, uuid: str) -> bool:
        return OBJ + uuid in self.prefix(prefix)

    # -- records ----------------------------------------------------------------------------

    def read(self, handle: Handle) -> dict[str, Any]:
        """The object's record as of the latest commit (or this process's pending change)."""
        prefix = handle.placed_prefix()
        record: dict[str, Any] | None = self.prefix(prefix).get(handle.key)
        if record is None:
            raise ReferenceError(
                f"the {handle.type_id} object {handle.uuid} no longer exists on prefix "
                f"{prefix!r} (deleted, or the prefix was restored to a state without it); "
                "fetch it again or drop this handle",
                uuid=handle.uuid,
                prefix=prefix,
            )
        handle.collectable = collectable(record)
        return record

    def write(self, handle: Handle, record: dict[str, Any]) -> None:
        self.prefix(handle.placed_prefix())[handle.key] = record
        handle.collectable = collectable(record)

    def create(self, handle: Handle, record: dict[str, Any]) -> None:
        """Write a new object's first record on ``handle.prefix`` (and its singleton slot)."""
        prefix = self.prefix(handle.placed_prefix())
        if handle.singleton:
            slot = SINGLETON + handle.type_id
            if slot in prefix:
                raise SingletonExists(
                    f"{handle.type_id} is a singleton and prefix {prefix.name!r} already has "
                    "its instance: use hotcopy.storage.fetch(cls) to get it",
                    prefix=prefix.name,
                    type_id=handle.type_id,
                )
            prefix[slot] = handle.uuid
            record["singleton"] = True
        record.setdefault("refs", 0)
        record.setdefault("tags", [])
        prefix[handle.key] = record
        if "attrs" in record:
            _add_instance(prefix, handle.type_id, handle.uuid)
        handle.collectable = collectable(record)

    def retarget(self, prefix: str, added: Iterable[str], removed: Iterable[str]) -> None:
        """Count strong references gained and lost by one record of ``prefix``.

        Gains are counted before losses, so re-assigning the same object never drops it; an
        object whose count reaches zero is deleted at once if nothing else keeps it.
        """
        delta = Counter(added)
        delta.subtract(removed)
        px = self.prefix(prefix)
        released = []
        for uuid, change in delta.items():
            if change == 0:
                continue
            record = px.get(OBJ + uuid)
            if record is None:
                continue  # a dangling reference (its prefix was restored): nothing to count
            record["refs"] = max(0, record.get("refs", 0) + change)
            px[OBJ + uuid] = record
            self._note(prefix, uuid, record)
            if record["refs"] == 0:
                released.append(uuid)
        self.collect(prefix, released)

    def _note(self, prefix: str, uuid: str, record: dict[str, Any]) -> None:
        obj = self.live(prefix, uuid)
        if obj is not None:
            handle_of(obj).collectable = collectable(record)

    def collect(self, prefix: str, uuids: Iterable[str]) -> None:
        """Delete the garbage among ``uuids`` (and what only it kept alive), iteratively."""
        px = self.prefix(prefix)
        pending = list(uuids)
        while pending:
            uuid = pending.pop()
            if self.live(prefix, uuid) is not None:
                continue  # a handle in this process keeps it; its finalizer will note it
            record = px.get(OBJ + uuid)
            if record is None or not collectable(record):
                continue
            pending.extend(self.destroy(prefix, uuid, record))

    def destroy(self, prefix: str, uuid: str, record: dict[str, Any]) -> list[str]:
        """Delete one record with its tags and singleton slot; return the uuids it released."""
        px = self.prefix(prefix)
        for tag in record.get("tags", []):
            MemberSet(px, TAG + tag).remove(uuid)
        slot = SINGLETON + record["class"]
        if record.get("singleton") and px.get(slot) == uuid:
            del px[slot]
        if "attrs" in record:
            MemberSet(px, INSTANCES + record["class"]).remove(uuid)
            refs = list(iter_refs(list(record["attrs"].values())))
        else:  # a container: its items are in its tree, whose nodes go with it
            refs = list(iter_refs(Tree(px, OBJ + uuid, record).drop()))
        del px[OBJ + uuid]
        released = []
        for target, count in Counter(refs).items():
            if target == uuid:
                continue  # a reference to itself dies with it
            target_record = px.get(OBJ + target)
            if target_record is None:
                continue
            target_record["refs"] = max(0, target_record.get("refs", 0) - count)
            px[OBJ + target] = target_record
            self._note(prefix, target, target_record)
            if target_record["refs"] == 0:
                released.append(target)
        return released

    def collect_garbage(self, prefixes: Collection[str] | None = None) -> None:
        """Delete the objects (of ``prefixes`` only, if given) whose last handle went since the
        previous call and that nothing keeps alive. Called by ``hotcopy.storage.commit()`` and
        ``close()`` before they commit."""
        # Swapped, never iterated in place: a finalizer may add to it at any moment.
        doomed, self._doomed = self._doomed, set()
        if prefixes is not None:
            later = {key for key in doomed if key[0] not in prefixes}
            self._doomed |= later
            doomed -= later
        by_prefix: dict[str, list[str]] = {}
        for prefix, uuid in doomed:
            by_prefix.setdefault(prefix, []).append(uuid)
        open_prefixes = self.repository.open_prefixes()
        for name, uuids in sorted(by_prefix.items()):
            px = open_prefixes.get(name)
            if px is None or not (px.mode == "rw" or px.writable_on_demand):
                continue  # closed (or opened read-only by the application): not ours to change
            try:
                px.begin()
            except TransactionConflict:
                # Only reads of ours were stale and nothing was pending (pending changes hold
                # the lease, which makes begin() a no-op): the collection reads afresh.
                px.begin()
            self.collect(name, uuids)


def instances(px: Prefix, type_id: str) -> list[str]:
    """The uuids of the live ``type_id`` objects of ``px``, oldest first."""
    with px.pinned():
        if INSTANCES_COMPLETE not in px:
            return _scan_instances(px).get(type_id, [])
        return MemberSet(px, INSTANCES + type_id).members()


def _add_instance(px: Prefix, type_id: str, uuid: str) -> None:
    if INSTANCES_COMPLETE not in px:
        # Objects stored before instance sets existed join theirs, once per prefix.
        for old_type, uuids in _scan_instances(px).items():
            MemberSet(px, INSTANCES + old_type).add(*uuids)
        px[INSTANCES_COMPLETE] = True
    MemberSet(px, INSTANCES + type_id).add(uuid)


def _scan_instances(px: Prefix) -> dict[str, list[str]]:
    """The uuids of every @memo object of ``px`` by type id, read from the records themselves
    (a prefix from before instance sets; reads every key once)."""
    found: dict[str, list[str]] = {}
    with px.pinned():
        for key in px:
            if key.startswith(OBJ):
                record = px[key]
                if "attrs" in record:
                    found.setdefault(record["class"], []).append(key[len(OBJ) :])
    return found


def refuse_copy(obj: Any, protocol: object = None) -> Any:
    """``__reduce_ex__`` of persisted objects and proxies: a copy would be a second Python object
    for one record (or drag the whole repository along), so copying and pickling are refused."""
    raise TypeError(
        f"a persisted {type(obj).__qualname__} cannot be copied or pickled: pass "
        "hotcopy.storage.uuid(obj) and fetch() it on the other side, or create a new object"
    )


def persisted_hash(obj: Any) -> int:
    """The hash of a persisted object: its record id's, as a weak proxy to it hashes."""
    return hash(handle_of(obj).uuid)


def handle_of(obj: Any) -> Handle:
    """The handle of a persisted object; ``TypeError`` for anything else."""
    try:
        handle = object.__getattribute__(obj, "_hc_state")
    except AttributeError:
        handle = None
    if not isinstance(handle, Handle):
        raise TypeError(
            f"{type(obj).__name__} is not a persisted object: decorate its class with "
            "@hotcopy.storage.memo, or use hotcopy.storage.list()/index()"
        )
    return handle
