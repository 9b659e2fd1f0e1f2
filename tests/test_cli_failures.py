"""What `enrich` says when its surroundings are wrong, and how `enrich run` ends odd files: one line and
exit status 2 for a database, bucket or broker that is down or misnamed (never a traceback); a recorded
failure with its reason for each file that cannot be read."""

from __future__ import annotations

import json
import os
import uuid
from dataclasses import replace
from pathlib import Path

import psycopg
import pytest
import redis
from sqlalchemy import Engine

from schema.results import ObjectRef, Status
from schema.settings import Settings
from tests.conftest import POSTGRES_ADMIN_URL, REDIS_URL, enrich_cli, sample_jpegs
from tests.test_repository import failed_result, write
from worker.storage import FetchError, LocalStore


def _said(stderr: str) -> str:
    """The words of an error, unwrapped from rich's box (it folds long lines at the terminal width)."""
    return " ".join(stderr.replace("│", " ").split())


def _fails_in_one_line(settings: Settings, *args: str) -> str:
    result = enrich_cli(settings, *args, check=False)
    said = _said(result.stderr)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    return said


def test_a_database_that_is_down_missing_or_unmigrated_is_one_line(tmp_path: Path, postgres_url: str) -> None:
    closed_port = Settings(database_url="postgresql+psycopg://postgres@127.0.0.1:1/enrich")
    assert "error: database:" in _fails_in_one_line(closed_port, "query")
    assert "Connection refused" in _fails_in_one_line(closed_port, "query")

    no_database = Settings(database_url=postgres_url.rsplit("/", 1)[0] + "/enrich_no_such_database")
    assert 'database "enrich_no_such_database" does not exist' in _fails_in_one_line(no_database, "query")

    unmigrated = Settings(database_url=f"sqlite:///{tmp_path / 'empty.db'}")
    assert "run `enrich db upgrade` first" in _fails_in_one_line(unmigrated, "query", "--status", "failed")

    # A deployment rolled back over a database that a newer enrich migrated: its migration job said
    # "Can't locate revision identified by '0099'" at the end of a traceback.
    name = f"enrich_newer_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    try:
        newer = Settings(database_url=postgres_url.rsplit("/", 1)[0] + f"/{name}")
        enrich_cli(newer, "db", "upgrade")
        with psycopg.connect(POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}", autocommit=True) as db:
            db.execute("UPDATE alembic_version SET version_num = '0099'")
        said = _fails_in_one_line(newer, "db", "upgrade")
        assert "database is at migration 0099, which this enrich does not know" in said, said
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def test_a_database_url_of_an_unsupported_kind_is_one_line_and_postgres_scheme_is_postgresql(
    postgres_url: str,
) -> None:
    # A MySQL URL ended in a ModuleNotFoundError traceback (no driver; PostgreSQL's connect options either).
    mysql = Settings(database_url="mysql://root@127.0.0.1/test")
    said = _fails_in_one_line(mysql, "query")
    assert "ENRICH_DATABASE_URL: mysql is not supported: use postgresql+psycopg://" in said
    # postgres://, as hosting platforms write it, is PostgreSQL ("Can't load plugin" before).
    heroku_style = Settings(database_url=postgres_url.replace("postgresql+psycopg://", "postgres://", 1))
    assert heroku_style.database_url.startswith("postgres://")
    assert enrich_cli(heroku_style, "db", "upgrade").returncode == 0


def test_a_missing_bucket_an_s3_server_down_and_a_bad_url_are_one_line(settings: Settings) -> None:
    said = _fails_in_one_line(settings, "ingest", "backfill", "s3://enrich-no-such-bucket/photos")
    assert "S3 NoSuchBucket" in said
    down = settings.model_copy(update={"s3_endpoint_url": "http://127.0.0.1:1"})
    assert "error: S3: Could not connect" in _fails_in_one_line(down, "ingest", "backfill", "s3://shop")
    assert "not an s3:// URL" in _fails_in_one_line(settings, "ingest", "backfill", "shop/photos")


