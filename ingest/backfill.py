"""`enrich ingest backfill s3://bucket/prefix`: queue every existing object under a prefix."""

from __future__ import annotations

from collections.abc import Iterator

from schema.results import IMAGE_SUFFIXES, ObjectRef
from schema.s3 import make_s3_client
from schema.settings import Settings


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
