"""The pipeline and micro-batcher in process, on real files, the real Postgres and a real (random) model."""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import math
import os
import threading
import tracemalloc
from collections import Counter
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session

from enrich.stack import process_table
from schema.results import ObjectRef
from schema.settings import Settings
from schema.tables import Enrichment
from tests.conftest import s3_client, sample_jpegs
from worker.batcher import MicroBatcher
from worker.device import ForkedCudaError, resolve_device
from worker.local_run import plan, run_local
from worker.pipeline import Job, Model, Pipeline
from worker.runtime import WorkerRuntime, build_pipeline, load_model
from worker.storage import LocalStore, S3Store


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    root = tmp_path / "drop"
    (root / "sub dir").mkdir(parents=True)
    for i, data in enumerate(sample_jpegs(6)):
        (root / f"img {i}.jpg").write_bytes(data)
    (root / "sub dir" / "café + tie.jpg").write_bytes(sample_jpegs(1)[0])
    (root / "truncated.jpg").write_bytes(sample_jpegs(1)[0][:300])
    (root / "not-an-image.png").write_bytes(b"MZ\x90\x00 this is an executable, not a PNG")
    (root / "empty.jpg").write_bytes(b"")
    rgba = io.BytesIO()
    Image.new("RGBA", (40, 30), (255, 0, 0, 128)).save(rgba, format="PNG")
    (root / "alpha.png").write_bytes(rgba.getvalue())
    (root / "notes.txt").write_text("not listed: no image suffix")
    return root


def rows_by_key(engine: Engine) -> dict[str, Enrichment]:
    with Session(engine) as session:
        return {row.key: row for row in session.scalars(select(Enrichment))}


def logged_batch_tally(caplog: pytest.LogCaptureFixture) -> Counter[str]:
    """The worker's per-batch log lines ("batch of 4: 3 ok, 1 failed_decode"), summed, then cleared."""
    tally: Counter[str] = Counter()
    for record in caplog.records:
        if record.name == "worker.pipeline" and record.getMessage().startswith("batch of "):
            for part in record.getMessage().split(": ", 1)[1].split(", "):
                n, what = part.split(" ", 1)
                tally[what] += int(n)
    caplog.clear()
    return tally


def test_local_folder_run_records_every_image_once_with_a_status(
    settings: Settings, pg_engine: Engine, folder: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="worker.pipeline")
    store, refs = plan(settings, str(folder))
    assert len(refs) == 11  # notes.txt is not an image
    outcomes = run_local(settings, store=store, refs=refs)
    assert len(outcomes) == len(refs)
    rows = rows_by_key(pg_engine)
    assert set(rows) == {ref.key for ref in refs}
    assert rows["truncated.jpg"].status == "failed_decode"
    assert rows["not-an-image.png"].status == "failed_decode"
    assert "not a recognised image" in (rows["not-an-image.png"].error or "")
    assert rows["empty.jpg"].status == "failed_decode" and "0 bytes" in (rows["empty.jpg"].error or "")
    ok = {key for key, row in rows.items() if row.status == "ok"}
    assert ok == {f"img {i}.jpg" for i in range(6)} | {"sub dir/café + tie.jpg", "alpha.png"}
    row = rows["sub dir/café + tie.jpg"]
    assert row.caption is not None and row.article_type_confidence is not None
    assert (row.width, row.height) == (60, 80)
    photo = (folder / "sub dir" / "café + tie.jpg").read_bytes()
    assert row.content_sha256 == hashlib.sha256(photo).hexdigest()  # hashed in the fetching process
    assert row.model_version == "0.0.1" and row.master_category is not None
    assert logged_batch_tally(caplog) == {"ok": 8, "failed_decode": 3}

    # A second run over the same folder enriches nothing twice.
    again = run_local(settings, store=store, refs=refs)
    assert {o.status for o in again if o.ref.key in ok} == {"skipped"}
    assert logged_batch_tally(caplog) == {"skipped": 8, "failed_decode": 3}
    assert len(rows_by_key(pg_engine)) == len(refs)