def test_a_broker_that_is_down_is_one_line(settings: Settings, pg_engine: Engine) -> None:
    write(pg_engine, failed_result(ObjectRef("shop", "a.jpg", etag="e1")))
    down = settings.model_copy(update={"broker_url": "redis://127.0.0.1:1/0"})
    assert "error: broker:" in _fails_in_one_line(down, "retry")
    assert "error: broker:" in _fails_in_one_line(
        down, "ingest", "backfill", "s3://shop", "--unless-queued", "5"
    )


def test_run_on_a_missing_folder_refuses_it_and_creates_no_database(
    tmp_path: Path, random_bundle: Path
) -> None:
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'local.db'}", model_bundle=random_bundle, device="cpu"
    )
    said = _fails_in_one_line(settings, "run", str(tmp_path / "no-such-folder"))
    assert "neither a folder nor an s3:// prefix" in said
    assert not (tmp_path / "local.db").exists()


def test_limits_below_their_range_are_refused(tmp_path: Path) -> None:
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'local.db'}")
    # A negative limit returned every row.
    assert "--limit" in _fails_in_one_line(settings, "query", "--limit", "-1")
    assert "--limit" in _fails_in_one_line(settings, "retry", "--limit", "0")


def test_retry_names_a_local_folder_instead_of_queueing_it(settings: Settings, pg_engine: Engine) -> None:
    # `enrich run` records a folder's absolute path as the bucket; queued, a worker would look for an S3
    # bucket of that name and fail the job again.
    write(pg_engine, failed_result(ObjectRef("/srv/photos", "a.jpg", etag="e1")))
    write(
        pg_engine, replace(failed_result(ObjectRef("shop", "b.jpg", etag="e2")), status=Status.FAILED_FETCH)
    )
    said = _said(enrich_cli(settings, "retry").stdout)
    assert "queued 1 failed jobs" in said and "enrich run /srv/photos" in said
    assert redis.Redis.from_url(REDIS_URL).llen(settings.queue) == 1


def test_run_records_why_each_odd_file_could_not_be_read(tmp_path: Path, random_bundle: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    (folder / "good.jpg").write_bytes(sample_jpegs(1)[0])
    (folder / "gone.jpg").symlink_to(folder / "deleted.jpg")  # a dangling link ended the whole run
    os.mkfifo(folder / "pipe.jpg")  # a FIFO blocked its fetching process until the fetch timeout
    # A name that is not UTF-8 cannot be a row (the key is not text): it is named on the terminal.
    (Path(os.fsdecode(bytes(folder) + b"/latin\xe9.jpg"))).write_bytes(sample_jpegs(1)[0])
    settings = Settings(
        database_url=f"sqlite:///{tmp_path / 'local.db'}",
        model_bundle=random_bundle,
        device="cpu",
        batch_size=4,
    )

    run = enrich_cli(settings, "run", str(folder), "--format", "json")
    said = _said(run.stderr)
    assert "4 images" in said and "ok 1" in said and "failed_fetch 2" in said and "unrecordable 1" in said, (
        said
    )
    assert "not recorded 'latin\\udce9.jpg'" in said
    rows = {row["key"]: row for row in map(json.loads, run.stdout.splitlines())}
    assert rows["gone.jpg"]["status"] == "failed_fetch" and "no such file" in rows["gone.jpg"]["error"]
    assert rows["pipe.jpg"]["status"] == "failed_fetch" and "not a regular file" in rows["pipe.jpg"]["error"]


def test_a_file_rewritten_after_listing_is_not_read_under_its_listed_version(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"first bytes")
    store = LocalStore(tmp_path)
    (ref,) = store.list()
    (tmp_path / "a.jpg").write_bytes(b"other, longer bytes")
    with pytest.raises(FetchError, match="changed since it was listed"):
        store.get(ref, max_bytes=1 << 20)
    (fresh,) = store.list()
    assert store.get(fresh, max_bytes=1 << 20).data == b"other, longer bytes"
