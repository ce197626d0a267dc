"""Weak proxies: links to objects of any prefix that neither own nor keep their target.

A proxy is only ``(prefix, uuid)``: it holds no Python reference to its target and adds nothing
to its reference count, so deleting the target is never blocked by proxies pointing at it. Each
access looks the target up again; once it is gone (deleted and committed, or its prefix restored
to a state without it) the proxy is *expired*.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ._errors import ObjectNotFound, ReferenceError
from ._space import handle_of, refuse_copy

if TYPE_CHECKING:
    from ._space import ObjectSpace


class WeakProxy:
    """Stands in for a persisted object: attribute reads and writes pass through to it.

    Create one with :func:`weak_proxy`; test it with :func:`expired`.
    """

    __slots__ = ("__weakref__", "_hc_prefix", "_hc_space", "_hc_uuid")

    _hc_space: ObjectSpace
    _hc_prefix: str
    _hc_uuid: str

    def __init__(self, space: ObjectSpace, prefix: str, uuid: str) -> None:
        object.__setattr__(self, "_hc_space", space)
        object.__setattr__(self, "_hc_prefix", prefix)
        object.__setattr__(self, "_hc_uuid", uuid)

    def __reduce_ex__(self, protocol: Any) -> Any:
        refuse_copy(self)

    def _hc_target(self) -> Any:
        try:
            return self._hc_space.load(self._hc_prefix, self._hc_uuid)
        except ObjectNotFound:
            raise ReferenceError(
                f"weak proxy to object {self._hc_uuid} on prefix {self._hc_prefix!r} has "
                "expired: its target was deleted; check hotcopy.storage.expired(proxy) first",
                uuid=self._hc_uuid,
                prefix=self._hc_prefix,
            ) from None

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") and name.endswith("__"):
            raise AttributeError(name)  # copy/pickle probing must not resolve the target
        return getattr(self._hc_target(), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self._hc_target(), name, value)

    def __delattr__(self, name: str) -> None:
        delattr(self._hc_target(), name)

    def __eq__(self, other: object) -> bool:
        # Equal to any proxy to the same object and to the object itself, which it stands in
        # for (target == proxy too: the target's own __eq__ defers to this one).
        target: tuple[str | None, str]
        if isinstance(other, WeakProxy):
            target = (other._hc_prefix, other._hc_uuid)
        else:
            try:
                handle = handle_of(other)
            except TypeError:
                return NotImplemented
            target = (handle.prefix, handle.uuid)
        return (self._hc_prefix, self._hc_uuid) == target

    def __hash__(self) -> int:
        return hash(self._hc_uuid)  # as its target hashes (_space.persisted_hash)

    def __repr__(self) -> str:
        return f"<weak_proxy {self._hc_prefix}:{self._hc_uuid}>"


def expired(proxy: WeakProxy) -> bool:
    """True once the proxy's target no longer exists (deleted and committed, or restored away).

    Never raises for a missing target: that is what it reports.
    """
    if not isinstance(proxy, WeakProxy):
        raise TypeError(f"expired() takes a weak proxy, not {type(proxy).__name__}")
    return not proxy._hc_space.exists(proxy._hc_prefix, proxy._hc_uuid)
