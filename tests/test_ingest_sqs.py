"""`enrich ingest sqs` against moto's real SQS API: one bad message never stops the poller or its batch."""

from __future__ import annotations

import base64
import json
import logging
import threading
from typing import Any

import boto3
import pytest
import redis

import ingest.sqs
from ingest.publisher import JobPublisher
from ingest.sqs import SqsStats, poll_sqs
from schema.settings import Settings
from tests.conftest import REDIS_URL

# 100 KB, under SQS's 256 KiB: json.loads raises RecursionError on it, which used to escape poll_sqs.
NESTED = '{"Records": ' + "[" * 50_000 + "]" * 50_000 + "}"


def event(*keys: str) -> str:
    records = [
        {
            "eventName": "ObjectCreated:Put",
            "s3": {"bucket": {"name": "shop"}, "object": {"key": key, "eTag": "e", "size": 1}},
        }
        for key in keys
    ]
    return json.dumps({"Records": records})


@pytest.fixture
def sqs(moto_server: str) -> Any:
    return boto3.client("sqs", endpoint_url=moto_server, region_name="us-east-1")


@pytest.fixture
def queue_url(sqs: Any, queue_name: str) -> str:
    return str(sqs.create_queue(QueueName=f"q-{queue_name}")["QueueUrl"])


def poll(sqs: Any, queue_url: str, queue_name: str, moto_server: str) -> SqsStats:
    settings = Settings(broker_url=REDIS_URL, queue=queue_name, sqs_endpoint_url=moto_server)
    publisher = JobPublisher(settings)
    try:
        return poll_sqs(
            client=sqs,
            queue_url=queue_url,
            publisher=publisher,
            stop=threading.Event(),
            wait_seconds=1,
            max_empty_polls=1,
        )
    finally:
        publisher.close()


def in_flight(sqs: Any, queue_url: str) -> int:
    attributes = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    return int(attributes["ApproximateNumberOfMessagesNotVisible"]) + int(
        attributes["ApproximateNumberOfMessages"]
    )


def queued_keys(queue_name: str) -> list[str]:
    messages = redis.Redis.from_url(REDIS_URL).lrange(queue_name, 0, -1)
    bodies = [json.loads(base64.b64decode(json.loads(m)["body"])) for m in messages]
    return sorted(args[0]["key"] for args, _kwargs, _embed in bodies)


def test_an_unparseable_body_is_deleted_and_its_batch_goes_on(
    sqs: Any, queue_url: str, queue_name: str, moto_server: str
) -> None:
    for body in (event("a.jpg"), NESTED, event("b.jpg")):
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    stats = poll(sqs, queue_url, queue_name, moto_server)
    assert (stats.messages, stats.queued, len(stats.malformed), stats.failed) == (3, 2, 1, [])
    assert "not valid JSON" in stats.malformed[0]
    assert queued_keys(queue_name) == ["a.jpg", "b.jpg"]
    assert in_flight(sqs, queue_url) == 0  # retrying cannot fix a malformed body: deleted, as before


def test_an_unexpected_failure_leaves_that_message_for_redrive_and_handles_the_rest(
    sqs: Any,
    queue_url: str,
    queue_name: str,
    moto_server: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    real_parse = ingest.sqs.parse_event_body

    def parse(body: Any) -> Any:
        if "boom.jpg" in str(body):
            raise RuntimeError("a bug in the parser")
        return real_parse(body)

    monkeypatch.setattr(ingest.sqs, "parse_event_body", parse)
    for body in (event("a.jpg"), event("boom.jpg"), event("b.jpg")):
        sqs.send_message(QueueUrl=queue_url, MessageBody=body)
    with caplog.at_level(logging.ERROR, logger="ingest.sqs"):
        stats = poll(sqs, queue_url, queue_name, moto_server)
    assert (stats.queued, stats.malformed, len(stats.failed)) == (2, [], 1)
    assert "RuntimeError: a bug in the parser" in stats.failed[0]
    assert "left for redelivery" in caplog.text
    assert queued_keys(queue_name) == ["a.jpg", "b.jpg"]
    assert (
        in_flight(sqs, queue_url) == 1
    )  # not deleted: SQS shows it again, its redrive policy dead-letters it


def test_ignored_records_are_counted_and_logged(
    sqs: Any, queue_url: str, queue_name: str, moto_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    sqs.send_message(QueueUrl=queue_url, MessageBody=event("good.jpg", "bad%00.jpg"))
    with caplog.at_level(logging.INFO, logger="ingest.sqs"):
        stats = poll(sqs, queue_url, queue_name, moto_server)
    assert stats.queued == 1 and len(stats.ignored) == 1 and "contains NUL" in stats.ignored[0]
    assert "contains NUL" in caplog.text
    assert queued_keys(queue_name) == ["good.jpg"]
    assert in_flight(sqs, queue_url) == 0


class _StaleHandles:
    """The real client, except that one delete carries a receipt handle SQS no longer honours."""

    def __init__(self, client: Any) -> None:
        self._client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self._client, name)

    def delete_message_batch(self, **kwargs: Any) -> Any:
        entries = [dict(entry) for entry in kwargs.pop("Entries")]
        entries[0]["ReceiptHandle"] = "stale"
        return self._client.delete_message_batch(Entries=entries, **kwargs)


def test_failed_deletes_are_logged(
    sqs: Any, queue_url: str, queue_name: str, moto_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    sqs.send_message(QueueUrl=queue_url, MessageBody=event("a.jpg"))
    with caplog.at_level(logging.ERROR, logger="ingest.sqs"):
        stats = poll(_StaleHandles(sqs), queue_url, queue_name, moto_server)
    assert stats.queued == 1
    assert "deleting SQS message" in caplog.text and "ReceiptHandleIsInvalid" in caplog.text, caplog.text
