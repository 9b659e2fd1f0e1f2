"""The Celery app of the worker: one task per image on the wire, consumed in micro-batches.

A fresh message skips Celery's task pool. The task's strategy (the function Celery calls for each message
it receives) hands the image straight to the micro-batcher, and the batch's callback acks the message once
its row is committed. Through the pool, every image in flight held a thread blocked on its batch, which
cost about a fifth of the worker's CPU per image (docs/benchmarks.md, session 14). A message Celery must
hold or may refuse (a retry's countdown, an expiry, a revoke, a malformed body) goes Celery's default way
instead: through the pool into the task function, which settles it by the same rules.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from functools import partial
from typing import Any

from celery import Celery, Task, bootsteps
from celery.worker.strategy import default as default_strategy
from kombu.exceptions import OperationalError

from schema.queue import ATTEMPTS_SPENT, celery_config, ref_from_message
from schema.settings import ENRICH_TASK_NAME, Settings
from worker.pipeline import Job, Outcome
from worker.runtime import WorkerRuntime

log = logging.getLogger(__name__)


class TransientError(Exception):
    """Raised into Celery's retry so the reason is visible in the worker log."""


def retry_countdown(retries: int) -> float:
    return float(min(2**retries, 60))


@dataclass(frozen=True, slots=True)
class Retry:
    """Send the job again after `countdown` seconds as `message`, then ack the one in hand."""

    message: dict[str, Any]
    countdown: float
    reason: str


@dataclass(frozen=True, slots=True)
class Settler:
    """What a job's end means for its message: the rules shared by the batching strategy and the task."""

    settings: Settings
    runtime: WorkerRuntime

    def job(self, message: dict[str, Any]) -> Job:
        final_attempt = _attempts_spent(message) >= self.settings.max_attempts - 1
        return Job(ref=ref_from_message(message), final_attempt=final_attempt)

    def settle(
        self, message: dict[str, Any], job: Job, retries: int, ended: Outcome | BaseException
    ) -> Outcome | Retry:
        spent = _attempts_spent(message)
        countdown = retry_countdown(retries)
        if isinstance(ended, BaseException):
            # The worker, not the image, failed (a batch slower than the visibility timeout, a loop error).
            # Acking would drop the job without a row: retry it instead. It spends an attempt (a failure
            # that follows the job round would otherwise loop for ever); on the last one the job is recorded
            # as failed_worker. If the batch still lands, its row replaces that failure, or the retry finds
            # the row and skips.
            self.runtime.metrics.retries.labels("worker").inc()
            reason = f"worker: {type(ended).__name__}: {ended}"
            if not job.final_attempt:
                return Retry({**message, ATTEMPTS_SPENT: spent + 1}, countdown, reason)
            ended = self.runtime.pipeline.record_failure(
                job.ref, f"gave up after {spent + 1} attempts: {reason}"
            )
        if ended.retry_reason is not None:
            # A database outage is not the image's fault: retried without spending the image's attempts.
            image_fault = not ended.retry_reason.startswith("database")
            retried = {**message, ATTEMPTS_SPENT: spent + 1} if image_fault else message
            return Retry(retried, countdown, ended.retry_reason)
        if ended.unrecordable is not None:
            log.error("no row can record s3://%s/%r: %s", ended.ref.bucket, ended.ref.key, ended.unrecordable)
        return ended


def _attempts_spent(message: dict[str, Any]) -> int:
    return int(message.get(ATTEMPTS_SPENT) or 0)


class Unsettled:
    """Counts the messages handed to the batcher and not yet acked, so a warm shutdown can wait for them."""

    def __init__(self) -> None:
        self._count = 0
        self._changed = threading.Condition()

    def add(self) -> None:
        with self._changed:
            self._count += 1

    def remove(self) -> None:
        with self._changed:
            self._count -= 1
            self._changed.notify_all()

    def wait_until_none(self) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self._count == 0)


class BrokerGate:
    """Sends what settles a message (its ack, its retry) unless the broker just failed on its channel.

    A batch's messages are settled one after another on its thread. On a broker gone silent each send waited
    out the socket timeout in turn (a batch of 64 held the worker 64 x 10 s, past the visibility timeout;
    a retry, with kombu's publish retry and the reject after it, about three timeouts each): after the
    first failure, the sends for messages of the same channel are given up at once, for `pause_s`. A
    message whose ack or retry was not sent stays unacknowledged, as after a failed send, and Redis hands
    it out again. Messages delivered on a new connection (the consumer reconnected) are settled as usual.
    """

    def __init__(self, pause_s: float, errors: tuple[type[BaseException], ...]) -> None:
        self._pause_s = pause_s
        self._errors = errors
        self._channel: object = None
        self._until = float("-inf")

    def send(self, channel: object, action: Callable[[], object]) -> str | None:
        """None once sent; else why not."""
        if channel is self._channel and time.monotonic() < self._until:
            return "not sent: the broker failed on this connection just before"
        try:
            action()
            return None
        except self._errors as error:
            self._channel, self._until = channel, time.monotonic() + self._pause_s
            return f"{type(error).__name__}: {error}"


