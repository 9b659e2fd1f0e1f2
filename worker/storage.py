"""Where image bytes come from: an S3 API (AWS, MinIO, moto) or a local folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from stat import S_ISREG
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.exceptions import BotoCoreError, ClientError

from schema.results import IMAGE_SUFFIXES, ObjectRef, bare_etag, real_version_id
from schema.s3 import make_s3_client
from schema.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

    from worker.s3_get import ObstoreGetter


class FetchError(Exception):
    """Fetching failed. `transient` errors are worth retrying; the others become a failed row."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient

    def __reduce__(self) -> tuple[Any, ...]:
        # Raised in a fetching process and re-raised in the worker: keep the class and `transient`.
        return (_rebuild_fetch_error, (type(self), str(self), self.transient))


def _rebuild_fetch_error(cls: type[FetchError], message: str, transient: bool) -> FetchError:
    error = cls.__new__(cls)
    Exception.__init__(error, message)
    error.transient = transient
    return error


def quoted_etag(etag: str) -> str:
    """An ETag as an If-Match header gives it: in double quotes."""
    return f'"{etag.strip(chr(34))}"'


def overwritten(ref: ObjectRef) -> FetchError:
    """The If-Match of a job's ETag failed: the key holds other bytes now (whose upload has its own event)."""
    return FetchError(
        f"object s3://{ref.bucket}/{ref.key} changed since the event (ETag {ref.etag} gone)", transient=False
    )


class LimitError(FetchError):
    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


class UnnamableKey(Exception):
    """The S3 client at hand cannot name this key exactly: fetch it with another."""


def transient_status(status: int) -> bool:
    """An HTTP status worth another try later: a server error, a timeout or throttling, or no answer (0)."""
    return status == 0 or status >= 500 or status in (408, 429)


@dataclass(frozen=True, slots=True)
class FetchedObject:
    data: bytes
    size: int
    last_modified: datetime | None = None
    # What the store says these bytes are: the identity of a job whose event named neither.
    etag: str | None = None
    version_id: str | None = None
    # Computed where the object is built, i.e. in the fetching process: the worker process, whose one GIL
    # bounds a GPU pod, then only unpickles it (0.47 ms saved per 500 kB photo on the development CPU).
    sha256: str = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sha256", hashlib.sha256(self.data).hexdigest())


def fetched_object(
    data: bytes, *, max_bytes: int, last_modified: datetime | None, etag: str | None, version_id: str | None
) -> FetchedObject:
    """A GET's bytes and the identity its answer gave, refused if the body outgrew the limit its size
    header was checked against."""
    if len(data) > max_bytes:
        raise LimitError(f"object is over the limit of {max_bytes} bytes")
    return FetchedObject(
        data=data,
        size=len(data),
        last_modified=last_modified,
        etag=bare_etag(etag),
        version_id=real_version_id(version_id),
    )


class ObjectStore(Protocol):
    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject: ...


# S3 error codes that will not change on retry: record the failure instead.
PERMANENT_S3_ERRORS = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "AccessDenied", "404", "403", "412"}


class S3Store:
    def __init__(
        self, client: S3Client, *, settings: Settings | None = None, fast: ObstoreGetter | None = None
    ) -> None:
        self._client = client
        self._settings = settings
        self._fast = fast

    @classmethod
    def from_settings(cls, settings: Settings) -> S3Store:
        from worker.s3_get import ObstoreGetter  # obstore loads in the processes that fetch, not in decoders

        session = boto3.session.Session()
        try:
            fast: ObstoreGetter | None = ObstoreGetter(settings, session)
        except ValueError:  # no credentials anywhere: boto3's GET says so, as it always did
            fast = None
        return cls(make_s3_client(settings, session=session), settings=settings, fast=fast)

    def __reduce__(self) -> tuple[Any, ...]:
        # A fetching process builds its own client (and connection pool) from the same settings.
        if self._settings is None:
            raise TypeError("an S3Store made from a bare client cannot cross processes: use from_settings")
        return (S3Store.from_settings, (self._settings,))

    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        if self._fast is not None:
            try:
                return self._fast.get(ref, max_bytes=max_bytes)
            except UnnamableKey:
                pass  # a key such as "a//b.jpg": boto3 names any key
        return self._boto3_get(ref, max_bytes=max_bytes)

    def _boto3_get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        arguments: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            arguments["VersionId"] = ref.version_id
        elif ref.etag:
            # The event names one version of the bytes; if the key was overwritten since, fail clearly
            # (the overwrite has an event of its own) rather than enrich other bytes under this identity.
            arguments["IfMatch"] = quoted_etag(ref.etag)
        try:
            response = self._client.get_object(**arguments)
            size = int(response["ContentLength"])
            if size > max_bytes:
                response["Body"].close()
                raise LimitError(f"object is {size} bytes, over the limit of {max_bytes}")
            data = response["Body"].read(max_bytes + 1)
        except ClientError as error:
            code = str(error.response.get("Error", {}).get("Code", ""))
            status = error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
            if code == "PreconditionFailed" or status == 412:
                raise overwritten(ref) from None
            transient = code not in PERMANENT_S3_ERRORS and transient_status(status)
            raise FetchError(f"S3 {code or status}: {error}", transient=transient) from None
        except BotoCoreError as error:
            raise FetchError(f"S3 unreachable: {error}", transient=True) from None
        return fetched_object(
            data,
            max_bytes=max_bytes,
            last_modified=response.get("LastModified"),
            etag=response.get("ETag"),
            version_id=response.get("VersionId"),
        )


class LocalStore:
    """A folder as a bucket: the bucket is the folder's absolute path, the key a relative path in it."""

    def __init__(self, root: Path) -> None:
        self.root = root.resolve()

    @property
    def bucket(self) -> str:
        return str(self.root)

    def _path(self, ref: ObjectRef) -> Path:
        path = (self.root / ref.key).resolve()
        # A key like '../../etc/passwd' or an absolute path must not escape the folder.
        if not path.is_relative_to(self.root):
            raise FetchError(f"key {ref.key!r} resolves outside {self.root}", transient=False)
        return path

    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        path = self._path(ref)
        try:
            stat = path.stat()
            # A FIFO or a device named like a photo would block the read (or never end): refuse it.
            if not S_ISREG(stat.st_mode):
                raise FetchError(f"not a regular file: {path}", transient=False)
            if ref.etag and local_etag(stat) != ref.etag:
                raise FetchError(f"{path} changed since it was listed", transient=False)
            if stat.st_size > max_bytes:
                raise LimitError(f"file is {stat.st_size} bytes, over the limit of {max_bytes}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise FetchError(f"no such file: {path}", transient=False) from None
        except OSError as error:  # permissions, a directory, an I/O error: none goes away on retry
            raise FetchError(f"cannot read {path}: {error}", transient=False) from None
        modified = datetime.fromtimestamp(stat.st_mtime, tz=UTC)
        return FetchedObject(data=data, size=len(data), last_modified=modified)

    def list(self, prefix: str = "") -> Iterator[ObjectRef]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if not key.lower().endswith(IMAGE_SUFFIXES) or not key.startswith(prefix):
                    continue
                try:
                    stat = path.stat()
                except OSError:
                    # A dangling link: listed without a version, so get() records why it cannot be read
                    # instead of one missing file ending the whole run.
                    yield ObjectRef(bucket=self.bucket, key=key)
                    continue
                yield ObjectRef(bucket=self.bucket, key=key, etag=local_etag(stat), size=stat.st_size)


def local_etag(stat: os.stat_result) -> str:
    """A cheap version tag for a local file: changes when it is rewritten."""
    return hashlib.sha1(f"{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]
