"""`enrich run PATH`: the same pipeline in process, without a broker, over a folder or an s3:// prefix."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from ingest.backfill import list_objects
from schema.results import ObjectRef
from schema.s3 import parse_s3_url
from schema.settings import Settings
from worker.batcher import MicroBatcher
from worker.pipeline import Job, Model, Outcome
from worker.runtime import build_pipeline, load_model
from worker.storage import LocalStore, ObjectStore, S3Store


def plan(settings: Settings, source: str) -> tuple[ObjectStore, list[ObjectRef]]:
    if source.startswith("s3://"):
        bucket, prefix = parse_s3_url(source)
        return S3Store.from_settings(settings), list(list_objects(settings, bucket, prefix))
    root = Path(source)
    if not root.is_dir():
        raise FileNotFoundError(f"{source} is neither a folder nor an s3:// prefix")
    store = LocalStore(root)
    return store, list(store.list())


def run_local(
    settings: Settings,
    *,
    store: ObjectStore,
    refs: list[ObjectRef],
    model: Model | None = None,
    on_done: Callable[[Outcome], None] | None = None,
) -> list[Outcome]:
    """Enrich `refs` into settings.database_url; every ref ends as exactly one Outcome."""
    pipeline = build_pipeline(settings, model=model or load_model(settings), store=store)
    # The worker's batcher, so fetch/decode of one batch overlaps inference of the previous one.
    batcher = MicroBatcher(pipeline, batch_size=settings.batch_size, max_wait_s=settings.max_wait_ms / 1000)
    try:
        # No broker to retry through: transient failures are recorded as failures at once.
        futures = [batcher.submit(Job(ref=ref, final_attempt=True)) for ref in refs]
        outcomes = []
        for future in futures:
            outcome = future.result()
            outcomes.append(outcome)
            if on_done is not None:
                on_done(outcome)
        return outcomes
    finally:
        batcher.close()
        pipeline.close()
