"""The commands a user types: `enrich run`, `enrich query`, `enrich db upgrade`, `--help`."""

from __future__ import annotations

import base64
import csv
import io
import json
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path

import pytest
import redis
from alembic.script import ScriptDirectory
from kombu import Connection
from sqlalchemy import Engine

from ingest.publisher import JobPublisher
from schema.migrate import alembic_config, current_revision
from schema.queue import ref_from_message
from schema.results import FIELDS, ObjectRef, Status
from schema.settings import Settings
from tests.conftest import REDIS_URL, enrich_cli, sample_jpegs
from tests.test_repository import failed_result, ok_result, write


@pytest.fixture
def sqlite_settings(tmp_path: Path, random_bundle: Path) -> Settings:
    return Settings(
        database_url=f"sqlite:///{tmp_path / 'local.db'}",
        model_bundle=random_bundle,
        device="cpu",
        batch_size=8,
    )


def test_help_names_every_command(sqlite_settings: Settings) -> None:
    top = enrich_cli(sqlite_settings, "--help").stdout
    for command in ("run", "worker", "ingest", "query", "db", "train", "evaluate"):
        assert command in top
    ingest = enrich_cli(sqlite_settings, "ingest", "--help").stdout
    for command in ("webhook", "sqs", "backfill"):
        assert command in ingest


