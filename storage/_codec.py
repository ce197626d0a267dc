"""Value codec: JSON types or bytes, round-tripping exactly.

Only values that survive the trip unchanged are accepted, and this module is where that is
decided. A tuple would come back as a list and an ``IntEnum`` as an ``int``: ``TypeError``.
``NaN`` and ``Infinity`` are not JSON, a string with a lone surrogate is not UTF-8 (nor printable),
and JSON nested deeper than :data:`MAX_DEPTH` levels would exhaust the recursion of the readers
that parse it back: ``ValueError``. Each is refused up front rather than stored and later
unreadable.
"""

from __future__ import annotations

import json
import math
import reprlib
from typing import Any

VTYPE_BYTES = 0
VTYPE_JSON = 1

MAX_DEPTH = 512
"""The deepest nesting of lists and dicts in a stored JSON value (documented in the README)."""

_LEAVES = (str, int, float, bool, type(None))
# Made once: json.dumps with options builds a new encoder on every call. allow_nan=False makes
# NaN and Infinity an error; UTF-8 refuses a lone surrogate. Both say where only on a re-walk.
_ENCODE = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode
# The payload is always UTF-8 (see encode_value): json.loads would first guess the encoding of
# the bytes, a third of the cost of decoding a small value.
_DECODE = json.JSONDecoder().decode


def encode_value(value: Any) -> tuple[int, bytes]:
    """Return ``(vtype, payload)`` for a storable value.

    Raises:
        TypeError: a type that would not come back as itself (a tuple, a subclass, a set...).
        ValueError: ``NaN``/``Infinity``, a string (or dict key) with a lone surrogate, or
            lists and dicts nested deeper than :data:`MAX_DEPTH`; the message says where.
    """
    if type(value) is bytes:
        return VTYPE_BYTES, value
    try:
        _check(value, 1, False)
        try:
            return VTYPE_JSON, _ENCODE(value).encode("utf-8")
        except ValueError:  # also UnicodeEncodeError: find the culprit, or re-raise as is
            _check(value, 1, True)
            raise
    except _Refused as refused:
        raise refused.error(refused.message()) from None


def decode_value(vtype: int, payload: bytes) -> Any:
    """Invert :func:`encode_value`."""
    if vtype == VTYPE_BYTES:
        return payload
    if vtype == VTYPE_JSON:
        return _DECODE(payload.decode("utf-8"))
    raise ValueError(f"unknown value type {vtype}")


def check_text(text: str, what: str) -> None:
    """Refuse a ``str`` that UTF-8 cannot encode (a lone surrogate) with ``ValueError``."""
    if not text.isascii():
        problem = _surrogate(text)
        if problem:
            raise ValueError(f"{what} {reprlib.repr(text)} {problem}; use valid Unicode text")


def too_deep(path: str, limit: int = MAX_DEPTH) -> ValueError:
    """The error for lists and dicts nested past ``limit``, for ``path`` (a value's name)."""
    return ValueError(
        f"{path}: lists and dicts nested deeper than {limit} levels (or circular) cannot be stored"
    )


class _Refused(Exception):
    """Why a value is refused; ``steps`` collects the path to it from the inside out."""

    def __init__(self, error: type[Exception], problem: str, *, located: bool = True) -> None:
        super().__init__(problem)
        self.error = error
        self.problem = problem
        self.located = located
        self.steps: list[str | int] = []

    def message(self) -> str:
        if not self.located:
            return str(too_deep("value"))  # a path 513 levels long would not be one line
        path = "value" + "".join(f"[{reprlib.repr(step)}]" for step in reversed(self.steps))
        return f"{path}: {self.problem}"


def _check(value: Any, depth: int, strict: bool) -> None:
    """Refuse types that do not round-trip, and nesting past MAX_DEPTH.

    ``strict`` also refuses non-finite floats and lone surrogates. The encoder finds those at
    no cost, so the strict walk runs only after it has failed, to say where.
    """
    kind = type(value)
    if kind is dict or kind is list:
        if depth > MAX_DEPTH:
            raise _Refused(ValueError, "", located=False)
        for step, item in value.items() if kind is dict else enumerate(value):
            if kind is dict:
                _check_dict_key(step, strict)
            if strict or type(item) not in _LEAVES:
                try:
                    _check(item, depth + 1, strict)
                except _Refused as refused:
                    refused.steps.append(step)
                    raise
        return
    if kind in _LEAVES:
        if strict and kind is float and not math.isfinite(value):
            raise _Refused(ValueError, f"{value!r} is not a JSON number; store it as a str")
        if strict and kind is str and not value.isascii() and _surrogate(value):
            raise _Refused(ValueError, f"the str {_surrogate(value)}; store it as bytes")
        return
    hint = " (bytes are allowed only as the whole value)" if kind is bytes else ""
    raise _Refused(TypeError, f"{kind.__name__} is not storable; use JSON types or bytes{hint}")


def _check_dict_key(key: Any, strict: bool) -> None:
    if type(key) is not str:
        raise _Refused(TypeError, f"dict keys must be str, not {type(key).__name__}")
    if strict and not key.isascii() and _surrogate(key):
        raise _Refused(ValueError, f"the dict key {reprlib.repr(key)} {_surrogate(key)}")


def _surrogate(text: str) -> str:
    """Where ``text`` holds a lone surrogate, which UTF-8 cannot encode, or ``""``."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        return (
            f"holds a lone surrogate U+{ord(text[err.start]):04X} at index {err.start}, "
            "which UTF-8 cannot encode"
        )
    return ""
