"""Fixtures for the real services: Postgres, Redis, an S3+SQS API server (moto) and worker processes."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import boto3
import psycopg
import pytest
import redis
from moto.server import ThreadedMotoServer
from sqlalchemy import Engine, text

from enrich.stack import WorkerProcess, free_port
from schema.db import make_engine
from schema.migrate import upgrade
from schema.settings import Settings, settings_env

T = TypeVar("T")
StartWorker = Callable[..., WorkerProcess]  # (settings, *extra worker CLI args) -> a running worker
ServeWebhook = Callable[[Settings], str]  # settings -> the base URL of a running webhook

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
FASHION_SMALL = SHARED / "datasets" / "fashion-small"
POSTGRES_ADMIN_URL = os.environ.get("ENRICH_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("ENRICH_TEST_REDIS", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A throwaway database on the real server, migrated with Alembic, dropped at the end."""
    name = f"enrich_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + f"/{name}"
    upgrade(url)
    yield url
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def pg_engine(postgres_url: str) -> Iterator[Engine]:
    engine = make_engine(postgres_url)
    with engine.begin() as conn:
        conn.execute(text("TRUNCATE enrichments RESTART IDENTITY"))
    yield engine
    engine.dispose()


@pytest.fixture
def queue_name() -> Iterator[str]:
    """A queue (Redis list) of this test alone, removed afterwards."""
    name = f"enrich-test-{uuid.uuid4().hex[:8]}"
    yield name
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(name)
    client.close()


@pytest.fixture(scope="session")
def moto_server() -> Iterator[str]:
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    yield f"http://127.0.0.1:{port}"
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _fake_aws_credentials() -> None:
    # moto accepts any credentials; set them so boto3 never looks for real ones.
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")


@pytest.fixture
def bucket(moto_server: str) -> str:
    name = f"images-{uuid.uuid4().hex[:8]}"
    s3_client(moto_server).create_bucket(Bucket=name)
    return name


def s3_client(endpoint: str):  # type: ignore[no-untyped-def]
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


@pytest.fixture(scope="session")
def random_bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from worker.model.random_bundle import write_random_bundle

    return write_random_bundle(tmp_path_factory.mktemp("bundle") / "random")


@pytest.fixture
def settings(
    postgres_url: str, pg_engine: Engine, queue_name: str, moto_server: str, random_bundle: Path
) -> Settings:
    return Settings(
        database_url=postgres_url,
        broker_url=REDIS_URL,
        queue=queue_name,
        s3_endpoint_url=moto_server,
        sqs_endpoint_url=moto_server,
        model_bundle=random_bundle,
        device="cpu",
        batch_size=4,
        max_wait_ms=300,
        visibility_timeout_s=60,
        fetch_threads=4,
        metrics_port=0,
    )


@pytest.fixture
def start_worker() -> Iterator[StartWorker]:
    workers: list[WorkerProcess] = []

    def start(settings: Settings, *extra: str) -> WorkerProcess:
        worker = WorkerProcess(settings, *extra)
        workers.append(worker)
        return worker

    yield start
    for worker in workers:
        worker.stop()


def wait_for(
    predicate: Callable[[], T], timeout: float = 60.0, interval: float = 0.25, what: str = "condition"
) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def enrich_cli(settings: Settings, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Runs `enrich ARGS` as a user would, in a child process that reads `settings` from its environment."""
    return subprocess.run(
        [sys.executable, "-m", "enrich.cli", *args],
        env=settings_env(settings),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=check,
    )


def sample_jpegs(n: int) -> list[bytes]:
    """Real catalogue photos (60x80 JPEGs) from the shared dataset."""
    paths = sorted((FASHION_SMALL / "images").glob("*.jpg"))[:n]
    return [p.read_bytes() for p in paths]


@pytest.fixture
def serve_webhook() -> Iterator[ServeWebhook]:
    """Serves the real webhook app with uvicorn on a loopback port; returns its base URL."""
    import threading

    import uvicorn

    from ingest.publisher import JobPublisher
    from ingest.webhook import make_webhook_app

    servers: list[tuple[uvicorn.Server, threading.Thread]] = []

    def serve(settings: Settings) -> str:
        port = free_port()
        app = make_webhook_app(settings, JobPublisher(settings))
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        wait_for(lambda: server.started, timeout=10, what="webhook start")
        servers.append((server, thread))
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(timeout=10)