def make_worker_app(settings: Settings, runtime: WorkerRuntime) -> Celery:
    app = Celery("enrich-worker")
    app.conf.update(celery_config(settings))
    settler = Settler(settings, runtime)
    unsettled = Unsettled()

    # max_retries=None: Celery never gives up on its own. A retry that reached Celery's limit would raise
    # the task's error instead, and Celery acks a task that raises, dropping the job without a row: free
    # retries would be capped too (`retry(max_retries=None)` means "the task's default", not "unlimited").
    # The image's own attempts are limited by the pipeline, which records a failed row on the last one.
    # shared=False: the task closes over this runtime; Celery would otherwise add it to every app made later
    # in the process (a test's next app got the previous runtime's task).
    @app.task(
        name=ENRICH_TASK_NAME,
        bind=True,
        max_retries=None,
        shared=False,
        # A partial, not a function: Celery reads it off the task instance, which would bind a function.
        Strategy=partial(batching_strategy, settler=settler, unsettled=unsettled),
    )
    def enrich_object(self: Task, message: dict[str, Any]) -> dict[str, Any]:
        job = settler.job(message)
        ended: Outcome | BaseException
        try:
            ended = runtime.batcher.submit(job).result(timeout=settings.visibility_timeout_s)
        except Exception as error:  # noqa: BLE001 - settled as a worker-side failure
            ended = error
        decision = settler.settle(message, job, self.request.retries, ended)
        if isinstance(decision, Retry):
            raise self.retry(
                args=[decision.message], exc=TransientError(decision.reason), countdown=decision.countdown
            )
        return _summary(decision)

    class SettleBeforeShutdown(bootsteps.StartStopStep):
        """On a warm shutdown, wait for the images in the batcher: their acks must go out before the
        connection closes, or their messages come back to be skipped by another worker."""

        def stop(self, parent: Any) -> None:
            unsettled.wait_until_none()

    app.steps["consumer"].add(SettleBeforeShutdown)
    return app


def batching_strategy(
    task: Task, app: Celery, consumer: Any, *, settler: Settler, unsettled: Unsettled, **kwargs: Any
) -> Callable[..., None]:
    through_pool = default_strategy(task, app, consumer, **kwargs)
    revoked = consumer.controller.state.revoked
    connection_errors = consumer.connection_errors
    submit = settler.runtime.batcher.submit
    metrics = settler.runtime.metrics
    # Celery raises a failed publish as kombu's OperationalError; kombu raises a failed ack as is.
    gate = BrokerGate(settler.settings.broker_socket_timeout_s, (OperationalError, *connection_errors))

    def acknowledge(message: Any, job: Job) -> None:
        why = gate.send(message.channel, message.ack)
        if why is not None:
            # A broker connection lost while the batch ran (a Redis restart) fails every ack of that batch,
            # which kombu would log at CRITICAL with a traceback each: one line, and a count, say what it is.
            metrics.acks_lost.inc()
            log.warning(
                "lost the ack of s3://%s/%s with the broker connection (%s): the job is settled; Redis"
                " hands its message out again after the visibility timeout, and a written image is then"
                " skipped",
                *_where(job),
                why,
            )

    def on_message(message: Any, body: Any, ack: Any, reject: Any, callbacks: Any, **kw: Any) -> Any:
        headers = message.headers
        # body is only given for Celery's protocol 1; ours is protocol 2.
        if body is not None or headers.get("eta") or headers.get("expires") or headers.get("id") in revoked:
            return through_pool(message, body, ack, reject, callbacks, **kw)
        try:
            args, _kwargs, _embed = message.decode()
            payload = args[0]
            job = settler.job(payload)
        except Exception:  # noqa: BLE001 - malformed: Celery's own path refuses it and logs why
            return through_pool(message, body, ack, reject, callbacks, **kw)
        retries = int(headers.get("retries") or 0)

        def send_retry(decision: Retry) -> bool:
            log.info("retry s3://%s/%s in %.0f s: %s", *_where(job), decision.countdown, decision.reason)
            why = gate.send(
                message.channel,
                partial(
                    task.apply_async,
                    args=[decision.message],
                    task_id=headers.get("id"),
                    retries=retries + 1,
                    countdown=decision.countdown,
                    argsrepr=headers.get("argsrepr"),
                    kwargsrepr="{}",
                ),
            )
            if why is None:
                return True
            metrics.retries_unsent.inc()
            log.warning(
                "could not send the retry of s3://%s/%s (%s): its message stays unacknowledged, and Redis"
                " hands it out again",
                *_where(job),
                why,
            )
            return False

        def finish(future: Future[Outcome]) -> None:
            try:
                error = future.exception()
                decision = settler.settle(payload, job, retries, error or future.result())
                if isinstance(decision, Retry) and not send_retry(decision):
                    return
                acknowledge(message, job)
            except Exception:
                log.exception("could not settle s3://%s/%s; it goes back on the queue", *_where(job))
                reject(log, connection_errors, True)
            finally:
                unsettled.remove()

        unsettled.add()
        try:
            future = submit(job)
        except Exception as error:  # noqa: BLE001 - settled (here, at once) as a worker-side failure
            future = Future()
            future.set_exception(error)
        future.add_done_callback(finish)
        return None

    return on_message


def _where(job: Job) -> tuple[str, str]:
    return job.ref.bucket, job.ref.key


def _summary(outcome: Outcome) -> dict[str, Any]:
    summary: dict[str, Any] = {"bucket": outcome.ref.bucket, "key": outcome.ref.key, "status": outcome.status}
    if outcome.unrecordable is not None:
        summary["error"] = outcome.unrecordable
    return summary
