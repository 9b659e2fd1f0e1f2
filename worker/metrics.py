"""Prometheus metrics of one worker process, on a registry of its own (no import-time globals).

Under `enrich worker --processes N` the supervisor sets PROMETHEUS_MULTIPROC_DIR for its children, so these
values land in files it aggregates and serves on one port; gauges say how they combine across processes."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from worker.liveness import STALLED


class WorkerMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.results = Counter(
            "enrich_results", "Jobs finished, by final status", ["status"], registry=self.registry
        )
        self.retries = Counter(
            "enrich_transient_failures",
            "Jobs handed back for retry, by stage",
            ["stage"],
            registry=self.registry,
        )
        self.skipped = Counter(
            "enrich_skipped_already_enriched",
            "Jobs whose image already had an ok row for this model version",
            registry=self.registry,
        )
        self.acks_lost = Counter(
            "enrich_acks_lost",
            "Jobs settled whose ack the broker connection lost: Redis hands them out again after the"
            " visibility timeout, and those second jobs skip",
            registry=self.registry,
        )
        self.retries_unsent = Counter(
            "enrich_retries_unsent",
            "Jobs to retry whose new message the broker could not take: the one in hand stays"
            " unacknowledged, and Redis hands it out again",
            registry=self.registry,
        )
        self.reused = Counter(
            "enrich_predictions_reused",
            "Images whose identical bytes already had a prediction of this model: no forward pass",
            registry=self.registry,
        )
        self.forward_passes = Counter("enrich_forward_passes", "Model forward passes", registry=self.registry)
        self.batch_size = Histogram(
            "enrich_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=self.registry,
        )
        self.device_memory_peak = Gauge(
            "enrich_device_memory_peak_bytes",
            "Peak GPU memory allocated by the worker processes (summed over the live ones)",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.ready = Gauge(
            "enrich_worker_processes_ready",
            "Worker processes that have loaded the model and consume the queue",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.fetched_bytes = Gauge(
            "enrich_fetched_bytes_held",
            "Bytes of fetched objects waiting for or in decoding (capped by ENRICH_MAX_FETCHED_BYTES)",
            multiprocess_mode="livesum",
            registry=self.registry,
        )
        self.stalled = Gauge(
            STALLED,
            "Seconds a worker process has held work without finishing any of it (0 when it holds none);"
            " the longest over the live processes",
            multiprocess_mode="livemax",
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "enrich_stage_seconds", "Wall time of a batch stage", ["stage"], registry=self.registry
        )
