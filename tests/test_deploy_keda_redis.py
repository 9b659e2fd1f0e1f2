"""Scaling you can see without a cluster: fill a real Redis list, read its length the way KEDA's redis scaler
does, and check the replica count KEDA's formula gives from the ScaledObject as written. Also checks that a
job the real ingest publisher sends lands on the Redis list KEDA is told to watch, and that the burst
simulation behind docs/scaling.md keeps its promises."""

from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import redis

from deploy import scaling
from schema.results import ObjectRef
from schema.settings import DEFAULT_QUEUE, Settings

REDIS_URL = os.environ.get("ENRICH_TEST_REDIS", "redis://127.0.0.1:6379/0")
# The script KEDA's redis scaler EVALs (pkg/scalers/redis_scaler.go): the length of whatever the key holds.
KEDA_LENGTH_SCRIPT = """
local listName = KEYS[1]
local listType = redis.call('type', listName).ok
local cmd = {zset = 'zcard', set = 'scard', list = 'llen', hash = 'hlen', none = 'llen'}
return redis.call(cmd[listType], listName)
"""


@pytest.fixture
def client() -> Iterator[redis.Redis]:
    conn = redis.Redis.from_url(REDIS_URL)
    try:
        conn.ping()
    except redis.ConnectionError as exc:
        pytest.fail(f"Redis at {REDIS_URL} is required: {exc}")
    yield conn
    conn.close()


@pytest.fixture
def throwaway_list(client: redis.Redis) -> Iterator[str]:
    name = f"enrich-keda-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        client.delete(name)


def keda_list_length(client: redis.Redis, name: str) -> int:
    return int(client.eval(KEDA_LENGTH_SCRIPT, 1, name))


def fill_to(client: redis.Redis, name: str, length: int) -> None:
    """Grow the list to exactly `length` messages (the payload does not matter to LLEN)."""
    missing = length - int(client.llen(name))
    chunk = 10_000
    while missing > 0:
        n = min(chunk, missing)
        client.rpush(name, *(b"x" for _ in range(n)))
        missing -= n


@functools.cache
def _specs() -> dict[str, scaling.ScalerSpec]:
    return {
        overlay: scaling.worker_spec(scaling.load_objects(overlay)) for overlay in ("cpu", "gpu", "aws-sqs")
    }


@pytest.mark.parametrize("overlay", ["cpu", "gpu"])
def test_replicas_from_a_real_queue(client: redis.Redis, throwaway_list: str, overlay: str) -> None:
    spec = _specs()[overlay]
    length, act, top = spec.list_length, spec.activation, spec.max_replicas
    assert spec.list_name == DEFAULT_QUEUE
    # (messages in the list, replicas KEDA + HPA settle on), for the ScaledObject as written.
    expectations = [
        (0, 0),  # idle: scaled to zero
        (act, 0),  # at the activation threshold: still asleep (KEDA wants strictly more)
        (act + 1, 1),  # one message past it wakes one worker
        (length, 1),  # a full per-replica target is still one worker
        (length + 1, 2),
        (3 * length + 5, 4),
        (top * length, top),
        ((top + 3) * length, top),  # capped by maxReplicaCount
    ]
    for fill, expected in sorted(expectations):
        fill_to(client, throwaway_list, fill)
        llen = keda_list_length(client, throwaway_list)
        assert llen == fill
        assert scaling.is_active(llen, spec) == (fill > act)
        assert scaling.target_replicas(llen, spec) == expected, (overlay, fill)
        # The plain formula, spelt out once more: ceil(LLEN / listLength) within [1, max] when active.
        if fill > act:
            assert expected == min(top, max(1, math.ceil(fill / length)))


def test_the_gpu_numbers_as_documented() -> None:
    """docs/scaling.md and the ScaledObject's comment derive these; a change must update both."""
    gpu = _specs()["gpu"]
    assert (gpu.list_length, gpu.activation, gpu.min_replicas, gpu.max_replicas) == (20_000, 0, 0, 8)
    assert gpu.list_length == scaling.WORKER_IMAGES_PER_S * 10  # throughput x 10 s queue-wait goal
    assert (gpu.cooldown_s, gpu.polling_s) == (300, 10)
    assert _specs()["aws-sqs"] == gpu


