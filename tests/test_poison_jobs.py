"""One job the stack cannot handle must end alone, with a reason: never fail its batch-mates, never loop.

Real Postgres, a real (random) model, real files or the S3 API server; the triggers are inputs a bucket or
a folder can really hold (a key with a NUL byte, a file name that is not UTF-8) or a model's NaN output.
"""

from __future__ import annotations

import dataclasses
import math
import os
import threading
import time
from pathlib import Path

import redis
import torch
from celery import Celery
from celery.contrib.testing.worker import start_worker
from sqlalchemy import Engine, text
from sqlalchemy.orm import Session

from ingest.publisher import JobPublisher
from schema.db import make_engine, make_session_factory
from schema.queue import celery_config
from schema.repository import upsert_enrichments
from schema.results import EnrichmentResult, ImagePrediction, ObjectRef, Status
from schema.settings import ENRICH_TASK_NAME, Settings
from tests.conftest import StartWorker, s3_client, sample_jpegs, wait_for
from tests.test_end_to_end import unacked_for
from tests.test_pipeline import rows_by_key
from worker.local_run import plan, run_local
from worker.pipeline import Job, Model, Outcome, Pipeline
from worker.runtime import WorkerRuntime, build_decoder, build_pipeline, load_model
from worker.storage import FetchedObject, LocalStore
from worker.tasks import make_worker_app

GOOD = [f"good {i}.jpg" for i in range(3)]


class OnePhotoStore:
    """Serves the same photo under any key, as a bucket would serve keys our code cannot even encode."""

    def __init__(self) -> None:
        self.photo = sample_jpegs(1)[0]

    def get(self, ref: ObjectRef, *, max_bytes: int) -> FetchedObject:
        ref.key.encode()  # what botocore does first: a key with a lone surrogate raises here
        return FetchedObject(data=self.photo, size=len(self.photo))


def in_process_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"decode_processes": 0})


def test_a_key_the_database_cannot_hold_ends_unrecordable_and_its_batch_mates_are_written(
    settings: Settings, pg_engine: Engine
) -> None:
    settings = in_process_settings(settings)
    pipeline = build_pipeline(settings, model=load_model(settings), store=OnePhotoStore())
    refs = [ObjectRef("shop", key) for key in GOOD] + [ObjectRef("shop", "odd\x00.jpg")]
    try:
        # Not the last attempt: a refused row is not transient, so it must not come back as a retry.
        outcomes = pipeline.process([Job(ref=ref) for ref in refs])
    finally:
        pipeline.close()
    assert [o.status for o in outcomes] == ["ok", "ok", "ok", "unrecordable"]
    assert "NUL" in (outcomes[3].unrecordable or "")
    assert {key: row.status for key, row in rows_by_key(pg_engine).items()} == dict.fromkeys(GOOD, "ok")


def test_a_key_that_cannot_be_encoded_is_retried_on_its_attempts_then_ends_alone(
    settings: Settings, pg_engine: Engine
) -> None:
    settings = in_process_settings(settings)
    pipeline = build_pipeline(settings, model=load_model(settings), store=OnePhotoStore())
    refs = [ObjectRef("shop", key) for key in GOOD] + [ObjectRef("shop", "odd\ud800.jpg")]
    try:
        first = pipeline.process([Job(ref=ref) for ref in refs])
        last = pipeline.process([Job(ref=ref, final_attempt=True) for ref in refs])
    finally:
        pipeline.close()
    # An unexpected error may be transient: retried, spending the image's attempts (a "fetch" reason).
    assert [o.status for o in first] == ["ok", "ok", "ok", "retry"]
    assert (first[3].retry_reason or "").startswith("fetch: unexpected UnicodeEncodeError")
    # On the last one it ends; its failure row cannot be stored either (psycopg cannot encode the key).
    assert [o.status for o in last] == ["skipped", "skipped", "skipped", "unrecordable"]


class NaNForOne:
    """The real model, with one image's output turned to NaN (what a half-precision overflow gives)."""

    def __init__(self, model: Model, poisoned: int) -> None:
        self.model, self.poisoned = model, poisoned
        self.name, self.version, self.preprocessing = model.name, model.version, model.preprocessing
        self.upscales_on_device, self.collate = model.upscales_on_device, model.collate

    def predict(self, batch: torch.Tensor) -> list[ImagePrediction]:
        predictions = self.model.predict(batch)
        bad = predictions[self.poisoned]
        predictions[self.poisoned] = dataclasses.replace(bad, caption_confidence=math.nan)
        return predictions


