"""Settings as an operator writes them in the environment: lists without JSON, nonsense refused clearly."""

from __future__ import annotations

import subprocess
import sys

import pytest
from pydantic import ValidationError

from schema.settings import Settings, settings_env
from tests.conftest import REPO


@pytest.mark.parametrize(
    ("raw", "buckets"),
    [
        ("uploads", ["uploads"]),
        ("uploads, photos ,", ["uploads", "photos"]),
        ('["uploads", "photos"]', ["uploads", "photos"]),
        ("", []),
    ],
)
def test_allowed_buckets_from_a_comma_separated_or_json_list(
    monkeypatch: pytest.MonkeyPatch, raw: str, buckets: list[str]
) -> None:
    monkeypatch.setenv("ENRICH_ALLOWED_BUCKETS", raw)
    assert Settings().allowed_buckets == buckets


def test_allowed_buckets_survive_the_environment_of_a_child_process(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in settings_env(Settings(allowed_buckets=["uploads", "a,b"])).items():
        monkeypatch.setenv(name, value)
    assert Settings().allowed_buckets == ["uploads", "a,b"]  # JSON, so a comma inside a name is kept


def test_broken_json_for_allowed_buckets_says_what_to_write(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENRICH_ALLOWED_BUCKETS", '["uploads"')
    with pytest.raises(ValidationError, match=r"ENRICH_ALLOWED_BUCKETS.*not a JSON list.*comma-separated"):
        Settings()


@pytest.mark.parametrize(
    "name", ["batch_size", "visibility_timeout_s", "max_attempts", "worker_processes", "stall_limit_s"]
)
@pytest.mark.parametrize("value", ["0", "-1"])
def test_counts_below_one_are_refused_by_name(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(f"ENRICH_{name.upper()}", value)
    with pytest.raises(ValidationError, match=f"ENRICH_{name.upper()}={value} must be at least 1"):
        Settings()


@pytest.mark.parametrize("queue", ["", "  "])
def test_an_empty_queue_name_is_refused(queue: str) -> None:
    with pytest.raises(ValidationError, match="ENRICH_QUEUE must name the queue"):
        Settings(queue=queue)


def test_the_defaults_and_one_of_each_are_valid() -> None:
    Settings()
    Settings(batch_size=1, visibility_timeout_s=1, max_attempts=1, worker_processes=1, queue="q")


def test_the_cli_names_each_bad_variable_without_a_traceback() -> None:
    env = settings_env(Settings(database_url="sqlite://"))
    env |= {"ENRICH_ALLOWED_BUCKETS": "uploads", "ENRICH_BATCH_SIZE": "0", "ENRICH_MAX_ATTEMPTS": "many"}
    result = subprocess.run(
        [sys.executable, "-m", "enrich.cli", "query"],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    said = " ".join(result.stderr.split())
    assert result.returncode == 2 and "Traceback" not in said, said
    assert "ENRICH_BATCH_SIZE=0 must be at least 1" in said
    assert "ENRICH_MAX_ATTEMPTS: Input should be a valid integer" in said
    assert "ALLOWED_BUCKETS" not in said  # a plain bucket name is fine