def test_local_store_refuses_keys_outside_its_root(
    settings: Settings, pg_engine: Engine, folder: Path
) -> None:
    store = LocalStore(folder)
    hostile = [
        ObjectRef(store.bucket, k) for k in ("../../../../etc/passwd", "/etc/passwd", "sub dir/../../x.jpg")
    ]
    outcomes = run_local(settings, store=store, refs=hostile)
    assert [o.status for o in outcomes] == ["failed_fetch"] * 3
    assert all("outside" in (o.result.error or "") for o in outcomes if o.result)


def test_n_images_take_ceil_n_over_batch_forward_passes_and_resolve_after_commit(
    settings: Settings, pg_engine: Engine, folder: Path
) -> None:
    store, refs = plan(settings, str(folder))
    good = [r for r in refs if r.key.startswith("img")]  # 6 images
    pipeline = build_pipeline(settings, model=load_model(settings), store=store)
    batcher = MicroBatcher(pipeline, batch_size=4, max_wait_s=5.0)
    committed_when_resolved: list[bool] = []
    lock = threading.Lock()

    def check(key: str, _resolved: object) -> None:
        with Session(pg_engine) as session:
            found = session.scalar(select(Enrichment.status).where(Enrichment.key == key))
        with lock:
            committed_when_resolved.append(found == "ok")

    try:
        futures = [batcher.submit(Job(ref=ref)) for ref in good]
        for ref, future in zip(good, futures, strict=True):
            future.add_done_callback(functools.partial(check, ref.key))
        assert [f.result(timeout=60).status for f in futures] == ["ok"] * 6
    finally:
        batcher.close()
        pipeline.close()
    assert pipeline.metrics.forward_passes._value.get() == math.ceil(6 / 4)
    assert committed_when_resolved == [True] * 6


class ExplodingModel:
    """Wraps a real model; fails any batch that contains alpha.png (translucent red on white, so
    (255, 127, 127) at the centre of its input), as a poison input would."""

    def __init__(self, model: Pipeline) -> None:
        self._model = model
        self.name, self.version = model.name, model.version  # type: ignore[attr-defined]
        self.preprocessing = model.preprocessing  # type: ignore[attr-defined]
        self.upscales_on_device, self.collate = model.upscales_on_device, model.collate  # type: ignore[attr-defined]

    def predict(self, batch):  # type: ignore[no-untyped-def]
        h, w = batch.shape[2] // 2, batch.shape[3] // 2
        centres = batch[:, :, h, w].int()
        poisoned = (centres[:, 0] == 255) & ((centres[:, 1:] - 127).abs() <= 2).all(dim=1)
        if bool(poisoned.any()):
            raise RuntimeError("CUDA error: an illegal memory access was encountered")
        return self._model.predict(batch)  # type: ignore[attr-defined]


class RecordingModel:
    """Wraps a real model; records the size of every batch it predicts."""

    def __init__(self, model: Model) -> None:
        self._model = model
        self.name, self.version, self.preprocessing = model.name, model.version, model.preprocessing
        self.upscales_on_device, self.collate = model.upscales_on_device, model.collate
        self.batches: list[int] = []

    def predict(self, batch):  # type: ignore[no-untyped-def]
        self.batches.append(len(batch))
        return self._model.predict(batch)


def test_a_worker_runs_one_full_batch_through_its_model_before_it_takes_jobs(settings: Settings) -> None:
    # The first pass of a process pays one-time costs (kernels load, the allocator grows): paid at start,
    # not by the first images after a scale-up. Not counted as serving, and nothing is written.
    model = RecordingModel(load_model(settings))
    runtime = WorkerRuntime.build(settings, model=model)
    try:
        assert model.batches == [settings.batch_size]
        assert runtime.metrics.forward_passes._value.get() == 0
    finally:
        runtime.close()


def test_a_poison_image_fails_alone_its_batch_mates_succeed(
    settings: Settings, pg_engine: Engine, folder: Path
) -> None:
    store, refs = plan(settings, str(folder))
    model = ExplodingModel(load_model(settings))  # type: ignore[arg-type]
    run_local(settings, store=store, refs=refs, model=model)
    rows = rows_by_key(pg_engine)
    assert rows["alpha.png"].status == "failed_infer"
    assert "illegal memory access" in (rows["alpha.png"].error or "")
    assert all(rows[f"img {i}.jpg"].status == "ok" for i in range(6))


