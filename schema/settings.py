"""One settings object for the whole service, read from ``ENRICH_*`` environment variables."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_BUNDLE = REPO_ROOT / "models" / "default"
DEFAULT_QUEUE = "enrich"
ENRICH_TASK_NAME = "enrich.object"
# Settings below 1 that would not fail at start but quietly misbehave later, and why each needs one.
AT_LEAST_ONE: dict[str, str] = {
    "batch_size": "a forward pass needs an image",
    "visibility_timeout_s": "Redis would hand every message in progress to another worker at once",
    "max_attempts": "a job needs at least one attempt to end as a row",
    "worker_processes": "1 runs the worker in the `enrich worker` process itself, N > 1 supervises N",
    "stall_limit_s": "a worker's liveness probe would fail whenever it holds work, and it would be restarted"
    " for ever",
}


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may use: its affinity, capped by the cgroup's CPU quota. A container's CPU limit
    is a quota, invisible to the affinity mask, which lists every core of the node: sizing pools by the mask
    alone would start 64 decoding processes in a pod allowed 4 CPUs."""
    cores = len(os.sched_getaffinity(0))
    try:
        if (cgroup_root / "cpu.max").exists():  # cgroup v2: "<quota> <period>" or "max <period>"
            quota, period = (cgroup_root / "cpu.max").read_text().split()[:2]
        else:  # cgroup v1: quota -1 when unlimited
            quota = (cgroup_root / "cpu" / "cpu.cfs_quota_us").read_text().strip()
            period = (cgroup_root / "cpu" / "cpu.cfs_period_us").read_text().strip()
        if quota not in ("max", "-1"):
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no readable quota: the affinity mask is all there is
    return cores


