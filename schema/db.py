"""Engines and sessions, created on demand from a URL (never at import)."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.orm import Session, sessionmaker

# A database that stops answering without closing the connection (a partition, a failed-over host) would
# otherwise block a worker's batch loop until the kernel gives up on the socket, hours later: connecting
# gives up after 10 s, a dead peer is noticed within ~40 s by TCP keepalives, and the worker's statements are
# cancelled by the server past its limit (worker/runtime.py). Each ends as a connection error,
# which the worker retries without spending the images' attempts.
_POSTGRES_CONNECT_ARGS = {
    "connect_timeout": 10,
    "keepalives_idle": 20,
    "keepalives_interval": 5,
    "keepalives_count": 4,
    "tcp_user_timeout": 40_000,  # ms: unacknowledged data (a request sent into a partition)
}


def supported_url(text: str) -> URL:
    """The URL of a database the service can use: PostgreSQL or SQLite. `postgres://`, the scheme many
    hosting platforms hand out, is PostgreSQL; anything else is refused here with the two that work, rather
    than failing later on a missing driver or on PostgreSQL's connection options."""
    url = make_url(text)
    if url.drivername == "postgres":
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in ("postgresql", "sqlite"):
        raise ArgumentError(
            f"{url.get_backend_name()} is not supported: use postgresql+psycopg://USER:PASSWORD@HOST/DB "
            "or sqlite:///FILE"
        )
    return url


def make_engine(database_url: str, *, statement_timeout_s: float | None = None) -> Engine:
    """statement_timeout_s: the server cancels any statement of this engine that runs longer (None: no
    limit, for migrations and operators' queries)."""
    url = supported_url(database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"timeout": 30})

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):  # type: ignore[no-untyped-def]
            # WAL lets `enrich query` read while a run writes.
            cursor = dbapi_conn.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.close()

        return engine
    # executemany through psycopg's pipeline rather than SQLAlchemy's "insertmanyvalues" rewrite into one
    # long multi-row statement, which psycopg would have to parse again for every batch.
    # No JIT: the planner's cost for the latest-row subquery (evaluated per candidate row) crosses
    # jit_above_cost, and compiling took ~0.5 s of every `enrich query --status failed` that then ran
    # in 1 ms (docs/benchmarks.md). Every statement here is short; none gains from JIT.
    options = ["-c jit=off"]
    if isinstance(url.query.get("options"), str):
        options.insert(0, str(url.query["options"]))  # the URL's own (?options=...) are kept, not replaced
    if statement_timeout_s is not None:
        options.append(f"-c statement_timeout={int(statement_timeout_s * 1000)}")
    connect_args: dict[str, object] = {**_POSTGRES_CONNECT_ARGS, "options": " ".join(options)}
    return create_engine(
        url,
        connect_args=connect_args,
        pool_pre_ping=True,
        pool_size=5,
        max_overflow=5,
        pool_timeout=30,
        use_insertmanyvalues=False,
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)
