"""Persisted objects on prefixes (dbzero's "prefixes and scoped types"): the public object API.

Usage::

    import hotcopy.storage as hc

    @hc.memo(prefix="settings")             # every instance on "settings"
    class Settings:
        def __init__(self, theme): self.theme = theme

    @hc.memo                                # instances on the current prefix, or ...
    class Project:
        def __init__(self, name, client):
            hc.set_prefix(self, f"client_{client}")   # ... here: first statement of __init__
            self.name = name
            self.revisions = hc.index()               # starts on the object's prefix

    hc.init(root); hc.open("work", "rw")
    s = Settings("dark"); p = Project("site", "acme")
    hc.tags(p).add("active"); hc.find(Project, "active", prefix="client_acme")  # [p]
    hc.find(Project, prefix="client_acme")  # [p]: every live Project there
    s.owner = hc.weak_proxy(p)              # across prefixes: weak only
    hc.commit()                             # commits every open prefix with changes
    hc.fetch(Settings, hc.uuid(s)); hc.get_prefix_of(s).name  # "settings"

Rules (the contract; see the modules named for the mechanism):

* Placement (``_memo``): ``set_prefix(self, name)`` if called first in ``__init__``, else
  ``@memo(prefix=...)``, else the current prefix; decided at the first attribute write (or the
  end of ``__init__``). A prefix that is needed and not open is opened on demand: read-only
  to read from it, reopened for writing in place at its first change (created if it does not
  exist); the current prefix is never changed. Containers start on the current prefix, or
  inside a ``@memo`` ``__init__`` on that object's prefix.
* References (``_values``): attributes hold JSON types, bytes, enum values, weak proxies, and
  strong references to ``@memo`` objects and containers *of the same prefix*; any other strong
  reference raises :class:`CrossPrefixReference` -- except an empty, unreferenced, untagged
  container, which moves to the holder's prefix (auto-hardening).
* Lifetime (``_space``): an object is kept by strong references stored on its prefix
  (``getrefcount``), by tags, or by being its class's singleton on the prefix. Without any of
  these it lives while this process holds a handle (``hc.tags(obj)`` counts as one while it
  is used); once the last handle is dropped, the next ``hotcopy.storage.commit()`` (or
  ``close()`` of its prefix) deletes it, then whatever only it kept alive. Handles held by
  *other* processes do not count (each process decides for its own handles).
* Singletons: ``@memo(singleton=True)``: ``Cls(...)`` creates the one instance of its prefix
  (:class:`SingletonExists` if there is one), ``fetch(Cls)`` returns it
  (:class:`ObjectNotFound` before it was created; never created implicitly).
* Durability: writes are pending in each prefix's transaction (holding its write lease) until
  ``commit()``, which commits every open prefix, one atomic commit per prefix; ``close()``
  commits what is pending on the prefixes it closes, as dbzero's does. Concurrent
  writers on one prefix use ``with hc.get_prefix_of(obj).transaction():`` around
  read-modify-write code, or retry on :class:`TransactionConflict`.
* Storage: records are JSON under ``obj/<uuid>``, tag members under ``tag/<tag>``, instances
  of each class under ``instances/<type id>``, singleton slots under ``singleton/<type id>`` of
  the object's prefix, containers and member sets as trees whose nodes are records under
  ``node/`` (``_tree``): a copy or restore of a prefix carries exactly its objects. Weak proxies
  into a restored prefix may expire (``expired()``).
"""

from __future__ import annotations

from typing import Any, TypeVar, overload

from . import _api
from ._containers import MemoIndex, MemoList
from ._enums import EnumType, EnumValue
from ._errors import ObjectNotFound
from ._memo import memo_info, place
from ._prefix import Prefix
from ._proxy import WeakProxy
from ._repository import validate_prefix_name
from ._space import SINGLETON, handle_of

T = TypeVar("T")


@overload
def fetch(cls: type[T], uuid: str | None = None, *, prefix: str | None = None) -> T: ...


@overload
def fetch(cls: str, /, *, prefix: str | None = None) -> Any: ...


