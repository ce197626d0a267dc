"""Value codec: JSON types or bytes, round-tripping exactly.

Only types that survive the trip unchanged are accepted: a tuple would come back as a list and
an ``IntEnum`` as an ``int``, so they are refused up front rather than silently altered.
"""

from __future__ import annotations

import json
from typing import Any

VTYPE_BYTES = 0
VTYPE_JSON = 1

_SCALARS = (str, int, float, bool, type(None))
# Made once: json.dumps with options builds a new encoder on every call.
_ENCODE = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_ENCODE_ASCII = json.JSONEncoder(separators=(",", ":")).encode


def encode_value(value: Any) -> tuple[int, bytes]:
    """Return ``(vtype, payload)`` for a storable value, or raise ``TypeError``."""
    if type(value) is bytes:
        return VTYPE_BYTES, value
    _check_json(value, "value")
    try:
        return VTYPE_JSON, _ENCODE(value).encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates are valid in Python strings but not in UTF-8; escaping keeps them.
        return VTYPE_JSON, _ENCODE_ASCII(value).encode("ascii")


def decode_value(vtype: int, payload: bytes) -> Any:
    """Invert :func:`encode_value`."""
    if vtype == VTYPE_BYTES:
        return payload
    if vtype == VTYPE_JSON:
        return json.loads(payload)
    raise ValueError(f"unknown value type {vtype}")


def _check_json(value: Any, path: str) -> None:
    kind = type(value)
    if kind in _SCALARS:
        return
    if kind is dict:
        for key, item in value.items():
            if type(key) is not str:
                raise TypeError(f"{path}: dict keys must be str, not {type(key).__name__}")
            _check_json(item, f"{path}[{key!r}]")
        return
    if kind is list:
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
        return
    hint = " (bytes are allowed only as the whole value)" if kind is bytes else ""
    raise TypeError(f"{path}: {kind.__name__} is not storable; use JSON types or bytes{hint}")
