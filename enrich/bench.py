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
import shutil
import statistics
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis
import torch
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
from worker.supervisor import child_settings

# The stages a worker cannot run faster than: its S3 GETs (fetch threads against the S3 server in use),
# decoding (its process pool) and the model (forward passes on pre-decoded batches).
CEILINGS = ("fetch", "decode", "model")
# A row wait gives up once no new row has arrived for this long: a worker that stopped writing (a stuck
# batch, a retry loop) ends the phase with what it measured, instead of hanging the device call.
ROW_WAIT_STALL_S = 120.0
# The latency phase's uploads must keep up with the offered rate, or its percentiles describe a lighter load.
ACHIEVED_SHARE = 0.95


def unique_bytes(blob: bytes, key: str) -> bytes:
    """The image with the key after its end (decoders ignore trailing bytes): the worker enriches identical
    bytes once, and the runs of one bench upload the same photos again (and cycle them when asked for more
    images than there are), so without this a later run would measure reused rows, not work."""
    return blob + b"\x00enrich-bench:" + key.encode()


def cycled(blobs: list[bytes], n: int) -> list[bytes]:
    return [blobs[i % len(blobs)] for i in range(n)]


def statuses_text(statuses: dict[str, int]) -> str:
    return ", ".join(f"{status} {count}" for status, count in sorted(statuses.items())) or "no rows"


class RowsMissing(RuntimeError):
    """A phase's rows did not all arrive: its worker exited, or none came for ROW_WAIT_STALL_S. Carries what
    had arrived, so the report keeps a (partial, invalid) figure instead of losing the set."""

    def __init__(self, reason: str, *, done: int, expected: int, elapsed_s: float, statuses: dict[str, int]):
        super().__init__(
            f"{reason}: {done} of {expected} rows after {elapsed_s:.0f} s ({statuses_text(statuses)})"
        )
        self.done, self.expected, self.elapsed_s, self.statuses = done, expected, elapsed_s, statuses

    @property
    def rate(self) -> float:
        return self.done / self.elapsed_s if self.elapsed_s > 0 else 0.0


class GpuMemorySampler:
    """Peak GPU memory by nvidia-smi (per process, so it sees what torch reserves and the CUDA context,
    which the worker's own max_memory_allocated does not) while a phase runs; nothing without nvidia-smi."""

    def __init__(self, pids: list[int], *, every_s: float = 0.5) -> None:
        self.pids, self.every_s = set(pids), every_s
        self.peak_workers_mib = self.peak_all_mib = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if shutil.which("nvidia-smi"):
            self._thread = threading.Thread(target=self._run, name="gpu-memory", daemon=True)

    def __enter__(self) -> GpuMemorySampler:
        if self._thread is not None:
            self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _sample(self) -> None:
        query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
        try:
            text = subprocess.run(query, capture_output=True, text=True, timeout=10, check=True).stdout
        except (OSError, subprocess.SubprocessError):
            return
        used = {}
        for line in text.splitlines():
            pid, _, mib = line.partition(",")
            if pid.strip().isdigit() and mib.strip().isdigit():
                used[int(pid)] = float(mib)
        # In a container nvidia-smi may show the host's pids, matching none of ours: the total still counts.
        self.peak_workers_mib = max(self.peak_workers_mib, sum(v for p, v in used.items() if p in self.pids))
        self.peak_all_mib = max(self.peak_all_mib, sum(used.values()))

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.every_s)

    @property
    def available(self) -> bool:
        return self._thread is not None


