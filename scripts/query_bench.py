"""How fast `enrich query` answers on a large table: fills a scratch Postgres database and times its SQL.

    .venv/bin/python scripts/query_bench.py [--rows 1000000] [--admin-url postgresql://postgres@127.0.0.1/postgres]

Rows: one bucket, keys `catalogue/<n>.jpg` with 10 % of them holding a second object version, 2 % failures,
one article type in seven `Tshirts` (`INSERT ... SELECT generate_series`, then `ANALYZE`). Each query is the
statement `enrich query` sends (schema.repository.build_query), timed in a warm session, median of 5. The
"before 2026-12-03" column runs the same filters as they were then: a `LIKE` for the prefix, no code-point
index (dropped inside a transaction that is rolled back) and JIT on, the server's default.
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg
from sqlalchemy import Select, text
from sqlalchemy.orm import Session

from schema.db import make_engine
from schema.migrate import upgrade
from schema.repository import EnrichmentQuery, build_query
from schema.tables import Enrichment

DATABASE = "enrich_query_bench"
QUERIES = {
    "(no filter)": EnrichmentQuery(),
    "--status failed": EnrichmentQuery(status="failed"),
    "--prefix catalogue/12345": EnrichmentQuery(key_prefix="catalogue/12345"),
    "--prefix nothing/": EnrichmentQuery(key_prefix="nothing/"),
    "--prefix catalogue/1 --status failed": EnrichmentQuery(key_prefix="catalogue/1", status="failed"),
    "--where articleType=Tshirts --min-confidence 0.5": EnrichmentQuery(
        equals={"articleType": "Tshirts"}, min_confidence=0.5
    ),
}
FILL = """
INSERT INTO enrichments (bucket, key, object_version, etag, sequencer, object_last_modified, content_sha256,
    status, attempts, gender, gender_confidence, base_colour, base_colour_confidence, article_type,
    article_type_confidence, caption, model_name, model_version, updated_at, created_at)
SELECT 'shop', 'catalogue/' || (g % :keys) || '.jpg', 'v' || (g / :keys), 'e' || g, lpad(g::text, 20, '0'),
    now() - (:rows - g) * interval '1 second', md5(g::text),
    CASE WHEN g % 50 = 0 THEN 'failed_decode' ELSE 'ok' END, 1, 'Men', 0.9, 'Black', 0.8,
    CASE WHEN g % 7 = 0 THEN 'Tshirts' ELSE 'Shirts' END, 0.7, 'Nike Men Black Tshirt',
    'enrich-lite2', '1.0.0',
    now() - (:rows - g) * interval '1 second', now()
FROM generate_series(0, :rows - 1) g
"""


def median_ms(session: Session, statement: Select[Enrichment]) -> tuple[int, float]:
    times, found = [], 0
    for _ in range(5):
        start = time.perf_counter()
        found = len(list(session.scalars(statement)))
        times.append(time.perf_counter() - start)
    return found, statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--admin-url", default="postgresql://postgres@127.0.0.1:5432/postgres")
    args = parser.parse_args()
    with psycopg.connect(args.admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{DATABASE}" WITH (FORCE)')
        admin.execute(f'CREATE DATABASE "{DATABASE}"')
    url = args.admin_url.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{DATABASE}"
    upgrade(url)
    engine = make_engine(url)
    start = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(text(FILL), {"rows": args.rows, "keys": args.rows * 9 // 10})
        conn.execute(text("ANALYZE enrichments"))
    print(f"{args.rows:,} rows written in {time.perf_counter() - start:.0f} s\n")
    print("| `enrich query ... --limit 20` | rows | before 2026-12-03 | now |\n| --- | --- | --- | --- |")
    for name, query in QUERIES.items():
        with engine.connect() as conn, conn.begin():
            conn.execute(text("DROP INDEX ix_enrichments_key_codepoint"))
            conn.execute(text("SET LOCAL jit = on"))
            found_before, before = median_ms(Session(conn), build_query(query, "other").limit(20))
            conn.rollback()
        with Session(engine) as session:
            found, now = median_ms(session, build_query(query).limit(20))
        assert found == found_before, (name, found_before, found)
        print(f"| `{name}` | {found} | {before:,.1f} ms | {now:,.1f} ms |", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
