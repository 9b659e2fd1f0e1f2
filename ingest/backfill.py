"""`enrich ingest backfill s3://bucket/prefix`: queue the existing objects under a prefix (all of them, or
with --missing-only those that have no row yet: the reconciliation that catches a job lost in transit)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from itertools import islice

from sqlalchemy.orm import Session

from ingest.publisher import JobPublisher, PublishReport
from schema.db import make_engine
from schema.repository import without_rows
from schema.results import IMAGE_SUFFIXES, ObjectRef
from schema.s3 import make_s3_client
from schema.settings import Settings
from worker.model.config import BundleConfig


def list_objects(
    settings: Settings, bucket: str, prefix: str, *, images_only: bool = True
) -> Iterator[ObjectRef]:
    paginator = make_s3_client(settings).get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            key = item["Key"]
            if images_only and not key.lower().endswith(IMAGE_SUFFIXES):
                continue
            yield ObjectRef(
                bucket=bucket, key=key, etag=item.get("ETag", "").strip('"') or None, size=item["Size"]
            )


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
