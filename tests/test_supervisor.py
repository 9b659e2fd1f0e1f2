"""`enrich worker --processes N`: N Celery consumers on one device, kept alive by one supervisor process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import Engine

from schema.settings import Settings, settings_env, usable_cores
from tests.conftest import REPO, StartWorker, wait_for
from tests.test_end_to_end import put_images, unacked_for
from tests.test_reliability import one_ok_row_per_key, publish, queue_length
from worker.supervisor import WorkerSupervisor, child_settings


def test_supervised_processes_all_consume_a_killed_one_is_replaced_and_sigterm_stops_them(
    settings: Settings, pg_engine: Engine, bucket: str, moto_server: str, start_worker: StartWorker
) -> None:
    keys = [f"pool/{i}.jpg" for i in range(8)]
    # Each process holds at most 4 messages (concurrency 4, prefetch 1) and waits 3 s to fill a batch of 32,
    # so 8 held messages at once means both processes consume.
    settings = settings.model_copy(
        update={
            "worker_processes": 2,
            "worker_concurrency": 4,
            "batch_size": 32,
            "max_wait_ms": 3000,
            "visibility_timeout_s": 3,
        }
    )
    worker = start_worker(settings)
    worker.wait_ready()
    first_pids = worker.worker_pids()
    assert len(first_pids) == 2

    publish(settings, bucket, put_images(moto_server, bucket, keys))
    wait_for(lambda: unacked_for(settings.queue) == 8 and queue_length(settings.queue) == 0, what="8 held")
    os.kill(first_pids[0], signal.SIGKILL)  # its 4 messages come back after the visibility timeout
    wait_for(lambda: one_ok_row_per_key(pg_engine, keys), timeout=90, what="8 ok rows, each once")

    wait_for(
        lambda: len(worker.worker_pids()) == 2 and first_pids[0] not in worker.worker_pids(), what="restart"
    )
    wait_for(lambda: worker.metric("enrich_worker_processes_ready") == 2, what="the replacement is ready")
    assert first_pids[1] in worker.worker_pids()

    children = worker.worker_pids()
    worker.process.send_signal(signal.SIGTERM)
    assert worker.process.wait(timeout=60) == 0
    assert not any(os.path.exists(f"/proc/{pid}") for pid in children)


def test_a_supervised_process_that_cannot_start_stops_the_supervisor_with_its_error(
    settings: Settings,
) -> None:
    settings = settings.model_copy(update={"worker_processes": 2, "model_bundle": REPO / "no-such-bundle"})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "enrich.cli", "worker", "--loglevel", "warning"],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    assert "no-such-bundle" in result.stderr
    assert "before all were ready" in result.stderr
    assert time.monotonic() - started < 60  # no restart loop


def test_each_supervised_process_gets_its_share_of_the_cores() -> None:
    cores = usable_cores()  # a CI container's CPU quota included
    auto = Settings(worker_processes=2)
    assert auto.effective_model_threads == max(1, cores // 2)
    child = child_settings(auto)
    assert child.worker_processes == 1 and child.metrics_port == 0
    assert child.effective_model_threads == max(1, cores // 2 // 2)
    assert child.effective_decode_processes == max(1, cores // 2)
    # Explicit values are the operator's: passed through unchanged.
    pinned = child_settings(Settings(worker_processes=2, model_threads=3, decode_processes=5))
    assert (pinned.model_threads, pinned.decode_processes) == (3, 5)


def test_usable_cores_honours_a_container_cpu_quota(tmp_path: Path) -> None:
    affinity = len(os.sched_getaffinity(0))
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")  # 1.5 CPUs: a pod's `limits: cpu: 1500m`
    assert usable_cores(v2) == min(affinity, 2)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert usable_cores(v2) == affinity
    v1 = tmp_path / "v1"
    (v1 / "cpu").mkdir(parents=True)
    (v1 / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    assert usable_cores(v1) == 1
    (v1 / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    assert usable_cores(v1) == affinity
    assert usable_cores(tmp_path / "absent") == affinity


def test_the_cpus_setting_sizes_the_pools_where_no_quota_does() -> None:
    # A GPU pod without a CPU limit: no quota, an affinity mask of every core of the node. The manifests
    # pass the pod's CPU request as ENRICH_CPUS, and the pools follow it, never above what is usable.
    assert Settings(cpus=1).effective_decode_processes == 1
    assert Settings(cpus=1).effective_model_threads == 1
    assert Settings(cpus=10_000).effective_decode_processes == usable_cores()
    split = child_settings(Settings(cpus=1, worker_processes=2))
    assert (split.decode_processes, split.model_threads) == (1, 1)


@pytest.mark.skipif(usable_cores() < 2, reason="needs two usable cores to tell all from half")
def test_enrich_run_gives_its_model_every_usable_core_and_a_worker_half() -> None:
    # `enrich run` has no fetching processes or stack beside it: all the cores ran 512 photos in 37-38 s
    # where half of them took 48 (2-core AVX2 EPYC). A worker keeps half for what runs beside it.
    import torch

    from worker.runtime import use_model_threads

    before = torch.get_num_threads()
    try:
        settings = Settings(cpus=2)
        use_model_threads(settings, alone=True)
        assert torch.get_num_threads() == 2
        use_model_threads(settings)
        assert torch.get_num_threads() == 1
        use_model_threads(Settings(cpus=2, model_threads=1), alone=True)  # a setting is obeyed
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


CRASH_LOOPING_CHILD = """
import pathlib, sys, time
from prometheus_client import Gauge
Gauge("enrich_worker_processes_ready", "ready", multiprocess_mode="livesum").set(1)
marker = pathlib.Path(sys.argv[1])
if not marker.exists():  # the first start works for a moment (the pod passes its startup probe) ...
    marker.write_text("started")
    time.sleep(1.0)
sys.exit(3)  # ... then every start dies at once (a device gone bad, a full disk)
"""


@pytest.mark.timeout(60)
def test_a_crash_looping_process_stops_the_supervisor_instead_of_looking_healthy(tmp_path: Path) -> None:
    script = tmp_path / "child.py"
    script.write_text(CRASH_LOOPING_CHILD)
    command = [sys.executable, str(script), str(tmp_path / "marker")]
    supervisor = WorkerSupervisor(Settings(worker_processes=1, metrics_port=0), command, max_backoff_s=0.1)
    started = time.monotonic()
    assert supervisor.run() == 3  # old code: restarted it every 30 s for ever, probes answering 200
    assert supervisor.serving  # it had been ready: this is the crash loop, not the failed start
    assert time.monotonic() - started < 30
