"""The table contract on the real Postgres (and the SQLite default of `enrich run`)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, func, select, text
from sqlalchemy.orm import Session

from schema.db import make_engine
from schema.migrate import upgrade
from schema.repository import EnrichmentQuery, already_enriched, query_enrichments, upsert_enrichments
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
    # '%' and '_' in a prefix are literal characters, not SQL wildcards.
    assert keys(key_prefix="men/bad_%") == ["men/bad_%.jpg"]
    # A hostile value is a bound parameter, never SQL.
    assert keys(equals={"articleType": "x' OR '1'='1"}) == []
    with pytest.raises(ValueError, match="unknown field"):
        keys(equals={"colour; DROP TABLE enrichments": "x"})
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(Enrichment)) == 4


def test_already_enriched_names_only_ok_rows_of_that_model_version(engine: Engine) -> None:
    a, b, c = (ObjectRef("shop", k, etag="e") for k in ("a.jpg", "b.jpg", "c.jpg"))
    write(engine, ok_result(a), failed_result(b), ok_result(c, version="0.9.0"))
    with Session(engine) as session:
        assert already_enriched(session=session, refs=[a, b, c], model_version="1.0.0") == {a}
