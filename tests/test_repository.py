"""The table contract on the real Postgres (and the SQLite default of `enrich run`)."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from alembic import command
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from schema.db import make_engine
from schema.migrate import alembic_config, upgrade
from schema.repository import (
    EnrichmentQuery,
    already_enriched,
    build_query,
    query_enrichments,
    upsert_enrichments,
)
from schema.results import EnrichmentResult, FieldPrediction, ImagePrediction, ObjectRef, Status
from schema.tables import Enrichment


@pytest.fixture(params=["postgres", "sqlite"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    if request.param == "postgres":
        yield request.getfixturevalue("pg_engine")
        return
    url = f"sqlite:///{tmp_path / 'enrich.db'}"
    upgrade(url)
    sqlite_engine = make_engine(url)
    yield sqlite_engine
    sqlite_engine.dispose()


def ok_result(
    ref: ObjectRef, *, version: str = "1.0.0", article: str = "Tshirts", conf: float = 0.9
) -> EnrichmentResult:
    fields = {
        name: FieldPrediction(value=value, confidence=conf, top_k=((value, conf),))
        for name, value in {
            "gender": "Men",
            "baseColour": "Navy Blue",
            "season": "Summer",
            "usage": "Casual",
            "articleType": article,
            "masterCategory": "Apparel",
            "subCategory": "Topwear",
        }.items()
    }
    return EnrichmentResult(
        ref=ref,
        status=Status.OK,
        model_name="enrich",
        model_version=version,
        prediction=ImagePrediction(
            fields=fields, caption="Nike Men Navy Blue Tshirt", caption_confidence=0.5
        ),
        content_sha256="0" * 64,
        size=10,
    )


def failed_result(ref: ObjectRef, *, version: str = "1.0.0") -> EnrichmentResult:
    return EnrichmentResult(
        ref=ref,
        status=Status.FAILED_DECODE,
        model_name="enrich",
        model_version=version,
        error="corrupt image",
    )


def write(engine: Engine, *results: EnrichmentResult) -> None:
    with Session(engine) as session, session.begin():
        upsert_enrichments(session=session, results=list(results))


def rows(engine: Engine) -> list[Enrichment]:
    with Session(engine) as session:
        return list(session.scalars(select(Enrichment).order_by(Enrichment.id)))


def test_duplicate_writes_leave_one_row_and_never_overwrite_ok(engine: Engine) -> None:
    ref = ObjectRef("shop", "a.jpg", etag='"e1"')
    write(engine, ok_result(ref, article="Tshirts"))
    write(engine, ok_result(ref, article="Shirts"), ok_result(ref, article="Jeans"))
    (row,) = rows(engine)
    assert (row.article_type, row.object_version, row.etag, row.status) == ("Tshirts", "e1", "e1", "ok")
    assert row.attempts == 1


def test_a_retry_replaces_a_failure_and_counts_attempts(engine: Engine) -> None:
    ref = ObjectRef("shop", "a.jpg", etag="e1")
    write(engine, failed_result(ref))
    write(engine, ok_result(ref))
    (row,) = rows(engine)
    assert (row.status, row.error, row.attempts) == ("ok", None, 2)


@pytest.fixture
def west_of_utc(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """This process's local time 8 hours behind UTC (a POSIX TZ string: no tz database needed)."""
    monkeypatch.setenv("TZ", "XST8")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


@pytest.mark.usefixtures("west_of_utc")
def test_a_retried_row_is_found_by_its_time_in_any_local_timezone(engine: Engine) -> None:
    # The retry's updated_at was local wall time, which SQLite stores without its offset: 8 hours in the
    # past here, so `--since 1h` missed the row and `--until 1h` returned it.
    ref = ObjectRef("shop", "a.jpg", etag="e1")
    write(engine, failed_result(ref))
    write(engine, ok_result(ref))
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    with Session(engine) as session:
        since = query_enrichments(session=session, query=EnrichmentQuery(since=hour_ago))
        until = query_enrichments(session=session, query=EnrichmentQuery(until=hour_ago))
    assert [(row.key, row.attempts) for row in since] == [("a.jpg", 2)] and until == []