class Settings(BaseSettings):
    """Every knob of the service. Built once at the edge (CLI, worker start) and passed in."""

    model_config = SettingsConfigDict(env_prefix="ENRICH_", env_file=None, extra="ignore")

    # Storage of results: a local SQLite file by default so `enrich run` needs nothing running.
    database_url: str = "sqlite:///enrich.db"

    # Broker and queue (the Redis list KEDA watches has the same name as the queue).
    broker_url: str = "redis://127.0.0.1:6379/0"
    queue: str = DEFAULT_QUEUE
    # Seconds before Redis hands an unacknowledged message to another worker; above the worst batch.
    visibility_timeout_s: int = 600
    # Retries of a job that failed for a transient reason before it is dead-lettered.
    max_attempts: int = 5
    # The longest one Redis command may wait for its reply. Without it, a broker gone without closing the
    # connection (a failover, a dead node, a NAT dropping state) blocked a publish, or a worker's ack, for
    # as long as the kernel kept the socket: the batch thread, and so the worker, stopped.
    broker_socket_timeout_s: float = 10.0

    # S3 API (AWS, MinIO or moto). Credentials also fall back to the usual AWS_* variables.
    s3_endpoint_url: str | None = None
    s3_region: str = "us-east-1"
    s3_access_key_id: SecretStr | None = None
    s3_secret_access_key: SecretStr | None = None
    # Buckets the ingest accepts events for; empty means any. NoDecode: the environment may hold a JSON
    # list or a plain comma-separated one (see _bucket_list), not only the JSON pydantic-settings expects.
    allowed_buckets: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sqs_queue_url: str | None = None
    sqs_endpoint_url: str | None = None  # None: AWS's own endpoint for the region

    # Inference.
    model_bundle: Path = DEFAULT_BUNDLE
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    precision: str = "auto"  # auto (bf16 on CUDA and on CPUs with native bf16) | bf16 | fp32
    batch_size: int = 64
    max_wait_ms: int = 50
    # Tasks one worker process holds at once; enough to fill the next batch while one runs.
    worker_concurrency: int = 0  # 0: 2 x batch_size
    # Worker processes (Celery consumers) one `enrich worker` runs and supervises on the same device: one
    # process's Python (messaging, batching, the upsert) caps it at a few hundred images/s, below a GPU.
    worker_processes: int = 1
    fetch_threads: int = 8
    # The longest one object's fetch may take in its fetching process, the S3 client's own retries included:
    # its connect and read timeouts bound each socket call, not a server that trickles bytes. A slower
    # fetch is killed and retried as a transient failure. Not applied with ENRICH_DECODE_PROCESSES=0.
    fetch_timeout_s: float = 180.0
    # Threads of the model's CPU work in each worker process (0: half the usable cores, at least one). On a
    # CPU device the other half decode, fetch and run the stack; on 2 cores one model thread gave the same
    # or a higher end-to-end rate than two, at less CPU per image and about half the p95 latency.
    model_threads: int = 0
    # Prometheus metrics of a worker process on /metrics, and its liveness on /healthz (ingest serves both
    # on its own HTTP port).
    metrics_port: int = 9100
    # /healthz fails once a worker process has held work this long without finishing any: above the worst
    # batch (a fetch's 180 s limit, the database's 60 s statement limit, a GPU batch), below the visibility
    # timeout.
    stall_limit_s: float = 300.0

    # Limits on hostile input.
    max_object_bytes: int = 50 * 1024 * 1024
    # Bytes of fetched objects one worker process holds at once, waiting for or in decoding: fetching
    # waits beyond it, so a batch of large originals cannot exhaust the pod's memory (worker/budget.py).
    max_fetched_bytes: int = 1024 * 1024 * 1024
    max_image_pixels: int = 60_000_000
    # CPUs the worker may use, for sizing its decoding processes and model threads (0: usable_cores(), the
    # affinity mask capped by the container's CPU quota). In Kubernetes the manifests set it from the pod's
    # CPU request: a pod with no CPU limit has no quota, and its affinity mask lists every core of the node.
    cpus: int = 0
    # Decoding runs in this many worker processes (-1: one per usable CPU, see `cpus`), so that one
    # image can be held to a wall-clock and a memory limit (a thread cannot be stopped mid-decode, a process
    # can) and JPEG decoding uses every core. 0 decodes in the fetch threads, bounded by the pixel limit
    # alone.
    decode_processes: int = -1
    decode_timeout_s: float = 10.0
    decode_memory_mb: int = 1024  # address space a decoding process may add to its start-up footprint

    # Ingest webhook.
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 8080
    webhook_secret: SecretStr | None = None
    webhook_max_body_bytes: int = 1024 * 1024

    @field_validator("allowed_buckets", mode="before")
    @classmethod
    def _bucket_list(cls, value: Any) -> Any:
        """`uploads,photos` or `["uploads", "photos"]` (what settings_env writes); a list passes as is."""
        if not isinstance(value, str):
            return value
        text = value.strip()
        if text.startswith("["):
            try:
                return json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(
                    f"ENRICH_ALLOWED_BUCKETS={value!r} is not a JSON list ({error.msg}); "
                    "or give the buckets comma-separated: uploads,photos"
                ) from None
        return [name.strip() for name in text.split(",") if name.strip()]

    @field_validator(*AT_LEAST_ONE)
    @classmethod
    def _at_least_one(cls, value: float, info: ValidationInfo) -> float:
        name = info.field_name or ""
        if value < 1:
            raise ValueError(f"ENRICH_{name.upper()}={value:g} must be at least 1: {AT_LEAST_ONE[name]}")
        return value

    @field_validator("queue")
    @classmethod
    def _queue_named(cls, value: str) -> str:
        # An empty name would consume and publish on a queue no KEDA trigger nor other process watches.
        if not value.strip():
            raise ValueError(f"ENRICH_QUEUE must name the queue (default {DEFAULT_QUEUE!r}), got {value!r}")
        return value

    @model_validator(mode="after")
    def _decoders_can_receive_the_largest_object(self) -> Settings:
        # A decoding process receives the whole object before its task starts. One that runs out of address
        # space while receiving dies outside any task, and Pebble's pool does not recover from that (its
        # jobs fail as "pool broken", or the pool hangs): measured, a 600 MB object broke a 1024 MiB
        # decoder, 300 MB did not. So the limit must leave room for ~3 copies plus the ~190 MiB a process
        # starts with.
        needed_mb = math.ceil((3 * self.max_object_bytes) / 2**20) + 256
        if self.decode_processes != 0 and self.decode_memory_mb < needed_mb:
            raise ValueError(
                f"ENRICH_DECODE_MEMORY_MB={self.decode_memory_mb} is too small for ENRICH_MAX_OBJECT_BYTES="
                f"{self.max_object_bytes}: a decoding process receives the whole object; set it to at "
                f"least {needed_mb}"
            )
        return self

    @property
    def effective_concurrency(self) -> int:
        return self.worker_concurrency or 2 * self.batch_size

    @property
    def effective_model_threads(self) -> int:
        return self.model_threads if self.model_threads > 0 else max(1, self.usable_cpus // 2)

    @property
    def effective_decode_processes(self) -> int:
        if self.decode_processes >= 0:
            return self.decode_processes
        return self.usable_cpus

    @property
    def usable_cpus(self) -> int:
        return min(self.cpus, usable_cores()) if self.cpus > 0 else usable_cores()


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment in which a child process reads the same Settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICH_")}
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        # pydantic-settings reads list-valued variables as JSON.
        env[f"ENRICH_{name.upper()}"] = json.dumps(value) if isinstance(value, list) else str(value)
    return env
