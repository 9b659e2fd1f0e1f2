"""Every uploaded image ends in exactly one final state, whatever fails in between.

Real worker processes, the real Redis and Postgres, moto's S3 server; outages are made with a loopback
TCP proxy that a test cuts and restores for the worker alone.
"""

from __future__ import annotations

import http.server
import os
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import Future
from functools import partial
from urllib.parse import urlsplit

import pytest
import redis
from sqlalchemy import Engine, select, text
from sqlalchemy.orm import Session

from enrich.stack import WorkerProcess, with_port
from enrich.tcp_proxy import TcpProxy
from ingest.publisher import JobPublisher
from schema.queue import ref_to_message
from schema.results import ObjectRef
from schema.s3 import make_s3_client
from schema.settings import ENRICH_TASK_NAME, Settings
from schema.tables import Enrichment
from tests.conftest import REDIS_URL, StartWorker, enrich_cli, wait_for
from tests.test_end_to_end import put_images, rows, unacked_for
from worker.metrics import WorkerMetrics
from worker.pipeline import Job, Outcome
from worker.runtime import WorkerRuntime, build_pipeline, load_model
from worker.storage import S3Store
from worker.tasks import make_worker_app


def queue_length(queue: str) -> int:
    return int(redis.Redis.from_url(REDIS_URL).llen(queue))


def nothing_waiting_or_held(queue: str) -> bool:
    """Every job settled: none left in the list, none delivered and unacknowledged."""
    return queue_length(queue) == 0 and unacked_for(queue) == 0


def publish(settings: Settings, bucket: str, etags: dict[str, str]) -> None:
    report = JobPublisher(settings).publish(ObjectRef(bucket, key, etag=etag) for key, etag in etags.items())
    assert report.published == len(etags)


def one_ok_row_per_key(engine: Engine, keys: list[str]) -> bool:
    found = rows(engine)
    return sorted(r.key for r in found) == sorted(keys) and all(r.status == "ok" for r in found)


@pytest.fixture
def keys() -> list[str]:
    return [f"crash/{i}.jpg" for i in range(6)]


def test_sigkill_mid_batch_brings_the_tasks_back_and_each_finishes_once(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    start_worker: StartWorker,
) -> None:
    publish(settings, bucket, put_images(moto_server, bucket, keys))
    # Worker A takes every message and waits to fill a batch of 32: killed while holding all six.
    settings = settings.model_copy(update={"visibility_timeout_s": 3})
    slow = start_worker(settings.model_copy(update={"batch_size": 32, "max_wait_ms": 20_000}))
    wait_for(lambda: unacked_for(settings.queue) == 6 and queue_length(settings.queue) == 0, what="A holds 6")
    os.kill(slow.process.pid, signal.SIGKILL)
    slow.process.wait()
    assert rows(pg_engine) == []

    time.sleep(settings.visibility_timeout_s + 1)  # the messages become visible again
    start_worker(settings)
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), what="6 ok rows after the crash")
    wait_for(lambda: nothing_waiting_or_held(settings.queue), what="all acked")
    assert all(r.attempts == 1 for r in rows(pg_engine))


def test_warm_shutdown_finishes_the_batch_in_hand(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    start_worker: StartWorker,
) -> None:
    publish(settings, bucket, put_images(moto_server, bucket, keys))
    worker = start_worker(settings.model_copy(update={"batch_size": 32, "max_wait_ms": 3000}))
    wait_for(lambda: unacked_for(settings.queue) == 6, what="worker holds 6")
    worker.process.send_signal(signal.SIGTERM)  # what Kubernetes sends on scale-down
    assert worker.process.wait(timeout=60) == 0
    assert one_ok_row_per_key(pg_engine, keys)
    assert nothing_waiting_or_held(settings.queue)


