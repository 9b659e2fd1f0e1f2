"""One source of truth: every ENRICH_* name and value the deploy files set is a field of
schema.settings.Settings that parses, the queue KEDA watches is the queue the code uses, and the commands
the containers run exist in the `enrich` CLI."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pydantic
import pytest
import typer.main
import yaml

from deploy import scaling
from deploy.lock import INGEST_IMAGE_COMMANDS
from schema.settings import DEFAULT_QUEUE, Settings

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
COMPOSE = REPO / "docker-compose.yml"
DOCKERFILES = sorted((REPO / "deploy").glob("Dockerfile.*[!e]"))  # not the .dockerignore files
OVERLAYS = ("cpu", "gpu", "aws-sqs")
ENV_NAME = re.compile(r"\bENRICH_[A-Z0-9_]+\b")
SETTINGS_VARS = {f"ENRICH_{name.upper()}" for name in Settings.model_fields}


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return doc


@pytest.fixture(scope="module")
def manifests() -> dict[str, list[dict[str, Any]]]:
    """The rendered overlays (what `kubectl apply -k` would send)."""
    if shutil.which("kubectl") is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is required in CI to render deploy/k8s (see docs/deploy.md, 'CI')")
        pytest.skip("kubectl not installed")
    return {o: scaling.render(K8S / "overlays" / o) for o in OVERLAYS}


def _env_maps(manifests: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, str]]]:
    """(where, {ENRICH_*: value}) for each environment a container gets: ConfigMap data + literal env."""
    for overlay, objs in manifests.items():
        config = {}
        for cm in (o for o in objs if o.get("kind") == "ConfigMap"):
            config.update(cm.get("data", {}))
        yield f"{overlay}/ConfigMap", config
        for obj in (o for o in objs if o.get("kind") in ("Deployment", "Job")):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                literal = {e["name"]: e["value"] for e in c.get("env", []) if "value" in e}
                yield f"{overlay}/{obj['metadata']['name']}", {**config, **literal}
    for name, service in _compose()["services"].items():
        yield f"compose/{name}", {k: str(v) for k, v in (service.get("environment") or {}).items()}


def test_every_enrich_name_in_deploy_files_is_a_setting() -> None:
    """A textual sweep: a name in a comment, a kustomize literal, a patch or a Dockerfile ENV counts too."""
    files = [
        *K8S.rglob("*.yaml"),
        COMPOSE,
        *DOCKERFILES,
        REPO / "deploy" / "minio-init.sh",
        REPO / "deploy" / "k8s" / "secrets.example.env",
    ]
    unknown = {
        (path.relative_to(REPO).as_posix(), name)
        for path in files
        for name in ENV_NAME.findall(path.read_text())
        if name not in SETTINGS_VARS
    }
    assert not unknown, f"ENRICH_* names that schema/settings.py does not define: {sorted(unknown)}"


def test_secret_keys_are_settings(manifests: dict[str, list[dict[str, Any]]]) -> None:
    for _overlay, objs in manifests.items():
        for obj in (o for o in objs if o.get("kind") in ("Deployment", "Job")):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                for env in c.get("env", []):
                    assert env["name"] in SETTINGS_VARS or not env["name"].startswith("ENRICH_")


def test_every_environment_parses_as_settings(
    manifests: dict[str, list[dict[str, Any]]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The values, not just the names: each container's ENRICH_* environment builds a valid Settings."""
    count = 0
    for where, env in _env_maps(manifests):
        with monkeypatch.context() as m:
            for name in list(SETTINGS_VARS):
                m.delenv(name, raising=False)
            for name, value in env.items():
                if name.startswith("ENRICH_"):
                    m.setenv(name, value)
            try:
                settings = Settings()
            except pydantic.ValidationError as exc:
                pytest.fail(f"{where}: {exc}")
            assert settings.queue == DEFAULT_QUEUE, where
            count += 1
    assert count >= 10


