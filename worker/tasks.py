"""The Celery app of the worker: one task per image, executed through the shared micro-batcher."""

from __future__ import annotations

import logging
from typing import Any

from celery import Celery, Task

from schema.queue import ATTEMPTS_SPENT, celery_config, ref_from_message
from schema.settings import ENRICH_TASK_NAME, Settings
from worker.pipeline import Job, Outcome
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class TransientError(Exception):
    """Raised into Celery's retry so the reason is visible in the worker log."""


def retry_countdown(retries: int) -> float:
    return float(min(2**retries, 60))


def make_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = Celery("enrich-worker")
    app.conf.update(celery_config(settings))

    # max_retries=None: Celery never gives up on its own. A retry that reached Celery's limit would raise
    # the task's error instead, and Celery acks a task that raises, dropping the job without a row: free
    # retries would be capped too (`retry(max_retries=None)` means "the task's default", not "unlimited").
    # The image's own attempts are limited by the pipeline, which records a failed row on the last one.
    # shared=False: the task closes over this runtime; Celery would otherwise add it to every app made later
    # in the process (a test's next app got the previous runtime's task).
    @app.task(name=ENRICH_TASK_NAME, bind=True, max_retries=None, shared=False)
    def enrich_object(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        ref = ref_from_message(message)
        spent = int(message.get(ATTEMPTS_SPENT) or 0)
        final_attempt = spent >= settings.max_attempts - 1
        countdown = retry_countdown(self.request.retries)
        try:
            outcome = runtime.batcher.submit(Job(ref=ref, final_attempt=final_attempt)).result(
                timeout=settings.visibility_timeout_s
            )
        except Exception as error:  # noqa: BLE001
            # The worker, not the image, failed (a batch slower than the visibility timeout, a loop error).
            # Celery acks a task that raises, which would drop the job without a row: retry it instead.
            # It spends an attempt (a failure that follows the job round would otherwise loop for ever);
            # on the last one the job is recorded as failed_worker. If the batch still lands, its row
            # replaces that failure, or the retry finds the row and skips.
            runtime.metrics.retries.labels("worker").inc()
            reason = f"worker: {type(error).__name__}: {error}"
            if final_attempt:
                outcome = runtime.pipeline.record_failure(
                    ref, f"gave up after {spent + 1} attempts: {reason}"
                )
            else:
                retried = {**message, ATTEMPTS_SPENT: spent + 1}
                raise self.retry(args=[retried], exc=TransientError(reason), countdown=countdown) from None
        if outcome.retry_reason is not None:
            # A database outage is not the image's fault: retried without spending the image's attempts.
            image_fault = not outcome.retry_reason.startswith("database")
            retried = {**message, ATTEMPTS_SPENT: spent + 1} if image_fault else message
            raise self.retry(args=[retried], exc=TransientError(outcome.retry_reason), countdown=countdown)
        if outcome.unrecordable is not None:
            log.error("no row can record s3://%s/%r: %s", ref.bucket, ref.key, outcome.unrecordable)
        return _summary(outcome)

    return app


def _summary(outcome: Outcome) -> dict[str, Any]:
    summary: dict[str, Any] = {"bucket": outcome.ref.bucket, "key": outcome.ref.key, "status": outcome.status}
    if outcome.unrecordable is not None:
        summary["error"] = outcome.unrecordable
    return summary
