"""Logical (JSON) backup documents, as DictDB's BackupManager writes them, and ``apply_delta``.

A native backup file is a run of commit batches; its logical document is what those commits
did, key by key, last write winning:

```json
{"type": "delta", "timestamp": 1763795730.123456,
 "prefixes": {"users": {"upserts": {"alice": {"age": 3}}, "deletes": ["bob"]}}}
```

A ``"type": "full"`` document holds every live record of each prefix in ``upserts``; applying it
makes the prefix hold exactly those records. In a delta document, a prefix that was copied in
full (new, compacted or otherwise rewritten since its previous backup, so no delta exists) is
marked ``"full": true`` and is applied the same way: what a rewrite dropped is deleted.
``bytes`` values, which JSON cannot hold, appear as ``{"$base64": "..."}``; a stored one-key
dict whose key is ``$base64`` or ``$dict`` is written as ``{"$dict": {...}}``, so nothing is
mistaken for bytes.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from hotcopy.storage import Repository, validate_prefix_name
from hotcopy.storage import _format as fmt
from hotcopy.storage._codec import decode_value
from hotcopy.storage._durable import write_durably
from hotcopy.storage._files import open_regular, read_regular
from hotcopy.storage._log import Damage, iter_segments

from ._catalog import backup_time_us
from ._errors import BackupError

_BYTES_KEY = "$base64"
_DICT_KEY = "$dict"  # escapes a stored one-key dict whose key is one of these tags
_TAGS = (_BYTES_KEY, _DICT_KEY)


def changes_in(
    path: str | os.PathLike[str], *, full: bool, start: int = 0
) -> tuple[dict[str, Any], list[str]]:
    """``(upserts, deletes)`` made by the batches of a backup file (a full copy, or a delta of
    the main-file bytes from offset ``start`` on)."""
    upserts: dict[str, Any] = {}
    deletes: dict[str, None] = {}
    fd = open_regular(path)
    try:
        begin, after, shift = 0, None, start
        if full:
            header = fmt.unpack_main_header(os.pread(fd, fmt.HEADER_SIZE, 0))
            begin, after, shift = header.size, header.base_seq, 0
        for item in iter_segments(fd, begin, os.fstat(fd).st_size, after, shift=shift):
            if isinstance(item, Damage):
                raise BackupError(f"{path}: damaged at offset {item.offset}: {item.reason}")
            for batch in item.batches:
                for op in batch.ops:
                    if op.kind == fmt.OP_PUT:
                        upserts[op.key] = _to_json(decode_value(op.vtype, op.value or b""))
                        deletes.pop(op.key, None)
                    else:
                        upserts.pop(op.key, None)
                        deletes[op.key] = None
    finally:
        os.close(fd)
    return upserts, [] if full else list(deletes)


def document_name(backup_id: str, kind: str) -> str:
    """The file name of a backup's logical document, as DictDB names its files:
    ``hotcopy_backup_<sec>_<usec>.json`` when it is ``full``, ``hotcopy_delta_..`` otherwise,
    after the backup's start time (unique in its catalog)."""
    seconds, micros = divmod(backup_time_us(backup_id), 1_000_000)
    return f"hotcopy_{'backup' if kind == 'full' else 'delta'}_{seconds}_{micros:06d}.json"


def write_document(
    catalog_dir: Path,
    backup_id: str,
    timestamp: float,
    prefixes: dict[str, tuple[dict[str, Any], list[str]]],
    full_prefixes: frozenset[str],
) -> Path:
    """Write the logical document of a backup beside it; return its path.

    ``full_prefixes`` hold all their live records. The document is ``full`` when every prefix
    is, and its type and its name both follow from that one decision.
    """
    kind = "full" if set(prefixes) <= full_prefixes else "delta"
    changes: dict[str, dict[str, Any]] = {}
    for name, (upserts, deletes) in sorted(prefixes.items()):
        changes[name] = {"upserts": upserts, "deletes": deletes}
        if kind == "delta" and name in full_prefixes:
            changes[name]["full"] = True
    document = {"type": kind, "timestamp": timestamp, "prefixes": changes}
    path = catalog_dir / document_name(backup_id, kind)
    write_durably(path, json.dumps(document, ensure_ascii=False).encode())
    return path


def apply_delta(repo: Repository | str | os.PathLike[str], path: str | os.PathLike[str]) -> int:
    """Apply a logical backup document to a repository; return the number of records affected.

    Each prefix changes in one transaction of its own view: prefixes the caller has open
    through ``repo`` stay open and see the result at their next read. A prefix with changes
    the caller has not committed is refused before anything is applied (applying would have
    to commit them, or wait for the caller's own write lease).
    """
    changes = _read_document(path)
    owned = not isinstance(repo, Repository)
    repository = Repository.init(repo) if not isinstance(repo, Repository) else repo
    affected = 0
    try:
        for name in changes:
            mine = repository.open_prefixes().get(name)
            if mine is not None and mine.in_transaction:
                raise BackupError(
                    f"prefix {name!r} has uncommitted changes through this Repository: commit "
                    "or roll them back, then apply the document (nothing was applied)"
                )
        for name, (upserts, deletes, full) in changes.items():
            with repository.open_view(name, "rw") as prefix:
                if full:
                    deletes = deletes + [key for key in prefix if key not in upserts]
                for key, value in upserts.items():
                    prefix[key] = _from_json(value)
                    affected += 1
                for key in deletes:
                    if key in prefix:
                        del prefix[key]
                        affected += 1
                prefix.commit()
    finally:
        if owned:
            repository.close()
    return affected


def _read_document(
    path: str | os.PathLike[str],
) -> dict[str, tuple[dict[str, Any], list[str], bool]]:
    """A document's changes by prefix, ``(upserts, deletes, full)``, every field checked."""
    try:
        document = json.loads(read_regular(path))
    except (ValueError, UnicodeDecodeError) as err:
        raise BackupError(f"{path} is not a hotcopy delta or full document: {err}") from None
    if not isinstance(document, dict) or document.get("type") not in ("delta", "full"):
        raise BackupError(f"{path} is not a hotcopy delta or full document")
    prefixes = document.get("prefixes")
    if not isinstance(prefixes, dict):
        raise BackupError(f"{path}: 'prefixes' must be an object of prefix names")
    changes = {}
    for name, change in prefixes.items():
        validate_prefix_name(name)
        upserts = change.get("upserts", {}) if isinstance(change, dict) else None
        deletes = change.get("deletes", []) if isinstance(change, dict) else None
        if not isinstance(upserts, dict) or not isinstance(deletes, list):
            raise BackupError(
                f"{path}: prefix {name!r} needs 'upserts' (an object) and 'deletes' (a list)"
            )
        if not all(isinstance(key, str) for key in deletes):
            raise BackupError(f"{path}: prefix {name!r}: 'deletes' must hold keys (strings)")
        full = document["type"] == "full" or change.get("full", False) is True
        changes[name] = (upserts, deletes, full)
    return changes


def _to_json(value: Any) -> Any:
    if isinstance(value, bytes):
        return {_BYTES_KEY: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in _TAGS:
        return {_DICT_KEY: value}  # a stored dict that looks like a tag: escaped
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict) and len(value) == 1:
        if _BYTES_KEY in value:
            return base64.b64decode(value[_BYTES_KEY])
        if _DICT_KEY in value:
            return value[_DICT_KEY]
    return value
