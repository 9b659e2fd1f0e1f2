"""`enrich bench`: throughput and latency of each stage and of the whole stack, on the same images.

(a) model ceiling: classifier + captioner forward passes on pre-decoded batches;
(b) decode ceiling: bytes -> model-size tensors in the worker's decoding processes;
(s) fetch ceiling: S3 GETs through one worker process's fetching processes;
(i) ingest ceiling: MinIO-style webhook POSTs into one `enrich ingest webhook` process;
(c) end to end: S3 API server -> ingest publisher -> Redis -> `enrich worker` -> Postgres rows, with the CPU
    per image of the worker processes and of every process on the machine;
(d) upload-to-row latency at a fixed offered load (half of (c));
and a naive baseline: the same stack with one image per task and one forward pass per image.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import urllib3
from pydantic import SecretStr
from sqlalchemy import Engine, func, select

from enrich.ceilings import decode_ceiling, machine_description, model_ceiling
from enrich.stack import (
    NANIO_CREDENTIALS,
    NanioServer,
    WorkerProcess,
    cpu_by_group_since,
    cpu_by_process,
    free_port,
    machine_busy_seconds,
    minio_event,
    start_moto,
    stop_processes,
    wait_for_port,
)
from ingest.publisher import JobPublisher
from schema.db import make_engine
from schema.migrate import upgrade
from schema.results import ObjectRef
from schema.s3 import make_s3_client
from schema.settings import Settings, settings_env, usable_cores
from schema.tables import Enrichment
from worker.image_pool import ImagePool
from worker.pipeline import Model
from worker.runtime import build_decoder
from worker.storage import LocalStore, S3Store

# The stages a worker cannot run faster than: its S3 GETs (fetch threads against the S3 server in use),
# decoding (its process pool) and the model (forward passes on pre-decoded batches).
CEILINGS = ("fetch", "decode", "model")


def unique_bytes(blob: bytes, key: str) -> bytes:
    """The image with the key after its end (decoders ignore trailing bytes): the worker enriches identical
    bytes once, and the runs of one bench upload the same photos again (and cycle them when asked for more
    images than there are), so without this a later run would measure reused rows, not work."""
    return blob + b"\x00enrich-bench:" + key.encode()


@dataclass
class BenchReport:
    label: str
    images: int
    device: str
    batch_size: int
    worker_processes: int = 1
    s3_server: str = "moto"
    rates: dict[str, float] = field(default_factory=dict)  # images/s per stage
    latency_ms: dict[str, float] = field(default_factory=dict)
    memory: dict[str, float] = field(default_factory=dict)  # MiB
    worker_cpu_ms: float | None = None  # the worker processes' own CPU per image during (c)
    machine_cpu_ms: float | None = None  # every process's CPU per image during (c)
    cpu_ms_by_group: dict[str, float] = field(default_factory=dict)  # the same, by kind of process

    @property
    def cores(self) -> int:
        return usable_cores()

    @property
    def limits(self) -> dict[str, float]:
        """What (c) cannot exceed: each stage's ceiling, and the machine's cores at (c)'s CPU per image
        (every process on the machine shares them: S3 server, Redis, Postgres, worker, decoding)."""
        limits = {name: self.rates[name] for name in CEILINGS if name in self.rates}
        if self.machine_cpu_ms:
            limits["machine CPU"] = self.cores * 1000 / self.machine_cpu_ms
        return limits

    @property
    def bound(self) -> str:
        limits = self.limits
        return min(limits, key=limits.__getitem__) if limits else "?"

    @property
    def efficiency(self) -> float | None:
        """(c) / min(a, b): the share of the model and decode ceilings the whole stack delivers."""
        if "end_to_end" not in self.rates or not {"model", "decode"} <= set(self.rates):
            return None
        return self.rates["end_to_end"] / min(self.rates["model"], self.rates["decode"])

    def lines(self) -> list[str]:
        head = (
            f"{self.label}: {self.images} images, {self.device}, batch {self.batch_size}, S3 {self.s3_server}"
        )
        if self.worker_processes > 1:
            head += f", {self.worker_processes} worker processes"
        rows = [f"| {head} | |", "|---|---|"]
        rows += [f"| {name} | {rate:,.1f} images/s |" for name, rate in self.rates.items()]
        if self.efficiency is not None:
            rows.append(f"| end_to_end / min(model, decode) | {self.efficiency:.0%} |")
            limit = self.limits[self.bound]
            share = self.rates["end_to_end"] / limit
            rows.append(
                f"| tightest limit | {self.bound}: {limit:,.0f} images/s (end_to_end reaches {share:.0%}) |"
            )
        if self.worker_cpu_ms is not None:
            cap = f"one core's worth: <= {1000 / self.worker_cpu_ms:,.0f} images/s"
            rows.append(f"| worker processes' CPU per image | {self.worker_cpu_ms:.2f} ms ({cap}) |")
        if self.machine_cpu_ms is not None:
            cap = f"{self.cores} cores: <= {self.cores * 1000 / self.machine_cpu_ms:,.0f} images/s"
            rows.append(
                f"| whole machine's CPU per image (every process) | {self.machine_cpu_ms:.2f} ms ({cap}) |"
            )
        if self.cpu_ms_by_group:
            parts = sorted(self.cpu_ms_by_group.items(), key=lambda item: -item[1])
            rows.append("| ... by process | " + ", ".join(f"{name} {ms:.2f}" for name, ms in parts) + " ms |")
        if "naive" in self.rates and "end_to_end" in self.rates:
            speedup = self.rates["end_to_end"] / self.rates["naive"]
            rows.append(f"| speed-up over naive | {speedup:.1f}x |")
        latency = dict(self.latency_ms)
        if (offered := latency.pop("offered_rate", None)) is not None:
            rows.append(f"| offered load for latency | {offered:,.1f} images/s |")
        rows += [f"| upload-to-row latency {name} | {value:,.0f} ms |" for name, value in latency.items()]
        rows += [f"| {name} | {value:,.0f} MiB |" for name, value in self.memory.items()]
        return rows


@dataclass
class EndToEndRun:
    rate: float  # images/s
    # CPU milliseconds per image meanwhile: the worker processes' own (the Python of messaging, batching and
    # writing, and the model on a CPU; not their fetching and decoding processes), and every process's.
    worker_cpu_ms: float
    machine_cpu_ms: float
    cpu_ms_by_group: dict[str, float]
    worker: WorkerProcess


class Stack:
    """An S3 API server (moto or nanio started here, or the one at `s3_endpoint`), the configured Redis and
    Postgres, and one worker at a time."""

    def __init__(self, settings: Settings, s3_endpoint: str | None, *, s3_server: str = "moto") -> None:
        self._stop_server: Callable[[], None] | None = None
        self.s3_server = s3_server if s3_endpoint is None else s3_endpoint
        if s3_endpoint is None:
            if s3_server == "nanio":
                nanio = NanioServer(workers=max(1, usable_cores() // 4))
                self._stop_server, s3_endpoint, (key, secret) = nanio.stop, nanio.endpoint, NANIO_CREDENTIALS
            else:
                moto, s3_endpoint = start_moto()
                self._stop_server, key, secret = moto.stop, "local", "local"  # moto takes any keys
            # In the settings, not the environment: fetching processes forked earlier never see it change.
            settings = settings.model_copy(
                update={"s3_access_key_id": SecretStr(key), "s3_secret_access_key": SecretStr(secret)}
            )
        self.settings = settings.model_copy(update={"s3_endpoint_url": s3_endpoint, "metrics_port": 0})
        self.client = make_s3_client(self.settings)
        upgrade(settings.database_url)  # a fresh database works too; a migrated one is left as it is
        self.engine: Engine = make_engine(settings.database_url)
        self.bucket = f"bench-{uuid.uuid4().hex[:8]}"
        self.client.create_bucket(Bucket=self.bucket)

    def upload(self, prefix: str, blobs: list[bytes]) -> list[ObjectRef]:
        def put(item: tuple[int, bytes]) -> ObjectRef:
            key = f"{prefix}/{item[0]:07d}.jpg"
            body = unique_bytes(item[1], key)
            etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
            return ObjectRef(self.bucket, key, etag=etag, size=len(body))

        with ThreadPoolExecutor(8) as pool:
            return list(pool.map(put, enumerate(blobs)))

    def rows_under(self, prefix: str) -> int:
        with self.engine.connect() as conn:
            count = conn.scalar(
                select(func.count()).where(
                    Enrichment.bucket == self.bucket, Enrichment.key.startswith(prefix + "/")
                )
            )
        return int(count or 0)

    def fetch_ceiling(self, blobs: list[bytes], model: Model) -> float:
        """GETs/s through one worker process's fetching processes (its S3 client, `fetch_threads` of them)
        from the S3 server in use: what that server and our client allow each worker process."""
        refs = self.upload(f"fetch-{uuid.uuid4().hex[:6]}", blobs)
        pool: ImagePool = build_decoder(self.settings, model, S3Store.from_settings(self.settings))
        limit = self.settings.max_object_bytes
        try:
            with ThreadPoolExecutor(2 * self.settings.fetch_threads) as threads:
                list(threads.map(lambda ref: pool.fetch(ref, max_bytes=limit), refs[:64]))  # warm-up
                started = time.perf_counter()
                list(threads.map(lambda ref: pool.fetch(ref, max_bytes=limit), refs))
            return len(refs) / (time.perf_counter() - started)
        finally:
            pool.close()

    def ingest_ceiling(self, n: int, *, clients: int = 16) -> float:
        """Events/s one `enrich ingest webhook` process takes in: MinIO-style POSTs of one event each (as
        MinIO sends them) from `clients` threads, each answered once its job is on a Redis queue."""
        token = uuid.uuid4().hex
        settings = self.settings.model_copy(
            update={
                "queue": f"ingest-{uuid.uuid4().hex[:8]}",
                "webhook_port": free_port(),
                "webhook_secret": SecretStr(token),
            }
        )
        process = subprocess.Popen(
            [sys.executable, "-m", "enrich.cli", "ingest", "webhook"],
            env=settings_env(settings),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        url = f"http://127.0.0.1:{settings.webhook_port}/events"
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        bodies = [
            json.dumps(minio_event(self.bucket, f"ingest/{i:07d}.jpg", uuid.uuid4().hex)).encode()
            for i in range(n + 64)
        ]
        http = urllib3.PoolManager(maxsize=clients)

        def post(body: bytes) -> None:
            response = http.request("POST", url, body=body, headers=headers)
            if response.status != 200:
                raise RuntimeError(f"webhook answered {response.status}: {response.data[:200]!r}")

        try:
            wait_for_port(settings.webhook_port, process)
            with ThreadPoolExecutor(clients) as threads:
                list(threads.map(post, bodies[:64]))  # warm-up: connections, the broker's
                started = time.perf_counter()
                list(threads.map(post, bodies[64:]))
            return n / (time.perf_counter() - started)
        finally:
            http.clear()
            stop_processes([process], grace_s=10)
            redis.Redis.from_url(settings.broker_url).delete(settings.queue)

    def start_worker(self, queue: str, processes: int, *args: str) -> WorkerProcess:
        settings = self.settings.model_copy(update={"queue": queue, "worker_processes": processes})
        worker = WorkerProcess(settings, *args, quiet=True)
        worker.wait_ready()
        return worker

    def end_to_end(self, blobs: list[bytes], *worker_args: str, processes: int = 1) -> EndToEndRun:
        """From the first publish to the last committed row; the worker is left running."""
        prefix, queue = f"e2e-{uuid.uuid4().hex[:6]}", f"bench-{uuid.uuid4().hex[:8]}"
        refs = self.upload(prefix, blobs)
        worker = self.start_worker(queue, processes, *worker_args)
        publisher = JobPublisher(self.settings.model_copy(update={"queue": queue}))
        cpu_before, busy_before, by_process = worker.cpu_seconds(), machine_busy_seconds(), cpu_by_process()
        started = time.perf_counter()
        publisher.publish(refs)
        while self.rows_under(prefix) < len(refs):
            if (code := worker.exited()) is not None:
                raise RuntimeError(f"worker exited with {code}")
            time.sleep(0.05)
        return EndToEndRun(
            rate=len(refs) / (time.perf_counter() - started),
            worker_cpu_ms=(worker.cpu_seconds() - cpu_before) * 1000 / len(refs),
            machine_cpu_ms=(machine_busy_seconds() - busy_before) * 1000 / len(refs),
            cpu_ms_by_group={
                group: seconds * 1000 / len(refs) for group, seconds in cpu_by_group_since(by_process).items()
            },
            worker=worker,
        )

    def latency(self, worker: WorkerProcess, blobs: list[bytes], *, rate: float) -> dict[str, float]:
        """Upload-to-row latency with uploads offered at `rate`/s (each followed by its event)."""
        prefix = f"lat-{uuid.uuid4().hex[:6]}"
        publisher = JobPublisher(self.settings.model_copy(update={"queue": worker.settings.queue}))
        uploaded: dict[str, float] = {}
        lock = threading.Lock()

        def upload_and_notify(index: int) -> None:
            key = f"{prefix}/{index:07d}.jpg"
            moment = time.time()
            body = unique_bytes(blobs[index], key)
            etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
            publisher.publish([ObjectRef(self.bucket, key, etag=etag)])
            with lock:
                uploaded[key] = moment

        started = time.perf_counter()
        with ThreadPoolExecutor(16) as pool:
            for index in range(len(blobs)):
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                pool.submit(upload_and_notify, index)
        while self.rows_under(prefix) < len(blobs):
            time.sleep(0.05)
        with self.engine.connect() as conn:
            query = select(Enrichment.key, Enrichment.created_at).where(
                Enrichment.bucket == self.bucket, Enrichment.key.startswith(prefix + "/")
            )
            written = {key: created for key, created in conn.execute(query)}
        latencies = sorted((written[key].timestamp() - moment) * 1000 for key, moment in uploaded.items())
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98], "offered_rate": rate}

    def close(self) -> None:
        self.engine.dispose()
        if self._stop_server is not None:
            self._stop_server()


def run_bench(
    settings: Settings,
    model: Model,
    blobs: list[bytes],
    *,
    label: str,
    s3_endpoint: str | None,
    end_to_end: bool,
    naive_images: int,
    latency_images: int,
    say: Callable[[str], None],
    worker_processes: int = 1,
    s3_server: str = "moto",
) -> BenchReport:
    device = str(getattr(model, "device", settings.device))
    report = BenchReport(
        label=label,
        images=len(blobs),
        device=device,
        batch_size=settings.batch_size,
        worker_processes=worker_processes,
    )
    decoder = build_decoder(settings, model, LocalStore(Path.cwd()))  # only decoding is measured here
    try:
        rate, tensors = decode_ceiling(decoder, blobs, threads=settings.fetch_threads)
    finally:
        decoder.close()
    report.rates["decode"] = rate
    processes = settings.effective_decode_processes
    how = f"{processes} processes" if processes else f"{settings.fetch_threads} threads"
    say(f"(b) decode ceiling: {rate:,.1f} images/s ({how})")
    report.rates["model"] = model_ceiling(model, tensors, batch_size=settings.batch_size)
    say(f"(a) model ceiling: {report.rates['model']:,.1f} images/s")
    del tensors
    if not end_to_end:
        return report
    stack = Stack(settings, s3_endpoint, s3_server=s3_server)
    report.s3_server = stack.s3_server
    try:
        report.rates["fetch"] = stack.fetch_ceiling(blobs, model)
        say(
            f"(s) fetch ceiling: {report.rates['fetch']:,.1f} images/s "
            f"(one worker process's {settings.fetch_threads} fetching processes, S3 {stack.s3_server})"
        )
        report.rates["ingest"] = stack.ingest_ceiling(len(blobs))
        say(
            f"(i) ingest ceiling: {report.rates['ingest']:,.1f} events/s "
            "(one `enrich ingest webhook` process, MinIO-style POSTs)"
        )
        run = stack.end_to_end(blobs, processes=worker_processes)
        worker = run.worker
        report.rates["end_to_end"] = run.rate
        report.worker_cpu_ms, report.machine_cpu_ms = run.worker_cpu_ms, run.machine_cpu_ms
        report.cpu_ms_by_group = run.cpu_ms_by_group
        say(
            f"(c) end to end: {run.rate:,.1f} images/s; CPU per image: worker processes "
            f"{run.worker_cpu_ms:.2f} ms, whole machine {run.machine_cpu_ms:.2f} ms"
        )
        try:
            offered = max(run.rate / 2, 1.0)
            report.latency_ms = stack.latency(worker, blobs[:latency_images], rate=offered)
            say(
                f"(d) latency at {offered:,.1f} images/s: "
                + ", ".join(f"{k} {v:,.0f} ms" for k, v in report.latency_ms.items() if k != "offered_rate")
            )
            report.memory["worker peak RSS"] = worker.peak_rss_mib()
            gpu = worker.metric("enrich_device_memory_peak_bytes")
            if gpu == gpu and gpu > 0:  # NaN-safe
                report.memory["worker peak GPU memory"] = gpu / 2**20
        finally:
            worker.stop()
        if naive_images:
            naive = stack.end_to_end(blobs[:naive_images], "--batch-size", "1", "--concurrency", "1")
            naive.worker.stop()
            report.rates["naive"] = naive.rate
            say(f"naive baseline (one image per task and per forward pass): {naive.rate:,.1f} images/s")
    finally:
        stack.close()
    return report


def markdown_section(reports: list[BenchReport], command: str) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [f"## {when}: {machine_description()}", "", f"Command: `{command}`", ""]
    for report in reports:
        lines += [*report.lines(), ""]
    return "\n".join(lines) + "\n"
