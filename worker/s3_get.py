"""The worker's S3 GET through obstore (Rust's object_store): the one S3 call made once per image.

boto3 spends ~1.3-1.6 ms of Python per GET (its event hooks, endpoint rules, SigV4 in Python, response
parsing) where obstore spends ~0.25 ms (measured against the bench's S3 server on the 2-core development
machine). The fetching processes' CPU is the largest share of a GPU machine's CPU per catalogue photo, so
the GET goes through obstore; everything else (listing, SQS, the bench's uploads) stays on boto3, and
credentials still come from boto3's chain (settings, AWS_* variables, profile, role), refreshed as boto3
refreshes them. A key obstore cannot name (an empty segment such as "a//b.jpg" or "/a.jpg", or a "." or ".."
segment, all of which S3 allows) is fetched by boto3 instead.
"""

from __future__ import annotations

import re
import threading
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import boto3
import obstore
from obstore.auth.boto3 import Boto3CredentialProvider
from obstore.exceptions import (
    BaseError,
    NotFoundError,
    PermissionDeniedError,
    PreconditionError,
    UnauthenticatedError,
)
from obstore.store import S3Store as ObstoreS3

from schema.results import ObjectRef
from schema.settings import Settings
from worker.storage import (
    FetchedObject,
    FetchError,
    LimitError,
    UnnamableKey,
    fetched_object,
    overwritten,
    quoted_etag,
    transient_status,
)

if TYPE_CHECKING:
    from obstore import GetOptions

_CODE = re.compile(r"<Code>([A-Za-z0-9]+)</Code>")
_STATUS = re.compile(r"status code: (\d{3})")


class ObstoreGetter:
    """GETs objects of any bucket with one obstore store per bucket (each with its own connection pool)."""

    def __init__(self, settings: Settings, session: boto3.session.Session) -> None:
        self._settings = settings
        self._auth: dict[str, Any]
        if settings.s3_access_key_id and settings.s3_secret_access_key:
            self._auth = {
                "access_key_id": settings.s3_access_key_id.get_secret_value(),
                "secret_access_key": settings.s3_secret_access_key.get_secret_value(),
            }
        else:  # ValueError when boto3's chain finds no credentials at all
            self._auth = {"credential_provider": Boto3CredentialProvider(session)}
        self._stores: dict[str, ObstoreS3] = {}
        self._lock = threading.Lock()

    def _store(self, bucket: str) -> ObstoreS3:
        with self._lock:
            store = self._stores.get(bucket)
            if store is None:
                settings = self._settings
                store = ObstoreS3(
                    bucket,
                    region=settings.s3_region,
                    endpoint=settings.s3_endpoint_url,
                    # AWS: bucket.s3.region.amazonaws.com, unless the name has a dot (its TLS certificate).
                    virtual_hosted_style_request=settings.s3_endpoint_url is None and "." not in bucket,
                    client_options={
                        "allow_http": True,  # an http:// endpoint (MinIO in compose, moto) is allowed
                        "connect_timeout": timedelta(seconds=5),
                        "timeout": timedelta(seconds=60),
                    },
                    # boto3's "standard" mode as configured for the other calls: three attempts in all.
                    retry_config={"max_retries": 2, "retry_timeout": timedelta(seconds=20)},
                    **self._auth,
                )
                self._stores[bucket] = store
            return store

    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        if not _nameable(ref.key):
            raise UnnamableKey(ref.key)
        options: GetOptions = {}
        if ref.version_id:
            options["version"] = ref.version_id
        elif ref.etag:
            options["if_match"] = quoted_etag(ref.etag)
        try:
            result = obstore.get(self._store(ref.bucket), ref.key, options=options or None)
        except ValueError as error:  # a path obstore refuses after all: ask boto3
            raise UnnamableKey(f"{ref.key!r}: {error}") from None
        except PreconditionError:
            raise overwritten(ref) from None
        # obstore raises Python's own FileNotFoundError for a 404 (and may for a 403 PermissionError).
        except (
            FileNotFoundError,
            PermissionError,
            NotFoundError,
            PermissionDeniedError,
            UnauthenticatedError,
        ) as error:
            raise FetchError(f"S3 {_code(error)}: {_first_line(error)}", transient=False) from None
        except BaseError as error:
            raise _generic(error) from None
        if result.meta["path"] != ref.key:  # never enrich another object's bytes under this key
            raise UnnamableKey(f"{ref.key!r} was read as {result.meta['path']!r}")
        size = int(result.meta["size"])
        if size > max_bytes:
            raise LimitError(f"object is {size} bytes, over the limit of {max_bytes}")
        try:
            data = bytes(result.bytes())
        except BaseError as error:  # the connection dropped mid-body: worth another try
            raise FetchError(f"S3 body: {_first_line(error)}", transient=True) from None
        return fetched_object(
            data,
            max_bytes=max_bytes,
            last_modified=result.meta["last_modified"],
            etag=result.meta["e_tag"],
            version_id=result.meta["version"],
        )


def _nameable(key: str) -> bool:
    """obstore's paths are "/"-separated non-empty segments other than "." and "..": a leading, trailing or
    doubled "/" would be dropped (another object's name), a dot segment refused."""
    return all(part not in ("", ".", "..") for part in key.split("/"))


def _code(error: Exception) -> str:
    """The S3 error code in the server's XML answer (NoSuchKey, NoSuchBucket, AccessDenied, ...)."""
    found = _CODE.search(str(error))
    if found:
        return found.group(1)
    if isinstance(error, NotFoundError | FileNotFoundError):
        return "404"
    return "403"


def _first_line(error: Exception) -> str:
    text = str(error)
    # obstore appends the server's XML and a debug dump: the reason is what comes before them.
    return text.split(": <?xml", 1)[0].split("\n", 1)[0]


def _generic(error: Exception) -> FetchError:
    """5xx, 408/429, a timeout or an unreachable server (after obstore's retries) are transient; any other
    status the server gave (400, say) will not change on retry."""
    status = _STATUS.search(str(error))
    code = int(status.group(1)) if status else 0
    transient = transient_status(code)
    label = _CODE.search(str(error))
    name = label.group(1) if label else (str(code) if code else "unreachable")
    return FetchError(f"S3 {name}: {_first_line(error)}", transient=transient)