def test_cuda_is_refused_in_a_forked_child() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            resolve_device("cuda")
            message = b"allowed"
        except ForkedCudaError:
            message = b"refused"
        os.write(write, message)
        os._exit(0)
    os.waitpid(pid, 0)
    assert os.read(read, 16) == b"refused"
    assert resolve_device("cpu") == "cpu"


def _refuse_to_unpickle() -> LocalStore:
    raise RuntimeError("this store cannot be rebuilt in a fetching process")


class StoreThatCannotReachItsProcesses(LocalStore):
    """Every fetching process fails to start (its copy of the store cannot be unpickled there)."""

    def __reduce__(self) -> tuple[object, ...]:
        return (_refuse_to_unpickle, ())


def test_a_broken_fetching_pool_retries_the_job_then_records_why(
    settings: Settings, pg_engine: Engine, folder: Path
) -> None:
    settings = settings.model_copy(update={"decode_processes": 1, "fetch_threads": 1})
    store = StoreThatCannotReachItsProcesses(folder)
    pipeline = build_pipeline(settings, model=load_model(settings), store=store)
    ref = ObjectRef(store.bucket, "img 0.jpg")
    try:
        retried = pipeline.process([Job(ref=ref)])[0]
        final = pipeline.process([Job(ref=ref, final_attempt=True)])[0]
    finally:
        pipeline.close()
    assert retried.status == "retry" and (retried.retry_reason or "").startswith("failed_fetch: ")
    assert final.result is not None and final.status == "failed_fetch"
    assert (final.result.error or "").startswith("gave up after retries: ")
    row = rows_by_key(pg_engine)["img 0.jpg"]
    assert row.status == "failed_fetch" and (row.error or "").startswith("gave up after retries: ")


def test_the_image_pool_starts_all_its_processes_before_the_first_image(
    settings: Settings, folder: Path
) -> None:
    def pool_processes() -> int:
        # Children of a fork server: Pebble's fetching and decoding processes.
        table = process_table()
        servers = {pid for pid, (_, cmdline, _) in table.items() if "multiprocessing.forkserver" in cmdline}
        return sum(parent in servers for parent, _, _ in table.values())

    settings = settings.model_copy(update={"decode_processes": 2, "fetch_threads": 3})
    before = pool_processes()
    pipeline = build_pipeline(settings, model=load_model(settings), store=LocalStore(folder))
    try:
        assert pool_processes() - before == 2 + 3
        outcome = pipeline.process([Job(ref=plan(settings, str(folder))[1][0])])[0]
        assert outcome.status == "ok"
    finally:
        pipeline.close()


