"""`enrich bench` measures every stage through the real stack (figures are printed, never asserted)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from sqlalchemy import Engine

from enrich.bench import BenchReport, GpuMemorySampler, RowsMissing, Stack, markdown_section, run_bench
from enrich.stack import NanioServer, catalogue_images, cpu_by_process, descendants
from schema.settings import Settings
from worker.runtime import load_model


def test_bench_reports_every_stage_ratio_latency_and_memory(
    settings: Settings, pg_engine: Engine, moto_server: str
) -> None:
    settings = settings.model_copy(update={"batch_size": 8, "max_wait_ms": 50})
    report = run_bench(
        settings,
        load_model(settings),
        catalogue_images(24),
        label="small",
        s3_endpoint=moto_server,
        end_to_end=True,
        naive_images=8,
        latency_images=12,
        say=lambda _line: None,
        latency_rate=4.0,
    )
    assert set(report.rates) == {"fetch", "decode", "model", "ingest", "end_to_end", "naive"}
    assert all(rate > 0 for rate in report.rates.values())
    assert report.efficiency is not None and report.bound in ("fetch", "model", "decode", "machine CPU")
    assert report.latency_ms["p50"] <= report.latency_ms["p95"] <= report.latency_ms["p99"]
    assert report.memory["worker peak RSS"] > 100  # a real process with torch loaded
    assert report.worker_cpu_ms is not None and report.worker_cpu_ms > 0
    # Every phase's rows are ok, so its figure stands; (c) ran after an untimed warm-up round. Twelve uploads
    # on a busy machine may fall short of (d)'s offered rate, which marks (d) alone, and says why.
    assert report.statuses == {"end_to_end": {"ok": 24}, "latency": {"ok": 12}, "naive": {"ok": 8}}
    assert set(report.invalid) <= {"latency"} and "uploads reached" in report.invalid.get(
        "latency", "uploads reached"
    )
    assert 1 <= report.mean_batch["end_to_end"] <= 8 and report.warmup_s["end_to_end"] > 0
    assert report.offered_rate["achieved"] > 0 and report.offered_rate["target"] == 4.0
    json.dumps(report.to_json())  # what `enrich bench --out` writes beside the Markdown
    section = markdown_section([report], "enrich bench")
    assert "speed-up over naive" in section and "upload-to-row latency p95" in section
    assert "end_to_end / min(model, decode)" in section and "tightest limit" in section
    assert "worker processes' CPU per image" in section and "whole machine's CPU per image" in section


def test_bench_runs_several_worker_processes_through_the_supervisor_against_nanio(
    settings: Settings, pg_engine: Engine
) -> None:
    settings = settings.model_copy(update={"batch_size": 4, "max_wait_ms": 50})
    stack = Stack(settings, None, s3_server="nanio")  # nanio started here, in its own processes
    try:
        run = stack.end_to_end(catalogue_images(32), processes=2)
        worker = run.worker
        try:
            assert run.rate > 0 and run.worker_cpu_ms > 0 and run.machine_cpu_ms > run.worker_cpu_ms
            assert len(worker.worker_pids()) == 2
            assert worker.metric("enrich_worker_processes_ready") == 2
            assert worker.metric("enrich_forward_passes_total") >= 32 / 4
            assert worker.peak_rss_mib() > 2 * 100  # two real processes with torch loaded
            groups = cpu_by_process()
            workers = set(worker.worker_pids())
            assert {groups[pid][0] for pid in workers} == {"worker processes"}
            pools = descendants(worker.process.pid) - workers
            assert pools and {groups[pid][0] for pid in pools} == {"fetching + decoding"}
        finally:
            worker.stop()
    finally:
        stack.close()


def test_cpu_of_the_s3_servers_pool_processes_counts_as_the_s3_server() -> None:
    # nanio's processes are multiprocessing children, whose command lines look like any other pool's.
    nanio = NanioServer(workers=2)
    try:
        servers = descendants(nanio.process.pid) | {nanio.process.pid}
        assert len(servers) >= 3
        groups = cpu_by_process()
        assert {groups[pid][0] for pid in servers} == {"S3 server"}
    finally:
        nanio.stop()


def test_a_phase_with_failed_rows_or_too_slow_uploads_is_marked_invalid_in_the_markdown() -> None:
    report = BenchReport(label="small", images=8, device="cpu", batch_size=4, worker_processes=2)
    report.rates.update({"fetch": 100.0, "decode": 50.0, "model": 40.0, "end_to_end": 30.0})
    report.statuses["end_to_end"] = {"ok": 6, "failed_infer": 2}
    report.invalid["end_to_end"] = "2 of 8 rows not ok"
    section = markdown_section([report], "enrich bench")
    assert "**INVALID: end_to_end**" in section and "30.0 images/s **INVALID**" in section
    assert "rows by status: end_to_end | failed_infer 2, ok 6" in section
    assert "fetch x 2" in report.limits and report.limits["fetch x 2"] == 200.0  # (c) runs two such processes
    assert "model (one process" in section and "2 processes at one core each" not in section  # no CPU figure


def test_the_worker_cpu_cap_counts_each_processs_model_threads() -> None:
    # With ENRICH_MODEL_THREADS=2 a worker process ran 19 images/s at 72 ms of CPU per image, past the
    # "<= 14 images/s" that a cap of one core per process printed (AVX2 EPYC, 2026-12-07).
    report = BenchReport(
        label="small", images=8, device="cpu", batch_size=4, worker_processes=2, model_threads=2
    )
    report.rates.update({"decode": 50.0, "model": 40.0, "end_to_end": 30.0})
    report.worker_cpu_ms = 100.0
    assert "(2 processes at 2 cores each: <= 40 images/s)" in markdown_section([report], "enrich bench")


def test_a_row_wait_that_stalls_raises_with_what_arrived() -> None:
    counts = iter([{"ok": 1}, {"ok": 2}] + [{"ok": 2, "failed_decode": 1}] * 1000)
    stack = SimpleNamespace(status_counts=lambda _prefix: next(counts))
    worker = SimpleNamespace(exited=lambda: None)
    with pytest.raises(RowsMissing) as raised:
        Stack.wait_rows(stack, "p", 5, worker, phase="timed round", stall_s=0.3)  # type: ignore[arg-type]
    assert raised.value.done == 3 and raised.value.statuses == {"ok": 2, "failed_decode": 1}
    assert "timed round: no new row for 0 s: 3 of 5 rows" in str(raised.value) and raised.value.rate > 0


def test_gpu_memory_is_sampled_from_nvidia_smi_where_there_is_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\nprintf '123, 4000\\n999, 700\\n'\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    with GpuMemorySampler([123], every_s=0.05) as sampler:
        time.sleep(0.3)
    assert sampler.available and sampler.peak_workers_mib == 4000 and sampler.peak_all_mib == 4700
    monkeypatch.setenv("PATH", str(tmp_path / "none"))
    with GpuMemorySampler([123]) as sampler:  # no nvidia-smi (a CPU machine): nothing sampled, no error
        pass
    assert not sampler.available and sampler.peak_all_mib == 0