@pytest.fixture
def pg_proxy(postgres_url: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(urlsplit(postgres_url).port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture
def redis_proxy() -> Iterator[TcpProxy]:
    proxy = TcpProxy(urlsplit(REDIS_URL).port or 6379)
    yield proxy
    proxy.close()


@pytest.fixture
def s3_proxy(moto_server: str) -> Iterator[TcpProxy]:
    proxy = TcpProxy(urlsplit(moto_server).port or 0)
    yield proxy
    proxy.close()


def filling_a_batch_through(redis_proxy: TcpProxy, settings: Settings, **update: object) -> Settings:
    """A worker on the proxied broker that holds what it receives in a batch waiting 3 s to fill, and whose
    unacknowledged messages come back 3 s after a lost ack."""
    return settings.model_copy(
        update={
            "broker_url": with_port(settings.broker_url, redis_proxy.port),
            "batch_size": 32,
            "max_wait_ms": 3000,
            "visibility_timeout_s": 3,
            **update,
        }
    )


def test_postgres_outage_is_retried_with_backoff_and_nothing_is_lost(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    start_worker: StartWorker,
    pg_proxy: TcpProxy,
) -> None:
    publish(settings, bucket, put_images(moto_server, bucket, keys))
    pg_proxy.down()
    worker = start_worker(
        settings.model_copy(update={"database_url": with_port(settings.database_url, pg_proxy.port)})
    )
    wait_for(
        lambda: worker.metric('enrich_transient_failures_total{stage="sink"}') >= 6, what="sink failures"
    )
    assert rows(pg_engine) == []
    pg_proxy.up()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=90, what="rows after the outage")
    wait_for(lambda: nothing_waiting_or_held(settings.queue), what="all acked")


def test_a_database_outage_longer_than_the_images_attempts_loses_nothing(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    start_worker: StartWorker,
    pg_proxy: TcpProxy,
) -> None:
    # Two attempts per image, and an outage that makes each job retry at least three times: the database's
    # retries must not spend them. (Celery's retry(max_retries=None) means "the task's default", so these
    # jobs used to end after their second retry: Celery acked the raised error and no row was written.)
    settings = settings.model_copy(
        update={"max_attempts": 2, "database_url": with_port(settings.database_url, pg_proxy.port)}
    )
    publish(settings, bucket, put_images(moto_server, bucket, keys[:2]))
    pg_proxy.down()
    worker = start_worker(settings)
    wait_for(
        lambda: worker.metric('enrich_transient_failures_total{stage="sink"}') >= 3 * 2,
        timeout=90,
        what="three sink failures per job",
    )
    pg_proxy.up()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys[:2]), timeout=90, what="rows after the outage")
    assert {row.attempts for row in rows(pg_engine)} == {1}


def test_during_a_database_outage_the_backlog_stays_in_the_list_keda_measures(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    start_worker: StartWorker,
    pg_proxy: TcpProxy,
) -> None:
    # Each retry is a message with an ETA, which Celery holds unacknowledged until it is due, raising its
    # prefetch for each: without a cap one worker took the whole backlog out of the list during an outage,
    # KEDA read a queue length of 0 and scaled the fleet down while the work waited.
    settings = settings.model_copy(
        update={"batch_size": 2, "database_url": with_port(settings.database_url, pg_proxy.port)}
    )
    keys = [f"outage/{i}.jpg" for i in range(24)]
    publish(settings, bucket, put_images(moto_server, bucket, keys))
    pg_proxy.down()
    worker = start_worker(settings)
    wait_for(
        lambda: (
            worker.metric('enrich_transient_failures_total{stage="sink"}')
            >= 2 * settings.effective_concurrency
        ),
        timeout=90,
        what="two rounds of retries",
    )
    held, waiting = [], []
    for _ in range(12):
        held.append(unacked_for(settings.queue))
        waiting.append(queue_length(settings.queue))
        time.sleep(0.5)
    assert max(held) <= settings.effective_concurrency, held
    # (A message is briefly in neither place while it is delivered or retried.)
    assert min(waiting) >= len(keys) - settings.effective_concurrency - 2, waiting
    pg_proxy.up()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=120, what="rows after the outage")


