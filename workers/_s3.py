"""Object storage for backup catalogs: a small, explicit wrapper over a boto3 S3 client.

A catalog at ``s3://BUCKET/PATH`` keeps every file as the object ``PATH/<name>``. boto3 gives
the standard AWS credential chain (environment, ``~/.aws/config`` and ``credentials``,
``AWS_ENDPOINT_URL``), conditional writes and multipart transfers; this module adds only what a
catalog needs on top (size limits, create-only puts, a lease) and turns every botocore failure
into a ``CatalogError`` an operator can act on, in one place (``_translated``).

boto3 is imported when an ``ObjectStore`` is made, never by ``import hotcopy.workers``: it
costs the storage core's import time far more than everything else together.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Iterable, Iterator
from typing import Any

from hotcopy.coordinator._process import ProcessIdentity, is_alive

from ._errors import CatalogError

log = logging.getLogger(__name__)

_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_IPV4 = re.compile(r"\d+\.\d+\.\d+\.\d+")
_REFUSED = {"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "403"}
_MISSING = {"NoSuchKey", "404"}
_PART_SIZE = 16 << 20
_PUT_RETRIES = 4  # a 409 ConditionalRequestConflict: another conditional write was in flight


def is_object_url(text: str) -> bool:
    """Whether ``text`` names object storage (``s3://...``) rather than a local directory."""
    return text.startswith("s3://")


def _split_url(url: str) -> tuple[str, str]:
    if not is_object_url(url):
        raise CatalogError(f"{url!r} is not an s3://BUCKET[/PATH] URL")
    bucket, _, path = url.removeprefix("s3://").partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket or _IPV4.fullmatch(bucket):
        raise CatalogError(
            f"{url!r}: {bucket!r} is not a valid bucket name (3-63 characters: lowercase "
            "letters, digits, '.' and '-', starting and ending with a letter or a digit)"
        )
    path = path.removesuffix("/")  # "s3://bucket/backups/" means the same as without the "/"
    if path:
        try:
            _check_name(path)
        except ValueError as err:
            raise CatalogError(f"{url!r}: {err}") from None
    return bucket, path


def _check_name(name: str) -> None:
    for segment in name.split("/"):
        if segment in ("", ".", "..") or any(c < " " or c in "\\?#\x7f" for c in segment):
            raise ValueError(f"{name!r} has an empty, '.' or '..' segment or a character refused")


class ObjectStore:
    """The objects below ``s3://BUCKET/PATH``, named relative to PATH.

    Args:
        url: ``s3://BUCKET`` or ``s3://BUCKET/PATH``.
        endpoint_url: an S3-compatible server (MinIO, Ceph, moto), addressed path-style; by
            default boto3's (AWS, or ``AWS_ENDPOINT_URL``).
        connect_timeout, read_timeout, max_attempts: per request, then botocore's standard
            retry mode; outage tests make them short.
        part_size: of multipart transfers.
    """

    def __init__(
        self,
        url: str,
        *,
        endpoint_url: str | None = None,
        connect_timeout: float = 10.0,
        read_timeout: float = 60.0,
        max_attempts: int = 5,
        part_size: int = _PART_SIZE,
    ) -> None:
        self._bucket, self._path = _split_url(url)
        import boto3
        from boto3.s3.transfer import TransferConfig
        from botocore.config import Config

        config = Config(
            retries={"mode": "standard", "max_attempts": max_attempts},
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            s3={"addressing_style": "path"} if endpoint_url else None,
        )

        def make_client() -> Any:
            session = boto3.session.Session()
            region = session.region_name or "us-east-1"
            return session.client(
                "s3", endpoint_url=endpoint_url, region_name=region, config=config
            )

        self._make_client, self._pid, self._boto = make_client, os.getpid(), make_client()
        # s3transfer adjusts the part size itself past 10,000 parts (160 GiB at 16 MiB).
        self._transfer = TransferConfig(
            multipart_threshold=part_size, multipart_chunksize=part_size, max_concurrency=4
        )

    @property
    def _client(self) -> Any:
        if self._pid != os.getpid():  # a forked child must not share its parent's connections
            self._pid, self._boto = os.getpid(), self._make_client()
        return self._boto

    @property
    def describe(self) -> str:
        """The ``s3://`` URL of this store, for messages."""
        return f"s3://{self._bucket}/{self._path}".removesuffix("/")

    @property
    def _endpoint(self) -> str:
        return str(self._client.meta.endpoint_url)

    def close(self) -> None:
        """Close the client's connections; idempotent."""
        self._client.close()

    def __enter__(self) -> ObjectStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _key(self, name: str) -> str:
        _check_name(name)
        return f"{self._path}/{name}" if self._path else name

    @contextlib.contextmanager
    def _translated(self, what: str) -> Iterator[None]:
        """Turn a botocore failure into a ``CatalogError`` naming ``what`` and a remedy."""
        import botocore.exceptions as aws
        from boto3.exceptions import Boto3Error
        from s3transfer.exceptions import RetriesExceededError

        try:
            yield
        except RetriesExceededError as err:
            raise CatalogError(f"{what}: {err.last_exception}") from err
        except aws.NoCredentialsError as err:
            raise CatalogError(
                f"{what}: no AWS credentials found; set AWS_ACCESS_KEY_ID and "
                "AWS_SECRET_ACCESS_KEY, or AWS_PROFILE with ~/.aws/credentials"
            ) from err
        except (aws.ConnectionError, aws.HTTPClientError) as err:  # after botocore's retries
            raise CatalogError(
                f"{what}: cannot reach {self._endpoint} ({err}); check the endpoint "
                "(AWS_ENDPOINT_URL) and the network"
            ) from err
        except aws.ClientError as err:
            if _code(err) in _REFUSED:
                raise CatalogError(
                    f"{what}: credentials refused by {self._endpoint} ({_code(err)}); check "
                    "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY (or AWS_PROFILE) and its policy"
                ) from err
            if _code(err) == "NoSuchBucket":
                raise CatalogError(
                    f"{what}: bucket {self._bucket!r} does not exist at {self._endpoint}; "
                    "create it first or correct the URL"
                ) from err
            raise CatalogError(f"{what}: {err}") from err
        except (aws.BotoCoreError, Boto3Error) as err:
            raise CatalogError(f"{what}: {err}") from err

    def _where(self, name: str) -> str:
        return f"{self.describe}/{name}"

    def get(self, name: str, limit: int) -> bytes | None:
        """The bytes of object ``name``, or None if there is none.

        Raises:
            CatalogError: it is larger than ``limit`` bytes (nothing more is read), or storage
                failed.
        """
        got = self._get(name, limit)
        return None if got is None else got[0]

    def _get(self, name: str, limit: int) -> tuple[bytes, str] | None:
        """The bytes and ETag of ``name``, or None."""
        with self._translated(f"cannot read {self._where(name)}"):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=self._key(name))
            except self._client.exceptions.NoSuchKey:
                return None
            body = response["Body"]
            with contextlib.closing(body):
                if response["ContentLength"] > limit:
                    raise CatalogError(
                        f"{self._where(name)} holds {response['ContentLength']} bytes, more "
                        f"than the {limit} expected of it: it is not one of hotcopy's"
                    )
                return bytes(body.read()), str(response["ETag"])

    def put(self, name: str, data: bytes, *, create_only: bool) -> bool:
        """Write object ``name`` in one PUT, checksummed (a body damaged on the way is refused).

        Returns:
            False when ``create_only`` and the object already exists (nothing written).
        """
        return self._put(name, data, if_none_match=create_only) is not None

    def _put(
        self, name: str, data: bytes, *, if_none_match: bool = False, if_match: str = ""
    ) -> str | None:
        """Put and return the new ETag, or None when the condition asked for does not hold."""
        from botocore.exceptions import ClientError

        condition = {"IfNoneMatch": "*"} if if_none_match else {}
        if if_match:
            condition = {"IfMatch": if_match}
        with self._translated(f"cannot write {self._where(name)}"):
            for attempt in range(_PUT_RETRIES + 1):
                try:
                    response = self._client.put_object(
                        Bucket=self._bucket,
                        Key=self._key(name),
                        Body=data,
                        ChecksumAlgorithm="CRC32",
                        **condition,
                    )
                    return str(response["ETag"])
                except ClientError as err:
                    if condition and _code(err) in {"PreconditionFailed", *_MISSING}:
                        return None  # 404: S3 answers If-Match on a missing object so
                    if _code(err) != "ConditionalRequestConflict" or attempt == _PUT_RETRIES:
                        raise
                    time.sleep(0.05 * 2**attempt)  # another conditional write is in flight
        raise AssertionError("unreachable")

    def upload_file(self, name: str, path: str | os.PathLike[str]) -> None:
        """Upload a local file as object ``name`` (multipart, overwriting), then check its size."""
        from boto3.s3.transfer import create_transfer_manager

        size = os.stat(path).st_size
        key = self._key(name)
        with (
            self._translated(f"cannot upload {os.fspath(path)} to {self._where(name)}"),
            create_transfer_manager(self._client, self._transfer) as manager,
        ):
            extra = {"ChecksumAlgorithm": "CRC32"}
            manager.upload(os.fspath(path), self._bucket, key, extra).result()
            stored = self._client.head_object(Bucket=self._bucket, Key=key)["ContentLength"]
        if stored != size:
            raise CatalogError(f"{self._where(name)} holds {stored} bytes after uploading {size}")

    def download_file(self, name: str, path: str | os.PathLike[str]) -> None:
        """Download object ``name`` into a new file ``path``, in one streamed GET: ranged GETs
        in parallel cost some servers a pass over the whole object each (moto: 16 MiB parts
        of 1 GiB took 7x longer than one GET). Not synced: the caller's scratch copy."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            for chunk in self.chunks(name, 8 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(fd, view) :]
        except BaseException:
            os.unlink(path)  # nothing half-downloaded is left to be taken for the object
            raise
        finally:
            os.close(fd)

    def chunks(self, name: str, chunk_size: int = 4 << 20) -> Iterator[bytes]:
        """Stream the bytes of object ``name``; a missing object is a ``CatalogError``."""
        with self._translated(f"cannot read {self._where(name)}"):
            try:
                response = self._client.get_object(Bucket=self._bucket, Key=self._key(name))
            except self._client.exceptions.NoSuchKey:
                raise CatalogError(f"{self._where(name)} is missing") from None
            with contextlib.closing(response["Body"]) as body:
                yield from body.iter_chunks(chunk_size)

    def sizes(self, under: str = "") -> dict[str, int]:
        """Every object below ``under`` (all if empty), by name relative to PATH, with its size."""
        root = self._path and self._path + "/"
        prefix = self._key(under) + "/" if under else root
        found: dict[str, int] = {}
        with self._translated(f"cannot list {self.describe}/{under}".removesuffix("/")):
            pages = self._client.get_paginator("list_objects_v2")
            for page in pages.paginate(Bucket=self._bucket, Prefix=prefix):
                for item in page.get("Contents", ()):
                    found[str(item["Key"]).removeprefix(root)] = int(item["Size"])
        return found

    def delete(self, names: Iterable[str]) -> None:
        """Delete objects, 1000 a request; a missing one is not an error.

        Raises:
            CatalogError: naming every object that could not be deleted, and why.
        """
        keys = [self._key(name) for name in names]
        failed: list[str] = []
        for start in range(0, len(keys), 1000):
            batch = [{"Key": key} for key in keys[start : start + 1000]]
            with self._translated(f"cannot delete from {self.describe}"):
                response = self._client.delete_objects(
                    Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True}
                )
            errors = response.get("Errors", ())
            failed += [f"{e['Key']} ({e.get('Code')}: {e.get('Message')})" for e in errors]
        if failed:
            raise CatalogError(f"cannot delete from s3://{self._bucket}: {', '.join(failed)}")

    def abort_uploads(self, started_before: float) -> list[str]:
        """Abort the multipart uploads below PATH started before ``started_before`` (unix
        time): what a killed run left half-sent, billed by the store until aborted. The
        names of the objects they were for."""
        root = self._path and self._path + "/"
        aborted: list[str] = []
        with self._translated(f"cannot list the unfinished uploads of {self.describe}"):
            pages = self._client.get_paginator("list_multipart_uploads")
            for page in pages.paginate(Bucket=self._bucket, Prefix=root):
                for upload in page.get("Uploads", ()):
                    if upload["Initiated"].timestamp() < started_before:
                        self._client.abort_multipart_upload(
                            Bucket=self._bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                        )
                        aborted.append(upload["Key"][len(root) :])
        return aborted

    def _delete_if(self, name: str, etag: str) -> bool:
        """Delete ``name`` only while its ETag is ``etag``; False if it has changed or gone."""
        from botocore.exceptions import ClientError

        key = self._key(name)
        with self._translated(f"cannot delete {self._where(name)}"):
            try:
                self._client.delete_object(Bucket=self._bucket, Key=key, IfMatch=etag)
                return True
            except ClientError as err:
                if _code(err) in {"PreconditionFailed", *_MISSING}:
                    return False
                if _code(err) != "NotImplemented":
                    raise
            # A server without conditional deletes: compare, then delete. Another holder may
            # replace the object between the two, and lose it: the lease's ttl makes that rare.
            try:
                current = self._client.head_object(Bucket=self._bucket, Key=key)["ETag"]
            except ClientError:
                return False
            if current != etag:
                return False
            self._client.delete_object(Bucket=self._bucket, Key=key)
            return True

    def holder(self, name: str) -> str:
        """Who holds the lease ``name`` now, for a message."""
        held = self._get(name, 64 << 10)
        return "nobody (released)" if held is None else describe_holder(_parse_lease(held[0]))

    def lock(self, name: str, *, ttl: float, timeout: float | None, owner: str) -> ObjectLock:
        """A lease on object ``name``, taken on entering; see ``ObjectLock``."""
        return ObjectLock(self, name, ttl=ttl, timeout=timeout, owner=owner)


class LeaseBusy(CatalogError):
    """A lease was not granted within its timeout: another holder has it."""


def describe_holder(holder: dict[str, Any]) -> str:
    """Who holds a lease, as its object says, for a message."""
    if not holder:
        return "an unreadable lease object"
    left = float(holder.get("expires", 0)) - time.time()
    return (
        f"{holder.get('owner')!r} (host {holder.get('host')}, pid {holder.get('pid')}; "
        f"its lease runs {max(left, 0):.0f} s more unless renewed)"
    )


class ObjectLock(contextlib.AbstractContextManager[None]):
    """A lease held as an object created only if absent: ``{owner, host, pid, expires}``.

    Entering waits (``timeout`` seconds, None = forever) while another holder's lease has not
    expired; an expired one is deleted if it is still the object read, then taken. While held,
    a thread rewrites it with a later expiry every ``ttl / 3``, only if it is still ours (its
    ETag). Expiry is compared with this host's clock, so hosts' clocks must agree to well
    within ``ttl``. If the lease is lost (taken over after it expired), ``lost`` becomes True
    and leaving raises ``CatalogError``: whatever was done under it must not be published.
    """

    def __init__(
        self, store: ObjectStore, name: str, *, ttl: float, timeout: float | None, owner: str
    ) -> None:
        self._store, self._name, self._ttl, self._timeout = store, name, ttl, timeout
        self._owner = owner
        self._etag, self._expires, self._writing = "", 0.0, 0.0
        self._lost = threading.Event()
        self._stop = threading.Event()
        self._renewer: threading.Thread | None = None

    @property
    def lost(self) -> bool:
        """Whether the lease was found taken by another holder while held."""
        return self._lost.is_set()

    @property
    def held(self) -> bool:
        """Whether the lease is surely still ours: not lost, and a third of its ttl still
        ahead. A holder stopped past a renewal (SIGSTOP, a frozen VM) learns here, before it
        writes, that another may hold it now, without waiting for its renewal thread."""
        return not self.lost and time.time() + self._ttl / 3 < self._expires

    def _body(self) -> bytes:
        self._writing = time.time() + self._ttl  # becomes _expires once the write succeeds
        me = ProcessIdentity.current()
        info = {"owner": self._owner, "host": socket.gethostname(), "pid": me.pid}
        here = {"boot": me.boot.hex(), "pidns": _pid_namespace(), "start_ticks": me.start_ticks}
        return json.dumps({**info, **here, "ttl": self._ttl, "expires": self._writing}).encode()

    def __enter__(self) -> None:
        deadline = None if self._timeout is None else time.monotonic() + self._timeout
        delay = 0.05
        first_seen: dict[str, float] = {}  # each version of the lease object: when first read
        while (etag := self._store._put(self._name, self._body(), if_none_match=True)) is None:
            held = self._store._get(self._name, 64 << 10)
            if held is None:
                continue  # released meanwhile
            holder = _parse_lease(held[0])
            # A lease unchanged for longer than its ttl, on this host's own clock, was not
            # renewed: its holder is gone, whatever its expiry claims (a clock far ahead, or
            # a planted object).
            unrenewed = time.monotonic() - first_seen.setdefault(held[1], time.monotonic())
            ttl = holder.get("ttl")
            stale = unrenewed > (ttl if isinstance(ttl, int | float) and ttl > 0 else self._ttl)
            if float(holder.get("expires", 0)) < time.time() or stale or _died_here(holder):
                log.info("breaking lease %s of %s: expired, or its holder died", self._name, holder)
                self._store._delete_if(self._name, held[1])
                continue
            if deadline is not None and time.monotonic() >= deadline:
                raise LeaseBusy(
                    f"{self._store._where(self._name)} is held by {describe_holder(holder)}; "
                    f"gave up after {self._timeout:g} s"
                )
            pause = delay if deadline is None else min(delay, deadline - time.monotonic())
            time.sleep(max(pause, 0))  # polling a remote server: there is no event to wait on
            delay = min(delay * 2, 1.0)
        self._etag, self._expires = etag, self._writing
        self._renewer = threading.Thread(target=self._renew, name="s3-lease-renewal", daemon=True)
        self._renewer.start()

    def _renew(self) -> None:
        # A renewal whose answer is lost and which botocore retries is refused by its own
        # write (new ETag): the lease counts as lost, the safe mistake to make.
        while not self._stop.wait(self._ttl / 3):
            try:
                etag = self._store._put(self._name, self._body(), if_match=self._etag)
            except CatalogError as err:  # unreachable for now: keep trying until it expires
                if time.time() < self._expires:
                    log.warning("cannot renew lease %s: %s", self._name, err)
                    continue
                etag = None
            if etag is None:
                log.error("lease %s lost: taken by another holder, or expired", self._name)
                self._lost.set()
                return
            self._etag, self._expires = etag, self._writing

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        if self._renewer is not None:
            self._renewer.join()
        failing = exc_info[0] is not None
        try:
            if not self.lost and not self._store._delete_if(self._name, self._etag):
                self._lost.set()
        except CatalogError as err:
            if not failing:
                raise
            # The error that ended the work is the one to report (an unreachable store fails
            # the release too); the lease expires by itself.
            log.warning("cannot release lease %s: %s", self._name, err)
        if self.lost and not failing:
            raise CatalogError(
                f"lease {self._store._where(self._name)} was lost while held (it expired, and "
                "another holder may have taken it): what was done under it must not be published"
            )


def _code(err: Any) -> str:
    """The S3 error code of a botocore ``ClientError`` (a bare status for HEAD requests)."""
    return str(err.response.get("Error", {}).get("Code", ""))


def _pid_namespace() -> int:
    return os.stat("/proc/self/ns/pid").st_ino


def _died_here(holder: dict[str, Any]) -> bool:
    """Whether the lease's holder ran in this boot and pid namespace (this machine, this
    container) and is gone: its lease need not run out first, as restic breaks a lock whose
    process on this host no longer exists. Pid and start time name one process for ever; a
    process this one cannot see (``hidepid``) counts as alive (``is_alive``)."""
    pid, ticks, boot = holder.get("pid"), holder.get("start_ticks"), holder.get("boot")
    if not (isinstance(pid, int) and isinstance(ticks, int) and isinstance(boot, str)):
        return False
    me = ProcessIdentity.current()
    if boot != me.boot.hex() or holder.get("pidns") != _pid_namespace():
        return False
    return not is_alive(ProcessIdentity(pid, ticks, me.boot))


def _parse_lease(data: bytes) -> dict[str, Any]:
    # Not a lease of ours (or damaged): counts as expired, and is broken only if unchanged.
    with contextlib.suppress(ValueError):
        holder = json.loads(data)
        if isinstance(holder, dict) and isinstance(holder.get("expires"), int | float):
            return holder
    return {}
