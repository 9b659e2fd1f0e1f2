"""Publishes one Celery task per object onto the Redis queue the workers (and KEDA) watch."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from celery import Celery

from schema.queue import celery_config, ref_to_message
from schema.results import ObjectRef
from schema.settings import ENRICH_TASK_NAME, Settings


@dataclass(slots=True)
class PublishReport:
    published: int = 0
    # Refs not published, each with why (bucket not allowed, ...): counted, never silently dropped.
    rejected: list[str] = field(default_factory=list)


class JobPublisher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._app = Celery("enrich-ingest")
        self._app.conf.update(celery_config(settings))

    def publish(self, refs: Iterable[ObjectRef]) -> PublishReport:
        """Raises kombu/redis errors when the broker is down: the caller must not ack the source event."""
        report = PublishReport()
        allowed = set(self._settings.allowed_buckets)
        with self._app.producer_or_acquire() as producer:
            for ref in refs:
                if allowed and ref.bucket not in allowed:
                    report.rejected.append(f"s3://{ref.bucket}/{ref.key}: bucket not in the allow-list")
                    continue
                self._app.send_task(
                    ENRICH_TASK_NAME,
                    args=[ref_to_message(ref)],
                    # Given, so Celery does not saferepr() the arguments for its monitoring header.
                    argsrepr=f"s3://{ref.bucket}/{ref.key}",
                    kwargsrepr="{}",
                    queue=self._settings.queue,
                    producer=producer,
                    retry=True,
                    retry_policy={"max_retries": 3, "interval_start": 0.2, "interval_step": 0.5},
                )
                report.published += 1
        return report

    def close(self) -> None:
        self._app.close()
