"""Publishes one Celery task per object onto the Redis queue the workers (and KEDA) watch."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

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
                    retry_policy={
                        "max_retries": 3,
                        "interval_start": 0.2,
                        "interval_step": 0.5,
                        "errback": self._give_up_after_a_timeout(time.monotonic()),
                    },
                )
                report.published += 1
        return report

    def _give_up_after_a_timeout(self, started: float) -> Callable[[BaseException, float], Any]:
        """kombu's errback, called before each reconnect of one send: the retries are for what fails fast (a
        connection a Redis restart reset); a broker that let the command time out (gone silent) is not
        tried again. Each try waited out the socket timeout, and a webhook request ~50 s for its 503, long
        after a sender may have given up; now one timeout. The send raises, so the event is not acked."""
        patience = self._settings.broker_socket_timeout_s / 2

        def errback(error: BaseException, _interval: float) -> None:
            if time.monotonic() - started >= patience:
                raise error

        return errback

    def close(self) -> None:
        self._app.close()