@dataclass
class BenchReport:
    label: str
    images: int
    device: str
    batch_size: int
    worker_processes: int = 1
    model_threads: int = 1  # torch threads of each worker process
    s3_server: str = "moto"
    rates: dict[str, float] = field(default_factory=dict)  # images/s per stage
    latency_ms: dict[str, float] = field(default_factory=dict)
    offered_rate: dict[str, float] = field(default_factory=dict)  # (d)'s target and achieved images/s
    memory: dict[str, float] = field(default_factory=dict)  # MiB
    worker_cpu_ms: float | None = None  # the worker processes' own CPU per image during (c)
    machine_cpu_ms: float | None = None  # every process's CPU per image during (c)
    cpu_ms_by_group: dict[str, float] = field(default_factory=dict)  # the same, by kind of process
    statuses: dict[str, dict[str, int]] = field(default_factory=dict)  # phase -> row status -> rows
    mean_batch: dict[str, float] = field(default_factory=dict)  # phase -> images per forward pass
    warmup_s: dict[str, float] = field(default_factory=dict)  # phase -> its worker's untimed warm-up round
    # (a)'s untimed first batch (one-time costs, when the bench's model is fresh) and its later ones
    model_batch_ms: dict[str, float] = field(default_factory=dict)
    invalid: dict[str, str] = field(default_factory=dict)  # figure -> why it does not measure what it says

    @property
    def cores(self) -> int:
        return usable_cores()

    @property
    def limits(self) -> dict[str, float]:
        """What (c) cannot exceed: each stage's ceiling, and the machine's cores at (c)'s CPU per image
        (every process on the machine shares them: S3 server, Redis, Postgres, worker, decoding). The fetch
        ceiling is one worker process's; (c) runs `worker_processes` of them, so it counts that many times
        (an upper bound: it assumes the S3 server scales). Model and decode are not scaled: the processes
        share one device and one machine's cores."""
        limits = {name: self.rates[name] for name in CEILINGS if name in self.rates}
        if "fetch" in limits and self.worker_processes > 1:
            limits[f"fetch x {self.worker_processes}"] = limits.pop("fetch") * self.worker_processes
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

    @property
    def valid(self) -> bool:
        return not self.invalid

    def _rate_name(self, name: str) -> str:
        labels = {
            "fetch": "fetch (one worker process's fetching processes)",
            "decode": "decode (one process's decoding pool)",
            "model": "model (one process, pre-decoded batches)",
            "ingest": "ingest (one webhook process)",
        }
        return labels.get(name, name)

    def lines(self) -> list[str]:
        head = f"{self.label}: {self.images} images, {self.device}, batch {self.batch_size}"
        if {"fetch", "end_to_end"} & set(self.rates):  # a ceilings-only run starts no S3 server
            head += f", S3 {self.s3_server}"
        if self.worker_processes > 1:
            head += f", {self.worker_processes} worker processes"
        rows = [f"| {head} | |", "|---|---|"]
        rows += [f"| **INVALID: {name}** | **{why}** |" for name, why in self.invalid.items()]
        for name, rate in self.rates.items():
            mark = " **INVALID**" if name in self.invalid else ""
            unit = "events/s" if name == "ingest" else "images/s"
            rows.append(f"| {self._rate_name(name)} | {rate:,.1f} {unit}{mark} |")
        if self.efficiency is not None:
            rows.append(f"| end_to_end / min(model, decode) | {self.efficiency:.0%} |")
            limit = self.limits[self.bound]
            share = self.rates["end_to_end"] / limit
            rows.append(
                f"| tightest limit | {self.bound}: {limit:,.0f} images/s (end_to_end reaches {share:.0%}) |"
            )
        if self.worker_cpu_ms is not None:
            n, k = self.worker_processes, self.model_threads
            cap = f"{n} process{'es' if n > 1 else ''} at {k} core{'s' if k > 1 else ''} each: "
            cap += f"<= {n * k * 1000 / self.worker_cpu_ms:,.0f}"
            rows.append(f"| worker processes' CPU per image | {self.worker_cpu_ms:.2f} ms ({cap} images/s) |")
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
            mark = " **INVALID**" if {"naive", "end_to_end"} & set(self.invalid) else ""
            rows.append(f"| speed-up over naive | {speedup:.1f}x{mark} |")
        rows += [f"| rows by status: {phase} | {statuses_text(s)} |" for phase, s in self.statuses.items()]
        rows += [
            f"| mean batch: {phase} | {size:.1f} images per forward pass |"
            for phase, size in self.mean_batch.items()
        ]
        rows += [f"| untimed warm-up: {phase} | {s:.1f} s |" for phase, s in self.warmup_s.items()]
        if self.model_batch_ms:
            first, later = self.model_batch_ms["first"], self.model_batch_ms["later"]
            rows.append(f"| model: first batch / later batches | {first:,.0f} ms / {later:,.0f} ms each |")
        if self.offered_rate:
            target, achieved = self.offered_rate["target"], self.offered_rate["achieved"]
            rows.append(
                f"| offered load for latency | {achieved:,.1f} images/s achieved (target {target:,.1f}) |"
            )
        mark = " **INVALID**" if "latency" in self.invalid else ""
        rows += [f"| upload-to-row latency {k} | {v:,.0f} ms{mark} |" for k, v in self.latency_ms.items()]
        rows += [f"| {name} | {value:,.0f} MiB |" for name, value in self.memory.items()]
        return rows

    def to_json(self) -> dict[str, object]:
        return asdict(self) | {
            "limits": self.limits,
            "bound": self.bound,
            "efficiency": self.efficiency,
            "valid": self.valid,
            "cores": self.cores,
        }


