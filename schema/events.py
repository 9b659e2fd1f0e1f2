"""S3 event notifications -> ObjectRefs.

Understands the bodies that reach ingest: AWS S3 records (direct, inside an SNS envelope, or as an SQS
message body), MinIO's webhook body (the same records plus `EventName`/`Key`), EventBridge's
`detail` form, and the `s3:TestEvent` that arrives when a notification is configured.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote_plus

from schema.results import ObjectRef


class EventParseError(ValueError):
    """The body is not an S3 event we understand; the sender should not retry it unchanged."""


@dataclass(slots=True)
class ParsedEvent:
    refs: list[ObjectRef] = field(default_factory=list)
    # Records deliberately not turned into jobs (deletes, test events), with why: counted, not lost.
    ignored: list[str] = field(default_factory=list)


def parse_event_body(body: bytes | str | Mapping[str, Any]) -> ParsedEvent:
    """Parse one notification body. Raises EventParseError on anything malformed."""
    document = _load(body)
    if not isinstance(document, Mapping):
        raise EventParseError("event body must be a JSON object")

    # SNS envelope (S3 -> SNS -> SQS/HTTP): the S3 event is a JSON string in "Message".
    if document.get("Type") == "Notification" and "Message" in document:
        return parse_event_body(str(document["Message"]))
    if document.get("Event") == "s3:TestEvent" or document.get("Type") == "SubscriptionConfirmation":
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
        parsed.refs.append(_ref_from_s3_record(record, index))
    return parsed


def _load(body: bytes | str | Mapping[str, Any]) -> Any:
    if isinstance(body, Mapping):
        return body
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise EventParseError(f"event body is not valid JSON: {error}") from None


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
    size = obj.get("size")
    return ObjectRef(
        bucket=bucket,
        # Keys in S3 events are URL-encoded with '+' for spaces.
        key=unquote_plus(raw_key),
        version_id=_optional_str(obj.get("versionId")),
        etag=_optional_str(obj.get("eTag") or obj.get("etag")),
        size=int(size) if isinstance(size, int | str) and str(size).isdigit() else None,
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
    return ParsedEvent(
        refs=[
            ObjectRef(
                bucket=str(bucket),
                # EventBridge keys are URL-encoded too (but spaces arrive as %20, which unquote_plus handles).
                key=unquote_plus(str(key)),
                version_id=_optional_str(obj.get("version-id")),
                etag=_optional_str(obj.get("etag")),
                size=obj.get("size") if isinstance(obj.get("size"), int) else None,
                sequencer=_optional_str(obj.get("sequencer")),
            )
        ]
    )


def _optional_str(value: object) -> str | None:
    return str(value) if value not in (None, "") else None
