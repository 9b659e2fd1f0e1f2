"""deploy/k8s renders with kustomize and validates offline: core kinds with kubernetes-validate, KEDA objects
against the KEDA CRD schemas in ../shared/reference, and the cross-object references line up."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from deploy import scaling

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "deploy" / "k8s"
REFERENCE = REPO.parent / "shared" / "reference"
OVERLAYS = ("cpu", "gpu", "aws-sqs")
# Oldest and newest Kubernetes minor versions the core objects are checked against.
K8S_VERSIONS = ("1.29.0", kubernetes_validate.latest_version())
CRD_FILES = {
    "ScaledObject": "keda-crd-keda.sh_scaledobjects.yaml",
    "TriggerAuthentication": "keda-crd-keda.sh_triggerauthentications.yaml",
    "ScaledJob": "keda-crd-keda.sh_scaledjobs.yaml",
}
NOT_CORE_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is required in CI to render deploy/k8s (see docs/deploy.md, 'CI')")
        pytest.skip("kubectl not installed")
    return exe


def render(target: Path) -> list[dict[str, Any]]:
    _kubectl()
    return scaling.render(target)


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    return {name: render(K8S / "overlays" / name) for name in OVERLAYS}


def _objects(rendered: dict[str, list[dict[str, Any]]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for overlay, objs in rendered.items():
        for obj in objs:
            yield overlay, obj


def _find(objs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    matches = [o for o in objs if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(matches) == 1, f"expected one {kind}/{name}, found {len(matches)}"
    return matches[0]


def _pod_spec(obj: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = obj["spec"]["template"]["spec"]
    return spec


# -- rendering ------------------------------------------------------------------------------------------


def test_every_kustomization_renders() -> None:
    roots = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
    components = [
        r for r in roots if yaml.safe_load((r / "kustomization.yaml").read_text())["kind"] == "Component"
    ]
    assert {r.name for r in roots} >= {"base", *OVERLAYS}
    for root in roots:
        if root in components:
            continue
        objs = render(root)
        assert objs, f"{root} rendered nothing"
        assert all(o["metadata"].get("namespace") == "enrich" for o in objs if o["kind"] != "Namespace")


def test_prometheus_operator_component_renders_on_an_overlay(tmp_path: Path) -> None:
    """The optional component is meant to be added to an overlay: render it the way a user would."""
    rel = os.path.relpath(K8S, tmp_path)
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\n"
        f"resources:\n  - {rel}/overlays/gpu\ncomponents:\n  - {rel}/components/prometheus-operator\n"
    )
    objs = render(tmp_path)
    monitor = _find(objs, "ServiceMonitor", "enrich-ingest")
    pod_monitor = _find(objs, "PodMonitor", "enrich-worker")
    service = _find(objs, "Service", "enrich-ingest")
    worker = _find(objs, "Deployment", "enrich-worker")
    assert monitor["metadata"]["namespace"] == pod_monitor["metadata"]["namespace"] == "enrich"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert {p["name"] for p in service["spec"]["ports"]} >= {monitor["spec"]["endpoints"][0]["port"]}
    labels = worker["spec"]["template"]["metadata"]["labels"]
    assert pod_monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    ports = {p["name"] for p in _pod_spec(worker)["containers"][0]["ports"]}
    assert pod_monitor["spec"]["podMetricsEndpoints"][0]["port"] in ports


# -- schemas --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_kinds_validate_strictly(rendered: dict[str, list[dict[str, Any]]], version: str) -> None:
    checked = set()
    for overlay, obj in _objects(rendered):
        if obj["apiVersion"].startswith(NOT_CORE_GROUPS):
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: {exc.message} at {list(exc.path)}"
            )
        checked.add(obj["kind"])
    assert checked >= {"Namespace", "ServiceAccount", "ConfigMap", "Service", "Deployment", "Job"}
    assert "PodDisruptionBudget" in checked


def test_core_validation_catches_a_mistake(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Negative control: the validator used above does reject a misspelt field and a wrong type."""
    worker = _find(rendered["gpu"], "Deployment", "enrich-worker")
    bad = yaml.safe_load(yaml.safe_dump(worker))
    _pod_spec(bad)["terminationGracePeriod"] = 180
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)
    bad = yaml.safe_load(yaml.safe_dump(worker))
    _pod_spec(bad)["containers"][0]["ports"][0]["containerPort"] = "9100"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, K8S_VERSIONS[-1], strict=True)