def test_a_nan_prediction_is_a_failed_inference_not_a_refused_batch(
    settings: Settings, pg_engine: Engine, tmp_path: Path
) -> None:
    for key, data in zip(GOOD, sample_jpegs(3), strict=True):
        (tmp_path / key).write_bytes(data)
    settings = in_process_settings(settings)
    pipeline = build_pipeline(
        settings, model=NaNForOne(load_model(settings), poisoned=1), store=LocalStore(tmp_path)
    )
    try:
        outcomes = pipeline.process([Job(ref=ObjectRef("local", key)) for key in GOOD])
    finally:
        pipeline.close()
    assert [o.status for o in outcomes] == ["ok", "failed_infer", "ok"]
    rows = rows_by_key(pg_engine)
    assert rows[GOOD[1]].status == "failed_infer" and "not finite" in (rows[GOOD[1]].error or "")
    assert rows[GOOD[0]].status == rows[GOOD[2]].status == "ok"


def test_enrich_run_over_a_folder_with_a_file_name_that_is_not_utf8(
    settings: Settings, pg_engine: Engine, tmp_path: Path
) -> None:
    for key, data in zip(GOOD, sample_jpegs(3), strict=True):
        (tmp_path / key).write_bytes(data)
    # A Latin-1 name out of an old zip file: Python lists it as 'caf\udce9.jpg'.
    (Path(os.fsdecode(os.fsencode(tmp_path) + b"/caf\xe9.jpg"))).write_bytes(sample_jpegs(1)[0])
    store, refs = plan(in_process_settings(settings), str(tmp_path))
    assert len(refs) == 4
    outcomes = run_local(in_process_settings(settings), store=store, refs=refs)
    assert sorted(o.status for o in outcomes) == ["ok", "ok", "ok", "unrecordable"]
    assert {key: row.status for key, row in rows_by_key(pg_engine).items()} == dict.fromkeys(GOOD, "ok")


def test_a_batch_behind_a_lock_ends_as_a_database_retry_instead_of_wedging_the_worker(
    settings: Settings, pg_engine: Engine, postgres_url: str, tmp_path: Path
) -> None:
    (tmp_path / "a.jpg").write_bytes(sample_jpegs(1)[0])
    settings = in_process_settings(settings)
    model = load_model(settings)
    ref = ObjectRef("local", "a.jpg")
    # A failed row, which a retry may replace: the batch's upsert must take its lock.
    earlier = EnrichmentResult(
        ref=ref,
        status=Status.FAILED_FETCH,
        error="earlier",
        model_name=model.name,
        model_version=model.version,
    )
    with Session(pg_engine) as session, session.begin():
        upsert_enrichments(session=session, results=[earlier])
    decoder = build_decoder(settings, model, LocalStore(tmp_path))
    pipeline = Pipeline(
        model=model,
        session_factory=make_session_factory(make_engine(postgres_url, statement_timeout_s=1.0)),
        decoder=decoder,
        max_object_bytes=settings.max_object_bytes,
        max_fetched_bytes=settings.max_fetched_bytes,
        fetch_threads=2,
    )
    holder = pg_engine.connect()
    lock = holder.begin()
    holder.execute(text("SELECT id FROM enrichments WHERE key = 'a.jpg' FOR UPDATE"))
    outcomes: list[Outcome] = []
    finished = threading.Event()

    def run() -> None:
        outcomes.extend(pipeline.process([Job(ref=ref)]))
        finished.set()

    try:
        threading.Thread(target=run, daemon=True).start()
        # The server cancels the upsert after 1 s; without a limit it waits as long as the lock is held.
        assert finished.wait(timeout=20), "the batch is still blocked behind the lock"
    finally:
        lock.rollback()
        holder.close()
        finished.wait(timeout=30)
        pipeline.close()
    assert outcomes[0].status == "retry"
    assert (outcomes[0].retry_reason or "").startswith("database: OperationalError")


class BrokenBatcher:
    def __init__(self) -> None:
        self.calls = 0

    def submit(self, job: Job) -> object:
        self.calls += 1
        raise RuntimeError("the batch loop is broken")


def broken_worker_app(settings: Settings) -> tuple[Celery, Pipeline, BrokenBatcher]:
    """The worker's Celery app over a batcher that fails every job, three attempts per image."""
    settings = in_process_settings(settings).model_copy(update={"max_attempts": 3})
    pipeline = build_pipeline(settings, model=load_model(settings), store=OnePhotoStore())
    batcher = BrokenBatcher()
    runtime = WorkerRuntime(pipeline=pipeline, batcher=batcher, metrics=pipeline.metrics)  # type: ignore[arg-type]
    return make_worker_app(settings, runtime), pipeline, batcher