def test_run_a_folder_into_sqlite_then_query_json_csv_and_filters(
    sqlite_settings: Settings, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, data in enumerate(sample_jpegs(5)):
        (folder / f"p{i}.jpg").write_bytes(data)
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")

    run = enrich_cli(sqlite_settings, "run", str(folder))
    assert "6 images" in run.stderr and "failed_decode 1" in run.stderr and "ok 5" in run.stderr
    assert "p0.jpg" in run.stdout and "broken.jpg" in run.stdout  # the table of results

    lines = enrich_cli(sqlite_settings, "query", "--format", "json").stdout.splitlines()
    documents = {doc["key"]: doc for doc in map(json.loads, lines)}
    assert set(documents) == {f"p{i}.jpg" for i in range(5)} | {"broken.jpg"}
    good = documents["p0.jpg"]
    for name in ("bucket", "key", "status", "error", "caption", "model_version"):
        assert name in good
    for name in FIELDS:
        assert set(good[name]) == {"value", "confidence"}
        assert 0.0 <= good[name]["confidence"] <= 1.0
    assert good["status"] == "ok" and good["bucket"] == str(folder.resolve())
    assert documents["broken.jpg"]["status"] == "failed_decode" and documents["broken.jpg"]["error"]

    failed = enrich_cli(sqlite_settings, "query", "--status", "failed", "--format", "csv").stdout
    assert [row["key"] for row in csv.DictReader(io.StringIO(failed))] == ["broken.jpg"]
    article = good["articleType"]["value"]
    same = enrich_cli(
        sqlite_settings, "query", "--where", f"articleType={article}", "--format", "json"
    ).stdout
    assert good["key"] in same and all(
        json.loads(x)["articleType"]["value"] == article for x in same.splitlines()
    )
    assert enrich_cli(sqlite_settings, "query", "--since", "1h", "--format", "json").stdout.count("\n") == 6
    assert enrich_cli(sqlite_settings, "query", "--until", "1h", "--format", "json").stdout == ""

    bad = enrich_cli(sqlite_settings, "query", "--where", "colour", check=False)
    assert bad.returncode != 0 and "FIELD=VALUE" in bad.stderr


def test_db_upgrade_on_the_real_postgres_is_idempotent(settings: Settings) -> None:
    head = ScriptDirectory.from_config(alembic_config(settings.database_url)).get_current_head()
    first = enrich_cli(settings, "db", "upgrade")
    second = enrich_cli(settings, "db", "upgrade")
    assert f"revision {head}" in first.stdout and f"revision {head}" in second.stdout
    assert current_revision(settings.database_url) == head


def _said(stderr: str) -> str:
    """The words of an error, unwrapped from rich's box (it folds long lines at the terminal width)."""
    return " ".join(stderr.replace("│", " ").split())


def test_query_and_retry_refuse_unknown_statuses_and_times(sqlite_settings: Settings) -> None:
    enrich_cli(sqlite_settings, "db", "upgrade")
    # A typo matched no row and printed an empty table with exit 0, as if nothing had failed.
    for args in (["query", "--status", "okay"], ["retry", "--status", "ok"]):
        bad = enrich_cli(sqlite_settings, *args, check=False)
        said = _said(bad.stderr)
        assert bad.returncode == 2 and "'--status'" in said and "failed_fetch" in said, said
    for since in ("1w", "15m", "7d", "2026-11-01", "2026-11-01T12:00+01:00"):
        assert enrich_cli(sqlite_settings, "query", "--since", since, "--format", "json").stdout == ""
    # A time that is neither ISO nor a duration ended in a ValueError traceback.
    bad = enrich_cli(sqlite_settings, "query", "--since", "yesterday", check=False)
    said = _said(bad.stderr)
    assert bad.returncode == 2 and "Traceback" not in said, said
    assert "--since" in said and "'yesterday'" in said and "15m" in said


def test_retry_requeues_the_failed_version_with_its_stored_identity(
    settings: Settings, pg_engine: Engine
) -> None:
    older = ObjectRef("shop", "k.jpg", etag="e1", size=10, sequencer="0055AED6DCD90281E5")
    newer = ObjectRef("shop", "k.jpg", version_id="v2", etag="e2", size=12, sequencer="0055AED6DCD90281F0")
    write(pg_engine, replace(ok_result(older), last_modified=datetime(2026, 11, 1, tzinfo=UTC)))
    write(pg_engine, replace(failed_result(newer), status=Status.FAILED_FETCH))

    assert "queued 1 failed jobs" in enrich_cli(settings, "retry").stdout

    (raw,) = redis.Redis.from_url(REDIS_URL).lrange(settings.queue, 0, -1)
    (message,), _kwargs, _embed = json.loads(base64.b64decode(json.loads(raw)["body"]))
    queued = ref_from_message(message)
    # Without its sequencer the retried version's row lost its place, and the older one became latest.
    assert queued.sort_sequencer == newer.sort_sequencer
    assert (queued.object_version, queued.etag, queued.size) == ("v2", "e2", 12)


def test_status_reports_the_queue_and_the_table(settings: Settings, pg_engine: Engine) -> None:
    write(pg_engine, ok_result(ObjectRef("shop", "a.jpg", etag='"a"'), version="1.0.0"))
    write(
        pg_engine,
        ok_result(ObjectRef("shop", "a.jpg", etag='"a"'), version="2.0.0"),
        failed_result(ObjectRef("shop", "b.jpg", etag='"b"'), version="2.0.0"),
    )
    JobPublisher(settings).publish([ObjectRef("shop", f"q{i}.jpg", etag='"q"') for i in range(3)])
    # A consumer holding one message unacknowledged, as a worker's batch does.
    with Connection(settings.broker_url) as connection:
        held = connection.SimpleQueue(settings.queue).get(timeout=10)
        document = json.loads(enrich_cli(settings, "status", "--format", "json").stdout)
        table = enrich_cli(settings, "status").stdout
        held.ack()
    queue = document["queue"]
    assert (queue["name"], queue["waiting"], queue["held"]) == (settings.queue, 2, 1)
    # The one held, named as the workers' logs name it, and how long it has been held.
    [longest] = queue["longest_held"]
    assert longest["job"] == "s3://shop/q0.jpg" and 0 <= longest["held_s"] < 60
    assert document["written_since"]["rows"] == 3
    assert document["models"] == [
        {"model_name": "enrich", "model_version": "2.0.0", "rows": {"failed_decode": 1, "ok": 1}},
        {"model_name": "enrich", "model_version": "1.0.0", "rows": {"ok": 1}},
    ]
    assert "2 waiting" in table and "1 held" in table and "s3://shop/q0.jpg" in table
    assert "failed_decode" in table
    later = json.loads(enrich_cli(settings, "status", "--since", "2999-01-01", "--format", "json").stdout)
    assert later["written_since"] == {"since": "2999-01-01T00:00:00+00:00", "rows": 0, "latest": None}
    assert enrich_cli(settings, "status", "--format", "csv", check=False).returncode == 2