def _crd_validator(kind: str, api_version: str) -> jsonschema.protocols.Validator:
    crd = yaml.safe_load((REFERENCE / CRD_FILES[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group and crd["spec"]["names"]["kind"] == kind
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    schema = served["schema"]["openAPIV3Schema"]
    return jsonschema.Draft7Validator(schema)


def test_reference_schemas_are_there() -> None:
    missing = [name for name in CRD_FILES.values() if not (REFERENCE / name).is_file()]
    assert not missing, f"{REFERENCE} lacks {missing}: CI needs ../shared beside the repository"


def test_keda_objects_validate_against_the_crds(rendered: dict[str, list[dict[str, Any]]]) -> None:
    seen: dict[str, int] = {}
    for overlay, obj in _objects(rendered):
        if not obj["apiVersion"].startswith("keda.sh/"):
            continue
        errors = sorted(_crd_validator(obj["kind"], obj["apiVersion"]).iter_errors(obj), key=str)
        assert not errors, f"{overlay}: {obj['kind']}/{obj['metadata']['name']}: " + "; ".join(
            f"{list(e.path)}: {e.message}" for e in errors
        )
        seen[obj["kind"]] = seen.get(obj["kind"], 0) + 1
    assert seen.get("ScaledObject", 0) >= 4 and seen.get("TriggerAuthentication", 0) >= 4


def test_keda_validation_catches_a_mistake(rendered: dict[str, list[dict[str, Any]]]) -> None:
    scaled = _find(rendered["gpu"], "ScaledObject", "enrich-worker")
    validator = _crd_validator("ScaledObject", scaled["apiVersion"])
    bad = yaml.safe_load(yaml.safe_dump(scaled))
    bad["spec"]["triggers"][0]["metadata"]["listLength"] = 20000  # must be a string
    assert list(validator.iter_errors(bad))
    bad = yaml.safe_load(yaml.safe_dump(scaled))
    del bad["spec"]["scaleTargetRef"]
    assert list(validator.iter_errors(bad))


# -- references between objects ---------------------------------------------------------------------------


def test_scaled_objects_point_at_real_deployments_and_auth(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        for so in (o for o in objs if o["kind"] == "ScaledObject"):
            target = so["spec"]["scaleTargetRef"]
            deployment = _find(objs, target.get("kind", "Deployment"), target["name"])
            assert "replicas" not in deployment["spec"], f"{overlay}: KEDA owns {target['name']}'s replicas"
            for trigger in so["spec"]["triggers"]:
                auth = trigger.get("authenticationRef")
                assert auth, f"{overlay}: trigger {trigger['type']} has no TriggerAuthentication"
                _find(objs, auth.get("kind", "TriggerAuthentication"), auth["name"])


def test_selectors_match_pod_labels(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        pod_labels = [
            o["spec"]["template"]["metadata"]["labels"] for o in objs if o["kind"] in ("Deployment", "Job")
        ]
        for obj in objs:
            if obj["kind"] == "Service":
                selector = obj["spec"]["selector"]
            elif obj["kind"] in ("PodDisruptionBudget", "Deployment"):
                selector = obj["spec"]["selector"]["matchLabels"]
            else:
                continue
            assert any(selector.items() <= labels.items() for labels in pod_labels), (
                f"{overlay}: {obj['kind']}/{obj['metadata']['name']} selects no pod"
            )
        for obj in (o for o in objs if o["kind"] == "Service"):
            pods = [
                _pod_spec(d)
                for d in objs
                if d["kind"] == "Deployment"
                and obj["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            names = {p["name"] for spec in pods for c in spec["containers"] for p in c.get("ports", [])}
            for port in obj["spec"]["ports"]:
                assert port["targetPort"] in names, f"{overlay}: Service {obj['metadata']['name']} port"


def test_config_and_secret_references(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Pods use the generated (hashed) ConfigMap and only the documented Secret."""
    for overlay, objs in rendered.items():
        config_maps = {o["metadata"]["name"] for o in objs if o["kind"] == "ConfigMap"}
        for obj in (o for o in objs if o["kind"] in ("Deployment", "Job")):
            for container in _pod_spec(obj)["containers"]:
                for source in container.get("envFrom", []):
                    assert source["configMapRef"]["name"] in config_maps, overlay
                for env in container.get("env", []):
                    ref = env.get("valueFrom", {}).get("secretKeyRef")
                    if ref:
                        assert ref["name"] == "enrich-secrets" and ref["key"] == env["name"], overlay


# -- operational properties -------------------------------------------------------------------------------


def _config(objs: list[dict[str, Any]]) -> dict[str, str]:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap"]
    data: dict[str, str] = cm["data"]
    return data


def test_worker_shutdown_budget(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """worst batch (3 x (5 s connect + 30 s read) fetch, schema/s3.py) < grace period < visibility timeout."""
    worst_fetch_s = 3 * (5 + 30)
    for overlay, objs in rendered.items():
        worker = _pod_spec(_find(objs, "Deployment", "enrich-worker"))
        grace = worker["terminationGracePeriodSeconds"]
        visibility = int(_config(objs)["ENRICH_VISIBILITY_TIMEOUT_S"])
        assert worst_fetch_s + 30 <= grace < visibility, overlay


def test_gpu_only_where_meant(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        container = _pod_spec(_find(objs, "Deployment", "enrich-worker"))["containers"][0]
        gpus = container["resources"].get("limits", {}).get("nvidia.com/gpu")
        device = _config(objs)["ENRICH_DEVICE"]
        if overlay == "cpu":
            assert gpus is None and device == "cpu"
        else:
            assert gpus == "1" and device == "cuda", overlay


def test_pods_run_as_non_root_with_probes(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        for obj in (o for o in objs if o["kind"] in ("Deployment", "Job")):
            spec = _pod_spec(obj)
            assert spec["securityContext"]["runAsNonRoot"] is True
            assert spec["securityContext"]["runAsUser"] != 0
            for c in spec["containers"]:
                assert c["securityContext"]["allowPrivilegeEscalation"] is False
                assert "memory" in c["resources"]["limits"]
        worker = _pod_spec(_find(objs, "Deployment", "enrich-worker"))["containers"][0]
        assert {"startupProbe", "livenessProbe"} <= worker.keys()
        ingest = _pod_spec(_find(objs, "Deployment", "enrich-ingest"))["containers"][0]
        if overlay != "aws-sqs":  # the SQS poller serves no HTTP
            assert {"readinessProbe", "livenessProbe"} <= ingest.keys()
            assert ingest["readinessProbe"]["httpGet"]["path"] == "/healthz"


def test_scrape_annotations_name_the_metrics_port(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        config = _config(objs)
        expected = {
            "enrich-worker": config["ENRICH_METRICS_PORT"],
            "enrich-ingest": config["ENRICH_WEBHOOK_PORT"],
        }
        for name, port in expected.items():
            deployment = _find(objs, "Deployment", name)
            annotations = deployment["spec"]["template"]["metadata"]["annotations"]
            if annotations["prometheus.io/scrape"] != "true":
                continue
            assert annotations["prometheus.io/port"] == port, (overlay, name)
            ports = _pod_spec(deployment)["containers"][0]["ports"]
            assert int(port) in {p["containerPort"] for p in ports}, (overlay, name)


def test_scaled_object_shape(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """Scale from zero, wake on any waiting message, capped, with a cooldown; SQS trigger on AWS only."""
    for overlay, objs in rendered.items():
        so = _find(objs, "ScaledObject", "enrich-worker")
        spec = scaling.ScalerSpec.from_scaled_object(so)
        assert spec.min_replicas == 0 and spec.activation == 0
        assert 1 <= spec.max_replicas <= 64 and spec.cooldown_s >= 60 and spec.polling_s <= 30
        types = sorted(t["type"] for t in so["spec"]["triggers"])
        assert types == (["aws-sqs-queue", "redis"] if overlay == "aws-sqs" else ["redis"]), overlay
    aws = rendered["aws-sqs"]
    queue_url = _config(aws)["ENRICH_SQS_QUEUE_URL"]
    for so in (o for o in aws if o["kind"] == "ScaledObject"):
        for t in so["spec"]["triggers"]:
            if t["type"] == "aws-sqs-queue":
                assert t["metadata"]["queueURL"] == queue_url
    ingest = _pod_spec(_find(aws, "Deployment", "enrich-ingest"))["containers"][0]
    assert ingest["args"] == ["ingest", "sqs"]
    assert not [o for o in aws if o["kind"] == "Service" and o["metadata"]["name"] == "enrich-ingest"]


def test_kubectl_renders_what_the_scaling_module_reads() -> None:
    """deploy/scaling.py (docs/scaling.md's plot) reads the same ScaledObject the overlay applies."""
    exe = _kubectl()
    out = subprocess.run(
        [exe, "kustomize", str(K8S / "overlays" / "gpu")], check=True, capture_output=True, text=True
    )
    objs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert scaling.worker_spec(objs) == scaling.worker_spec(scaling.load_objects("gpu"))


def test_disruption_budgets_never_block_a_drain(rendered: dict[str, list[dict[str, Any]]]) -> None:
    """A PDB with minAvailable >= the replicas it covers makes `kubectl drain` hang forever."""
    for overlay, objs in rendered.items():
        scaled = {so["spec"]["scaleTargetRef"]["name"]: so for so in objs if so["kind"] == "ScaledObject"}
        for pdb in (o for o in objs if o["kind"] == "PodDisruptionBudget"):
            selector = pdb["spec"]["selector"]["matchLabels"]
            (deployment,) = [
                d
                for d in objs
                if d["kind"] == "Deployment"
                and selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
            ]
            if "maxUnavailable" in pdb["spec"]:
                assert pdb["spec"]["maxUnavailable"] >= 1, overlay
                continue
            name = deployment["metadata"]["name"]
            floor = (
                scaled[name]["spec"].get("minReplicaCount", 0)
                if name in scaled
                else deployment["spec"]["replicas"]
            )
            assert floor > pdb["spec"]["minAvailable"], (
                f"{overlay}: PDB {pdb['metadata']['name']} blocks drains"
            )


def test_every_object_is_labelled_part_of_enrich(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, obj in _objects(rendered):
        labels = obj["metadata"].get("labels", {})
        assert labels.get("app.kubernetes.io/part-of") == "enrich", (
            f"{overlay}: {obj['kind']}/{obj['metadata']['name']}"
        )


def test_worker_pools_are_sized_by_the_pods_cpu_request(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        for obj in objs:
            if obj["kind"] != "Deployment" or obj["metadata"]["name"] != "enrich-worker":
                continue
            container = _pod_spec(obj)["containers"][0]
            env = {e["name"]: e for e in container.get("env", [])}
            source = env["ENRICH_CPUS"]["valueFrom"]["resourceFieldRef"]
            assert source["resource"] == "requests.cpu" and source["containerName"] == container["name"], (
                overlay
            )
            assert "cpu" in container["resources"]["requests"], overlay


def test_only_a_webhook_needs_the_webhook_secret(rendered: dict[str, list[dict[str, Any]]]) -> None:
    for overlay, objs in rendered.items():
        container = _pod_spec(_find(objs, "Deployment", "enrich-ingest"))["containers"][0]
        names = {e["name"] for e in container.get("env", [])}
        webhook = container["args"] == ["ingest", "webhook"]
        assert ("ENRICH_WEBHOOK_SECRET" in names) == webhook, overlay
