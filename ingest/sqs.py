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
    from mypy_boto3_sqs.type_defs import MessageTypeDef

log = logging.getLogger(__name__)


@dataclass(slots=True)
class SqsStats:
    messages: int = 0
    queued: int = 0
    # Deleted: retrying cannot fix them.
    malformed: list[str] = field(default_factory=list)
    # Records of accepted messages not turned into jobs (deletes, test events, keys no row can hold).
    ignored: list[str] = field(default_factory=list)
    # Left undeleted for redelivery (and the queue's redrive policy / DLQ): the broker was down, or handling
    # failed in a way nobody expected.
    failed: list[str] = field(default_factory=list)


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
    fix it; a redrive policy on the queue keeps a copy where one is configured). Any other failure of one
    message is logged and leaves it undeleted, so it neither stops the poller nor the rest of its batch;
    after the redrive policy's maxReceiveCount SQS moves it to the dead-letter queue.
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
        done: list[MessageTypeDef] = []
        for message in messages:
            stats.messages += 1
            if _handle(message, publisher, stats):
                done.append(message)
        if done:
            _delete(client, queue_url, done)
    return stats


def _handle(message: MessageTypeDef, publisher: JobPublisher, stats: SqsStats) -> bool:
    """Queues one message's objects; True when the message is finished with and may be deleted."""
    message_id = message.get("MessageId")
    try:
        parsed = parse_event_body(message.get("Body", ""))
    except EventParseError as error:
        log.error("dropping malformed SQS message %s: %s", message_id, error)
        stats.malformed.append(f"{message_id}: {error}")
        return True
    except Exception as error:
        # A parser bug, not a bad body: deleting would lose what may be a good event, so it stays.
        log.exception("SQS message %s could not be parsed; left for redelivery", message_id)
        stats.failed.append(f"{message_id}: {type(error).__name__}: {error}")
        return False
    for reason in parsed.ignored:
        log.info("SQS message %s: ignored %s", message_id, reason)
        stats.ignored.append(f"{message_id}: {reason}")
    try:
        report = publisher.publish(parsed.refs)
    except Exception as error:
        log.exception("queue unavailable; SQS message %s stays for redelivery", message_id)
        stats.failed.append(f"{message_id}: {type(error).__name__}: {error}")
        return False
    for reason in report.rejected:
        log.warning("SQS message %s: rejected %s", message_id, reason)
    stats.queued += report.published
    return True


def _delete(client: SQSClient, queue_url: str, messages: list[MessageTypeDef]) -> None:
    """Deletes what was handled. A failed delete only means SQS redelivers the message, whose objects are then
    queued again (the worker skips what already has a row): logged, never fatal."""
    message_ids = {str(i): m.get("MessageId", "?") for i, m in enumerate(messages)}
    try:
        response = client.delete_message_batch(
            QueueUrl=queue_url,
            Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(messages)],
        )
    except Exception:
        log.exception("deleting %d handled SQS messages failed; they will be redelivered", len(messages))
        return
    for failed in response.get("Failed", []):
        log.error(
            "deleting SQS message %s failed (%s%s): %s; it will be redelivered",
            message_ids.get(failed.get("Id", ""), f"entry {failed.get('Id')}"),
            failed.get("Code"),
            ", sender's fault" if failed.get("SenderFault") else "",
            failed.get("Message", ""),
        )
