"""The composition of stages for one micro-batch: skip -> fetch -> decode -> infer -> sink.

Errors are values: every ref ends as an Outcome, and one bad image never fails its batch-mates.
"""

from __future__ import annotations

import logging
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Protocol

import torch
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session

from schema.repository import already_enriched, ok_predictions_by_content, upsert_enrichments
from schema.results import EnrichmentResult, ImagePrediction, ObjectRef, Status
from worker.budget import ByteBudget, Hold
from worker.decode import DecodedInput, DecodeError, DecodeLimitError
from worker.image_pool import ImagePool, ImagePoolError
from worker.metrics import WorkerMetrics
from worker.model.config import PreprocessConfig
from worker.storage import FetchError, LimitError

log = logging.getLogger(__name__)


class Model(Protocol):
    """What the pipeline needs of a loaded bundle (worker.model.EnrichModel provides it)."""

    name: str
    version: str
    preprocessing: PreprocessConfig
    upscales_on_device: bool  # the decoders leave enlarging each image to `collate`

    def collate(self, pixels: Sequence[torch.Tensor]) -> torch.Tensor: ...

    def predict(self, batch: torch.Tensor) -> list[ImagePrediction]: ...


@dataclass(frozen=True, slots=True)
class Job:
    ref: ObjectRef
    # On the last attempt a transient failure is recorded as a failed row instead of retried.
    final_attempt: bool = False


@dataclass(slots=True)
class Outcome:
    """How one job ended in this batch."""

    ref: ObjectRef
    result: EnrichmentResult | None = None  # written to the table
    skipped: bool = False  # an ok row for this model version already existed
    retry_reason: str | None = None  # transient: nothing written, the job should be retried
    # The database refuses any row for this object (its key holds a NUL byte, say): nothing can be
    # written, so the job ends here, logged and counted, instead of being retried for ever.
    unrecordable: str | None = None

    @property
    def status(self) -> str:
        if self.retry_reason is not None:
            return "retry"
        if self.unrecordable is not None:
            return "unrecordable"
        if self.skipped:
            return "skipped"
        assert self.result is not None
        return self.result.status.value


@dataclass(slots=True)
class Prepared:
    """A job between the two stages: decoded pixels, or already a result (failure) or a retry."""

    job: Job
    pixels: torch.Tensor | None = None
    result: EnrichmentResult | None = None
    retry_reason: str | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)


