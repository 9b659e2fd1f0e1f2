"""Wires one worker process: model, store, database, pipeline and batcher (the composition root)."""

from __future__ import annotations

import io
import logging
import time
from dataclasses import dataclass

import torch
from PIL import Image

from schema.db import make_engine, make_session_factory
from schema.settings import Settings
from worker.batcher import MicroBatcher
from worker.decode import decode_to_input
from worker.image_pool import ImagePool
from worker.metrics import WorkerMetrics
from worker.pipeline import Model, Pipeline
from worker.storage import ObjectStore, S3Store

log = logging.getLogger(__name__)


def load_model(settings: Settings) -> Model:
    from worker.model.bundle import load_bundle  # torch-heavy; imported only where a model is needed

    return load_bundle(settings.model_bundle, device=settings.device, precision=settings.precision)


def use_model_threads(settings: Settings, *, alone: bool = False) -> None:
    """Size the process's torch thread pool: ENRICH_MODEL_THREADS, else half the usable cores for a worker
    (the rest fetch, decode and run the stack beside it), or all of them for a process `alone` with its
    decoding pool (`enrich run`: 512 catalogue photos in 37-38 s instead of 48 on a 2-core AVX2 EPYC,
    docs/benchmarks.md). Called by the worker and `enrich run` entry points only: a library caller (a
    test, a notebook) keeps its own choice."""
    unset = settings.model_threads <= 0
    torch.set_num_threads(settings.usable_cpus if alone and unset else settings.effective_model_threads)


def warm_up(model: Model, batch_size: int) -> float:
    """Run one full batch of a blank catalogue photo through the serving path (decode, collate, forward
    pass, caption loop) before the worker takes jobs; returns its seconds. The first pass of a process pays
    one-time costs (the device's kernels and libraries load on first use, the allocator grows, the upscale's
    weights are built): without this, the first images after a scale-up wait for them."""
    photo = io.BytesIO()
    Image.new("RGB", (60, 80), (200, 200, 200)).save(photo, "JPEG")
    decoded = decode_to_input(
        photo.getvalue(),
        pre=model.preprocessing,
        max_pixels=60 * 80,
        defer_upscale=model.upscales_on_device,
    )
    pixels = torch.from_numpy(decoded.pixels)
    started = time.perf_counter()
    model.predict(model.collate([pixels] * batch_size))
    return time.perf_counter() - started


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
        model = model or load_model(settings)
        log.info(
            "model warm-up: %.2f s for a batch of %d",
            warm_up(model, settings.batch_size),
            settings.batch_size,
        )
        pipeline = build_pipeline(
            settings,
            model=model,
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