@dataclass
class EndToEndRun:
    rate: float  # images/s
    # CPU milliseconds per image meanwhile: the worker processes' own (the Python of messaging, batching and
    # writing, and the model on a CPU; not their fetching and decoding processes), and every process's.
    worker_cpu_ms: float
    machine_cpu_ms: float
    cpu_ms_by_group: dict[str, float]
    worker: WorkerProcess
    statuses: dict[str, int] = field(default_factory=dict)
    mean_batch: float | None = None  # images per forward pass in the timed window
    warmup_s: float = 0.0
    gpu_memory: GpuMemorySampler | None = None


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

    def status_counts(self, prefix: str) -> dict[str, int]:
        """Rows under the prefix by status: a failed row is a row, but not throughput."""
        with self.engine.connect() as conn:
            query = (
                select(Enrichment.status, func.count())
                .where(Enrichment.bucket == self.bucket, Enrichment.key.startswith(prefix + "/"))
                .group_by(Enrichment.status)
            )
            return {status: int(count) for status, count in conn.execute(query)}

    def wait_rows(
        self,
        prefix: str,
        expected: int,
        worker: WorkerProcess,
        *,
        phase: str,
        stall_s: float = ROW_WAIT_STALL_S,
    ) -> dict[str, int]:
        """Until `expected` rows (of any status) are under the prefix; their statuses. RowsMissing if the
        worker exits or no new row arrives for `stall_s`."""
        started = last_change = time.perf_counter()
        done = 0
        while True:
            statuses = self.status_counts(prefix)
            now = time.perf_counter()
            if (total := sum(statuses.values())) >= expected:
                return statuses
            if total > done:
                done, last_change = total, now
            reason = None
            if (code := worker.exited()) is not None:
                reason = f"{phase}: worker exited with {code}"
            elif now - last_change > stall_s:
                reason = f"{phase}: no new row for {stall_s:.0f} s"
            if reason is not None:
                raise RowsMissing(
                    reason, done=total, expected=expected, elapsed_s=now - started, statuses=statuses
                )
            time.sleep(0.05)

    def mean_batch_since(self, worker: WorkerProcess, before: tuple[float, float]) -> float | None:
        """Images per forward pass since `before` (the worker's batch-size histogram's sum and count)."""
        total, passes = batch_totals(worker)
        if not passes - before[1] > 0:  # NaN-safe: a worker whose metrics did not answer
            return None
        return (total - before[0]) / (passes - before[1])

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

    def warm_up(self, worker: WorkerProcess, refs: list[ObjectRef], prefix: str) -> float:
        """An untimed round through a fresh worker, so that the timed one measures a warm stack and not each
        process's cold start (the first CUDA passes, cuDNN plans, allocator growth, S3 and database
        connections); seconds it took."""
        started = time.perf_counter()
        JobPublisher(worker.settings).publish(refs)
        self.wait_rows(prefix, len(refs), worker, phase="warm-up")
        return time.perf_counter() - started

    def end_to_end(
        self, blobs: list[bytes], *worker_args: str, processes: int = 1, batch_size: int | None = None
    ) -> EndToEndRun:
        """From the first publish to the last committed row, after an untimed warm-up round of about two
        batches per worker process (`batch_size`: the worker's, when its arguments change it); the worker is
        left running. RowsMissing (the worker stopped) if the rows do not all arrive."""
        prefix, queue = f"e2e-{uuid.uuid4().hex[:6]}", f"bench-{uuid.uuid4().hex[:8]}"
        warm_prefix = f"warm-{uuid.uuid4().hex[:6]}"
        batch = batch_size or self.settings.batch_size
        refs = self.upload(prefix, blobs)
        warm_refs = self.upload(warm_prefix, cycled(blobs, max(8, 2 * batch * processes)))
        worker = self.start_worker(queue, processes, *worker_args)
        try:
            warmup_s = self.warm_up(worker, warm_refs, warm_prefix)
            publisher = JobPublisher(worker.settings)
            cpu_before, busy_before = worker.cpu_seconds(), machine_busy_seconds()
            by_process = cpu_by_process()
            batches_before = batch_totals(worker)
            with GpuMemorySampler(worker.worker_pids()) as gpu:
                started = time.perf_counter()
                publisher.publish(refs)
                statuses = self.wait_rows(prefix, len(refs), worker, phase="timed round")
                seconds = time.perf_counter() - started
        except BaseException:
            worker.stop()
            raise
        return EndToEndRun(
            rate=len(refs) / seconds,
            worker_cpu_ms=(worker.cpu_seconds() - cpu_before) * 1000 / len(refs),
            machine_cpu_ms=(machine_busy_seconds() - busy_before) * 1000 / len(refs),
            cpu_ms_by_group={
                group: seconds * 1000 / len(refs) for group, seconds in cpu_by_group_since(by_process).items()
            },
            worker=worker,
            statuses=statuses,
            mean_batch=self.mean_batch_since(worker, batches_before),
            warmup_s=warmup_s,
            gpu_memory=gpu if gpu.available else None,
        )

    def latency(
        self, worker: WorkerProcess, blobs: list[bytes], *, rate: float
    ) -> tuple[dict[str, float], float, dict[str, int]]:
        """Upload-to-row latency with uploads offered at `rate`/s (each followed by its event): percentiles,
        the rate the uploads achieved, and the rows' statuses. Each image's latency starts at its scheduled
        moment, not when a thread got round to it, so uploads queued behind slow ones count their wait."""
        prefix = f"lat-{uuid.uuid4().hex[:6]}"
        publisher = JobPublisher(worker.settings)
        published: list[float] = []
        lock = threading.Lock()

        def upload_and_notify(index: int) -> None:
            key = f"{prefix}/{index:07d}.jpg"
            body = unique_bytes(blobs[index], key)
            etag = self.client.put_object(Bucket=self.bucket, Key=key, Body=body)["ETag"].strip('"')
            publisher.publish([ObjectRef(self.bucket, key, etag=etag)])
            with lock:
                published.append(time.perf_counter())

        started, wall_started = time.perf_counter(), time.time()
        with ThreadPoolExecutor(16) as pool:
            futures = []
            for index in range(len(blobs)):
                delay = started + index / rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                futures.append(pool.submit(upload_and_notify, index))
            for future in futures:
                future.result()  # a failed upload raises here, not as a row wait that stalls
        # n events offered at `rate` span (n - 1) / rate from the first to the last.
        span = max(published) - min(published)
        achieved = (len(published) - 1) / span if len(published) > 1 and span > 0 else rate
        statuses = self.wait_rows(prefix, len(blobs), worker, phase="latency")
        with self.engine.connect() as conn:
            query = select(Enrichment.key, Enrichment.created_at).where(
                Enrichment.bucket == self.bucket, Enrichment.key.startswith(prefix + "/")
            )
            written = {key: created for key, created in conn.execute(query)}
        latencies = sorted(
            (created.timestamp() - (wall_started + int(key.rsplit("/", 1)[1].removesuffix(".jpg")) / rate))
            * 1000
            for key, created in written.items()
        )
        cuts = statistics.quantiles(latencies, n=100, method="inclusive")
        return {"p50": cuts[49], "p95": cuts[94], "p99": cuts[98]}, achieved, statuses

    def close(self) -> None:
        self.engine.dispose()
        if self._stop_server is not None:
            self._stop_server()


