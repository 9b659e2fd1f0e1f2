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


@pytest.mark.parametrize(
    "body",
    [
        '{"Records": ' + "[" * 100_000 + "]" * 100_000 + "}",  # RecursionError inside json.loads
        '{"Records": [{"s3": {"object": {"size": 1' + "0" * 5000 + "}}}]}",  # int over the digit limit
    ],
    ids=["deeply-nested", "huge-integer"],
)
def test_bodies_that_break_the_json_parser_are_parse_errors_not_crashes(body: str) -> None:
    # Either escaped as RecursionError/ValueError: a 500 from the webhook, a dead SQS poller.
    with pytest.raises(EventParseError, match="not valid JSON"):
        parse_event_body(body)


@pytest.mark.parametrize("size", ["\u00b2", "\u0661\u0662", "-5", True, -5, "1" * 40, 1.5, None])
def test_an_odd_size_is_unknown_not_a_crash(size: object) -> None:
    # "²".isdigit() is True but int("²") raises: the size is a memory-budget hint, so it is dropped.
    (ref,) = parse_event_body({"Records": [s3_record("a.jpg", size=size)]}).refs
    assert ref.size is None
    (ref,) = parse_event_body({"Records": [s3_record("a.jpg", size="42")]}).refs
    assert ref.size == 42


def test_a_null_version_id_is_no_version_id() -> None:
    # S3's "null" names every write made while versioning was off or suspended: the ETag tells them apart.
    old = parse_event_body({"Records": [s3_record("n.jpg", eTag="e1", versionId="null")]}).refs[0]
    new = parse_event_body({"Records": [s3_record("n.jpg", eTag="e2", versionId="null")]}).refs[0]
    assert (old.version_id, old.object_version, new.object_version) == (None, "e1", "e2")
    bridge = eventbridge({"key": "n.jpg", "etag": "e3", "version-id": "null", "size": 1})
    (ref,) = parse_event_body(bridge).refs
    assert (ref.version_id, ref.object_version) == (None, "e3")


def eventbridge(obj: object, *, bucket: object = "shop") -> dict:
    return {"detail-type": "Object Created", "detail": {"bucket": {"name": bucket}, "object": obj}}


@pytest.mark.parametrize(
    ("bridge", "message"),
    [
        (eventbridge({"key": {"nested": 1}, "etag": "e"}), "non-string"),
        (eventbridge({"key": "k.jpg"}, bucket=""), "empty"),
        (eventbridge({"key": "k.jpg"}, bucket=["shop"]), "non-string"),
        (eventbridge({"key": ""}), "empty"),
        (eventbridge("k.jpg"), "lacks detail"),
        ({"detail-type": "Object Created", "detail": "x"}, "lacks detail"),
    ],
)
def test_eventbridge_is_validated_like_the_s3_form(bridge: dict, message: str) -> None:
    with pytest.raises(EventParseError, match=message):
        parse_event_body(bridge)


def test_eventbridge_size_must_be_an_int() -> None:
    for size, expected in ((5, 5), (True, None), ("5", 5), ("\u00b2", None), (-1, None)):
        (ref,) = parse_event_body(eventbridge({"key": "k.jpg", "size": size})).refs
        assert ref.size == expected, size


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        (s3_record("bad%00key.jpg"), "key 'bad\\x00key.jpg' contains NUL"),
        (s3_record("bad\u0000key.jpg"), "contains NUL"),
        (s3_record("bad\ud800key.jpg"), "lone surrogate"),
        (s3_record("k.jpg", eTag="e\x00"), "ETag"),
        (s3_record("k.jpg", versionId="v\udfff"), "version id"),
    ],
)
def test_a_key_no_row_can_hold_is_ignored_with_its_reason_and_its_siblings_kept(
    record: dict, reason: str
) -> None:
    # Postgres text cannot hold NUL and psycopg/botocore cannot encode a lone surrogate: such a job could
    # only fail in the worker without a row. The record is set aside, the good ones beside it go on.
    body = json.dumps({"Records": [s3_record("good.jpg"), record, s3_record("also good.jpg")]})
    parsed = parse_event_body(body)
    assert [r.key for r in parsed.refs] == ["good.jpg", "also good.jpg"]
    assert len(parsed.ignored) == 1 and parsed.ignored[0].startswith("Records[1]: ")
    assert reason in parsed.ignored[0]
    bridge = parse_event_body(eventbridge({"key": "x%00.jpg"}))
    assert bridge.refs == [] and "contains NUL" in bridge.ignored[0]


def test_sns_subscription_confirmation_is_returned_to_confirm() -> None:
    confirmation = {
        "Type": "SubscriptionConfirmation",
        "TopicArn": "arn:aws:sns:us-east-1:123456789012:uploads",
        "SubscribeURL": "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=t",
        "Token": "t",
    }
    parsed = parse_event_body(json.dumps(confirmation))
    assert parsed.refs == [] and parsed.subscription is not None
    assert parsed.subscription.topic_arn == confirmation["TopicArn"]
    assert parsed.subscription.subscribe_url == confirmation["SubscribeURL"]
    with pytest.raises(EventParseError, match="SubscribeURL"):
        parse_event_body({"Type": "SubscriptionConfirmation", "TopicArn": "arn"})
    unsubscribed = parse_event_body({"Type": "UnsubscribeConfirmation", "TopicArn": "arn"})
    assert unsubscribed.subscription is None and unsubscribed.ignored


def test_an_sns_envelope_is_unwrapped_once() -> None:
    inner = json.dumps({"Records": [s3_record("x.jpg")]})
    twice = json.dumps({"Type": "Notification", "Message": inner})
    with pytest.raises(EventParseError, match="no 'Records'"):
        parse_event_body({"Type": "Notification", "Message": twice})
    with pytest.raises(EventParseError, match="not a string"):
        parse_event_body({"Type": "Notification", "Message": {"Records": []}})
