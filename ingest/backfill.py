"""`enrich ingest backfill s3://bucket/prefix`: queue the existing objects under a prefix (all of them, or
with --missing-only those that have no row yet: the reconciliation that catches a job lost in transit)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Iterator
from datetime import datetime
from itertools import islice
from typing import TYPE_CHECKING

import redis
from botocore.exceptions import ClientError
from sqlalchemy.orm import Session

from ingest.publisher import JobPublisher, PublishReport
from schema.db import make_engine
from schema.repository import without_rows
from schema.results import IMAGE_SUFFIXES, ObjectRef, bare_etag, real_version_id
from schema.s3 import make_s3_client
from schema.settings import Settings
from worker.model.config import BundleConfig

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

log = logging.getLogger(__name__)
# Versioning that cannot be read is taken as off (today's ETag listing), with a warning: a backfill
# should not fail for want of one permission, or on a store without the versioning API.
_VERSIONING_UNKNOWABLE = frozenset({"AccessDenied", "NotImplemented"})


def list_objects(
    settings: Settings,
    bucket: str,
    prefix: str,
    *,
    images_only: bool = True,
    modified_before: datetime | None = None,
) -> Iterator[ObjectRef]:
    """The current objects under `prefix`, named as their S3 events name them; with `modified_before`,
    only those last written before it (a reconciliation leaves alone what its events are still bringing).

    On a versioned bucket an event carries the version id, so the listing must too: a ref with the ETag
    only is another identity for the same bytes, and `--missing-only` would re-queue (and the worker
    re-enrich) every object that arrived by an event.
    """
    client = make_s3_client(settings)
    listed = (
        _latest_versions(client, bucket, prefix)
        if _versioned(client, bucket)
        else _current(client, bucket, prefix)
    )
    for ref, last_modified in listed:
        if images_only and not ref.key.lower().endswith(IMAGE_SUFFIXES):
            continue
        if modified_before is not None and last_modified >= modified_before:
            continue
        yield ref


def _versioned(client: S3Client, bucket: str) -> bool:
    """Versioning Enabled or Suspended (a suspended bucket still holds objects with real version ids)."""
    try:
        status = client.get_bucket_versioning(Bucket=bucket).get("Status")
    except ClientError as error:
        code = error.response.get("Error", {}).get("Code", "")
        if code not in _VERSIONING_UNKNOWABLE:
            raise
        log.warning(
            "cannot read the versioning of bucket %s (%s): listing by ETag; on a versioned bucket grant "
            "s3:GetBucketVersioning, or reconciliation re-queues objects that arrived by an event",
            bucket,
            code,
        )
        return False
    return status in ("Enabled", "Suspended")


def _current(client: S3Client, bucket: str, prefix: str) -> Iterator[tuple[ObjectRef, datetime]]:
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            ref = ObjectRef(
                bucket=bucket, key=item["Key"], etag=bare_etag(item.get("ETag")), size=item["Size"]
            )
            yield ref, item["LastModified"]


def _latest_versions(client: S3Client, bucket: str, prefix: str) -> Iterator[tuple[ObjectRef, datetime]]:
    """The latest version of each key (a key whose latest is a delete marker is gone: its versions are all
    non-latest, and delete markers are listed apart). Pages through every old version too: the price of
    naming the current ones as their events do."""
    for page in client.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Versions", []):
            if not item.get("IsLatest"):
                continue
            ref = ObjectRef(
                bucket=bucket,
                key=item["Key"],
                # "null": written while versioning was off or suspended; its events name it by ETag too.
                version_id=real_version_id(item.get("VersionId")),
                etag=bare_etag(item.get("ETag")),
                size=item["Size"],
            )
            yield ref, item["LastModified"]


def without_a_row(session: Session, refs: Iterable[ObjectRef], *, model_version: str) -> Iterator[ObjectRef]:
    """The refs with no row for `model_version`, checked 1,000 at a time.

    Why this exists: kombu's Redis transport pops a message (BRPOP) before it records it as unacknowledged,
    so a worker killed in between loses that message. Every other failure leaves a row or a message; this
    one leaves neither, and only a comparison with the bucket finds it.
    """
    remaining = iter(refs)
    while chunk := list(islice(remaining, 1000)):
        yield from without_rows(session=session, refs=chunk, model_version=model_version)


def queue_objects(settings: Settings, refs: Iterable[ObjectRef], *, missing_only: bool) -> PublishReport:
    """Publish `refs`; with missing_only, only those without a row for the configured bundle's version."""
    publisher = JobPublisher(settings)
    try:
        if not missing_only:
            return publisher.publish(refs)
        version = BundleConfig.read(settings.model_bundle).version
        engine = make_engine(settings.database_url)
        try:
            with Session(engine) as session:
                return publisher.publish(without_a_row(session, refs, model_version=version))
        finally:
            engine.dispose()
    finally:
        publisher.close()


def waiting_jobs(settings: Settings) -> int:
    """The jobs waiting on the queue: the length of the Redis list KEDA measures too."""
    client = redis.Redis.from_url(settings.broker_url)
    try:
        return int(client.llen(settings.queue))
    finally:
        client.close()
