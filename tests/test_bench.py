"""`enrich bench` measures every stage through the real stack (figures are printed, never asserted)."""

from __future__ import annotations

from sqlalchemy import Engine

from enrich.bench import markdown_section, run_bench
from enrich.stack import catalogue_images
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
    assert set(report.rates) == {"fetch", "decode", "model", "end_to_end", "naive"}
    assert all(rate > 0 for rate in report.rates.values())
    assert report.efficiency is not None and report.bound in ("fetch", "model", "decode")
    assert report.latency_ms["p50"] <= report.latency_ms["p95"] <= report.latency_ms["p99"]
    assert report.memory["worker peak RSS"] > 100  # a real process with torch loaded
    assert report.worker_cpu_ms is not None and report.worker_cpu_ms > 0
    section = markdown_section([report], "enrich bench")
    assert "speed-up over naive" in section and "upload-to-row latency p95" in section
    assert "worker process CPU per image" in section