def test_broker_connections_lost_mid_batch_leave_each_image_enriched_once_and_the_worker_consuming(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    redis_proxy: TcpProxy,
    start_worker: StartWorker,
) -> None:
    # Three times, the worker holds six messages in a batch that waits to fill when its Redis connections
    # are reset. Celery restarts its consumer (which first waits for the batch), the batch's rows are
    # written, its acks are lost with the old connection, and Redis hands the messages out again after the
    # visibility timeout: the second jobs must find the rows and skip, and the worker must go on consuming.
    settings = filling_a_batch_through(redis_proxy, settings)
    worker = start_worker(settings)
    enriched: list[str] = []
    for cut in range(3):
        keys = [f"cut{cut}/{i}.jpg" for i in range(6)]
        publish(settings, bucket, put_images(moto_server, bucket, keys))
        wait_for(lambda: unacked_for(settings.queue) == 6, what=f"the worker holds 6 (cut {cut})")
        redis_proxy.down()
        enriched += keys
        wait_for(partial(one_ok_row_per_key, pg_engine, enriched), timeout=30, what="the batch's rows")
        redis_proxy.up()
        assert worker.process.poll() is None  # until 2026-12-07 the worker died here
        # Within the visibility timeout and Celery's reconnect back-off, not kombu's 50 s check for a
        # silent connection (which once hid a stall here; docs/reliability.md).
        wait_for(
            lambda: nothing_waiting_or_held(settings.queue),
            timeout=30,
            what=f"the redelivered jobs acked (cut {cut})",
        )
    # Each cut lost the acks of the six (counted and logged as such) and their second jobs skipped.
    assert worker.metric("enrich_acks_lost_total") >= 3 * 6
    assert worker.metric("enrich_skipped_already_enriched_total") >= 3 * 6
    assert {row.attempts for row in rows(pg_engine)} == {1}
    assert worker.process.poll() is None


def test_a_broker_gone_silent_mid_batch_neither_blocks_the_worker_nor_loses_an_image(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    redis_proxy: TcpProxy,
    start_worker: StartWorker,
) -> None:
    # Redis vanishes without closing the worker's connections (a dead node, a failover): commands are sent
    # and no reply comes. The batch in hand is written and its acks give up after the socket timeout (until
    # 2026-12-07 there was none: the first ack blocked the batch's thread, and with it the worker, for as
    # long as the kernel kept the socket). Once Redis answers again the worker reconnects, the messages
    # come back and skip, and new jobs run.
    settings = filling_a_batch_through(redis_proxy, settings, broker_socket_timeout_s=4)
    publish(settings, bucket, put_images(moto_server, bucket, keys))
    worker = start_worker(settings)
    wait_for(lambda: unacked_for(settings.queue) == 6, what="the worker holds 6")
    redis_proxy.blackhole()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=30, what="the batch's rows")
    # The first ack waits out the socket timeout (4 s); the other five, on the same connection, are given
    # up without a try. One after another (until 2026-12-08) they took 6 x 4 s, holding the worker.
    wait_for(lambda: worker.metric("enrich_acks_lost_total") >= 6, timeout=12, what="the acks given up")
    redis_proxy.up()
    late = ["silent/late.jpg"]
    publish(settings, bucket, put_images(moto_server, bucket, late))
    wait_for(lambda: one_ok_row_per_key(pg_engine, [*keys, *late]), timeout=60, what="a new job's row")
    wait_for(
        lambda: nothing_waiting_or_held(settings.queue),
        timeout=60,
        what="the redelivered jobs acked",
    )
    assert worker.metric("enrich_skipped_already_enriched_total") >= 6
    assert {row.attempts for row in rows(pg_engine)} == {1}
    assert worker.process.poll() is None


def test_retries_a_silent_broker_cannot_take_leave_their_messages_to_come_back(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    redis_proxy: TcpProxy,
    s3_proxy: TcpProxy,
    start_worker: StartWorker,
) -> None:
    # A worker cut off from the network (S3 and Redis at once): the batch's fetches fail, and the broker
    # takes none of its retries. The first retry gives up after kombu's publish retries; the other five, on
    # the same connection, are given up at once (until 2026-12-08 each waited the same in turn, holding the
    # worker). Their messages stay unacknowledged and come back once the network does.
    etags = put_images(moto_server, bucket, keys)
    s3_proxy.down()
    settings = filling_a_batch_through(
        redis_proxy,
        settings,
        broker_socket_timeout_s=3,
        max_wait_ms=5000,
        s3_endpoint_url=f"http://127.0.0.1:{s3_proxy.port}",
    )
    publish(settings, bucket, etags)
    worker = start_worker(settings)
    wait_for(lambda: unacked_for(settings.queue) == 6, what="the worker holds 6")
    redis_proxy.blackhole()
    # The fetches fail within ~6 s, the first retry after 2 x 3 s of timeouts; one after another, the six
    # took ~40 s.
    wait_for(lambda: worker.metric("enrich_retries_unsent_total") >= 6, timeout=22, what="retries unsent")
    assert rows(pg_engine) == []
    s3_proxy.up()
    redis_proxy.up()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=90, what="rows once the network is back")
    wait_for(
        lambda: nothing_waiting_or_held(settings.queue),
        timeout=60,
        what="every message settled",
    )
    assert worker.process.poll() is None


