"""`enrich ingest sqs`: long-poll the SQS queue a bucket notifies, queue the objects, then delete."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ingest.publisher import JobPublisher
from schema.events import EventParseError, parse_event_body

if TYPE_CHECKING:
    from mypy_boto3_sqs import SQSClient

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SqsStats:
    messages: int = 0
    queued: int = 0
    malformed: list[str] = field(default_factory=list)


def poll_sqs(
    *,
    client: SQSClient,
    queue_url: str,
    publisher: JobPublisher,
    stop: threading.Event,
    wait_seconds: int = 20,
    max_empty_polls: int | None = None,
) -> SqsStats:
    """Runs until `stop` is set (or after `max_empty_polls` empty long-polls in a row, for batch use).

    A message is deleted only after its objects are on the Redis queue: if publishing fails, SQS shows it
    again after its visibility timeout. A malformed body is deleted with an error log (retrying cannot
    fix it; a redrive policy on the queue keeps a copy where one is configured).
    """
    stats = SqsStats()
    empty_polls = 0
    while not stop.is_set():
        response = client.receive_message(
            QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=wait_seconds, VisibilityTimeout=60
        )
        messages = response.get("Messages", [])
        if not messages:
            empty_polls += 1
            if max_empty_polls is not None and empty_polls >= max_empty_polls:
                break
            continue
        empty_polls = 0
        done: list[dict[str, str]] = []
        for message in messages:
            stats.messages += 1
            try:
                parsed = parse_event_body(message.get("Body", ""))
            except EventParseError as error:
                log.error("dropping malformed SQS message %s: %s", message.get("MessageId"), error)
                stats.malformed.append(f"{message.get('MessageId')}: {error}")
            else:
                try:
                    stats.queued += publisher.publish(parsed.refs).published
                except Exception:
                    log.exception(
                        "queue unavailable; SQS message %s stays for redelivery", message.get("MessageId")
                    )
                    continue
            done.append({"Id": str(len(done)), "ReceiptHandle": message["ReceiptHandle"]})
        if done:
            client.delete_message_batch(QueueUrl=queue_url, Entries=done)  # type: ignore[arg-type]
    return stats