def fetch(cls: type[T] | str, uuid: str | None = None, *, prefix: str | None = None) -> Any:
    """Load an object: ``fetch(uuid)``, ``fetch(Cls, uuid)`` (checking its class), or
    ``fetch(Cls)`` for a singleton class.

    A uuid from :func:`uuid` names the prefix to look on. A bare one (32 hex digits, as older
    hotcopy made them) and a singleton are looked for on ``prefix``, else the class's
    ``@memo(prefix=...)``, else the current prefix. A singleton is never created here: create
    it with ``Cls(...)`` (once per prefix).

    Raises:
        ObjectNotFound: no such object (or no instance of the singleton) on that prefix, or
            ``prefix`` is not the prefix the uuid names.
        TypeError: the object is not a ``cls``, or ``fetch(Cls)`` of a non-singleton class.
    """
    if isinstance(cls, str):
        if uuid is not None:
            raise TypeError("fetch(uuid) takes one uuid; fetch(cls, uuid) checks the class")
        name, key = _locate(cls, prefix)
        return _api.object_space().load(name, key, verify=True)
    scope = None if cls in (MemoList, MemoIndex) else memo_info(cls).prefix
    space = _api.object_space()
    if uuid is None:
        if cls in (MemoList, MemoIndex) or not memo_info(cls).singleton:
            raise TypeError(
                f"fetch({cls.__qualname__}) without a uuid is for singleton classes "
                "(@memo(singleton=True)); pass the uuid: fetch(cls, uuid)"
            )
        name = prefix or scope or space.current_name()
        key = space.prefix(name).get(SINGLETON + memo_info(cls).type_id)
        if key is None:
            raise ObjectNotFound(
                f"prefix {name!r} has no {cls.__qualname__} yet: create the singleton with "
                f"{cls.__qualname__}(...) first",
                prefix=name,
            )
    else:
        name, key = _locate(uuid, prefix, scope)
    obj = space.load(name, key, verify=True)
    if not isinstance(obj, cls):
        raise TypeError(
            f"object {key} on prefix {name!r} is a {type(obj).__qualname__}, "
            f"not a {cls.__qualname__}"
        )
    return obj


def uuid(obj: Any) -> str:
    """The id of a persisted object (or of a weak proxy's target, expired or not), naming its
    prefix: ``"<prefix>:<32 hex digits>"`` (prefix names have no ``:``), so :func:`fetch` and
    :func:`get_prefix_of` need nothing else. An object still in ``__init__`` is placed first."""
    if isinstance(obj, WeakProxy):
        prefix, key = obj._hc_prefix, obj._hc_uuid
    else:
        handle = handle_of(obj)
        if handle.prefix is None:
            place(obj, handle, None)
        prefix, key = handle.placed_prefix(), handle.uuid
    return f"{prefix}:{key}"


def _locate(uuid: str, prefix: str | None, default: str | None = None) -> tuple[str, str]:
    """(prefix, key) of a uuid: the prefix it names; for a bare one (older hotcopy), ``prefix``,
    else ``default``, else the current prefix."""
    named, _, key = uuid.rpartition(":")
    if not named:
        return prefix or default or _api.object_space().current_name(), key
    validate_prefix_name(named)
    if prefix is not None and prefix != named:
        raise ObjectNotFound(
            f"no object {uuid} on prefix {prefix!r}: its uuid says it lives on {named!r}",
            uuid=uuid,
            prefix=prefix,
        )
    return named, key


def get_prefix_of(obj: Any) -> Prefix:
    """The prefix ``obj`` belongs to, opened if need be (read-only until its first change);
    its ``.name`` names it. Prefixes are equal when they are the same prefix.

    ``obj`` is a persisted object, a container, a weak proxy (its target's prefix), a uuid
    from :func:`uuid`, a ``@memo`` class or an enum (their scope; the current prefix if
    unscoped), or an enum value (see ``_enums``: its scope, else the prefix it was taken on).
    """
    space = _api.object_space()
    if isinstance(obj, str):
        if ":" not in obj:
            raise ValueError(
                f"uuid {obj!r} does not name its prefix (made by an older hotcopy): "
                "fetch(uuid, prefix=...) where it lives"
            )
        return space.prefix(_locate(obj, None)[0])
    if isinstance(obj, WeakProxy):
        return space.prefix(obj._hc_prefix)
    if isinstance(obj, EnumValue):
        if obj.prefix is not None:
            return space.prefix(obj.prefix)
        obj = obj.enum
    if isinstance(obj, EnumType):
        return space.prefix(obj.prefix) if obj.prefix else space.prefix(space.current_name())
    if isinstance(obj, type):
        scope = memo_info(obj).prefix
        return space.prefix(scope) if scope else space.prefix(space.current_name())
    handle = handle_of(obj)
    if handle.prefix is None:
        # Still in __init__ before placement: report where it would go (no side effect).
        scope = memo_info(type(obj)).prefix
        return space.prefix(scope) if scope else space.prefix(space.current_name())
    return space.prefix(handle.prefix)


def getrefcount(obj: Any) -> int:
    """How many strong references stored on its prefix point to ``obj`` (pending included).

    Weak proxies, tags and in-memory handles are not counted.
    """
    if isinstance(obj, WeakProxy):
        obj = obj._hc_target()
    handle = handle_of(obj)
    if handle.prefix is None:
        return 0
    refs: int = handle.space.read(handle).get("refs", 0)
    return refs


def weak_proxy(obj: Any) -> WeakProxy:
    """A link to ``obj`` that may cross prefixes and does not keep it alive or count as a
    reference. Store it as an attribute or item of an object on any prefix."""
    if isinstance(obj, WeakProxy):
        return obj
    handle = handle_of(obj)
    return WeakProxy(handle.space, handle.placed_prefix(), handle.uuid)
