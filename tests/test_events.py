"""S3 event bodies from AWS, MinIO, SNS and EventBridge resolve to the right objects."""

from __future__ import annotations

import json

import pytest

from schema.events import EventParseError, parse_event_body


def s3_record(key: str, *, bucket: str = "shop", event: str = "ObjectCreated:Put", **obj: object) -> dict:
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "eventName": event,
        "s3": {"bucket": {"name": bucket}, "object": {"key": key, "size": 123, "eTag": "abc", **obj}},
    }


def test_aws_record_with_encoded_key_resolves_spaces_plus_and_unicode() -> None:
    # S3 encodes ' ' as '+', a literal '+' as %2B, and UTF-8 bytes as %XX.
    body = {
        "Records": [s3_record("new+arrivals/caf%C3%A9+shirt+%2B+tie.jpg", versionId="v1", sequencer="0A")]
    }
    (ref,) = parse_event_body(json.dumps(body)).refs
    assert ref.bucket == "shop"
    assert ref.key == "new arrivals/café shirt + tie.jpg"
    assert (ref.version_id, ref.etag, ref.size, ref.sequencer) == ("v1", "abc", 123, "0A")
    assert ref.object_version == "v1"


def test_minio_webhook_body() -> None:
    body = {
        "EventName": "s3:ObjectCreated:Put",
        "Key": "shop/a+b.jpg",
        "Records": [s3_record("a+b.jpg", event="s3:ObjectCreated:Put") | {"eventSource": "minio:s3"}],
    }
    (ref,) = parse_event_body(json.dumps(body).encode()).refs
    assert (ref.bucket, ref.key, ref.object_version) == ("shop", "a b.jpg", "abc")


def test_sns_envelope_and_eventbridge() -> None:
    inner = json.dumps({"Records": [s3_record("x.jpg")]})
    assert parse_event_body({"Type": "Notification", "Message": inner}).refs[0].key == "x.jpg"
    bridge = {
        "detail-type": "Object Created",
        "detail": {"bucket": {"name": "shop"}, "object": {"key": "a%20b.jpg", "etag": "e", "size": 5}},
    }
    (ref,) = parse_event_body(bridge).refs
    assert (ref.key, ref.etag, ref.size) == ("a b.jpg", "e", 5)


def test_test_events_and_deletions_are_ignored_with_a_reason() -> None:
    parsed = parse_event_body({"Service": "Amazon S3", "Event": "s3:TestEvent", "Bucket": "shop"})
    assert parsed.refs == [] and "test event" in parsed.ignored[0]
    parsed = parse_event_body(
        {"Records": [s3_record("gone.jpg", event="ObjectRemoved:Delete"), s3_record("k.jpg")]}
    )
    assert [r.key for r in parsed.refs] == ["k.jpg"]
    assert "ObjectRemoved:Delete" in parsed.ignored[0]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        ("[1, 2]", "JSON object"),
        ("{}", "no 'Records'"),
        ('{"Records": [42]}', "not an object"),
        ('{"Records": [{"eventName": "ObjectCreated:Put", "s3": {}}]}', "lacks s3.bucket.name"),
        (
            '{"Records": [{"eventName": "ObjectCreated:Put",'
            ' "s3": {"bucket": {"name": ""}, "object": {"key": "k"}}}]}',
            "empty",
        ),
    ],
)
def test_malformed_bodies_raise_a_clear_error(body: bytes | str, message: str) -> None:
    with pytest.raises(EventParseError, match=message):
        parse_event_body(body)
