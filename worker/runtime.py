"""Wires one worker process: model, store, database, pipeline and batcher (the composition root)."""

from __future__ import annotations

from dataclasses import dataclass

from schema.db import make_engine, make_session_factory
from schema.settings import Settings
from worker.batcher import MicroBatcher
from worker.image_pool import ImagePool
from worker.metrics import WorkerMetrics
from worker.pipeline import Model, Pipeline
from worker.storage import ObjectStore, S3Store


def load_model(settings: Settings) -> Model:
    from worker.model.bundle import load_bundle  # torch-heavy; imported only where a model is needed

    return load_bundle(settings.model_bundle, device=settings.device, precision=settings.precision)


def use_model_threads(settings: Settings) -> None:
    """Size the process's torch thread pool. Called by the worker and `enrich run` entry points only: a
    library caller (a test, a notebook) keeps its own choice."""
    import torch

    torch.set_num_threads(settings.effective_model_threads)


# The worker's statements are one batch's lookup or upsert (milliseconds); one still running after this
# long is stuck behind a lock or a sick server, and its batch is better retried.
WORKER_STATEMENT_TIMEOUT_S = 60.0


def build_pipeline(
    settings: Settings, *, model: Model, store: ObjectStore, metrics: WorkerMetrics | None = None
) -> Pipeline:
    engine = make_engine(settings.database_url, statement_timeout_s=WORKER_STATEMENT_TIMEOUT_S)
    decoder = build_decoder(settings, model, store)
    decoder.start()  # here, not in build_decoder: the bench's decode-only ceiling needs no fetchers
    return Pipeline(
        model=model,
        session_factory=make_session_factory(engine),
        decoder=decoder,
        max_object_bytes=settings.max_object_bytes,
        max_fetched_bytes=settings.max_fetched_bytes,
        fetch_threads=settings.fetch_threads,
        metrics=metrics,
    )


def build_decoder(settings: Settings, model: Model, store: ObjectStore) -> ImagePool:
    return ImagePool(
        store=store,
        preprocessing=model.preprocessing,
        max_pixels=settings.max_image_pixels,
        processes=settings.effective_decode_processes,
        fetch_processes=settings.fetch_threads,
        timeout_s=settings.decode_timeout_s,
        memory_mb=settings.decode_memory_mb,
        fetch_timeout_s=settings.fetch_timeout_s,
        defer_upscale=model.upscales_on_device,
    )


@dataclass
class WorkerRuntime:
    pipeline: Pipeline
    batcher: MicroBatcher
    metrics: WorkerMetrics

    @classmethod
    def build(cls, settings: Settings, *, model: Model | None = None) -> WorkerRuntime:
        metrics = WorkerMetrics()
        pipeline = build_pipeline(
            settings,
            model=model or load_model(settings),
            store=S3Store.from_settings(settings),
            metrics=metrics,
        )
        batcher = MicroBatcher(
            pipeline, batch_size=settings.batch_size, max_wait_s=settings.max_wait_ms / 1000
        )
        return cls(pipeline=pipeline, batcher=batcher, metrics=metrics)

    def close(self) -> None:
        self.batcher.close()
        self.pipeline.close()