def test_history_per_model_version_and_latest_view(engine: Engine) -> None:
    ref = ObjectRef("shop", "a.jpg", etag="e1")
    write(engine, ok_result(ref, version="1.0.0", article="Tshirts"))
    write(engine, ok_result(ref, version="1.1.0", article="Shirts"))
    write(engine, ok_result(ObjectRef("shop", "b.jpg", etag="e2")))
    assert len(rows(engine)) == 3
    with engine.connect() as conn:
        latest = conn.execute(text("SELECT key, article_type FROM enrichments_latest ORDER BY key")).all()
    assert [tuple(r) for r in latest] == [("a.jpg", "Shirts"), ("b.jpg", "Tshirts")]
    with Session(engine) as session:
        found = query_enrichments(session=session, query=EnrichmentQuery(equals={}))
        assert sorted((r.key, r.model_version) for r in found) == [("a.jpg", "1.1.0"), ("b.jpg", "1.0.0")]
        history = query_enrichments(session=session, query=EnrichmentQuery(equals={}, all_versions=True))
        assert len(history) == 3


def test_query_filters_by_attribute_confidence_status_and_prefix(engine: Engine) -> None:
    write(
        engine,
        ok_result(ObjectRef("shop", "men/a.jpg", etag="1"), article="Tshirts", conf=0.95),
        ok_result(ObjectRef("shop", "men/b.jpg", etag="2"), article="Tshirts", conf=0.4),
        ok_result(ObjectRef("shop", "women/c.jpg", etag="3"), article="Jeans", conf=0.99),
        failed_result(ObjectRef("shop", "men/bad_%.jpg", etag="4")),
    )

    def keys(**kwargs: object) -> list[str]:
        with Session(engine) as session:
            query = EnrichmentQuery(equals=kwargs.pop("equals", {}), **kwargs)  # type: ignore[arg-type]
            return sorted(r.key for r in query_enrichments(session=session, query=query))

    assert keys(equals={"articleType": "Tshirts"}) == ["men/a.jpg", "men/b.jpg"]
    assert keys(equals={"articleType": "Tshirts"}, min_confidence=0.9) == ["men/a.jpg"]
    assert keys(min_confidence=0.9) == ["men/a.jpg", "women/c.jpg"]
    assert keys(status="failed") == ["men/bad_%.jpg"]
    assert keys(status="ok", key_prefix="men/") == ["men/a.jpg", "men/b.jpg"]
    assert keys(status="failed", key_prefix="men/") == keys(status="failed_decode", key_prefix="men/")
    assert keys(status="failed", key_prefix="men/") == ["men/bad_%.jpg"]
    assert keys(status="failed", key_prefix="women/") == []
    # '%' and '_' in a prefix are literal characters, not SQL wildcards.
    assert keys(key_prefix="men/bad_%") == ["men/bad_%.jpg"]
    # A hostile value is a bound parameter, never SQL.
    assert keys(equals={"articleType": "x' OR '1'='1"}) == []
    with pytest.raises(ValueError, match="unknown field"):
        keys(equals={"colour; DROP TABLE enrichments": "x"})
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Enrichment)) == 4


PREFIX_KEYS = [
    "men/a.jpg",
    "men/é ü.jpg",
    "men/\U0010ffff.jpg",
    "men/\U0010ffff\U0010ffff",
    "men0/x.jpg",
    "men.jpg",
    "meN/x.jpg",
    "Men/x.jpg",
    "me/x.jpg",
    "\ud7ff/a.jpg",
    "\ue000/b.jpg",
]


