"""Backup catalogs in an S3-compatible bucket (``s3://BUCKET/PATH``), against a real S3 API
server process (moto's, started by the test session; see ``tests/_s3server.py``).

The catalog rules are those of a directory (``test_backup_catalog``), expressed with objects:
pieces before the manifest, a backup without a manifest never used, one run or prune at a time
(a lock object), retention never breaking a chain.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hotcopy.storage import CorruptFileError, Repository
from hotcopy.workers import Catalog, CatalogError, backup, list_backups, main, prune, restore
from hotcopy.workers._errors import BackupInterrupted
from hotcopy.workers._places import ObjectPlace
from hotcopy.workers._s3 import ObjectStore
from hotcopy_test_support import storage_helpers

pytestmark = [pytest.mark.timeout(90)]

h = storage_helpers()


@pytest.fixture
def bucket(s3_url: tuple[str, str], monkeypatch: pytest.MonkeyPatch) -> str:
    """A catalog URL in a fresh bucket, with this process's S3 client pointed at the server
    as an operator's would be (``AWS_ENDPOINT_URL_S3``)."""
    url, endpoint = s3_url
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", endpoint)
    return url + "/host-a/repo"


@pytest.fixture
def repo_root(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / "repo"
    with Repository.init(root) as repo:
        for number in range(3):
            with repo.open_prefix(f"p{number}", "rw") as px:
                for key in range(200):
                    px[f"k{key}"] = {"n": key, "p": number, "pad": "x" * 50}
                px.commit()
    yield root


def dump(root: Path) -> dict[str, dict[str, Any]]:
    """Each prefix's contents (the shared helper's dump, without the commit seqs)."""
    return {name: contents for name, (_, contents) in h.dump_repository(root).items()}


def change(root: Path, name: str, changes: dict[str, Any]) -> None:
    with Repository(root) as repo, repo.open_prefix(name, "rw") as px:
        for key, value in changes.items():
            px[key] = value
        px.commit()


def make_key(path: Path) -> Path:
    path.write_bytes(os.urandom(32))
    path.chmod(0o600)
    return path


def objects(url: str) -> dict[str, int]:
    return ObjectStore(url).sizes()


def test_a_backup_in_a_bucket_restores_exactly(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    expected = dump(repo_root)
    result = backup(repo_root, bucket)
    assert result.complete and result.path == f"{bucket}/{result.id}"
    names = objects(bucket)
    assert f"{result.id}/MANIFEST.json" in names
    assert {f"{result.id}/p{n}.hc" for n in range(3)} <= set(names)

    restored = restore(bucket, tmp_path / "new")
    assert restored.id == result.id
    assert dump(tmp_path / "new") == expected
    assert Catalog(bucket).verify() == []
    listing = list_backups(bucket, verify=True)
    assert listing["catalog"] == bucket
    assert [(b["id"], b["restorable"]) for b in listing["backups"]] == [(result.id, True)]


def test_an_incremental_backup_in_a_bucket_is_a_chain_that_restores_the_newest_state(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    first = backup(repo_root, bucket)
    change(repo_root, "p1", {"k1": "changed", "new": [1, 2, 3]})
    second = backup(repo_root, bucket, incremental=True)
    assert second.prefixes["p1"]["kind"] == "delta"
    assert f"{second.id}/p1.hc-delta" in objects(bucket)
    restore(bucket, tmp_path / "new")
    assert dump(tmp_path / "new") == dump(repo_root)
    restore(bucket, tmp_path / "old", at=first.id)
    assert dump(tmp_path / "old")["p1"]["k1"] == {"n": 1, "p": 1, "pad": "x" * 50}


def test_a_run_that_never_published_its_manifest_is_never_used(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    good = backup(repo_root, bucket)
    change(repo_root, "p0", {"k0": "after"})
    # A run killed after uploading its pieces, before its manifest: what a crash leaves.
    catalog = Catalog(bucket)
    killed_id, staging = catalog.new_backup(time.time() + 1)
    (staging / "p0.hc").write_bytes(b"not a main file")
    catalog.publish(killed_id, staging)
    assert f"{killed_id}/p0.hc" in objects(bucket)

    listing = list_backups(bucket)
    statuses = {b["id"]: (b["status"], b["restorable"]) for b in listing["backups"]}
    assert statuses == {good.id: ("complete", True), killed_id: ("unfinished", False)}
    assert restore(bucket, tmp_path / "new").id == good.id
    report = prune(bucket, keep_last=1)
    assert report.removed == [killed_id]
    assert not any(name.startswith(killed_id) for name in objects(bucket))


def test_a_damaged_piece_in_the_bucket_is_found_and_never_restored(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    result = backup(repo_root, bucket)
    store = ObjectStore(bucket)
    name = f"{result.id}/p2.hc"
    with (tmp_path / "piece").open("wb") as out:
        for chunk in store.chunks(name):
            out.write(chunk)
    damaged = bytearray((tmp_path / "piece").read_bytes())
    damaged[len(damaged) // 2] ^= 0x01  # one flipped bit, same size
    assert zlib.crc32(damaged) != zlib.crc32((tmp_path / "piece").read_bytes())
    store.put(name, bytes(damaged), create_only=False)

    problems = Catalog(bucket).verify()
    assert len(problems) == 1 and "p2" in problems[0] and "checksum" in problems[0]
    with pytest.raises(CorruptFileError, match="nothing restored"):
        restore(bucket, tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new.*"))  # no staging or fetched pieces left behind


def test_prune_in_a_bucket_keeps_every_link_a_kept_backup_needs(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    full = backup(repo_root, bucket)
    change(repo_root, "p0", {"k0": "one"})
    backup(repo_root, bucket, incremental=True)
    change(repo_root, "p0", {"k0": "two"})
    newest = backup(repo_root, bucket, incremental=True)
    report = prune(bucket, keep_last=1)
    assert newest.id in report.kept
    assert full.id not in report.removed  # the newest delta's chain starts there
    restore(bucket, tmp_path / "new")
    assert dump(tmp_path / "new") == dump(repo_root)


def test_a_repository_of_another_catalog_is_refused(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    backup(repo_root, bucket)
    other = tmp_path / "other"
    with Repository.init(other) as repo, repo.open_prefix("x", "rw") as px:
        px["k"] = 1
        px.commit()
    with pytest.raises(CatalogError, match="holds backups of repository"):
        backup(other, bucket)


def test_the_command_line_backs_up_into_and_restores_from_a_bucket(
    s3_url: tuple[str, str],
    repo_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    url, endpoint = s3_url
    # --endpoint-url wins over the environment (restored after the test)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:9")
    catalog = f"{url}/cli"
    assert main(["backup", str(repo_root), catalog, "--endpoint-url", endpoint, "--json"]) == 0
    made = json.loads(capsys.readouterr().out)
    assert made["complete"]
    assert main(["backups", catalog, "--endpoint-url", endpoint, "--json"]) == 0
    assert [b["id"] for b in json.loads(capsys.readouterr().out)["backups"]] == [made["id"]]
    assert main(["verify", catalog, "--endpoint-url", endpoint]) == 0
    capsys.readouterr()
    new = tmp_path / "new"
    assert main(["restore", catalog, str(new), "--endpoint-url", endpoint, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["id"] == made["id"]
    assert dump(new) == dump(repo_root)


_HOLDER = """
import sys
from hotcopy.workers import Catalog, CatalogError
from hotcopy.workers._places import ObjectPlace
ObjectPlace.LOCK_TTL = float(sys.argv[2])
catalog = Catalog(sys.argv[1])
with catalog.locked():
    print("held", flush=True)
    sys.stdin.readline()  # SIGSTOPped here by the test, past the lock's expiry
    try:
        catalog.place.write("written-after-the-stop", b"1")
        print("wrote", flush=True)
    except CatalogError as err:
        print("refused:", err, flush=True)
"""


@contextlib.contextmanager
def lock_holder(bucket: str, ttl: float) -> Iterator[subprocess.Popen[str]]:
    """A process holding the lock of the catalog ``bucket`` (leases of ``ttl`` s) until told
    to go on (a line on its stdin); always reaped, even stopped."""
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, bucket, str(ttl)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "held"
        yield holder
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGCONT)
            holder.kill()
        holder.wait(10)
        for stream in (holder.stdin, holder.stdout, holder.stderr):
            if stream is not None:
                stream.close()


def test_a_run_stopped_past_its_lock_expiry_writes_nothing_once_another_holds_it(
    bucket: str, repo_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    backup(repo_root, bucket)
    ttl = 1.5
    with lock_holder(bucket, ttl) as holder:
        assert holder.stdout is not None and holder.stdin is not None
        os.kill(holder.pid, signal.SIGSTOP)
        monkeypatch.setattr(ObjectPlace, "LOCK_TTL", ttl)
        with Catalog(bucket).locked():  # granted once the stopped holder's lease expired
            os.kill(holder.pid, signal.SIGCONT)
            holder.stdin.write("go\n")
            holder.stdin.flush()
            said = holder.stdout.readline().strip()
        assert said.startswith("refused: lost the lock"), said
        assert holder.wait(30) == 1  # and leaving the lock says it was lost
        assert holder.stderr is not None and "was lost while held" in holder.stderr.read()
        assert "written-after-the-stop" not in objects(bucket)


def test_a_keyed_restore_checks_the_bytes_it_restores_not_an_earlier_read(
    bucket: str, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = make_key(tmp_path / "key")
    older = backup(repo_root, bucket, key_file=key_file)
    change(repo_root, "p1", {"k1": "newer"})
    expected = dump(repo_root)
    newer = backup(repo_root, bucket, key_file=key_file)
    name = f"{newer.id}/p1.hc.sealed"
    store = ObjectStore(bucket)
    replayed = b"".join(store.chunks(f"{older.id}/p1.hc.sealed"))  # sealed with the key too

    # Someone who can write the bucket, without the key, replays the older piece in place of
    # the newer one right after the newer one was first read whole.
    reads = []
    chunks = ObjectStore.chunks

    def swapped_after_reading(self: ObjectStore, wanted: str, *args: Any) -> Iterator[bytes]:
        yield from chunks(self, wanted, *args)
        reads.append(wanted)
        if wanted == name and reads.count(name) == 1:
            store.put(name, replayed, create_only=False)

    monkeypatch.setattr(ObjectStore, "chunks", swapped_after_reading)
    restore(bucket, tmp_path / "new", key_file=key_file, at=newer.id)
    assert dump(tmp_path / "new") == expected  # what was checked, not what the store held later
    assert reads.count(name) == 1  # each piece is read from the store once


def test_a_keyed_catalog_in_a_bucket_is_sealed_and_needs_its_key(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    key_file = make_key(tmp_path / "key")
    result = backup(repo_root, bucket, key_file=key_file)
    store = ObjectStore(bucket)
    for name in objects(bucket):
        if name.endswith((".sealed", "MANIFEST.json", "hotcopy-backups.json")):
            content = b"".join(store.chunks(name))
            assert content.startswith(b"HCS1"), name
            assert b"xxxxxxxx" not in content and b'"repository_id"' not in content, name
    assert not any(name.endswith(".hc") for name in objects(bucket))

    with pytest.raises(CatalogError, match="no key was given"):
        list_backups(bucket)
    other = make_key(tmp_path / "other-key")
    with pytest.raises(CatalogError, match="needs another key"):
        restore(bucket, tmp_path / "new", key_file=other)
    assert not (tmp_path / "new").exists()

    # A piece put in the clear, of the right size and checksums, is refused: only the key's
    # holder writes into a keyed catalog.
    plain = tmp_path / "plain"
    restore(bucket, plain, key_file=key_file)
    store.put(f"{result.id}/p0.hc", (plain / "p0.hc").read_bytes(), create_only=False)
    store.delete([f"{result.id}/p0.hc.sealed"])
    listing = list_backups(bucket, key_file=key_file)
    assert "not sealed" in listing["backups"][0]["problem"]
    with pytest.raises(CatalogError, match="not sealed"):
        restore(bucket, tmp_path / "again", key_file=key_file)


def test_a_compressed_backup_in_a_bucket_is_smaller_and_restores_without_being_told(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    plain = backup(repo_root, bucket)
    packed = backup(repo_root, bucket, compress=True)
    sizes = objects(bucket)
    raw = sum(sizes[f"{plain.id}/p{n}.hc"] for n in range(3))
    compressed = sum(sizes[f"{packed.id}/p{n}.hc.sealed"] for n in range(3))
    assert compressed < raw / 4  # the values repeat
    assert Catalog(bucket).verify() == []
    restore(bucket, tmp_path / "new", at=packed.id)
    assert dump(tmp_path / "new") == dump(repo_root)


def test_a_backup_whose_upload_fails_leaves_nothing_locally_and_names_the_upload(
    s3_server: Any,
    bucket: str,
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    good = backup(repo_root, bucket)
    upload_file = ObjectStore.upload_file

    def upload_into_an_outage(self: ObjectStore, name: str, path: Any) -> None:
        s3_server.kill()  # the server dies as the first piece goes up
        upload_file(self, name, path)

    monkeypatch.setattr(ObjectStore, "upload_file", upload_into_an_outage)
    try:
        with pytest.raises(CatalogError, match="cannot upload") as failed:
            backup(repo_root, bucket)
        assert "catalog.lock" not in str(failed.value)
        assert list(staging.iterdir()) == []  # the staged pieces went with the failed run
    finally:
        s3_server.start()  # empty: moto keeps its buckets in memory
    assert good.complete


def test_a_bucket_backup_uploads_each_piece_as_it_is_copied(
    bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backup into a bucket stages its pieces on local disk on their way up: it must hold
    only those in flight, not the whole backup (which needed the repository's size free in
    $TMPDIR), and upload while the workers copy the rest."""
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    root = tmp_path / "many"
    with Repository.init(root) as repo:  # 36 MiB: copied by worker processes, not inline
        for number in range(24):
            with repo.open_prefix(f"p{number:02}", "rw") as px:
                px["k"] = str(number) * (1536 << 10)
                px.commit()
    staged: list[int] = []

    def count_staged(done: int, total: int, done_bytes: int, total_bytes: int) -> None:
        staged.append(sum(1 for path in staging.rglob("*.hc") if path.is_file()))

    for key in (None, make_key(tmp_path / "key")):
        staged.clear()
        catalog = f"{bucket}/{'sealed' if key else 'plain'}"
        result = backup(root, catalog, jobs=2, progress=count_staged, key_file=key)
        assert result.complete and len(result.prefixes) == 24
        assert len(staged) > 4 and max(staged) <= 12, staged  # 3 batches of 3 in flight
        assert list(staging.iterdir()) == []
        restored = tmp_path / f"restored-{key is not None}"
        restore(catalog, restored, key_file=key)
        assert dump(restored) == dump(root)
        assert Catalog(catalog, key_file=key).verify() == []


@pytest.mark.parametrize("seal", ["key", "zstd"])
def test_a_bucket_backup_interrupted_during_an_upload_records_only_what_is_stored(
    bucket: str, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, seal: str
) -> None:
    """Ctrl-C as a piece goes up: the partial backup recorded names only pieces that are in
    the bucket (one sealed piece was dropped locally before its upload, and the partial
    backup named it: restorable by nobody)."""
    key = make_key(tmp_path / "key") if seal == "key" else None
    upload_file, calls = ObjectStore.upload_file, []

    def interrupted_at_the_third(self: ObjectStore, name: str, path: Any) -> None:
        calls.append(name)
        if len(calls) == 3:
            raise KeyboardInterrupt
        upload_file(self, name, path)

    monkeypatch.setattr(ObjectStore, "upload_file", interrupted_at_the_third)
    with pytest.raises(BackupInterrupted):
        backup(repo_root, bucket, key_file=key, compress=seal == "zstd")
    monkeypatch.setattr(ObjectStore, "upload_file", upload_file)
    assert Catalog(bucket, key_file=key).verify() == []
    (listed,) = list_backups(bucket, key_file=key)["backups"]
    assert listed["status"] == "partial" and listed["restorable"], listed
    restore(bucket, tmp_path / "new", at=listed["id"], key_file=key, allow_partial=True)
    restored, original = dump(tmp_path / "new"), dump(repo_root)
    assert restored and all(restored[name] == original[name] for name in restored)


def test_the_staging_of_a_killed_run_is_swept_by_the_next(
    bucket: str, repo_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run killed before its upload left its staging directory in $TMPDIR: the next run
    removes it, but not a directory of the user's that only has the name of one."""
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    made = subprocess.run(  # a process that makes a staging directory and dies
        [sys.executable, "-c", _MAKE_STAGING, str(staging)],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    left = Path(made.stdout.strip())
    (left / "p0.hc").write_bytes(b"x" * 1000)
    lookalike = staging / "hotcopy-staging.hotcopy-tmp-999999999-1-00000000"  # a dead pid's
    lookalike.mkdir()
    (lookalike / "mine").write_text("the user's")
    backup(repo_root, bucket)
    assert list(staging.iterdir()) == [lookalike]
    assert (lookalike / "mine").read_text() == "the user's"


_MAKE_STAGING = """
import sys
from pathlib import Path
from hotcopy.workers._workdir import WorkDirectory, opened_directory
with opened_directory(Path(sys.argv[1])) as fd:
    print(WorkDirectory(Path(sys.argv[1]), fd, "hotcopy-staging").path)
"""


def test_the_lock_of_a_run_killed_on_this_machine_is_broken_at_once_a_live_ones_is_not(
    bucket: str, repo_root: Path
) -> None:
    backup(repo_root, bucket)
    store = ObjectStore(bucket)
    with lock_holder(bucket, 3600) as holder:  # its lease would last an hour
        with (  # alive: waited for, and given up on
            pytest.raises(CatalogError, match="held by"),
            store.lock("catalog.lock", ttl=5, timeout=0.5, owner="test"),
        ):
            pass
        holder.kill()
        holder.wait(10)
        with store.lock("catalog.lock", ttl=5, timeout=10, owner="test"):  # dead: broken
            pass
        assert backup(repo_root, bucket).complete


def test_the_command_line_bounds_and_tells_the_wait_for_a_buckets_lock(
    bucket: str, repo_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    backup(repo_root, bucket)
    with lock_holder(bucket, 3600) as holder:
        assert main(["backup", str(repo_root), bucket, "--timeout", "0.5"]) != 0
        said = capsys.readouterr().err
        assert f"gave up after 0.5 s waiting for the lock of {bucket}" in said
        assert f"pid {holder.pid}" in said


def test_what_prune_finds_in_a_bucket_that_is_not_hotcopys_stays_and_is_named_safely(
    bucket: str, repo_root: Path
) -> None:
    good = backup(repo_root, bucket)
    store = ObjectStore(bucket)
    lookalike = "20200101T000000.000000Z"  # an object named like a backup, not below one
    store.put(lookalike, b"someone's", create_only=True)
    dead = "20200102T000000.000000Z"  # an unfinished run's claim, and a file of someone else's
    store.put(f"{dead}/STARTED", b"{}", create_only=True)
    import boto3  # a name hotcopy's own client refuses to write: put by another tool

    bucket_name, path = bucket.removeprefix("s3://").split("/", 1)
    boto3.client("s3").put_object(Bucket=bucket_name, Key=f"{path}/{dead}/\x1b[31mRED", Body=b"x")

    report = prune(bucket, keep_last=1)
    assert report.kept == [good.id]
    assert lookalike not in report.removed
    assert dead in report.removed
    names = objects(bucket)
    assert lookalike in names and f"{dead}/\x1b[31mRED" in names
    assert f"{dead}/STARTED" not in names
    said = json.dumps(report.to_json(), ensure_ascii=False)
    assert "\x1b" not in said and "\\x1b[31mRED" in said


def test_prune_aborts_the_uploads_a_killed_run_left_unfinished(
    bucket: str, repo_root: Path
) -> None:
    import boto3  # a run killed mid-upload leaves what this leaves

    good = backup(repo_root, bucket)
    client = boto3.client("s3")
    bucket_name, path = bucket.removeprefix("s3://").split("/", 1)
    key = f"{path}/20200101T000000.000000Z/p0.hc"
    upload = client.create_multipart_upload(Bucket=bucket_name, Key=key)
    client.upload_part(
        Bucket=bucket_name, Key=key, UploadId=upload["UploadId"], PartNumber=1, Body=b"x" * 1024
    )
    outside = client.create_multipart_upload(Bucket=bucket_name, Key="not-the-catalog/x")

    def unfinished() -> list[str]:
        listed = client.list_multipart_uploads(Bucket=bucket_name)
        return sorted(u["Key"] for u in listed.get("Uploads", ()))

    assert unfinished() == sorted([key, "not-the-catalog/x"])
    prune(bucket, keep_last=1, dry_run=True)
    assert key in unfinished()  # a dry run changes nothing
    assert prune(bucket, keep_last=1).kept == [good.id]
    assert unfinished() == ["not-the-catalog/x"]  # only below the catalog's path
    client.abort_multipart_upload(
        Bucket=bucket_name, Key="not-the-catalog/x", UploadId=outside["UploadId"]
    )


def test_a_compressed_piece_planted_in_an_unkeyed_bucket_never_opens_past_its_size(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    from hotcopy.workers import _sealing

    result = backup(repo_root, bucket)
    context = f"{result.id}/p0.hc".encode()  # unkeyed: anyone can frame it right
    bomb = _sealing.seal_bytes(bytes(64 << 20), None, compress=True, context=context)
    assert len(bomb) < 1 << 20
    ObjectStore(bucket).put(f"{result.id}/p0.hc.sealed", bomb, create_only=True)
    with pytest.raises(CatalogError, match="opens to more than the") as refused:
        restore(bucket, tmp_path / "new")
    assert f"{result.id}/p0.hc.sealed" in str(refused.value)
    assert not (tmp_path / "new").exists()
    assert not list(tmp_path.glob(".new.*"))


def test_a_truncated_sealed_piece_is_seen_by_size_and_never_continued(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    key_file = make_key(tmp_path / "key")
    first = backup(repo_root, bucket, key_file=key_file)
    store = ObjectStore(bucket)
    name = f"{first.id}/p0.hc.sealed"
    store.put(name, b"".join(store.chunks(name))[:-50], create_only=False)

    listing = list_backups(bucket, key_file=key_file)  # sizes only, no byte read
    assert listing["backups"][0]["restorable"] is False
    assert "bytes stored, the manifest says" in listing["backups"][0]["problem"]
    change(repo_root, "p0", {"k0": "after"})
    second = backup(repo_root, bucket, key_file=key_file, incremental=True)
    assert second.prefixes["p0"]["kind"] == "full"  # a new chain, not a delta on damage
    assert "p0" in second.chain_restarts
    restore(bucket, tmp_path / "new", key_file=key_file)
    assert dump(tmp_path / "new") == dump(repo_root)


def test_a_sealed_object_never_passes_for_another(
    bucket: str, repo_root: Path, tmp_path: Path
) -> None:
    key_file = make_key(tmp_path / "key")
    result = backup(repo_root, bucket, key_file=key_file)
    store = ObjectStore(bucket)

    def read(name: str) -> bytes:
        return b"".join(store.chunks(name))

    marker = read("hotcopy-backups.json")
    # The backup's manifest put in place of the marker (both sealed with the key).
    store.put("hotcopy-backups.json", read(f"{result.id}/MANIFEST.json"), create_only=False)
    with pytest.raises(CatalogError, match=r"hotcopy-backups.json.*damaged or forged"):
        list_backups(bucket, key_file=key_file)
    store.put("hotcopy-backups.json", marker, create_only=False)
    # A piece of one prefix put in place of another's: refused before its bytes are used.
    p0, p1 = f"{result.id}/p0.hc.sealed", f"{result.id}/p1.hc.sealed"
    store.put(p1, read(p0), create_only=False)
    with pytest.raises(CatalogError, match=r"p1\.hc\.sealed.*damaged or forged"):
        restore(bucket, tmp_path / "new", key_file=key_file)


def test_a_lock_object_that_is_never_renewed_is_broken_whatever_expiry_it_claims(
    bucket: str, repo_root: Path
) -> None:
    backup(repo_root, bucket)
    store = ObjectStore(bucket)
    planted = {"owner": "?", "host": "elsewhere", "pid": 1, "expires": 1e12}  # year 33658
    store.put("catalog.lock", json.dumps(planted).encode(), create_only=True)
    with (
        pytest.raises(CatalogError, match="held by"),
        store.lock("catalog.lock", ttl=2, timeout=0.5, owner="test"),
    ):
        pass  # not yet: unrenewed for less than a lease's life
    with store.lock("catalog.lock", ttl=1, timeout=10, owner="test"):
        pass  # unrenewed for longer than a lease's life (1 s): broken
    assert backup(repo_root, bucket).complete


def test_ctrl_c_while_uploading_says_nothing_was_recorded_and_leaves_nothing(
    bucket: str,
    repo_root: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    staging = tmp_path / "tmp"
    staging.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(staging))
    good = backup(repo_root, bucket)

    def interrupted(self: ObjectStore, name: str, path: Any) -> None:
        raise KeyboardInterrupt  # as Ctrl-C arrives during an upload

    monkeypatch.setattr(ObjectStore, "upload_file", interrupted)
    assert main(["backup", str(repo_root), bucket]) == 130
    said = capsys.readouterr().err
    assert "nothing of it is kept" in said and "recorded as partial" not in said
    assert list(staging.iterdir()) == []
    assert [b["id"] for b in list_backups(bucket)["backups"] if b["restorable"]] == [good.id]
