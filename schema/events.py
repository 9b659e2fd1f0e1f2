"""S3 event notifications -> ObjectRefs.

Understands the bodies that reach ingest: AWS S3 records (direct, inside an SNS envelope, or as an SQS
message body), MinIO's webhook body (the same records plus `EventName`/`Key`), EventBridge's
`detail` form, SNS's `SubscriptionConfirmation` (returned for the webhook to confirm) and the
`s3:TestEvent` that arrives when a notification is configured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from schema.results import ObjectRef, real_version_id

# A size with more digits than this is not an S3 size (5 TB has 13); int() of >4300 digits even raises.
_MAX_SIZE_DIGITS = 20


class EventParseError(ValueError):
    """The body is not an S3 event we understand; the sender should not retry it unchanged."""


@dataclass(frozen=True, slots=True)
class SnsSubscription:
    """An SNS SubscriptionConfirmation: nothing is delivered until its SubscribeURL is visited."""

    topic_arn: str
    subscribe_url: str


@dataclass(slots=True)
class ParsedEvent:
    refs: list[ObjectRef] = field(default_factory=list)
    # Records deliberately not turned into jobs (deletes, test events, keys no row can hold), with why:
    # counted, not lost.
    ignored: list[str] = field(default_factory=list)
    subscription: SnsSubscription | None = None


def parse_event_body(body: bytes | str | Mapping[str, Any]) -> ParsedEvent:
    """Parse one notification body. Raises EventParseError on anything malformed."""
    return _parse_document(_load(body), in_envelope=False)


def _parse_document(document: Any, *, in_envelope: bool) -> ParsedEvent:
    if not isinstance(document, Mapping):
        raise EventParseError("event body must be a JSON object")

    # SNS envelope (S3 -> SNS -> SQS/HTTP): the S3 event is a JSON string in "Message". One level only:
    # nothing wraps an SNS envelope in another, and unbounded unwrapping would be unbounded recursion.
    if document.get("Type") == "Notification" and "Message" in document and not in_envelope:
        message = document["Message"]
        if not isinstance(message, str):
            raise EventParseError("SNS notification 'Message' is not a string")
        return _parse_document(_load(message), in_envelope=True)
    if document.get("Type") == "SubscriptionConfirmation":
        return _sns_subscription(document)
    if document.get("Event") == "s3:TestEvent" or document.get("Type") == "UnsubscribeConfirmation":
        return ParsedEvent(ignored=[f"test event: {document.get('Event') or document.get('Type')}"])
    if "detail" in document and "Records" not in document:
        return _parse_eventbridge(document)
    records = document.get("Records")
    if not isinstance(records, list):
        raise EventParseError("event body has no 'Records' list")

    parsed = ParsedEvent()
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise EventParseError(f"Records[{index}] is not an object")
        event_name = str(record.get("eventName", ""))
        if not event_name.startswith(("ObjectCreated:", "s3:ObjectCreated:")):
            parsed.ignored.append(
                f"Records[{index}]: event {event_name or '<none>'} is not an object creation"
            )
            continue
        _add(parsed, _ref_from_s3_record(record, index), f"Records[{index}]")
    return parsed


def _load(body: bytes | str | Mapping[str, Any]) -> Any:
    if isinstance(body, Mapping):
        return body
    try:
        return json.loads(body)
    # ValueError covers JSONDecodeError, UnicodeDecodeError and an integer over Python's digit limit;
    # RecursionError a deeply nested body (200 KB of '[' is enough): all malformed, never a crash.
    except (ValueError, RecursionError) as error:
        raise EventParseError(f"event body is not valid JSON: {type(error).__name__}: {error}") from None


def _add(parsed: ParsedEvent, ref: ObjectRef, where: str) -> None:
    """One record whose names no row or request can carry is ignored with its reason; its siblings go on."""
    problem = _unstorable(ref)
    if problem is None:
        parsed.refs.append(ref)
    else:
        parsed.ignored.append(f"{where}: {problem}")


def _unstorable(ref: ObjectRef) -> str | None:
    # Postgres text cannot hold NUL; psycopg and botocore cannot encode a lone surrogate (JSON's "\ud800").
    # The reasons quote the value with repr(): escaped, so they can be logged and answered as JSON.
    for name, value in (
        ("bucket", ref.bucket),
        ("key", ref.key),
        ("version id", ref.version_id),
        ("ETag", ref.etag),
        ("sequencer", ref.sequencer),
    ):
        if value is None:
            continue
        if "\x00" in value:
            return f"{name} {value!r} contains NUL"
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{name} {value!r} contains a lone surrogate (not encodable as UTF-8)"
    return None


def _ref_from_s3_record(record: Mapping[str, Any], index: int) -> ObjectRef:
    try:
        s3 = record["s3"]
        bucket = s3["bucket"]["name"]
        obj = s3["object"]
        raw_key = obj["key"]
    except (KeyError, TypeError):
        raise EventParseError(f"Records[{index}] lacks s3.bucket.name or s3.object.key") from None
    if not isinstance(bucket, str) or not isinstance(raw_key, str) or not bucket or not raw_key:
        raise EventParseError(f"Records[{index}] has an empty or non-string bucket or key")
    return ObjectRef(
        bucket=bucket,
        # Keys in S3 events are URL-encoded with '+' for spaces.
        key=unquote_plus(raw_key),
        version_id=_version_id(obj.get("versionId")),
        etag=_optional_str(obj.get("eTag") or obj.get("etag")),
        size=_size(obj.get("size")),
        sequencer=_optional_str(obj.get("sequencer")),
    )


def _parse_eventbridge(document: Mapping[str, Any]) -> ParsedEvent:
    detail_type = str(document.get("detail-type", ""))
    if detail_type != "Object Created":
        return ParsedEvent(ignored=[f"EventBridge {detail_type or '<none>'} is not an object creation"])
    try:
        detail = document["detail"]
        bucket = detail["bucket"]["name"]
        obj = detail["object"]
        key = obj["key"]
    except (KeyError, TypeError):
        raise EventParseError("EventBridge event lacks detail.bucket.name or detail.object.key") from None
    # The same checks as the S3 form: a str() of a nested object would become a job for a key nobody wrote.
    if not isinstance(bucket, str) or not isinstance(key, str) or not bucket or not key:
        raise EventParseError("EventBridge event has an empty or non-string bucket or key")
    ref = ObjectRef(
        bucket=bucket,
        # EventBridge keys are URL-encoded too (but spaces arrive as %20, which unquote_plus handles).
        key=unquote_plus(key),
        version_id=_version_id(obj.get("version-id")),
        etag=_optional_str(obj.get("etag")),
        size=_size(obj.get("size")),
        sequencer=_optional_str(obj.get("sequencer")),
    )
    parsed = ParsedEvent()
    _add(parsed, ref, "EventBridge detail")
    return parsed


def _sns_subscription(document: Mapping[str, Any]) -> ParsedEvent:
    url, topic = document.get("SubscribeURL"), document.get("TopicArn")
    if not isinstance(url, str) or not url or not isinstance(topic, str):
        raise EventParseError("SNS SubscriptionConfirmation lacks a SubscribeURL or TopicArn string")
    return ParsedEvent(
        ignored=[f"SNS SubscriptionConfirmation for {topic}"],
        subscription=SnsSubscription(topic_arn=topic, subscribe_url=url),
    )


def _size(value: object) -> int | None:
    """A byte count, else None (unknown): the size is a hint for the worker's memory budget, so an odd one
    costs the hint, not the image."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    # isdigit() alone accepts "²" and other Unicode digits that int() refuses.
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= _MAX_SIZE_DIGITS:
        return int(value)
    return None


def _version_id(value: object) -> str | None:
    return real_version_id(_optional_str(value))


def _optional_str(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
