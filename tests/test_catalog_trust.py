"""A backup catalog is untrusted input (issue 15, items 4 and 5).

Each attack is what someone who can write the backup directory, but not the repository, can
do: rewrite a manifest (and recompute its unkeyed checksum, which is public), point a piece or
a base outside the catalog, plant a symbolic link or a FIFO, slip in a backup of another
repository, or give the marker a wrong shape. Every command must refuse with one line naming
the backup and what is wrong, read nothing outside the catalog and delete nothing there.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from hotcopy.coordinator._errors import HotcopyError
from hotcopy.storage import CorruptFileError, Repository
from hotcopy.workers import Catalog, CatalogError, backup, list_backups, main, prune, restore
from hotcopy.workers._catalog import CATALOG_MARKER, MANIFEST, CatalogView
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.timeout(90)]

h = storage_helpers()


def commit(root: Path, name: str, changes: dict[str, Any]) -> None:
    with Repository.init(root) as repo, repo.open_prefix(name, "rw") as px:
        for key, value in changes.items():
            px[key] = value
        px.commit()


def public_checksum(body: dict[str, Any]) -> str:
    """The unkeyed manifest checksum, as anyone can compute it (it is not a secret)."""
    content = {key: value for key, value in body.items() if key not in ("checksum", "hmac")}
    return hashlib.sha256(
        json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def rewrite_manifest(path: Path, change: Callable[[dict[str, Any]], None]) -> None:
    """Change a manifest as an attacker would: edit it, recompute its public checksum."""
    body = json.loads(path.read_text())
    change(body)
    body.pop("hmac", None)
    body["checksum"] = public_checksum(body)
    path.write_text(json.dumps(body))


def cli(capsys: pytest.CaptureFixture[str], *args: object) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main([str(arg) for arg in args])  # a traceback would escape here
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def one_line_error(err: str) -> bool:
    return err.startswith("hotcopy: error:") and len(err.splitlines()) == 1


@pytest.fixture
def catalog(tmp_path: Path) -> tuple[Path, Path, str, str]:
    """A repository with prefixes p and q, a full backup and a delta of it."""
    root, dest = tmp_path / "repo", tmp_path / "bk"
    commit(root, "p", {"secret": "ours", "n": 0})
    commit(root, "q", {"n": 0})
    full = backup(root, dest, jobs=1)
    commit(root, "p", {"n": 1})
    delta = backup(root, dest, jobs=1, incremental=True)
    assert Catalog(dest).load(delta.id).entries["p"].kind == "delta"
    return root, dest, full.id, delta.id


@pytest.fixture
def foreign(tmp_path: Path) -> tuple[Path, Path, str]:
    """Another repository's catalog, holding a secret."""
    root, dest = tmp_path / "other", tmp_path / "other-bk"
    commit(root, "p", {"secret": "THEIRS"})
    result = backup(root, dest, jobs=1)
    return root, dest, result.id