def test_published_jobs_land_on_the_list_keda_watches(
    client: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The real ingest publisher, on a throwaway queue name: the Redis key is exactly the queue name, so
    a ScaledObject with listName = ENRICH_QUEUE sees every job."""
    from ingest.publisher import JobPublisher

    queue = f"enrich-keda-test-{uuid.uuid4().hex[:12]}"
    monkeypatch.setenv("ENRICH_QUEUE", queue)
    monkeypatch.setenv("ENRICH_BROKER_URL", REDIS_URL)
    monkeypatch.delenv("ENRICH_ALLOWED_BUCKETS", raising=False)
    settings = Settings()
    publisher = JobPublisher(settings)
    try:
        report = publisher.publish(ObjectRef(bucket="uploads", key=f"keda/{i}.jpg") for i in range(25))
        assert report.published == 25
        assert keda_list_length(client, queue) == 25
        assert client.type(queue) == b"list"
        spec = scaling.ScalerSpec(**{**_spec_fields(_specs()["gpu"]), "list_name": queue, "list_length": 10})
        assert scaling.target_replicas(keda_list_length(client, queue), spec) == 3
    finally:
        publisher.close()
        for key in client.scan_iter(match=f"{queue}*"):
            client.delete(key)
        client.delete(queue)


def _spec_fields(spec: scaling.ScalerSpec) -> dict[str, Any]:
    return {name: getattr(spec, name) for name in spec.__slots__}


def test_burst_simulation_keeps_its_promises() -> None:
    """The model behind docs/scaling.md: every image is processed, the fleet reaches its cap for a big burst,
    nothing runs before the first poll, and the last worker goes after the cooldown."""
    spec = _specs()["gpu"]
    arrivals = scaling.scenario()
    result = scaling.simulate(arrivals, spec, startup_s=90)
    assert result.queue[-1] == 0 and result.images == int(arrivals.sum())
    assert int(result.replicas.max()) == spec.max_replicas
    assert result.replicas[0] == 0 and result.replicas[-1] == 0
    last_upload = int(np.nonzero(arrivals)[0][-1])
    gone = int(np.nonzero(result.replicas)[0][-1]) + 1
    # The last poll that saw a message is at most one polling interval before the last upload.
    assert spec.cooldown_s - spec.polling_s <= gone - last_upload <= spec.cooldown_s + 2 * spec.polling_s
    first_ready = int(np.nonzero(result.ready)[0][0])
    first_upload = int(np.nonzero(arrivals)[0][0])
    assert 90 <= first_ready - first_upload <= 90 + spec.polling_s
    assert np.nanmax(result.latency) <= 90 + spec.polling_s + 60
    # After a burst the HPA steps the fleet down (LLEN 0 asks for its floor of one) before KEDA's cooldown
    # removes the rest.
    burst = scaling.burst_arrivals(1500, [(60, 120, 5000.0)])
    after = scaling.simulate(burst, spec, startup_s=90)
    drained = int(np.nonzero(after.queue)[0][-1])
    assert after.replicas[drained + spec.cooldown_s - spec.polling_s] <= spec.max_replicas // 2
    assert after.replicas[-1] == 0
    warm = scaling.simulate(arrivals, scaling.ScalerSpec(**{**_spec_fields(spec), "min_replicas": 1}))
    assert np.nanmax(warm.latency) < np.nanmax(result.latency)
    assert warm.gpu_seconds > result.gpu_seconds


def test_docs_scaling_table_matches_the_simulation() -> None:
    """The headline rows of docs/scaling.md come from `python deploy/scaling.py`; a change to the ScaledObject
    or the model must be reflected there."""
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "scaling.md").read_text()
    spec = _specs()["gpu"]
    arrivals = scaling.scenario()
    rows = {
        "| the figure, as written": spec,
        "| the figure, `minReplicaCount: 1`": scaling.ScalerSpec(**{**_spec_fields(spec), "min_replicas": 1}),
    }
    for prefix, variant in rows.items():
        s = scaling.summary(
            scaling.simulate(arrivals, variant), scaling.WORKER_IMAGES_PER_S, scaling.GPU_HOUR_USD
        )
        (line,) = [ln for ln in doc.splitlines() if ln.startswith(prefix)]
        expected = (
            f"| {s['p50_latency_s']:.0f} s / {s['p95_latency_s']:.0f} s | {s['gpu_hours']:.2f} | "
            f"{s['utilisation'] * 100:.0f} % | {s['usd_per_million']:.2f} |"
        )
        assert line.endswith(expected), f"docs/scaling.md row {line!r} should end {expected!r}"
