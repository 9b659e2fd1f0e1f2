"""The Celery app of the worker: one task per image, executed through the shared micro-batcher."""

from __future__ import annotations

from typing import Any

from celery import Celery, Task

from schema.queue import celery_config, ref_from_message
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

    @app.task(name=ENRICH_TASK_NAME, bind=True, max_retries=settings.max_attempts - 1)
    def enrich_object(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        ref = ref_from_message(message)
        final_attempt = self.request.retries >= settings.max_attempts - 1
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
            raise self.retry(
                exc=TransientError(f"worker: {type(error).__name__}: {error}"),
                countdown=retry_countdown(self.request.retries),
                max_retries=None,
            ) from None
        if outcome.retry_reason is not None:
            database_down = outcome.retry_reason.startswith("database")
            # A database outage is not the image's fault: retry it without spending the image's attempts.
            raise self.retry(
                exc=TransientError(outcome.retry_reason),
                countdown=retry_countdown(self.request.retries),
                max_retries=None if database_down else settings.max_attempts - 1,
            )
        return {"bucket": ref.bucket, "key": ref.key, "status": outcome.status}

    return app