def test_a_worker_that_fails_every_attempt_records_failed_worker_and_stops(
    settings: Settings, pg_engine: Engine
) -> None:
    """The Celery task: a failure outside the pipeline's errors-as-values spends the image's attempts
    (run eagerly, each retry is executed at once), and the last one records why, instead of looping."""
    app, pipeline, batcher = broken_worker_app(settings)
    app.conf.task_always_eager = True
    app.conf.task_eager_propagates = False
    try:
        message = {"bucket": "shop", "key": "a.jpg", "etag": "e1"}
        result = app.tasks["enrich.object"].apply(args=[message])
    finally:
        pipeline.close()
    assert batcher.calls == 3
    assert result.get()["status"] == "failed_worker"
    row = rows_by_key(pg_engine)["a.jpg"]
    assert row.status == "failed_worker" and "gave up after 3 attempts" in (row.error or "")


def test_a_queued_job_the_worker_fails_every_time_spends_its_attempts_across_both_consuming_paths(
    settings: Settings, pg_engine: Engine
) -> None:
    """The same through a real worker on the Redis queue: the fresh message is handed to the batcher by
    the batching strategy, its retries (held for their countdown) run through Celery's pool; both count
    the image's attempts, the last records why, and every message is acknowledged."""
    app, pipeline, batcher = broken_worker_app(settings)
    try:
        with start_worker(app, pool="threads", concurrency=4, perform_ping_check=False):
            JobPublisher(settings).publish([ObjectRef("shop", "a.jpg", etag="e1")])
            # Countdowns of 1 s then 2 s before the second and third attempts.
            wait_for(lambda: "a.jpg" in rows_by_key(pg_engine), timeout=30, what="the failed_worker row")
            wait_for(lambda: unacked_for(settings.queue) == 0, timeout=10, what="every message acknowledged")
    finally:
        pipeline.close()
    assert batcher.calls == 3
    row = rows_by_key(pg_engine)["a.jpg"]
    assert row.status == "failed_worker" and "gave up after 3 attempts" in (row.error or "")
    assert redis.Redis.from_url(settings.broker_url).llen(settings.queue) == 0


def test_a_worker_writes_the_batch_mates_of_a_key_no_row_can_hold(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    client = s3_client(moto_server)
    keys = [*GOOD, "odd\x00.jpg"]  # S3 (and this server) store any key; Postgres text cannot hold a NUL
    refs = []
    for key, data in zip(keys, sample_jpegs(4), strict=True):
        etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        refs.append(ObjectRef(bucket, key, etag=etag.strip('"'), size=len(data)))
    settings = settings.model_copy(update={"batch_size": 4, "max_wait_ms": 1500})
    start_worker(settings)
    assert JobPublisher(settings).publish(refs).published == 4
    wait_for(lambda: len(rows_by_key(pg_engine)) == 3, timeout=60, what="the three good rows")
    assert {key: row.status for key, row in rows_by_key(pg_engine).items()} == dict.fromkeys(GOOD, "ok")
    # The fourth job ended (logged, counted) and was acknowledged: not back in the queue, not held.
    wait_for(lambda: unacked_for(settings.queue) == 0, timeout=30, what="every message acknowledged")
    time.sleep(3)  # past the first retry's countdown: a retried job would be back by now
    client = redis.Redis.from_url(settings.broker_url)
    assert client.llen(settings.queue) == 0 and unacked_for(settings.queue) == 0
    client.close()


def test_a_task_message_that_is_not_ours_is_refused_alone_and_the_worker_goes_on(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    """A message on the queue that names no object (another producer's, a hand-made one) cannot become a
    row: the batching strategy leaves it to Celery's own path, which logs why and acknowledges it, while
    its batch-mates are written and the worker keeps consuming."""
    client = s3_client(moto_server)
    refs = []
    for key, data in zip(GOOD, sample_jpegs(len(GOOD)), strict=True):
        etag = client.put_object(Bucket=bucket, Key=key, Body=data)["ETag"]
        refs.append(ObjectRef(bucket, key, etag=etag.strip('"'), size=len(data)))
    settings = settings.model_copy(update={"batch_size": 4, "max_wait_ms": 1500})
    worker = start_worker(settings)
    sender = Celery("stranger")
    sender.conf.update(celery_config(settings))
    for args in ([{"key": "no-bucket.jpg"}], ["not a message"]):
        sender.send_task(ENRICH_TASK_NAME, args=args, queue=settings.queue)
    assert JobPublisher(settings).publish(refs).published == len(GOOD)
    wait_for(lambda: len(rows_by_key(pg_engine)) == len(GOOD), timeout=60, what="the good rows")
    assert {key: row.status for key, row in rows_by_key(pg_engine).items()} == dict.fromkeys(GOOD, "ok")
    wait_for(lambda: unacked_for(settings.queue) == 0, timeout=30, what="every message acknowledged")
    assert redis.Redis.from_url(settings.broker_url).llen(settings.queue) == 0
    assert worker.process.poll() is None
    sender.close()