def batch_totals(worker: WorkerProcess) -> tuple[float, float]:
    """The worker's batch-size histogram so far: images forwarded and forward passes (NaN until it serves)."""
    return worker.metric("enrich_batch_size_sum"), worker.metric("enrich_batch_size_count")


def _invalidate(report: BenchReport, figure: str, why: str, say: Callable[[str], None]) -> None:
    report.invalid[figure] = why
    say(f"!!! INVALID {figure}: {why} !!!")


def _check_rows(
    report: BenchReport, phase: str, statuses: dict[str, int], say: Callable[[str], None]
) -> None:
    """Record a phase's rows by status; its figure counts only if every row is ok (a failed row is quick)."""
    report.statuses[phase] = statuses
    say(f"    rows by status ({phase}): {statuses_text(statuses)}")
    failed = sum(count for status, count in statuses.items() if status != "ok")
    if failed:
        _invalidate(report, phase, f"{failed} of {sum(statuses.values())} rows not ok", say)


def _missing(report: BenchReport, figure: str, missing: RowsMissing, say: Callable[[str], None]) -> None:
    """A phase that stopped short: its rate so far, marked invalid, so the set's other figures survive."""
    report.statuses[figure] = missing.statuses
    if figure in ("end_to_end", "naive"):
        report.rates[figure] = missing.rate
    _invalidate(report, figure, str(missing), say)