@pytest.mark.parametrize(
    "prefix",
    ["men/", "men", "men/\U0010ffff", "men/\U0010ffff\U0010ffff", "m", "M", "\ud7ff", "\U0010ffff", "x"],
)
def test_a_key_prefix_matches_exactly_the_keys_that_start_with_it(engine: Engine, prefix: str) -> None:
    # Case, characters that sort between the prefix and its successor under a locale (".", "0"), and the
    # largest code points: `--prefix` is str.startswith, whatever the database's collation.
    write(engine, *(ok_result(ObjectRef("shop", key, etag=str(i))) for i, key in enumerate(PREFIX_KEYS)))
    with Session(engine) as session:
        found = query_enrichments(session=session, query=EnrichmentQuery(key_prefix=prefix, limit=100))
    assert sorted(r.key for r in found) == sorted(k for k in PREFIX_KEYS if k.startswith(prefix))


def test_a_key_prefix_query_reads_an_index_range(pg_engine: Engine) -> None:
    # On a million rows a prefix query that scanned the table took ~1.9 s, 6 ms by this index
    # (docs/benchmarks.md); the planner shows which it would take when a scan is not an option.
    query = build_query(EnrichmentQuery(key_prefix="men/", all_versions=True))
    with pg_engine.connect() as conn:
        conn.execute(text("SET enable_seqscan = off"))
        sql = query.compile(dialect=pg_engine.dialect, compile_kwargs={"literal_binds": True})
        plan = "\n".join(conn.execute(text(f"EXPLAIN {sql}")).scalars())
    assert "ix_enrichments_key_codepoint" in plan, plan


def test_already_enriched_names_only_ok_rows_of_that_model_version(engine: Engine) -> None:
    a, b, c = (ObjectRef("shop", k, etag="e") for k in ("a.jpg", "b.jpg", "c.jpg"))
    write(engine, ok_result(a), failed_result(b), ok_result(c, version="0.9.0"))
    with Session(engine) as session:
        assert already_enriched(session=session, refs=[a, b, c], model_version="1.0.0") == {a}


T1 = datetime(2026, 11, 1, tzinfo=UTC)
SEQ1, SEQ2 = "0055AED6DCD90281E5", "0055AED6DCD90281F0"  # S3 sequencers of two puts of one key


def event_ok(key: str, etag: str, seq: str | None, modified: datetime | None, **kw: Any) -> EnrichmentResult:
    """An `ok` row as the worker writes it: an event's ref carries a sequencer, a listing's does not."""
    return replace(ok_result(ObjectRef("shop", key, etag=etag, sequencer=seq), **kw), last_modified=modified)


def latest(engine: Engine, key: str) -> tuple[str, str, str, str | None]:
    with engine.connect() as conn:
        row = conn.execute(
            text(
                "SELECT object_version, model_version, status, article_type FROM enrichments_latest "
                "WHERE key = :key"
            ),
            {"key": key},
        ).one()
    return (row[0], row[1], row[2], row[3])


def test_model_upgrade_by_backfill_is_the_latest_row_of_an_event_image(engine: Engine) -> None:
    # The event wrote model 1.0.0 with a sequencer; the upgrade's backfill lists the same bytes without one.
    write(engine, event_ok("a.jpg", "e1", SEQ1, T1, version="1.0.0", article="Tshirts"))
    write(engine, event_ok("a.jpg", "e1", None, T1, version="2.0.0", article="Shirts"))
    assert latest(engine, "a.jpg") == ("e1", "2.0.0", "ok", "Shirts")
    with Session(engine) as session:
        (shown,) = query_enrichments(session=session, query=EnrichmentQuery(key_prefix="a.jpg"))
    assert shown.model_version == "2.0.0"  # `enrich query` reads the view


def test_a_reconciled_newer_version_without_a_sequencer_is_the_latest_row(engine: Engine) -> None:
    # The overwrite's event was lost: reconciliation enriched it from a listing (LastModified, no sequencer).
    write(engine, event_ok("b.jpg", "e1", SEQ1, T1, article="Tshirts"))
    write(engine, event_ok("b.jpg", "e2", None, T1 + timedelta(hours=1), article="Shirts"))
    assert latest(engine, "b.jpg") == ("e2", "1.0.0", "ok", "Shirts")


