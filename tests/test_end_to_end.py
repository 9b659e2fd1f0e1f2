"""Bucket -> ingest -> Redis -> Celery worker process -> Postgres, over real connections throughout.

S3 and SQS are moto's server (a real HTTP API); Redis and Postgres are the real servers.
"""

from __future__ import annotations

import base64
import json
import math
import time

import boto3
import httpx
import pytest
import redis
from pydantic import SecretStr
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from enrich.stack import minio_event
from ingest.publisher import JobPublisher
from schema.results import ObjectRef
from schema.settings import Settings
from schema.tables import Enrichment
from tests.conftest import REDIS_URL, StartWorker, enrich_cli, s3_client, sample_jpegs, wait_for
from tests.test_repository import failed_result, ok_result, write
from worker.model.config import BundleConfig

# Keys that break naive handling: spaces, '+', unicode, characters that URL-encoding changes.
AWKWARD_KEYS = [
    "drop/plain.jpg",
    "drop/new arrivals/shirt 1.jpg",
    "drop/café + tie.jpg",
    "drop/100%_cotton&co.jpg",
]


def rows(engine: Engine) -> list[Enrichment]:
    with Session(engine) as session:
        return list(session.scalars(select(Enrichment).order_by(Enrichment.key)))


def put_images(endpoint: str, bucket: str, keys: list[str]) -> dict[str, str]:
    client = s3_client(endpoint)
    etags = {}
    for key, data in zip(keys, sample_jpegs(len(keys)), strict=True):
        etags[key] = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"].strip('"')
    return etags


def unacked_for(queue: str) -> int:
    """Messages the worker holds without having acknowledged them (kombu's Redis bookkeeping)."""
    client = redis.Redis.from_url(REDIS_URL)
    entries = client.hvals("unacked")
    client.close()
    return sum(1 for entry in entries if json.loads(entry)[2] == queue)


def test_put_object_notified_to_sqs_ends_as_rows_via_ingest_sqs_and_worker(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    sqs = boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")
    queue_url = sqs.create_queue(QueueName=f"{bucket}-events")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3_client(moto_server).put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={
            "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]
        },
    )
    etags = put_images(moto_server, bucket, AWKWARD_KEYS)
    settings = settings.model_copy(update={"sqs_queue_url": queue_url})

    result = enrich_cli(settings, "ingest", "sqs", "--wait-seconds", "1", "--exit-when-idle", "1")
    assert "4 objects queued" in result.stdout
    assert redis.Redis.from_url(REDIS_URL).llen(settings.queue) == 4

    start_worker(settings)
    wait_for(lambda: len([r for r in rows(pg_engine) if r.status == "ok"]) == 4, what="4 ok rows")
    found = {row.key: row for row in rows(pg_engine)}
    assert set(found) == set(AWKWARD_KEYS)
    for key, row in found.items():
        assert (row.bucket, row.etag, row.object_version) == (bucket, etags[key], etags[key])
        assert row.caption and row.article_type and row.model_version == "0.0.1"
    # Acknowledged only after commit, and nothing left behind.
    wait_for(lambda: unacked_for(settings.queue) == 0, timeout=10, what="no unacked messages")
    assert redis.Redis.from_url(REDIS_URL).llen(settings.queue) == 0


@pytest.fixture
def webhook(settings: Settings, serve_webhook) -> str:  # type: ignore[no-untyped-def]
    return str(serve_webhook(settings.model_copy(update={"webhook_secret": SecretStr("s3cret")})))


def test_minio_webhook_post_becomes_one_row_even_when_delivered_twice(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    webhook: str,
    start_worker: StartWorker,
) -> None:
    key = "drop/café + tie.jpg"
    etag = put_images(moto_server, bucket, [key])[key]
    body = minio_event(bucket, "drop/caf%C3%A9+%2B+tie.jpg", etag)
    auth = {"Authorization": "Bearer s3cret"}

    assert httpx.post(f"{webhook}/events", json=body).status_code == 401
    assert (
        httpx.post(f"{webhook}/events", json=body, headers={"Authorization": "Bearer wrong"}).status_code
        == 401
    )
    bad = httpx.post(f"{webhook}/events", content=b"{oops", headers=auth)
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]
    for _ in range(2):  # at-least-once delivery: the same event twice
        response = httpx.post(f"{webhook}/events", json=body, headers=auth)
        assert response.status_code == 200 and response.json()["queued"] == 1

    start_worker(settings)
    wait_for(lambda: rows(pg_engine) and rows(pg_engine)[0].status == "ok", what="ok row")
    wait_for(lambda: redis.Redis.from_url(REDIS_URL).llen(settings.queue) == 0, what="queue drained")
    wait_for(lambda: unacked_for(settings.queue) == 0, timeout=10, what="acks")
    (row,) = rows(pg_engine)
    assert (row.key, row.etag, row.attempts) == (key, etag, 1)


