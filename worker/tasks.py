"""The Celery app of the worker: one task per image, executed through the shared micro-batcher."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from schema.queue import ATTEMPTS_SPENT, celery_config, ref_from_message
from schema.settings import ENRICH_TASK_NAME, Settings
from worker.pipeline import Job
from worker.runtime import WorkerRuntime


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
    @app.task(name=ENRICH_TASK_NAME, bind=True, max_retries=None)
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
            # The worker, not the image, failed (a batch slower than the visibility timeout while the
            # database hangs, a loop error). Celery acks a task that raises, which would drop the job
            # without a row: retry it instead, without spending its attempts. If the batch still lands,
            # the retry finds the row and skips.
            runtime.metrics.retries.labels("worker").inc()
            exc = TransientError(f"worker: {type(error).__name__}: {error}")
            raise self.retry(exc=exc, countdown=countdown) from None
        if outcome.retry_reason is not None:
            # A database outage is not the image's fault: retried without spending the image's attempts.
            image_fault = not outcome.retry_reason.startswith("database")
            retried = {**message, ATTEMPTS_SPENT: spent + 1} if image_fault else message
            raise self.retry(args=[retried], exc=TransientError(outcome.retry_reason), countdown=countdown)
        return {"bucket": ref.bucket, "key": ref.key, "status": outcome.status}

    return app
