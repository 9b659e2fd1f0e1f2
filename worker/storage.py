"""Where image bytes come from: an S3 API (AWS, MinIO, moto) or a local folder."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

from schema.results import ObjectRef
from schema.settings import Settings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client


class FetchError(Exception):
    """Fetching failed. `transient` errors are worth retrying; the others become a failed row."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class LimitError(FetchError):
    def __init__(self, message: str) -> None:
        super().__init__(message, transient=False)


@dataclass(frozen=True, slots=True)
class FetchedObject:
    data: bytes
    size: int


class ObjectStore(Protocol):
    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject: ...

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectRef]: ...


def make_s3_client(settings: Settings) -> S3Client:
    credentials: dict[str, Any] = {}
    if settings.s3_access_key_id and settings.s3_secret_access_key:
        credentials = {
            "aws_access_key_id": settings.s3_access_key_id.get_secret_value(),
            "aws_secret_access_key": settings.s3_secret_access_key.get_secret_value(),
        }
    return boto3.session.Session().client(
        "s3",
        endpoint_url=settings.s3_endpoint_url,
        region_name=settings.s3_region,
        config=Config(
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
            # One pool slot per fetch thread, so fetches never queue for a connection.
            max_pool_connections=max(10, settings.fetch_threads * 2),
            s3={"addressing_style": "path"} if settings.s3_endpoint_url else {},
        ),
        **credentials,
    )


# S3 error codes that will not change on retry: record the failure instead.
PERMANENT_S3_ERRORS = {"NoSuchKey", "NoSuchBucket", "NoSuchVersion", "AccessDenied", "404", "403", "412"}


class S3Store:
    def __init__(self, client: S3Client) -> None:
        self._client = client

    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        arguments: dict[str, Any] = {"Bucket": ref.bucket, "Key": ref.key}
        if ref.version_id:
            arguments["VersionId"] = ref.version_id
        elif ref.etag:
            # The event names one version of the bytes; if the key was overwritten since, fail clearly
            # (the overwrite has an event of its own) rather than enrich other bytes under this identity.
            arguments["IfMatch"] = f'"{ref.etag.strip(chr(34))}"'
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
                raise FetchError(
                    f"object s3://{ref.bucket}/{ref.key} changed since the event (ETag {ref.etag} gone)",
                    transient=False,
                ) from None
            transient = code not in PERMANENT_S3_ERRORS and (status >= 500 or status in (0, 408, 429))
            raise FetchError(f"S3 {code or status}: {error}", transient=transient) from None
        except BotoCoreError as error:
            raise FetchError(f"S3 unreachable: {error}", transient=True) from None
        if len(data) > max_bytes:
            raise LimitError(f"object is over the limit of {max_bytes} bytes")
        return FetchedObject(data=data, size=len(data))

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
            for item in page.get("Contents", []):
                yield ObjectRef(
                    bucket=bucket, key=item["Key"], etag=item.get("ETag", "").strip('"') or None, size=item["Size"]
                )


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


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
            size = path.stat().st_size
            if size > max_bytes:
                raise LimitError(f"file is {size} bytes, over the limit of {max_bytes}")
            data = path.read_bytes()
        except FileNotFoundError:
            raise FetchError(f"no such file: {path}", transient=False) from None
        except IsADirectoryError:
            raise FetchError(f"not a file: {path}", transient=False) from None
        except PermissionError as error:
            raise FetchError(f"cannot read {path}: {error}", transient=False) from None
        return FetchedObject(data=data, size=len(data))

    def list(self, bucket: str, prefix: str) -> Iterator[ObjectRef]:
        for dirpath, _dirs, files in os.walk(self.root):
            for name in sorted(files):
                path = Path(dirpath) / name
                key = path.relative_to(self.root).as_posix()
                if path.suffix.lower() not in IMAGE_SUFFIXES or not key.startswith(prefix):
                    continue
                stat = path.stat()
                yield ObjectRef(bucket=self.bucket, key=key, etag=local_etag(stat), size=stat.st_size)


def local_etag(stat: os.stat_result) -> str:
    """A cheap version tag for a local file: changes when it is rewritten."""
    return hashlib.sha1(f"{stat.st_mtime_ns}:{stat.st_size}".encode()).hexdigest()[:16]


def parse_s3_url(url: str) -> tuple[str, str]:
    """'s3://bucket/some/prefix' -> ('bucket', 'some/prefix')."""
    if not url.startswith("s3://"):
        raise ValueError(f"not an s3:// URL: {url}")
    bucket, _, prefix = url[len("s3://") :].partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {url}")
    return bucket, prefix