def _record_end_to_end(report: BenchReport, run: EndToEndRun, say: Callable[[str], None]) -> None:
    report.rates["end_to_end"] = run.rate
    report.worker_cpu_ms, report.machine_cpu_ms = run.worker_cpu_ms, run.machine_cpu_ms
    report.cpu_ms_by_group = run.cpu_ms_by_group
    report.warmup_s["end_to_end"] = run.warmup_s
    if run.mean_batch is not None:
        report.mean_batch["end_to_end"] = run.mean_batch
    batch = f", mean batch {run.mean_batch:.1f}" if run.mean_batch is not None else ""
    say(
        f"(c) end to end: {run.rate:,.1f} images/s (after a {run.warmup_s:.1f} s untimed warm-up{batch}); "
        f"CPU per image: worker processes {run.worker_cpu_ms:.2f} ms, "
        f"whole machine {run.machine_cpu_ms:.2f} ms"
    )
    _check_rows(report, "end_to_end", run.statuses, say)
    if run.gpu_memory is not None:
        if run.gpu_memory.peak_workers_mib:
            report.memory["worker processes' peak GPU memory in (c) (nvidia-smi)"] = (
                run.gpu_memory.peak_workers_mib
            )
        report.memory["every process's peak GPU memory in (c) (nvidia-smi)"] = run.gpu_memory.peak_all_mib


def _latency(
    report: BenchReport,
    stack: Stack,
    run: EndToEndRun,
    blobs: list[bytes],
    say: Callable[[str], None],
    rate: float | None,
) -> None:
    target = rate or max(run.rate / 2, 1.0)
    try:
        report.latency_ms, achieved, statuses = stack.latency(run.worker, blobs, rate=target)
    except RowsMissing as missing:
        _missing(report, "latency", missing, say)
        return
    report.offered_rate = {"target": target, "achieved": achieved}
    say(
        f"(d) latency at {achieved:,.1f} images/s (target {target:,.1f}): "
        + ", ".join(f"{k} {v:,.0f} ms" for k, v in report.latency_ms.items())
    )
    _check_rows(report, "latency", statuses, say)
    if achieved < ACHIEVED_SHARE * target:
        why = f"uploads reached {achieved:,.1f} images/s, "
        why += f"under {ACHIEVED_SHARE:.0%} of the {target:,.1f} target"
        _invalidate(report, "latency", why, say)