def healthz(worker: WorkerProcess) -> int:
    url = f"http://127.0.0.1:{worker.settings.metrics_port}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_worker_holding_work_without_progress_fails_its_liveness_probe_until_it_moves_again(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    start_worker: StartWorker,
    processes: int,
) -> None:
    # A table lock held elsewhere stalls the batch (as a wedged GPU call would): the process is up and
    # serves metrics, and does no work. /healthz says so once the stall passes the limit, so Kubernetes
    # restarts the pod; under the supervisor, the longest stall of its processes counts.
    worker = start_worker(settings.model_copy(update={"stall_limit_s": 3, "worker_processes": processes}))
    worker.wait_ready()
    assert healthz(worker) == 200
    with pg_engine.connect() as lock:
        lock.execute(text("LOCK TABLE enrichments IN ACCESS EXCLUSIVE MODE"))
        publish(settings, bucket, put_images(moto_server, bucket, ["stalled.jpg"]))
        wait_for(lambda: healthz(worker) == 503, timeout=30, what="the liveness probe failing")
        lock.rollback()
    wait_for(lambda: one_ok_row_per_key(pg_engine, ["stalled.jpg"]), timeout=60, what="the row")
    wait_for(lambda: healthz(worker) == 200, timeout=10, what="the liveness probe passing again")


def test_s3_outage_is_retried_then_succeeds(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    s3_proxy: TcpProxy,
    start_worker: StartWorker,
) -> None:
    etags = put_images(moto_server, bucket, keys)
    s3_proxy.down()
    publish(settings, bucket, etags)
    worker = start_worker(
        settings.model_copy(update={"s3_endpoint_url": f"http://127.0.0.1:{s3_proxy.port}"})
    )
    wait_for(
        lambda: worker.metric('enrich_transient_failures_total{stage="fetch"}') >= 6, what="fetch retries"
    )
    assert rows(pg_engine) == []
    s3_proxy.up()
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=90, what="rows after S3 came back")


def test_transient_failures_that_exhaust_attempts_are_dead_lettered_and_can_be_retried(
    settings: Settings,
    pg_engine: Engine,
    bucket: str,
    moto_server: str,
    keys: list[str],
    s3_proxy: TcpProxy,
    start_worker: StartWorker,
) -> None:
    etags = put_images(moto_server, bucket, keys[:2])
    s3_proxy.down()
    settings = settings.model_copy(
        update={"max_attempts": 2, "s3_endpoint_url": f"http://127.0.0.1:{s3_proxy.port}"}
    )
    publish(settings, bucket, etags)
    start_worker(settings)
    wait_for(lambda: len(rows(pg_engine)) == 2, timeout=90, what="dead-lettered rows")
    assert {r.status for r in rows(pg_engine)} == {"failed_fetch"}
    assert all("gave up after retries" in (r.error or "") for r in rows(pg_engine))
    failed = enrich_cli(settings, "query", "--status", "failed", "--format", "csv").stdout
    assert all(key in failed for key in keys[:2])

    s3_proxy.up()
    retried = enrich_cli(settings, "retry", "--status", "failed_fetch")
    assert "queued 2" in retried.stdout
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys[:2]), timeout=60, what="ok after retry")
    assert all(r.attempts == 2 for r in rows(pg_engine))