def test_a_failed_newer_version_stays_latest_and_a_late_older_event_does_not(engine: Engine) -> None:
    # A failed fetch knows no LastModified: its sequencer still puts it after the older version, so it is the
    # latest row (where `enrich retry` and `--status failed` find it) ...
    write(engine, event_ok("c.jpg", "e1", SEQ1, T1))
    failed = replace(
        failed_result(ObjectRef("shop", "c.jpg", etag="e2", sequencer=SEQ2)), status=Status.FAILED_FETCH
    )
    write(engine, failed)
    assert latest(engine, "c.jpg")[:3] == ("e2", "1.0.0", "failed_fetch")
    # ... and a late event for an older version, whose fetch failed (If-Match), stays below the newer one.
    write(engine, event_ok("d.jpg", "e2", SEQ2, T1))
    late = replace(
        failed_result(ObjectRef("shop", "d.jpg", etag="e1", sequencer=SEQ1)), status=Status.FAILED_FETCH
    )
    write(engine, late)
    assert latest(engine, "d.jpg")[:3] == ("e2", "1.0.0", "ok")


def test_a_retry_keeps_the_stored_sequencer_and_last_modified(engine: Engine) -> None:
    ref = ObjectRef("shop", "a.jpg", etag="e1", sequencer=SEQ1)
    write(engine, replace(failed_result(ref), last_modified=T1))
    write(engine, failed_result(ObjectRef("shop", "a.jpg", etag="e1")))  # a ref without them: no NULLs
    (row,) = rows(engine)
    assert row.sequencer == ref.sort_sequencer and row.object_last_modified is not None
    assert row.object_last_modified.replace(tzinfo=UTC) == T1
    assert row.attempts == 2
    write(engine, ok_result(ObjectRef("shop", "a.jpg", etag="e1", sequencer="FF")))  # a value still wins
    (row,) = rows(engine)
    assert (row.status, row.sequencer) == ("ok", "FF".rjust(32, "0"))


def test_latest_view_has_the_table_columns_and_downgrade_restores_0002(engine: Engine) -> None:
    with engine.connect() as conn:
        table_columns = list(conn.execute(text("SELECT * FROM enrichments")).keys())
        shown = list(conn.execute(text("SELECT * FROM enrichments_latest")).keys())
    assert shown == [*table_columns, "rank_in_image"]
    write(engine, event_ok("a.jpg", "e1", SEQ1, T1, version="1.0.0"))
    write(engine, event_ok("a.jpg", "e1", None, T1, version="2.0.0"))
    try:
        _migrate(engine, "0002")
        assert latest(engine, "a.jpg")[1] == "1.0.0"  # 0002's view: the sequenced row first
    finally:
        _migrate(engine, "head")
    assert latest(engine, "a.jpg")[1] == "2.0.0"


def _migrate(engine: Engine, revision: str) -> None:
    url = engine.url.render_as_string(hide_password=False)
    with engine.begin() as connection:
        config = alembic_config(url)
        config.attributes["connection"] = connection
        if revision == "head":
            command.upgrade(config, revision)
        else:
            command.downgrade(config, revision)


def test_the_service_connections_run_without_jit_and_keep_the_urls_options(postgres_url: str) -> None:
    # JIT compiled for ~0.5 s before `enrich query --status failed` ran for 1 ms on a million rows.
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}options=-c%20work_mem%3D7MB"
    engine = make_engine(url, statement_timeout_s=5)
    try:
        with engine.connect() as conn:
            shown = [
                conn.execute(text(f"SHOW {name}")).scalar()
                for name in ("jit", "work_mem", "statement_timeout")
            ]
            assert shown == ["off", "7MB", "5s"]
    finally:
        engine.dispose()
