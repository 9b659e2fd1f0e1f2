"""Backfill on a versioned bucket names objects as their S3 events do (by version id), against moto's S3."""

from __future__ import annotations

import json
from typing import Any

import pytest
from botocore.exceptions import ClientError
from sqlalchemy import Engine
from sqlalchemy.orm import Session

import ingest.backfill
from ingest.backfill import list_objects, without_a_row
from schema.events import parse_event_body
from schema.results import ObjectRef
from schema.settings import Settings
from tests.conftest import s3_client
from tests.test_repository import ok_result, write


def s3_of(settings: Settings) -> Any:
    assert settings.s3_endpoint_url is not None
    return s3_client(settings.s3_endpoint_url)


def event_ref(bucket: str, key: str, put: Any) -> ObjectRef:
    """The ref the worker gets for `put`'s S3 event (the way S3 writes it)."""
    obj = {"key": key, "eTag": put["ETag"].strip('"'), "size": 7, "sequencer": "0A"}
    if "VersionId" in put:
        obj["versionId"] = put["VersionId"]
    record = {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": bucket}, "object": obj}}
    (ref,) = parse_event_body(json.dumps({"Records": [record]})).refs
    return ref


def test_missing_only_on_a_versioned_bucket_sees_the_rows_of_event_enriched_objects(
    settings: Settings, pg_engine: Engine, bucket: str
) -> None:
    s3 = s3_of(settings)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    enriched = [
        event_ref(bucket, key, s3.put_object(Bucket=bucket, Key=key, Body=b"bytes-1")) for key in "ab"
    ]
    write(pg_engine, *(ok_result(ref) for ref in enriched))
    s3.put_object(Bucket=bucket, Key="lost.jpg", Body=b"bytes-2")  # its job was lost in transit

    listed = list(list_objects(settings, bucket, "", images_only=False))
    with Session(pg_engine) as session:
        missing = list(without_a_row(session, listed, model_version="1.0.0"))
    assert [ref.key for ref in missing] == ["lost.jpg"]
    assert {ref.object_version for ref in listed} >= {ref.object_version for ref in enriched}


def test_the_listing_takes_latest_versions_skips_deleted_keys_and_treats_null_as_no_version(
    settings: Settings, bucket: str
) -> None:
    s3 = s3_of(settings)
    before = s3.put_object(Bucket=bucket, Key="before.jpg", Body=b"written-unversioned")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    s3.put_object(Bucket=bucket, Key="k.jpg", Body=b"v1")
    v2 = s3.put_object(Bucket=bucket, Key="k.jpg", Body=b"v2-longer")
    s3.put_object(Bucket=bucket, Key="gone.jpg", Body=b"x")
    s3.delete_object(Bucket=bucket, Key="gone.jpg")  # a delete marker is now its latest version
    s3.put_object(Bucket=bucket, Key="notes.txt", Body=b"not an image")
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Suspended"})
    suspended = s3.put_object(Bucket=bucket, Key="s.jpg", Body=b"suspended")

    by_key = {ref.key: ref for ref in list_objects(settings, bucket, "")}
    assert sorted(by_key) == ["before.jpg", "k.jpg", "s.jpg"]
    assert by_key["k.jpg"] == ObjectRef(
        bucket, "k.jpg", version_id=v2["VersionId"], etag=v2["ETag"].strip('"'), size=len(b"v2-longer")
    )
    # Written while versioning was off or suspended: S3's version id "null", so identified by ETag, as
    # its event is.
    for key, put in (("before.jpg", before), ("s.jpg", suspended)):
        assert by_key[key].version_id is None
        assert (
            by_key[key].object_version == put["ETag"].strip('"') == event_ref(bucket, key, put).object_version
        )


def test_an_unversioned_bucket_is_listed_by_etag(settings: Settings, bucket: str) -> None:
    s3 = s3_of(settings)
    put = s3.put_object(Bucket=bucket, Key="p/a.jpg", Body=b"abc")
    s3.put_object(Bucket=bucket, Key="q/b.jpg", Body=b"abc")
    assert list(list_objects(settings, bucket, "p/")) == [
        ObjectRef(bucket, "p/a.jpg", etag=put["ETag"].strip('"'), size=3)
    ]


class _NoVersioningPermission:
    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def get_bucket_versioning(self, **_kwargs: Any) -> Any:
        error = {"Error": {"Code": "AccessDenied", "Message": "Access Denied"}}
        raise ClientError(error, "GetBucketVersioning")  # type: ignore[arg-type]


def test_versioning_that_cannot_be_read_falls_back_to_the_etag_listing_with_a_warning(
    settings: Settings, bucket: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    s3 = s3_of(settings)
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    put = s3.put_object(Bucket=bucket, Key="a.jpg", Body=b"abc")
    real = ingest.backfill.make_s3_client
    monkeypatch.setattr(ingest.backfill, "make_s3_client", lambda s: _NoVersioningPermission(real(s)))
    assert list(list_objects(settings, bucket, "")) == [
        ObjectRef(bucket, "a.jpg", etag=put["ETag"].strip('"'), size=3)
    ]
    assert "s3:GetBucketVersioning" in caplog.text and "AccessDenied" in caplog.text