def test_permanent_errors_fail_once_without_retrying(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    etags = put_images(moto_server, bucket, ["gone.jpg", "overwritten.jpg"])
    client = make_s3_client(settings)
    client.delete_object(Bucket=bucket, Key="gone.jpg")
    client.put_object(Bucket=bucket, Key="overwritten.jpg", Body=b"new bytes, a new version")
    publish(settings, bucket, etags)
    worker = start_worker(settings)
    wait_for(lambda: len(rows(pg_engine)) == 2, what="2 failed rows")
    found = {r.key: r for r in rows(pg_engine)}
    assert found["gone.jpg"].status == "failed_fetch" and "NoSuchKey" in (found["gone.jpg"].error or "")
    assert found["overwritten.jpg"].status == "failed_fetch"
    assert "changed since the event" in (found["overwritten.jpg"].error or "")
    assert worker.metric("enrich_transient_failures_total") == 0


def test_a_late_event_for_an_older_version_never_hides_the_newer_one(
    settings: Settings, pg_engine: Engine, bucket: str
) -> None:
    client = make_s3_client(settings)
    old = client.put_object(Bucket=bucket, Key="shirt.jpg", Body=put_bytes(0))["ETag"].strip('"')
    new = client.put_object(Bucket=bucket, Key="shirt.jpg", Body=put_bytes(1))["ETag"].strip('"')
    pipeline = build_pipeline(settings, model=load_model(settings), store=S3Store.from_settings(settings))
    try:
        # Delivery is unordered: the newer event (sequencer 0B) arrives before the older one (0A).
        pipeline.process([Job(ObjectRef(bucket, "shirt.jpg", etag=new, sequencer="0B"))])
        pipeline.process([Job(ObjectRef(bucket, "shirt.jpg", etag=old, sequencer="0A"))])
    finally:
        pipeline.close()
    with pg_engine.connect() as conn:
        latest = conn.execute(
            text("SELECT etag, status FROM enrichments_latest WHERE key = 'shirt.jpg'")
        ).one()
    assert tuple(latest) == (new, "ok")
    with Session(pg_engine) as session:
        statuses = dict(session.execute(select(Enrichment.etag, Enrichment.status)).tuples().all())
    assert statuses == {new: "ok", old: "failed_fetch"}


def put_bytes(index: int) -> bytes:
    from tests.conftest import sample_jpegs

    return sample_jpegs(index + 1)[index]


class FailsOnceBatcher:
    """The worker's side failing once (a batch outlasting the visibility timeout), then succeeding."""

    def __init__(self) -> None:
        self.jobs: list[Job] = []

    def submit(self, job: Job) -> Future[Outcome]:
        self.jobs.append(job)
        future: Future[Outcome] = Future()
        if len(self.jobs) == 1:
            future.set_exception(TimeoutError())
        else:
            future.set_result(Outcome(ref=job.ref, skipped=True))
        return future


def test_a_worker_side_failure_retries_the_job_instead_of_acking_it_away(settings: Settings) -> None:
    # Celery acks a task that raises (acks_late acks failures too): the job would be gone without a row.
    batcher = FailsOnceBatcher()
    runtime = WorkerRuntime(pipeline=None, batcher=batcher, metrics=WorkerMetrics())  # type: ignore[arg-type]
    task = make_worker_app(settings, runtime).tasks[ENRICH_TASK_NAME]
    ref = ObjectRef("shop", "late.jpg", etag="e1")

    result = task.apply(args=[ref_to_message(ref)])  # eager: the retry runs at once, and succeeds

    assert result.state == "SUCCESS"
    assert [job.ref for job in batcher.jobs] == [ref, ref]
    assert runtime.metrics.retries.labels("worker")._value.get() == 1


class TricklingS3(threading.Thread):
    """An HTTP server that answers any GET with a 200 and then sends its body a byte every 0.2 s: each read
    returns within the S3 client's read timeout, so only a deadline on the whole fetch ends it."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler())

    @staticmethod
    def _handler() -> type[http.server.BaseHTTPRequestHandler]:
        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "1000")
                self.send_header("ETag", '"e1"')
                self.end_headers()
                try:
                    for _ in range(1000):
                        self.wfile.write(b"x")
                        self.wfile.flush()
                        time.sleep(0.2)
                except OSError:
                    pass  # the client gave up

            def log_message(self, *_args: object) -> None:
                pass

        return Handler

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def run(self) -> None:
        self.server.serve_forever()


def test_a_server_that_trickles_bytes_is_a_transient_fetch_failure_after_the_deadline(
    settings: Settings,
) -> None:
    trickle = TricklingS3()
    trickle.start()
    settings = settings.model_copy(update={"s3_endpoint_url": trickle.url, "fetch_timeout_s": 2.0})
    pipeline = build_pipeline(settings, model=load_model(settings), store=S3Store.from_settings(settings))
    started = time.monotonic()
    try:
        outcome = pipeline.process([Job(ref=ObjectRef("shop", "slow.jpg", etag="e1"))])[0]
    finally:
        pipeline.close()
        trickle.server.shutdown()
    # The old code waited for the 1,000 bytes (200 s): the worker's batch loop with it.
    assert time.monotonic() - started < 30
    assert outcome.status == "retry" and "longer than 2 s" in (outcome.retry_reason or "")