def test_queue_name_is_the_one_list_keda_watches(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """Celery's Redis transport keeps a queue in a list named after it: KEDA must read that key."""
    for overlay, objs in manifests.items():
        configured = {cm["data"]["ENRICH_QUEUE"] for cm in objs if cm.get("kind") == "ConfigMap"}
        assert configured == {DEFAULT_QUEUE}, overlay
        lists = {
            t["metadata"]["listName"]
            for so in objs
            if so.get("kind") == "ScaledObject"
            for t in so["spec"]["triggers"]
            if t["type"] == "redis"
        }
        assert lists == {DEFAULT_QUEUE}, overlay


def test_compose_uses_the_default_queue() -> None:
    compose_queues = {
        s["environment"]["ENRICH_QUEUE"]
        for s in _compose()["services"].values()
        if "ENRICH_QUEUE" in (s.get("environment") or {})
    }
    assert compose_queues == {DEFAULT_QUEUE}


def test_keda_reads_the_broker_database(manifests: dict[str, list[dict[str, Any]]]) -> None:
    """The list lives in the Redis database of ENRICH_BROKER_URL: the trigger's databaseIndex must match."""
    broker_dbs = {
        urlsplit(s["environment"]["ENRICH_BROKER_URL"]).path.strip("/") or "0"
        for s in _compose()["services"].values()
        if "ENRICH_BROKER_URL" in (s.get("environment") or {})
    }
    indexes = {
        t["metadata"].get("databaseIndex", "0")
        for objs in manifests.values()
        for so in objs
        if so.get("kind") == "ScaledObject"
        for t in so["spec"]["triggers"]
        if t["type"] == "redis"
    }
    assert broker_dbs == indexes == {urlsplit(Settings.model_fields["broker_url"].default).path.strip("/")}


def test_ports_agree(manifests: dict[str, list[dict[str, Any]]]) -> None:
    defaults = Settings.model_fields
    for overlay, objs in manifests.items():
        (cm,) = [o for o in objs if o.get("kind") == "ConfigMap"] or [{"data": {}}]
        if "ENRICH_WEBHOOK_PORT" in cm["data"]:
            assert int(cm["data"]["ENRICH_WEBHOOK_PORT"]) == defaults["webhook_port"].default, overlay
            assert int(cm["data"]["ENRICH_METRICS_PORT"]) == defaults["metrics_port"].default, overlay
    services = _compose()["services"]
    assert services["ingest"]["ports"] == [
        f"127.0.0.1:8080:{services['ingest']['environment']['ENRICH_WEBHOOK_PORT']}"
    ]
    for name in ("worker", "worker-cpu"):
        port = services[name]["environment"]["ENRICH_METRICS_PORT"]
        assert services[name]["ports"][0].endswith(f":{port}")
        assert port in " ".join(services[name]["healthcheck"]["test"])


def _resolves(args: list[str]) -> bool:
    """True when ARGS name a leaf command of the `enrich` CLI (options after it are not checked).

    Typer vendors its own click, so groups are recognised by their `commands` mapping, not by type."""
    from enrich.cli import app

    node: Any = typer.main.get_command(app)
    for word in args:
        commands = getattr(node, "commands", None)
        if word.startswith("-") or commands is None:
            break
        if word not in commands:
            return False
        node = commands[word]
    return getattr(node, "commands", None) is None


def _container_commands(
    manifests: dict[str, list[dict[str, Any]]],
) -> Iterator[tuple[str, str, list[str]]]:
    """(where, image, args after `enrich`) for every container of ours."""
    for overlay, objs in manifests.items():
        for obj in (o for o in objs if o.get("kind") in ("Deployment", "Job")):
            for c in obj["spec"]["template"]["spec"]["containers"]:
                yield f"{overlay}/{obj['metadata']['name']}", c["image"], c["args"]
    for name, service in _compose()["services"].items():
        image = str(service.get("image", ""))
        if not image.startswith("enrich-"):
            continue
        entry = service.get("entrypoint") or ["tini", "--", "enrich"]
        command = [*entry[entry.index("enrich") + 1 :], *(service.get("command") or [])]
        yield f"compose/{name}", image, command
    for dockerfile in DOCKERFILES:
        (cmd,) = re.findall(r"^CMD (\[.*\])$", dockerfile.read_text(), flags=re.M)
        yield dockerfile.name, f"enrich-{dockerfile.suffix.lstrip('.')}", yaml.safe_load(cmd)


def test_container_commands_exist_in_the_cli(manifests: dict[str, list[dict[str, Any]]]) -> None:
    seen = set()
    for where, image, args in _container_commands(manifests):
        assert _resolves(args), f"{where}: `enrich {' '.join(args)}` is not a command of enrich.cli"
        command = " ".join(w for w in args[:2] if not w.startswith("-"))
        seen.add(command)
        if "enrich-ingest" in image:
            # The slim image has no torch: only the commands tests/test_deploy_images.py checks run there.
            assert command in INGEST_IMAGE_COMMANDS, f"{where}: `enrich {command}` needs the worker image"
        else:
            assert "enrich-worker" in image and command == "worker", where
    assert {"worker", "ingest webhook", "ingest sqs", "db upgrade", "query"} <= seen


def test_dockerfile_entrypoints_run_the_enrich_script() -> None:
    for dockerfile in DOCKERFILES:
        text = dockerfile.read_text()
        assert 'ENTRYPOINT ["tini", "--", "enrich"]' in text, dockerfile.name
    # The console script the images call is the one pyproject.toml declares.
    import tomllib

    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["enrich"] == "enrich.cli:main"