@pytest.fixture(scope="module")
def large_originals(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 legal 2000x2000 PNGs of 11.4 MiB each (noise, stored uncompressed): large bytes that take the
    decoding processes long enough for fetched bytes to queue up in the worker."""
    root = tmp_path_factory.mktemp("originals")
    noise = Image.frombytes("RGB", (2000, 2000), os.urandom(2000 * 2000 * 3))
    buffer = io.BytesIO()
    noise.save(buffer, format="PNG", compress_level=0)
    for i in range(16):
        (root / f"original {i}.png").write_bytes(buffer.getvalue())
    return root


@pytest.mark.parametrize("objects_in_budget", [2.5, 0.5])
def test_the_bytes_a_worker_holds_stay_within_its_budget_whatever_the_object_sizes(
    settings: Settings, large_originals: Path, objects_in_budget: float
) -> None:
    refs = plan(settings, str(large_originals))[1]
    size = refs[0].size
    assert size is not None and size > 11 * 2**20
    budget = int(objects_in_budget * size)
    # 8 fetch threads and 2 decoding processes: fetching outruns decoding, as with large originals in S3.
    # Unbudgeted, the worker held ~20 objects of such a batch at once (232 MiB, measured).
    settings = settings.model_copy(
        update={"decode_processes": 2, "fetch_threads": 8, "max_fetched_bytes": budget}
    )
    pipeline = build_pipeline(settings, model=load_model(settings), store=LocalStore(large_originals))
    tracemalloc.start()  # the worker's own Python allocations: fetched bytes, their pickles, results
    try:
        prepared = pipeline.prepare([Job(ref=ref) for ref in refs])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        pipeline.close()
    # Nothing lost: every original decoded, even with a budget smaller than one of them (let in alone).
    assert all(item.pixels is not None for item in prepared), [item.result for item in prepared]
    assert pipeline.budget.held == 0
    # Held bytes <= the budget (or one object over it, alone), plus the copies in transit to a decoding
    # process and back from a fetching one.
    assert peak <= max(budget, size) + 2 * size + 8 * 2**20, f"{peak / 2**20:.0f} MiB"


class NewerVersion:
    """The same network under another model version (load_model's bundles are cached: never mutate one)."""

    def __init__(self, model: Model) -> None:
        self.predict, self.collate = model.predict, model.collate
        self.upscales_on_device = model.upscales_on_device
        self.name, self.version, self.preprocessing = model.name, "9.9.9", model.preprocessing


def test_identical_bytes_are_enriched_once_per_model(
    settings: Settings, pg_engine: Engine, tmp_path: Path, random_bundle: Path
) -> None:
    # The same photo under two names in one batch, then again as a third name (a re-upload, a copy in
    # another folder): one forward pass over one image, three ok rows with the same prediction.
    photo, other = sample_jpegs(2)
    (tmp_path / "a.jpg").write_bytes(photo)
    (tmp_path / "copy of a.jpg").write_bytes(photo)
    (tmp_path / "b.jpg").write_bytes(other)
    (tmp_path / "a again.jpg").write_bytes(photo)
    pipeline = build_pipeline(settings, model=load_model(settings), store=LocalStore(tmp_path))
    try:
        first = pipeline.process(
            [Job(ref=ObjectRef("local", k)) for k in ("a.jpg", "copy of a.jpg", "b.jpg")]
        )
        second = pipeline.process([Job(ref=ObjectRef("local", "a again.jpg"))])
    finally:
        pipeline.close()
    assert [o.status for o in first + second] == ["ok"] * 4
    assert pipeline.metrics.forward_passes._value.get() == 1
    assert pipeline.metrics.batch_size._sum.get() == 2  # a.jpg and b.jpg; the copies took a.jpg's
    assert pipeline.metrics.reused._value.get() == 2
    rows = rows_by_key(pg_engine)
    assert rows["copy of a.jpg"].caption == rows["a.jpg"].caption == rows["a again.jpg"].caption
    assert rows["a again.jpg"].article_type == rows["a.jpg"].article_type
    assert rows["a again.jpg"].top_k == rows["a.jpg"].top_k
    assert (rows["a again.jpg"].timings_ms or {}).get("reused") == 1.0
    assert "reused" not in (rows["a.jpg"].timings_ms or {})

    # Another model version does not take this one's predictions.
    pipeline = build_pipeline(settings, model=NewerVersion(load_model(settings)), store=LocalStore(tmp_path))
    try:
        assert pipeline.process([Job(ref=ObjectRef("local", "a.jpg"))])[0].status == "ok"
    finally:
        pipeline.close()
    assert pipeline.metrics.forward_passes._value.get() == 1 and pipeline.metrics.reused._value.get() == 0


def test_an_event_without_version_or_etag_is_keyed_by_what_the_get_returned(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str
) -> None:
    # A sender that names only the key: the row takes the object's ETag from the GET, so overwriting the
    # key with new bytes is a new image, not "already enriched" under a shared empty identity.
    client = s3_client(moto_server)
    first, second = sample_jpegs(2)
    pipeline = build_pipeline(settings, model=load_model(settings), store=S3Store.from_settings(settings))
    try:
        etags = []
        for data in (first, second):
            etags.append(client.put_object(Bucket=bucket, Key="shirt.jpg", Body=data)["ETag"].strip('"'))
            outcome = pipeline.process([Job(ref=ObjectRef(bucket, "shirt.jpg"))])[0]
            assert outcome.status == "ok"
    finally:
        pipeline.close()
    with Session(pg_engine) as session:
        found = session.execute(select(Enrichment.object_version, Enrichment.etag, Enrichment.status)).all()
    assert sorted(found) == sorted((etag, etag, "ok") for etag in etags)