class Pipeline:
    def __init__(
        self,
        *,
        model: Model,
        session_factory: Callable[[], Session],
        decoder: ImagePool,
        max_object_bytes: int,
        max_fetched_bytes: int,
        fetch_threads: int,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.model = model
        self.session_factory = session_factory
        self.decoder = decoder
        self.max_object_bytes = max_object_bytes
        self.metrics = metrics or WorkerMetrics()
        self.budget = ByteBudget(max_fetched_bytes, on_change=self.metrics.fetched_bytes.set)
        self._pool = ThreadPoolExecutor(max_workers=fetch_threads, thread_name_prefix="enrich-fetch")

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self.decoder.close()

    def process(self, jobs: Sequence[Job]) -> list[Outcome]:
        """One micro-batch end to end; returns one Outcome per job, in order."""
        return self.infer_and_sink(self.prepare(jobs))

    # -- stage 1: skip, fetch and decode (in worker processes, driven by the fetch threads) -------------

    def prepare(self, jobs: Sequence[Job]) -> list[Prepared]:
        started = time.perf_counter()
        done = self._already_enriched([job.ref for job in jobs])
        todo = [job for job in jobs if job.ref not in done]
        # A fetch thread hands its bytes to the decoder and moves on, so fetches and decodes overlap.
        fetched = iter([self._decoded(*pending) for pending in self._pool.map(self._fetch, todo)])
        # A job whose image is already enriched keeps neither result nor pixels: it ends as skipped.
        prepared = [Prepared(job=job) if job.ref in done else next(fetched) for job in jobs]
        self.metrics.stage_seconds.labels("prepare").observe(time.perf_counter() - started)
        return prepared

    def _already_enriched(self, refs: list[ObjectRef]) -> set[ObjectRef]:
        # Not fatal when it fails: the sink's upsert is idempotent on its own; this check only saves GPU time.
        try:
            return self._enriched_among(refs)
        except Exception as error:  # noqa: BLE001
            if _connection_trouble(error) or len(refs) == 1:
                return set()
        # A ref the database cannot even compare (a key it cannot encode) spoiled the batch's lookup:
        # one at a time, so its batch-mates are still skipped.
        return set().union(*(self._already_enriched([ref]) for ref in refs))

    def _enriched_among(self, refs: list[ObjectRef]) -> set[ObjectRef]:
        with self.session_factory() as session:
            return already_enriched(session=session, refs=refs, model_version=self.model.version)

    def _fetch(self, job: Job) -> tuple[Prepared, Future[DecodedInput] | None]:
        """Fetch and submit one job, holding its bytes in the budget until its decode has ended."""
        # With the event's size the wait happens before the GET; without it, after (the bytes in hand).
        # Capped: the fetch refuses a larger object, so a size no object can have must not stall the rest.
        hold = self.budget.reserve(min(job.ref.size or 0, self.max_object_bytes))
        pending: Future[DecodedInput] | None = None
        try:
            item, pending = self._fetch_and_submit(job, hold)
        except Exception as error:  # noqa: BLE001 - one job's surprise must not fail its batch-mates
            item = self._unexpected_fetch_error(job, error)
        finally:
            if pending is None:
                hold.release()
            else:
                # Released by the pool's thread when the decode ends, not by the batch thread, which
                # collects results in order: a later job's bytes must not wait for an earlier job's turn.
                pending.add_done_callback(lambda _: hold.release())
        return item, pending

    def _fetch_and_submit(self, job: Job, hold: Hold) -> tuple[Prepared, Future[DecodedInput] | None]:
        item = Prepared(job=job)
        ref = job.ref
        started = time.perf_counter()
        try:
            fetched = self.decoder.fetch(ref, max_bytes=self.max_object_bytes)
        except ImagePoolError as error:
            return self._pool_failed(item, error, Status.FAILED_FETCH), None
        except FetchError as error:
            status = Status.FAILED_LIMIT if isinstance(error, LimitError) else Status.FAILED_FETCH
            if error.transient and not job.final_attempt:
                item.retry_reason = f"fetch: {error}"
            else:
                reason = str(error) if not error.transient else f"gave up after retries: {error}"
                item.result = self._failure(ref, status, reason)
            return item, None
        item.timings_ms["fetch"] = (time.perf_counter() - started) * 1000
        hold.resize(len(fetched.data))
        if not ref.object_version:
            # An event that named neither a version nor an ETag: the row is keyed by what the GET returned,
            # or every later upload of the key would share the empty identity and be skipped as done.
            ref = replace(ref, version_id=fetched.version_id, etag=fetched.etag)
        item.result = EnrichmentResult(
            ref=ref,
            status=Status.OK,
            model_name=self.model.name,
            model_version=self.model.version,
            content_sha256=fetched.sha256,
            size=fetched.size,
            last_modified=fetched.last_modified,
        )
        try:
            return item, self.decoder.submit(fetched.data)
        except ImagePoolError as error:
            return self._pool_failed(item, error, Status.FAILED_DECODE), None

    def _unexpected_fetch_error(self, job: Job, error: Exception) -> Prepared:
        """An error no stage expects (a key botocore cannot encode, say): it may be transient, so it is
        retried, but it spends the image's attempts, so it ends as a recorded failure, never a loop."""
        reason = f"unexpected {type(error).__name__}: {error}"
        if job.final_attempt:
            return Prepared(job=job, result=self._failure(job.ref, Status.FAILED_FETCH, reason))
        return Prepared(job=job, retry_reason=f"fetch: {reason}")

    def _decoded(self, item: Prepared, pending: Future[DecodedInput] | None) -> Prepared:
        """Wait for the decode of one fetched item; a failure becomes the item's result."""
        if pending is None:
            return item
        result = item.result
        assert result is not None
        try:
            decoded = self.decoder.result(pending)
        except ImagePoolError as error:
            return self._pool_failed(item, error, Status.FAILED_DECODE)
        except DecodeError as error:
            result.status = (
                Status.FAILED_LIMIT if isinstance(error, DecodeLimitError) else Status.FAILED_DECODE
            )
            result.error = str(error)
            return item
        except Exception as error:  # noqa: BLE001 - a decoder bug on one image must not fail its batch
            result.status = Status.FAILED_DECODE
            result.error = f"unexpected decode error: {type(error).__name__}: {error}"
            return item
        item.timings_ms["decode"] = decoded.decode_ms
        item.pixels = torch.from_numpy(decoded.pixels)
        result.width, result.height = decoded.width, decoded.height
        return item

    def _pool_failed(self, item: Prepared, error: ImagePoolError, status: Status) -> Prepared:
        """Not the image's fault: retried like a transient fetch error, recorded on the last attempt."""
        if item.job.final_attempt:
            reason = f"gave up after retries: {error}"
            if item.result is None:  # failed before the fetch returned: nothing known of the object yet
                item.result = self._failure(item.job.ref, status, reason)
            else:
                item.result.status, item.result.error = status, reason
        else:
            item.result, item.retry_reason = None, f"{status.value}: {error}"
        return item

    def _failure(
        self,
        ref: ObjectRef,
        status: Status,
        reason: str,
        *,
        size: int | None = None,
        sha256: str | None = None,
    ) -> EnrichmentResult:
        return EnrichmentResult(
            ref=ref,
            status=status,
            error=reason,
            model_name=self.model.name,
            model_version=self.model.version,
            size=size,
            content_sha256=sha256,
        )

    # -- stage 2: one forward pass, then one database round trip -----------------------------------------

    def infer_and_sink(self, prepared: list[Prepared]) -> list[Outcome]:
        ready = [item for item in prepared if item.pixels is not None]
        to_run, copies = self._reuse_identical(ready)
        if to_run:
            self._infer(to_run)
        for item, source in copies:
            self._copy_result(item, source)
        outcomes = [self._outcome(item) for item in prepared]
        to_write = [o for o in outcomes if o.result is not None]
        if to_write:
            started = time.perf_counter()
            try:
                self._write([o.result for o in to_write if o.result is not None])
            except Exception as error:  # noqa: BLE001 - sorted below: the connection, or the data
                if _connection_trouble(error):
                    # Nothing was committed: hand every job of the batch back for retry.
                    self.metrics.retries.labels("sink").inc(len(to_write))
                    reason = f"database: {_one_line(error)}"
                    return [
                        Outcome(ref=o.ref, retry_reason=reason) if o.result is not None else o
                        for o in outcomes
                    ]
                # The database refused the batch's data, not its connection: one row at a time, so a row
                # it cannot hold fails alone and its batch-mates are written.
                for outcome in to_write:
                    self._write_alone(outcome)
            self.metrics.stage_seconds.labels("sink").observe(time.perf_counter() - started)
        tally: Counter[str] = Counter()
        for outcome in outcomes:
            if outcome.result is not None:
                tally[outcome.result.status.value] += 1
                self.metrics.results.labels(outcome.result.status.value).inc()
            elif outcome.unrecordable is not None:
                tally["unrecordable"] += 1
                self.metrics.results.labels("unrecordable").inc()
            elif outcome.skipped:
                tally["skipped"] += 1
                self.metrics.skipped.inc()
            else:
                stage = "sink" if (outcome.retry_reason or "").startswith("database") else "fetch"
                tally[f"retry ({stage})"] += 1
                self.metrics.retries.labels(stage).inc()
        # Fresh messages skip Celery's per-task log lines (worker/tasks.py): this is the worker's log of work.
        summary = ", ".join(f"{n} {what}" for what, n in sorted(tally.items()))
        log.info("batch of %d: %s", len(outcomes), summary)
        return outcomes

    def record_failure(self, ref: ObjectRef, reason: str) -> Outcome:
        """End a job outside any batch, when the batch path itself failed it on its last attempt."""
        outcome = Outcome(ref=ref, result=self._failure(ref, Status.FAILED_WORKER, reason))
        self._write_alone(outcome)
        return outcome

    def _write(self, results: Sequence[EnrichmentResult]) -> None:
        with self.session_factory() as session, session.begin():
            upsert_enrichments(session=session, results=results)

    def _write_alone(self, outcome: Outcome) -> None:
        """Write one refused batch's row by itself; if refused again, a bare failure row in its place
        (the model's output may be what the database cannot hold); if even that is refused, the object's
        identity is: the job is unrecordable."""
        result = outcome.result
        assert result is not None
        try:
            self._write([result])
            return
        except Exception as error:  # noqa: BLE001
            if _connection_trouble(error):
                outcome.result, outcome.retry_reason = None, f"database: {_one_line(error)}"
                return
            refused = _one_line(error)
        bare = self._failure(
            result.ref,
            Status.FAILED_WORKER,
            f"the database refused this image's row: {refused}",
            size=result.size,
            sha256=result.content_sha256,
        )
        try:
            self._write([bare])
            outcome.result = bare
        except Exception as error:  # noqa: BLE001
            if _connection_trouble(error):
                outcome.result, outcome.retry_reason = None, f"database: {_one_line(error)}"
            else:
                outcome.result, outcome.unrecordable = None, f"the database refuses any row for it: {refused}"

    def _outcome(self, item: Prepared) -> Outcome:
        if item.retry_reason is not None:
            return Outcome(ref=item.job.ref, retry_reason=item.retry_reason)
        if item.result is None:
            return Outcome(ref=item.job.ref, skipped=True)
        return Outcome(ref=item.job.ref, result=item.result)

    def _reuse_identical(
        self, ready: list[Prepared]
    ) -> tuple[list[Prepared], list[tuple[Prepared, Prepared]]]:
        """Identical bytes are enriched once per model: an image whose digest already has an ok row takes
        its prediction, and of several identical images in one batch only the first is run (the rest
        copy it afterwards). Returns the items to run and the (copy, source) pairs."""
        digests = {item.result.content_sha256 for item in ready if item.result and item.result.content_sha256}
        try:
            with self.session_factory() as session:
                known = ok_predictions_by_content(
                    session=session,
                    digests=digests,
                    model_name=self.model.name,
                    model_version=self.model.version,
                )
        except Exception:  # noqa: BLE001 - an outage or a refusal: the lookup only saves GPU time
            known = {}
        to_run: list[Prepared] = []
        copies: list[tuple[Prepared, Prepared]] = []
        first: dict[str, Prepared] = {}
        for item in ready:
            assert item.result is not None
            digest = item.result.content_sha256
            if digest is None:
                to_run.append(item)
            elif digest in known:
                item.result.prediction = known[digest]
                self._mark_reused(item)
            elif digest in first:
                copies.append((item, first[digest]))
            else:
                first[digest] = item
                to_run.append(item)
        return to_run, copies

    def _copy_result(self, item: Prepared, source: Prepared) -> None:
        assert item.result is not None and source.result is not None
        item.result.status, item.result.error = source.result.status, source.result.error
        item.result.prediction = source.result.prediction
        self._mark_reused(item)

    def _mark_reused(self, item: Prepared) -> None:
        """The item took another image's outcome: its pixels are not needed, and its row says so."""
        assert item.result is not None
        item.pixels = None
        item.result.timings_ms = {**item.timings_ms, "reused": 1.0}
        self.metrics.reused.inc()

    def _infer(self, ready: list[Prepared]) -> None:
        started = time.perf_counter()
        predictions: list[ImagePrediction | str]
        try:
            batch = self.model.collate([item.pixels for item in ready if item.pixels is not None])
            predictions = list(self.model.predict(batch))
            self._count_pass(len(ready))
        except Exception as error:  # noqa: BLE001 - any model failure becomes per-image data
            predictions = self._infer_one_by_one(ready, error)
        elapsed_ms = (time.perf_counter() - started) * 1000
        for item, prediction in zip(ready, predictions, strict=True):
            assert item.result is not None
            item.pixels = None  # free the tensor before the sink
            if isinstance(prediction, ImagePrediction) and _finite(prediction):
                item.result.prediction = prediction
            elif isinstance(prediction, ImagePrediction):
                item.result.status = Status.FAILED_INFER
                item.result.error = "the model's output is not finite (NaN or infinite confidences)"
            else:
                item.result.status = Status.FAILED_INFER
                item.result.error = prediction
            item.result.timings_ms = {**item.timings_ms, "infer_batch": elapsed_ms, "batch_size": len(ready)}
        self.metrics.stage_seconds.labels("infer").observe(elapsed_ms / 1000)

    def _infer_one_by_one(self, ready: list[Prepared], batch_error: Exception) -> list[ImagePrediction | str]:
        """A failed batch is retried image by image, so one poison input fails alone."""
        outcomes: list[ImagePrediction | str] = []
        for item in ready:
            assert item.pixels is not None
            try:
                outcomes.append(self.model.predict(self.model.collate([item.pixels]))[0])
                self._count_pass(1)
            except Exception as error:  # noqa: BLE001
                outcomes.append(f"inference failed: {type(error).__name__}: {error} (batch: {batch_error})")
        return outcomes

    def _count_pass(self, size: int) -> None:
        self.metrics.forward_passes.inc()
        self.metrics.batch_size.observe(size)
        if torch.cuda.is_initialized():
            self.metrics.device_memory_peak.set(torch.cuda.max_memory_allocated())


def _connection_trouble(error: BaseException) -> bool:
    """The database could not be reached, went away or timed out: no row of the batch is at fault."""
    if isinstance(error, OperationalError | InterfaceError):
        return True
    return isinstance(error, DBAPIError) and error.connection_invalidated


def _one_line(error: BaseException) -> str:
    text = next(iter(str(error).splitlines()), "")
    # The reason is stored in the row: a NUL byte (Postgres text cannot hold one) must not come along.
    return f"{type(error).__name__}: {text}".replace("\x00", "\\x00")


def _finite(prediction: ImagePrediction) -> bool:
    """A NaN confidence (an overflow in half precision, say) is no prediction, and JSON cannot store it."""
    values = [prediction.caption_confidence]
    for field_prediction in prediction.fields.values():
        values.append(field_prediction.confidence)
        values.extend(p for _, p in field_prediction.top_k)
    return all(math.isfinite(v) for v in values)