# -- the catalog marker ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "marker",
    [
        "[]",
        "1",
        '"catalog"',
        "null",
        '{"format": 1}',
        '{"format": "1", "repository_id": "00"}',
        '{"format": 1, "repository_id": 5}',
        '{"format": 99, "repository_id": "00112233445566778899aabbccddeeff"}',
        '{"format": 2, "repository_id": "00112233445566778899aabbccddeeff", "lineage": 3}',
        "{not json",
    ],
)
def test_a_wrong_shaped_marker_is_a_one_line_error_for_every_command(
    catalog: tuple[Path, Path, str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    marker: str,
) -> None:
    root, dest, _, _ = catalog
    (dest / CATALOG_MARKER).write_text(marker)
    for args in (
        ("restore", dest, tmp_path / "out"),
        ("verify", dest),
        ("prune", dest, "--keep-last", "1"),
        ("backup", root, dest),
        ("backups", dest),
    ):
        status, _, err = cli(capsys, *args)
        assert status == 1, args
        assert one_line_error(err) and CATALOG_MARKER in err, (args, err)
    assert not (tmp_path / "out").exists()


# -- every manifest field -------------------------------------------------------------------------

TOP_FIELDS: list[tuple[str, Any]] = [
    ("id", 5),
    ("created", "yesterday"),
    ("created", float("nan")),
    ("repository_id", None),
    ("repository_id", "not hex"),
    ("complete", "yes"),
    ("complete", 1),
    ("consistent", 0),
    ("interrupted", "no"),
    ("prefixes", []),
    ("failed", ["p"]),
    ("failed", {"p": 5}),
    ("planned", "p"),
    ("format", "2"),
]
ENTRY_FIELDS: list[tuple[str, Any]] = [
    ("kind", "copy"),
    ("kind", None),
    ("file", 5),
    ("base", 5),
    ("file_id", 12),
    ("file_id", "zz"),
    ("salt", "1"),
    ("salt", -1),
    ("start", -1),
    ("end", "9"),
    ("seq", 1.5),
    ("seq", True),
    ("size", -3),
    ("crc32", -5),
    ("crc32", 1 << 40),
    ("boundary_crc", "0"),
]


@pytest.mark.parametrize(("field", "value"), TOP_FIELDS + ENTRY_FIELDS)
def test_every_manifest_field_of_a_wrong_type_or_range_is_refused_naming_it(
    catalog: tuple[Path, Path, str, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    field: str,
    value: Any,
) -> None:
    _, dest, full_id, delta_id = catalog

    def change(body: dict[str, Any]) -> None:
        if (field, value) in TOP_FIELDS:
            body[field] = value
        else:
            body["prefixes"]["p"][field] = value

    rewrite_manifest(dest / delta_id / MANIFEST, change)
    with pytest.raises(CatalogError) as refused:
        Catalog(dest).load(delta_id)
    message = str(refused.value)
    assert delta_id in message and field in message and "\n" not in message
    status, out, err = cli(capsys, "verify", dest)
    assert status == 1 and one_line_error(err) and delta_id in out
    status, _, err = cli(capsys, "restore", dest, tmp_path / "out", "--at", delta_id)
    assert status == 1 and one_line_error(err) and field in err
    # The damaged backup affects nothing else.
    assert restore(dest, tmp_path / "older").id == full_id


# -- pieces and bases outside the backup ----------------------------------------------------------


@pytest.mark.parametrize("where", ["parent", "absolute", "other-prefix", "subdirectory"])
def test_a_piece_named_outside_its_own_backup_directory_is_refused(
    catalog: tuple[Path, Path, str, str],
    foreign: tuple[Path, Path, str],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    where: str,
) -> None:
    _, dest, full_id, _ = catalog
    _, other_dest, other_id = foreign
    secret = other_dest / other_id / "p.hc"
    planted = {
        "parent": f"../../{other_dest.name}/{other_id}/p.hc",
        "absolute": str(secret),
        "other-prefix": "q.hc",
        "subdirectory": "x/p.hc",
    }[where]
    if where == "subdirectory":
        (dest / full_id / "x").mkdir()
        shutil.copy(secret, dest / full_id / "x" / "p.hc")
    foreign_entry = json.loads((other_dest / other_id / MANIFEST).read_text())["prefixes"]["p"]

    def change(body: dict[str, Any]) -> None:
        entry = body["prefixes"]["p"]
        entry.update({k: foreign_entry[k] for k in ("file_id", "salt", "end", "seq", "size")})
        entry.update({k: foreign_entry[k] for k in ("crc32", "boundary_crc")})
        entry["file"] = planted

    rewrite_manifest(dest / full_id / MANIFEST, change)
    out = tmp_path / "out"
    with pytest.raises(CatalogError, match="file"):
        restore(dest, out, at=full_id)
    assert not out.exists()
    status, report, err = cli(capsys, "verify", dest)
    assert status == 1 and full_id in report and one_line_error(err)


def test_a_base_outside_the_catalog_is_refused(
    catalog: tuple[Path, Path, str, str],
    foreign: tuple[Path, Path, str],
    tmp_path: Path,
) -> None:
    _, dest, _, delta_id = catalog
    _, other_dest, other_id = foreign
    outside = (f"../{other_dest.name}/{other_id}", str(other_dest / other_id))
    for base in (*outside, "20990101T000000.000000Z", "20000101T000000.000000Z"):
        rewrite_manifest(
            dest / delta_id / MANIFEST,
            lambda body, base=base: body["prefixes"]["p"].update(base=base),
        )
        with pytest.raises(CatalogError, match="base"):
            restore(dest, tmp_path / "out", at=delta_id)
        assert not (tmp_path / "out").exists()


def test_a_backup_of_another_repository_is_refused(
    catalog: tuple[Path, Path, str, str],
    foreign: tuple[Path, Path, str],
    tmp_path: Path,
) -> None:
    _, dest, _, delta_id = catalog
    _, other_dest, other_id = foreign
    later = "20990101T000000.000000Z"
    shutil.copytree(other_dest / other_id, dest / later)
    rewrite_manifest(dest / later / MANIFEST, lambda body: body.update(id=later))
    with pytest.raises(CatalogError, match="repository"):
        restore(dest, tmp_path / "out", at=later)
    assert not (tmp_path / "out").exists()
    assert restore(dest, tmp_path / "latest").id == delta_id  # ours, not the planted one
    assert "THEIRS" not in json.dumps(h.dump_repository(tmp_path / "latest"))
    row = {r["id"]: r for r in list_backups(dest)["backups"]}[later]
    assert row["restorable"] is False and "repository" in row["problem"]


# -- links and special files ----------------------------------------------------------------------


def test_a_backup_directory_that_is_a_symlink_is_refused_and_prune_stays_inside(
    catalog: tuple[Path, Path, str, str],
    foreign: tuple[Path, Path, str],
    tmp_path: Path,
) -> None:
    _, dest, _, delta_id = catalog
    _, other_dest, other_id = foreign
    later = "20990101T000000.000000Z"
    (dest / later).symlink_to(other_dest / other_id)
    with pytest.raises(CatalogError, match="symbolic link"):
        restore(dest, tmp_path / "out", at=later)
    assert restore(dest, tmp_path / "latest").id == delta_id
    before = {p.name: p.stat().st_size for p in (other_dest / other_id).iterdir()}
    prune(dest, 1)
    assert {p.name: p.stat().st_size for p in (other_dest / other_id).iterdir()} == before
    assert (other_dest / other_id / MANIFEST).exists()


def test_a_piece_that_is_a_symlink_is_refused(
    catalog: tuple[Path, Path, str, str], foreign: tuple[Path, Path, str], tmp_path: Path
) -> None:
    _, dest, full_id, _ = catalog
    _, other_dest, other_id = foreign
    piece = dest / full_id / "p.hc"
    piece.unlink()
    piece.symlink_to(other_dest / other_id / "p.hc")
    with pytest.raises(CatalogError, match="symbolic link"):
        restore(dest, tmp_path / "out", at=full_id)
    assert not (tmp_path / "out").exists()


_CLI = "import sys; from hotcopy.workers import main; sys.exit(main(sys.argv[1:]))"


@pytest.mark.parametrize("what", ["piece", "manifest", "marker"])
def test_a_fifo_in_a_catalog_is_refused_at_once(
    catalog: tuple[Path, Path, str, str], tmp_path: Path, what: str
) -> None:
    _, dest, full_id, _ = catalog
    path = {
        "piece": dest / full_id / "p.hc",
        "manifest": dest / full_id / MANIFEST,
        "marker": dest / CATALOG_MARKER,
    }[what]
    path.unlink()
    os.mkfifo(path)
    restore_args = ["restore", str(dest), str(tmp_path / "out"), "--at", full_id]
    for args in (["verify", str(dest)], restore_args):
        done = h.run_python(_CLI, *args, timeout=30)
        assert done.returncode == 1, (args, done.stderr)
        assert one_line_error(done.stderr) and "FIFO" in done.stderr, done.stderr
    assert not (tmp_path / "out").exists()


# -- an authenticated catalog ---------------------------------------------------------------------


def _force_crc(data: bytes, at: int, crc: int) -> bytes:
    """``data`` with its 4 bytes at ``at`` chosen so that its CRC-32 is ``crc``: the CRC is
    affine in those 32 bits, so 32 probes and a GF(2) elimination find them."""

    def crc_with(value: int) -> int:
        return zlib.crc32(data[:at] + value.to_bytes(4, "little") + data[at + 4 :])

    zero = crc_with(0)
    rows = [(crc_with(1 << bit) ^ zero, 1 << bit) for bit in range(32)]
    want, chosen = crc ^ zero, 0
    for bit in range(32):
        pivot = next((i for i in range(bit, 32) if rows[i][0] >> bit & 1), None)
        assert pivot is not None
        rows[pivot], rows[bit] = rows[bit], rows[pivot]
        for i in range(32):
            if i != bit and rows[i][0] >> bit & 1:
                rows[i] = (rows[i][0] ^ rows[bit][0], rows[i][1] ^ rows[bit][1])
    for bit in range(32):
        if want >> bit & 1:
            chosen ^= rows[bit][1]
    forged = data[:at] + chosen.to_bytes(4, "little") + data[at + 4 :]
    assert zlib.crc32(forged) == crc
    return forged


def test_with_a_key_a_forged_manifest_or_piece_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, dest = tmp_path / "repo", tmp_path / "bk"
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    commit(root, "p", {"n": 0})
    first = backup(root, dest, jobs=1, key_file=key)
    commit(root, "p", {"n": 1})
    second = backup(root, dest, jobs=1, key_file=key, incremental=True)
    body = json.loads((dest / second.id / MANIFEST).read_text())
    assert "hmac" in body and "checksum" not in body
    assert all(len(entry["sha256"]) == 64 for entry in body["prefixes"].values())
    assert restore(dest, tmp_path / "ok", key_file=key).id == second.id

    # Without the key nothing of an authenticated catalog is trusted.
    with pytest.raises(CatalogError, match="key"):
        restore(dest, tmp_path / "nokey")
    monkeypatch.setenv("HOTCOPY_BACKUP_KEY_FILE", str(key))
    status, _, err = cli(capsys, "restore", dest, tmp_path / "env")
    assert status == 0, err
    monkeypatch.delenv("HOTCOPY_BACKUP_KEY_FILE")

    # A forged manifest (the public checksum recomputed) is refused with the key.
    rewrite_manifest(dest / second.id / MANIFEST, lambda b: b["prefixes"]["p"].update(seq=1))
    with pytest.raises(CatalogError, match="authenticat"):
        Catalog(dest, key_file=key).load(second.id)
    assert restore(dest, tmp_path / "older", key_file=key).id == first.id

    # A piece changed so that its size and CRC-32 still match: the CRC is no defence, the
    # keyed SHA-256 is.
    piece = dest / first.id / "p.hc"
    data = piece.read_bytes()
    changed = data[:-12] + bytes(b ^ 0x55 for b in data[-12:-8]) + data[-8:]
    piece.write_bytes(_force_crc(changed, len(data) - 40, zlib.crc32(data)))
    # Found as the piece is copied (on the descriptor it is copied from), before anything
    # goes live: a damaged file, where before it was found by a read of the catalog first.
    with pytest.raises((CatalogError, CorruptFileError), match="SHA-256"):
        restore(dest, tmp_path / "forged", key_file=key)
    assert not (tmp_path / "forged").exists()


@pytest.mark.parametrize("mode", [0o644, 0o606, 0o660])
def test_a_key_file_others_can_read_or_write_is_refused(tmp_path: Path, mode: int) -> None:
    """As ssh refuses a private key others can read: a key that is not secret authenticates
    nothing, and one others can write lets them choose it."""
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    os.chmod(key, mode)
    Repository.init(tmp_path / "repo").close()
    with pytest.raises(CatalogError, match="chmod 600"):
        backup(tmp_path / "repo", tmp_path / "bk", key_file=key)
    os.chmod(key, 0o600)
    assert backup(tmp_path / "repo", tmp_path / "bk", key_file=key).complete


@pytest.mark.parametrize("which", ["full", "delta"])
def test_a_damaged_piece_with_its_crc_rerecorded_is_never_restored(
    catalog: tuple[Path, Path, str, str], tmp_path: Path, which: str
) -> None:
    # The piece CRC is the catalog's word; the segments' own checksums are the file's. A
    # restore checks both, so one rewritten to match the other is still refused.
    _, dest, full_id, delta_id = catalog
    backup_id = full_id if which == "full" else delta_id
    entry = Catalog(dest).load(backup_id).entries["p"]
    piece = dest / backup_id / entry.file
    data = bytearray(piece.read_bytes())
    data[data.index(b"ours" if which == "full" else b"n")] ^= 0x01
    piece.write_bytes(bytes(data))
    crc = zlib.crc32(bytes(data))
    rewrite_manifest(
        dest / backup_id / MANIFEST,
        lambda body: body["prefixes"]["p"].update(crc32=crc),
    )
    with pytest.raises(Exception, match="damaged"):
        restore(dest, tmp_path / "new", at=delta_id)
    assert not (tmp_path / "new").exists()


def test_with_a_key_a_piece_replaced_after_its_check_is_never_restored(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Someone who can write the backup directory renames a forged piece (same size, same
    CRC-32) over the real one once restore has looked at it: the SHA-256 must be checked on
    the bytes copied, not on an earlier read of the name."""
    root, dest = tmp_path / "repo", tmp_path / "bk"
    key = tmp_path / "key"
    key.write_bytes(os.urandom(32))
    key.chmod(0o600)
    commit(root, "p", {"n": 0, "pad": "x" * 200})
    made = backup(root, dest, jobs=1, key_file=key)
    piece = dest / made.id / "p.hc"
    data = piece.read_bytes()
    at = data.index(b"x" * 100)
    changed = data[:at] + b"FORGED" + data[at + 6 :]
    forged = _force_crc(changed, at + 6, zlib.crc32(data))
    assert len(forged) == len(data) and forged != data

    pieces = CatalogView.pieces

    def swapped_after_looking(self: CatalogView, *args: Any, **kwargs: Any) -> Any:
        found = pieces(self, *args, **kwargs)
        (tmp_path / "planted").write_bytes(forged)
        os.rename(tmp_path / "planted", piece)  # the name now names the forgery
        return found

    monkeypatch.setattr(CatalogView, "pieces", swapped_after_looking)
    with pytest.raises(HotcopyError, match="SHA-256"):
        restore(dest, tmp_path / "new", key_file=key)
    assert not (tmp_path / "new").exists()
