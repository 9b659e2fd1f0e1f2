"""`enrich bench` measures every stage through the real stack (figures are printed, never asserted)."""

from __future__ import annotations

from sqlalchemy import Engine

from enrich.bench import Stack, markdown_section, run_bench
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
    )
    assert set(report.rates) == {"fetch", "decode", "model", "ingest", "end_to_end", "naive"}
    assert all(rate > 0 for rate in report.rates.values())
    assert report.efficiency is not None and report.bound in ("fetch", "model", "decode", "machine CPU")
    assert report.latency_ms["p50"] <= report.latency_ms["p95"] <= report.latency_ms["p99"]
    assert report.memory["worker peak RSS"] > 100  # a real process with torch loaded
    assert report.worker_cpu_ms is not None and report.worker_cpu_ms > 0
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
