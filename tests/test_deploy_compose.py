"""docker-compose.yml validates against the Compose Specification schema (../shared/reference) and wires the
stack in the right order. Nothing here needs a Docker engine; docs/deploy.md says what was not run."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
SCHEMA = REPO.parent / "shared" / "reference" / "compose-spec.json"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, dict[str, Any]]:
    svc: dict[str, dict[str, Any]] = compose["services"]
    return svc


def test_validates_against_the_compose_spec(compose: dict[str, Any]) -> None:
    assert SCHEMA.is_file(), f"{SCHEMA} missing: CI needs ../shared beside the repository"
    schema = json.loads(SCHEMA.read_text())
    validator = jsonschema.Draft7Validator(schema)
    errors = sorted(validator.iter_errors(compose), key=str)
    assert not errors, "; ".join(f"{list(e.path)}: {e.message}" for e in errors)
    bad = {
        **compose,
        "services": {**compose["services"], "redis": {**compose["services"]["redis"], "helthcheck": {}}},
    }
    assert list(validator.iter_errors(bad)), "negative control: a misspelt key must fail"


def test_docker_compose_config_when_available() -> None:
    """`docker compose config` is the authoritative parser; it needs no engine. Skipped where absent."""
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode:
        pytest.skip("docker compose plugin not installed")
    for profile in ("cpu", "gpu"):
        subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), "--profile", profile, "config", "--quiet"], check=True
        )


def test_the_stack_is_complete(services: dict[str, dict[str, Any]]) -> None:
    assert {
        "minio",
        "minio-init",
        "redis",
        "postgres",
        "migrate",
        "ingest",
        "worker",
        "worker-cpu",
    } <= services.keys()


def test_depends_on_conditions(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        for dep, rule in (service.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            condition = rule["condition"]
            if condition == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits for {dep}'s health, which has no healthcheck"
                )
            elif condition == "service_completed_successfully":
                assert services[dep].get("restart") == "no", f"{dep} is awaited as one-shot but restarts"
    for name in ("ingest", "worker", "worker-cpu", "query"):
        assert services[name]["depends_on"]["migrate"]["condition"] == "service_completed_successfully", name
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["minio-init"]["depends_on"] == {
        "minio": {"condition": "service_healthy"},
        "ingest": {"condition": "service_healthy"},
    }


def test_long_running_services_have_healthchecks(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if service.get("restart") == "unless-stopped":
            assert service.get("healthcheck", {}).get("test"), name


def test_gpu_and_cpu_workers(services: dict[str, dict[str, Any]]) -> None:
    gpu, cpu = services["worker"], services["worker-cpu"]
    assert gpu["profiles"] == ["gpu"] and cpu["profiles"] == ["cpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert "deploy" not in cpu
    assert gpu["environment"]["ENRICH_DEVICE"] == "cuda" and cpu["environment"]["ENRICH_DEVICE"] == "cpu"
    for worker in (gpu, cpu):
        # Warm shutdown budget, the same as the Kubernetes worker's terminationGracePeriodSeconds.
        assert worker["stop_grace_period"] == "180s"
        assert worker["build"]["dockerfile"] == "deploy/Dockerfile.worker"


def test_builds_point_at_files_that_exist(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        if "build" in service:
            assert (REPO / service["build"]["context"] / service["build"]["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (REPO / source).exists(), f"{name} mounts missing {source}"


def test_minio_webhook_points_at_ingest(services: dict[str, dict[str, Any]]) -> None:
    init = services["minio-init"]["environment"]
    ingest = services["ingest"]["environment"]
    assert init["WEBHOOK_ENDPOINT"] == f"http://ingest:{ingest['ENRICH_WEBHOOK_PORT']}/events"
    # MinIO sends auth_token as "Authorization: Bearer <token>", which the webhook compares to its secret.
    assert init["ENRICH_WEBHOOK_SECRET"] == ingest["ENRICH_WEBHOOK_SECRET"]
    assert init["MINIO_ROOT_USER"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert init["MINIO_ROOT_PASSWORD"] == services["minio"]["environment"]["MINIO_ROOT_PASSWORD"]
    assert ingest["ENRICH_S3_ACCESS_KEY_ID"] == services["minio"]["environment"]["MINIO_ROOT_USER"]
    assert json.loads(ingest["ENRICH_ALLOWED_BUCKETS"]) == [init["MINIO_BUCKET"]]
    assert ingest["ENRICH_WEBHOOK_HOST"] == "0.0.0.0"  # the default 127.0.0.1 is unreachable from minio


def test_minio_init_script() -> None:
    script = REPO / "deploy" / "minio-init.sh"
    if shutil.which("sh"):
        subprocess.run(["sh", "-n", str(script)], check=True)
    text = script.read_text()
    assert "notify_webhook:${TARGET_ID}" in text and 'ARN="arn:minio:sqs::${TARGET_ID}:webhook"' in text
    assert "mc event add" in text and "--event put" in text and "auth_token=" in text


def test_images_are_pinned(services: dict[str, dict[str, Any]]) -> None:
    for name, service in services.items():
        image = service.get("image", "")
        if image.startswith("enrich-"):
            continue
        _, _, tag = image.partition(":")
        assert tag and tag != "latest" and any(ch.isdigit() for ch in tag), f"{name}: {image} is not pinned"
