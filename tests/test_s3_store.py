"""ObjectStore against a real S3 server (moto as a child process, or HOTCOPY_TEST_S3_ENDPOINT).

No mocks: faults are real (a server SIGKILLed, a wrong secret, nothing listening). Where a
test must act at a precise point of a transfer, it hooks botocore's own request events.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import boto3
import pytest
from hotcopy.workers._errors import CatalogError
from hotcopy.workers._s3 import ObjectStore, is_object_url
from hotcopy_test_support import s3server

pytestmark = pytest.mark.timeout(60)


def raw_client(endpoint_url: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint_url, region_name="us-east-1")


@pytest.fixture
def store(s3_url: tuple[str, str]) -> ObjectStore:
    url, endpoint_url = s3_url
    return ObjectStore(url, endpoint_url=endpoint_url)


@pytest.mark.parametrize(
    "url",
    [
        "/data/backups",
        "s3://",
        "s3://ab",
        "s3://Bucket",
        "s3://-bucket",
        "s3://bucket-",
        "s3://my..bucket",
        "s3://192.168.1.1",
        "s3://bucket/a//b",
        "s3://bucket/a/../b",
        "s3://bucket/./b",
        "s3://bucket/a?x=1",
        "s3://bucket/a#frag",
    ],
)
def test_a_bad_url_is_refused_with_a_clear_message(url: str) -> None:
    with pytest.raises(CatalogError, match=r"URL|bucket name|segment"):
        ObjectStore(url, endpoint_url="http://127.0.0.1:1")


def test_a_url_names_its_bucket_and_path() -> None:
    assert is_object_url("s3://bucket") and not is_object_url("/s3://bucket")
    assert ObjectStore("s3://bucket").describe == "s3://bucket"
    assert ObjectStore("s3://my.bucket/a/b/").describe == "s3://my.bucket/a/b"


def test_create_only_put_refuses_the_second_writer(store: ObjectStore) -> None:
    assert store.put("marker.json", b"first", create_only=True)
    assert not store.put("marker.json", b"second", create_only=True)
    assert store.get("marker.json", limit=100) == b"first"
    assert store.put("marker.json", b"third", create_only=False)
    assert store.get("marker.json", limit=100) == b"third"


def test_get_of_a_missing_object_is_none_and_a_size_limit_is_enforced(store: ObjectStore) -> None:
    assert store.get("absent", limit=100) is None
    store.put("big", b"x" * 101, create_only=False)
    assert store.get("big", limit=101) == b"x" * 101
    with pytest.raises(CatalogError, match="101 bytes, more than the 100"):
        store.get("big", limit=100)


def test_names_are_relative_to_the_path(s3_url: tuple[str, str], store: ObjectStore) -> None:
    url, endpoint_url = s3_url
    store.put("b1/MANIFEST.json", b"{}", create_only=True)
    bucket = url.removeprefix("s3://").split("/")[0]
    keys = raw_client(endpoint_url).list_objects_v2(Bucket=bucket)["Contents"]
    assert [item["Key"] for item in keys] == ["catalog/b1/MANIFEST.json"]
    with pytest.raises(ValueError):
        store.put("../escape", b"", create_only=False)


def test_a_big_file_round_trips_byte_exact_through_multipart(
    s3_url: tuple[str, str], store: ObjectStore, tmp_path: Path
) -> None:
    source = tmp_path / "piece.hc"
    source.write_bytes(os.urandom(40 << 20))
    store.upload_file("b1/piece.hc", source)
    bucket = s3_url[0].removeprefix("s3://").split("/")[0]
    head = raw_client(s3_url[1]).head_object(Bucket=bucket, Key="catalog/b1/piece.hc")
    assert head["ETag"].strip('"').endswith("-3")  # three parts of 16 MiB or less
    store.download_file("b1/piece.hc", tmp_path / "restored.hc")
    assert (tmp_path / "restored.hc").read_bytes() == source.read_bytes()
    digest = hashlib.sha256()
    for chunk in store.chunks("b1/piece.hc", chunk_size=1 << 20):
        assert len(chunk) <= 1 << 20
        digest.update(chunk)
    assert digest.digest() == hashlib.sha256(source.read_bytes()).digest()
    assert store.sizes() == {"b1/piece.hc": 40 << 20}


def test_a_missing_object_cannot_be_downloaded_or_streamed(
    store: ObjectStore, tmp_path: Path
) -> None:
    with pytest.raises(CatalogError, match="missing"):
        store.download_file("absent", tmp_path / "absent")
    assert not list(tmp_path.iterdir())
    with pytest.raises(CatalogError, match="missing"):
        list(store.chunks("absent"))


def test_sizes_pages_past_1000_objects_and_delete_batches(store: ObjectStore) -> None:
    names = [f"b{i % 3}/{i:05}.hc-delta" for i in range(1005)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: store.put(n, n.encode(), create_only=True), names))
    store.put("marker.json", b"{}", create_only=True)
    assert store.sizes() == {**{n: len(n) for n in names}, "marker.json": 2}
    assert store.sizes("b1") == {n: len(n) for n in names if n.startswith("b1/")}
    store.delete([*names, "never-there"])
    assert store.sizes() == {"marker.json": 2}


def test_a_second_holder_waits_for_the_lock_and_gets_it_after_release(
    s3_url: tuple[str, str], store: ObjectStore
) -> None:
    other = ObjectStore(*s3_url[:1], endpoint_url=s3_url[1])
    saw_it_held = threading.Event()
    other._client.meta.events.register(
        "after-call.s3.GetObject", lambda **_: saw_it_held.set()
    )  # the waiter has read the lease of the first holder
    acquired = threading.Event()

    def second() -> None:
        with other.lock("catalog.lock", ttl=10, timeout=30, owner="second"):
            acquired.set()

    with store.lock("catalog.lock", ttl=10, timeout=0, owner="first"):
        with (
            pytest.raises(CatalogError, match="held by 'first'"),
            other.lock("catalog.lock", ttl=10, timeout=0.2, owner="second"),
        ):
            pass
        saw_it_held.clear()
        waiter = threading.Thread(target=second)
        waiter.start()
        assert saw_it_held.wait(10)
        assert not acquired.is_set()
    waiter.join(30)
    assert acquired.is_set()
    assert store.get("catalog.lock", 1000) is None  # released by the second holder too


def test_an_expired_lock_is_broken(store: ObjectStore) -> None:
    dead = {"owner": "crashed", "host": "elsewhere", "pid": 1, "expires": time.time() - 1}
    store.put("catalog.lock", json.dumps(dead).encode(), create_only=True)
    with store.lock("catalog.lock", ttl=10, timeout=5, owner="next") as held:
        assert held is None
        lease = json.loads(store.get("catalog.lock", 1000) or b"")
        assert lease["owner"] == "next" and lease["pid"] == os.getpid()


def test_a_held_lock_is_renewed_past_its_ttl(s3_url: tuple[str, str], store: ObjectStore) -> None:
    renewed = threading.Semaphore(0)
    store._client.meta.events.register(
        "after-call.s3.PutObject", lambda parsed, **_: "Error" not in parsed and renewed.release()
    )
    lock = store.lock("catalog.lock", ttl=0.6, timeout=0, owner="first")
    with lock:
        for _ in range(4):  # the take, then three renewals: more than ttl has passed
            assert renewed.acquire(timeout=10)
        second = ObjectStore(s3_url[0], endpoint_url=s3_url[1])
        with (
            pytest.raises(CatalogError, match="held by 'first'"),
            second.lock("catalog.lock", ttl=1, timeout=0, owner="second"),
        ):
            pass
    assert not lock.lost


def test_a_lock_lost_to_another_holder_is_reported(store: ObjectStore) -> None:
    refused = threading.Event()
    store._client.meta.events.register(
        "after-call.s3.PutObject", lambda parsed, **_: "Error" in parsed and refused.set()
    )
    lock = store.lock("catalog.lock", ttl=0.6, timeout=0, owner="first")
    with pytest.raises(CatalogError, match="lost while held"), lock:
        taker = {"owner": "taker", "host": "elsewhere", "pid": 1, "expires": time.time() + 60}
        store.put("catalog.lock", json.dumps(taker).encode(), create_only=False)
        assert refused.wait(10)  # the renewal, refused: the lease is no longer ours
        deadline = time.monotonic() + 10
        while not lock.lost and time.monotonic() < deadline:
            time.sleep(0.01)  # the renewer records the loss right after the refusal
        assert lock.lost
    assert json.loads(store.get("catalog.lock", 1000) or b"")["owner"] == "taker"


def test_credentials_refused_is_a_clear_error(
    s3_server: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    if s3_server.external:
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(CatalogError, match="credentials refused by"):
            ObjectStore("s3://hotcopy-any", endpoint_url=s3_server.endpoint_url).get("x", 1)
        return
    # moto checks signatures only when told to; its first two requests create a user and key.
    strict = s3server().S3Server(tmp_path / "moto.log", {"INITIAL_NO_AUTH_ACTION_COUNT": "2"})
    strict.start()
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "bootstrap")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "bootstrap")
        iam = boto3.client("iam", endpoint_url=strict.endpoint_url, region_name="us-east-1")
        iam.create_user(UserName="backup")
        key = iam.create_access_key(UserName="backup")["AccessKey"]
        for key_id, secret, code in [
            (key["AccessKeyId"], "not-the-secret", "SignatureDoesNotMatch"),
            ("AKIANOTAKEYATALL", "x", "InvalidAccessKeyId"),
            (key["AccessKeyId"], key["SecretAccessKey"], "AccessDenied"),  # no policy
        ]:
            monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
            monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
            store = ObjectStore("s3://hotcopy-any/c", endpoint_url=strict.endpoint_url)
            with pytest.raises(CatalogError, match=f"credentials refused by .*{code}") as err:
                store.get("marker.json", 100)
            assert "AWS_SECRET_ACCESS_KEY" in str(err.value)
    finally:
        strict.stop()


def test_no_credentials_a_missing_bucket_and_no_server_are_clear_errors(
    s3_url: tuple[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    url, endpoint_url = s3_url
    with pytest.raises(CatalogError, match="bucket 'hotcopy-nothing' does not exist"):
        ObjectStore("s3://hotcopy-nothing", endpoint_url=endpoint_url).get("marker.json", 100)
    nowhere = f"http://127.0.0.1:{s3server().free_port()}"
    store = ObjectStore(url, endpoint_url=nowhere, max_attempts=2, connect_timeout=1)
    with pytest.raises(CatalogError, match=f"cannot reach {nowhere}"):
        store.sizes()
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance role to ask for
    monkeypatch.setenv("AWS_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
    with pytest.raises(CatalogError, match="no AWS credentials found"):
        ObjectStore(url, endpoint_url=endpoint_url).get("marker.json", 100)


@pytest.mark.crash
def test_the_server_killed_mid_upload_is_an_error_not_a_hang(
    s3_server: Any, s3_url: tuple[str, str], tmp_path: Path
) -> None:
    if s3_server.external:
        pytest.skip("an external S3 endpoint cannot be killed")
    url, endpoint_url = s3_url
    store = ObjectStore(
        url,
        endpoint_url=endpoint_url,
        max_attempts=2,
        connect_timeout=1,
        read_timeout=2,
        part_size=5 << 20,
    )
    killed = threading.Lock()

    def kill_at_first_part(**_: Any) -> None:
        if killed.acquire(blocking=False):
            s3_server.kill()

    store._client.meta.events.register("before-send.s3.UploadPart", kill_at_first_part)
    source = tmp_path / "piece.hc"
    source.write_bytes(os.urandom(20 << 20))
    try:
        started = time.monotonic()
        with pytest.raises(CatalogError, match=f"cannot upload .*cannot reach {endpoint_url}"):
            store.upload_file("b1/piece.hc", source)
        assert time.monotonic() - started < 30
    finally:
        s3_server.start()  # empty: moto keeps its state in memory
