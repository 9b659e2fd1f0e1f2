"""A small soak in CI: kills, database outages, corrupt images and duplicates; the ledger must be exact."""

from __future__ import annotations

from sqlalchemy import Engine

from enrich.soak import run_soak
from schema.settings import Settings


def test_small_soak_ends_with_an_exact_ledger(
    settings: Settings, pg_engine: Engine, moto_server: str
) -> None:
    ledger = run_soak(
        settings,
        n=48,
        workers=2,
        bad_fraction=0.1,
        duplicate_fraction=0.25,
        kill_every_s=6,
        outage_every_s=9,
        timeout_s=240,
        seed=7,
        s3_endpoint=moto_server,
        bundle=None,
        log=print,
    )
    print("\n".join(ledger.lines()))
    assert ledger.uploaded == 48 and ledger.events_sent > 48
    assert ledger.kills >= 1 and ledger.db_outages >= 1  # the faults really happened
    assert ledger.expected_failed  # and some images really were corrupt
    assert ledger.lost == [] and ledger.duplicated == [] and ledger.wrong_status == []