def _naive(report: BenchReport, stack: Stack, blobs: list[bytes], say: Callable[[str], None]) -> None:
    try:
        naive = stack.end_to_end(blobs, "--batch-size", "1", "--concurrency", "1", batch_size=1)
    except RowsMissing as missing:
        _missing(report, "naive", missing, say)
        return
    naive.worker.stop()
    report.rates["naive"] = naive.rate
    report.warmup_s["naive"] = naive.warmup_s
    say(f"naive baseline (one image per task and per forward pass): {naive.rate:,.1f} images/s")
    _check_rows(report, "naive", naive.statuses, say)


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
    latency_rate: float | None = None,
) -> BenchReport:
    """`latency_rate`: the load (d) offers, images/s; by default half of what (c) reached."""
    device = str(getattr(model, "device", settings.device))
    report = BenchReport(
        label=label,
        images=len(blobs),
        device=device,
        batch_size=settings.batch_size,
        worker_processes=worker_processes,
        model_threads=child_settings(
            settings.model_copy(update={"worker_processes": worker_processes})
        ).effective_model_threads,
    )
    decoder = build_decoder(settings, model, LocalStore(Path.cwd()))  # only decoding is measured here
    try:
        rate, tensors = decode_ceiling(decoder, blobs, threads=settings.fetch_threads)
    finally:
        decoder.close()
    report.rates["decode"] = rate
    processes = settings.effective_decode_processes
    how = f"{processes} processes" if processes else f"{settings.fetch_threads} threads"
    say(f"(b) decode ceiling: {rate:,.1f} images/s (one process's decoding pool: {how})")
    ceiling = model_ceiling(model, tensors, batch_size=settings.batch_size)
    report.rates["model"] = ceiling.rate
    report.model_batch_ms = {"first": ceiling.first_batch_s * 1000, "later": ceiling.batch_s * 1000}
    say(
        f"(a) model ceiling: {ceiling.rate:,.1f} images/s (one process, pre-decoded batches; first batch "
        f"{ceiling.first_batch_s * 1000:,.0f} ms, later ones {ceiling.batch_s * 1000:,.0f} ms)"
    )
    del tensors
    if device.startswith("cuda") and torch.cuda.is_available():
        # What the allocator kept for the model ceiling's batches (it reserves more than it allocates).
        report.memory["bench process's peak GPU memory reserved (a)"] = (
            torch.cuda.max_memory_reserved() / 2**20
        )
    if not end_to_end:
        return report
    stack = Stack(settings, s3_endpoint, s3_server=s3_server)
    report.s3_server = stack.s3_server
    try:
        report.rates["fetch"] = stack.fetch_ceiling(blobs, model)
        say(
            f"(s) fetch ceiling: {report.rates['fetch']:,.1f} images/s "
            f"(one worker process's {settings.fetch_threads} fetching processes, S3 {stack.s3_server}; "
            f"(c) runs {worker_processes} such)"
        )
        report.rates["ingest"] = stack.ingest_ceiling(len(blobs))
        say(
            f"(i) ingest ceiling: {report.rates['ingest']:,.1f} events/s "
            "(one `enrich ingest webhook` process, MinIO-style POSTs)"
        )
        try:
            run = stack.end_to_end(blobs, processes=worker_processes)
        except RowsMissing as missing:
            # The stack stopped writing: (d) and the naive baseline would wait as long again.
            _missing(report, "end_to_end", missing, say)
            return report
        _record_end_to_end(report, run, say)
        try:
            _latency(report, stack, run, blobs[:latency_images], say, latency_rate)
            report.memory["worker peak RSS"] = run.worker.peak_rss_mib()
            gpu = run.worker.metric("enrich_device_memory_peak_bytes")
            if gpu == gpu and gpu > 0:  # NaN-safe
                report.memory["worker peak GPU memory allocated"] = gpu / 2**20
        finally:
            run.worker.stop()
        if naive_images:
            _naive(report, stack, blobs[:naive_images], say)
    finally:
        stack.close()
    return report


def markdown_section(reports: list[BenchReport], command: str, *, header: bool = True) -> str:
    """The reports' tables, under a heading naming the machine and command (`header`: the first of a run's
    sections; later sets of the same run append only their tables)."""
    lines: list[str] = []
    if header:
        when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
        lines += [f"## {when}: {machine_description()}", "", f"Command: `{command}`", ""]
    for report in reports:
        lines += [*report.lines(), ""]
    return "\n".join(lines) + "\n"
