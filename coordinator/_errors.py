"""The root of hotcopy's exception tree, and the lease errors.

Every layer's errors descend from :class:`HotcopyError`, which lives here because the
coordinator is the lowest layer (storage and workers import it, never the other way).
Leaves also subclass the builtin that fits, so ``except TimeoutError`` keeps working.
Each error keeps its fields and pickles (workers send them across processes).
"""

from __future__ import annotations

from typing import Any


class HotcopyError(Exception):
    """Base of every error hotcopy raises on purpose."""

    def __init__(self, message: str, **fields: Any) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields
        for key, value in fields.items():
            setattr(self, key, value)

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.fields))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type[HotcopyError], message: str, fields: dict[str, Any]) -> HotcopyError:
    error = cls.__new__(cls)
    HotcopyError.__init__(error, message, **fields)
    return error


class LeaseError(HotcopyError):
    """A lease could not be granted, kept or used."""


class LeaseTimeout(LeaseError, TimeoutError):
    """No grant came within the timeout."""


class WouldBlock(LeaseError, BlockingIOError):
    """A ``_nowait`` call would have had to wait."""


class LeaseFenced(LeaseError):
    """The lease's fencing token is no longer current (its TTL expired or it was released)."""


class CoordinatorUnavailable(LeaseError, ConnectionError):
    """No coordinator could be reached or started for the repository.

    Raised when connecting (or reconnecting after a coordinator died) fails for longer
    than the connect timeout. Check that ``ROOT/.hotcopy/`` is writable by this user and
    that ``python -m hotcopy.coordinator ROOT`` starts.
    """


class ClientClosed(LeaseError):
    """The client was closed by its owner; open a new one with ``connect()``.

    Kept apart from :class:`CoordinatorUnavailable` ("closed by you" versus "peer died").
    """


class LeaseTableFull(LeaseError):
    """The coordinator's fixed-size lease table has no free slot left."""


class UnsafePlace(HotcopyError, PermissionError):
    """A directory or file hotcopy would use can be changed by someone it does not trust.

    ``path`` names it; the message says how to make it safe (``chmod``, ``chown``, or running
    as its owner). Nothing was read or written there.
    """