def test_backfill_queues_existing_objects_and_a_redelivered_task_changes_nothing(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    keys = ["catalog/a.jpg", "catalog/b b.jpg", "other/c.jpg"]
    put_images(moto_server, bucket, keys)
    s3_client(moto_server).put_object(Bucket=bucket, Key="catalog/readme.txt", Body=b"not an image")
    result = enrich_cli(settings, "ingest", "backfill", f"s3://{bucket}/catalog/")
    assert "queued 2 objects" in result.stdout

    worker = start_worker(settings)
    wait_for(
        lambda: len(rows(pg_engine)) == 2 and all(r.status == "ok" for r in rows(pg_engine)), what="2 rows"
    )
    before = {(r.key, r.updated_at, r.caption) for r in rows(pg_engine)}
    # A redelivery of the same jobs (as after a lost ack) is skipped, not enriched twice.
    refs = [ObjectRef(bucket, r.key, etag=r.etag) for r in rows(pg_engine)]
    JobPublisher(settings).publish(refs)
    wait_for(lambda: worker.metric("enrich_skipped_already_enriched_total") == 2, what="2 skipped")
    assert {(r.key, r.updated_at, r.caption) for r in rows(pg_engine)} == before
    assert worker.metric("enrich_forward_passes_total") == 1


def test_queued_images_are_inferred_in_ceil_n_over_batch_passes(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    keys = [f"batch/{i:02d}.jpg" for i in range(10)]
    etags = put_images(moto_server, bucket, keys)
    JobPublisher(settings).publish(ObjectRef(bucket, k, etag=etags[k]) for k in keys)
    # Batch 4, a generous wait, and enough task threads to hold a full batch and the next one.
    settings = settings.model_copy(update={"max_wait_ms": 2000, "batch_size": 4})
    worker = start_worker(settings)
    wait_for(lambda: len([r for r in rows(pg_engine) if r.status == "ok"]) == 10, what="10 ok rows")
    assert worker.metric("enrich_forward_passes_total") == math.ceil(10 / 4)
    assert worker.metric("enrich_batch_size_count") == 3
    assert sorted(row.timings_ms["batch_size"] for row in rows(pg_engine)) == [2] * 2 + [4] * 8  # type: ignore[index]


def test_backfill_missing_only_requeues_just_the_objects_that_never_got_a_row(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str
) -> None:
    # The reconciliation for a job lost in transit (a worker killed between Redis's BRPOP and kombu's
    # unacked record leaves neither a message nor a row): a failed row is a final state too.
    keys = ["m/enriched.jpg", "m/failed.jpg", "m/lost.jpg"]
    etags = put_images(moto_server, bucket, keys)
    version = BundleConfig.read(settings.model_bundle).version
    ok = ok_result(ObjectRef(bucket, keys[0], etag=etags[keys[0]]), version=version)
    write(pg_engine, ok, failed_result(ObjectRef(bucket, keys[1], etag=etags[keys[1]]), version=version))
    # A row for another model version does not count: that version has not seen the object.
    write(pg_engine, ok_result(ObjectRef(bucket, keys[2], etag=etags[keys[2]]), version="0.0.1-old"))

    result = enrich_cli(settings, "ingest", "backfill", f"s3://{bucket}/m/", "--missing-only")

    assert "queued 1 objects" in result.stdout
    queued = redis.Redis.from_url(REDIS_URL).lrange(settings.queue, 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in queued]
    assert [args[0]["key"] for args, _kwargs, _embed in bodies] == ["m/lost.jpg"]


def test_reconciliation_waits_for_a_draining_backlog_and_leaves_fresh_uploads_to_their_events(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str
) -> None:
    # Run every 15 minutes while a large backlog drains, a reconciliation queued every waiting object again
    # (none has a row yet), doubling the list KEDA scales on at each run.
    put_images(moto_server, bucket, ["r/a.jpg", "r/b.jpg"])
    client = redis.Redis.from_url(REDIS_URL)
    client.rpush(settings.queue, *(b"waiting job" for _ in range(5)))
    args = ("ingest", "backfill", f"s3://{bucket}/r/", "--missing-only")

    busy = enrich_cli(settings, *args, "--unless-queued", "4")
    assert "skipped: 5 jobs wait" in busy.stdout and client.llen(settings.queue) == 5

    client.delete(settings.queue)
    # Just uploaded: their events are in flight, so a reconciliation leaves them alone...
    fresh = enrich_cli(settings, *args, "--unless-queued", "4", "--older-than", "10m")
    assert "queued 0 objects" in fresh.stdout and client.llen(settings.queue) == 0
    # ... and takes them once they are older than that, still without a row.
    time.sleep(1.1)
    due = enrich_cli(settings, *args, "--older-than", "1s")
    assert "queued 2 objects" in due.stdout and client.llen(settings.queue) == 2
    client.close()
