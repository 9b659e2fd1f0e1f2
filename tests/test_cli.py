"""The commands a user types: `enrich run`, `enrich query`, `enrich db upgrade`, `--help`."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from schema.results import FIELDS
from schema.settings import Settings
from tests.conftest import enrich_cli, sample_jpegs


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
    first = enrich_cli(settings, "db", "upgrade")
    second = enrich_cli(settings, "db", "upgrade")
    assert "revision 0002" in first.stdout and "revision 0002" in second.stdout
