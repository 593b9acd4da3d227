"""Fixtures of the deployment checks: the compose file, the Kubernetes objects as kustomize renders them, uv.lock."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.files import DASHBOARD, K8S, ROOT, Objects, load_yaml

#: manifests for CRDs that may not be installed (KEDA, the Prometheus Operator): not in the kustomization
OPTIONAL_MANIFESTS = ("keda-scaledobject.yaml", "monitoring.yaml")
#: applied instead of an optional manifest, with the same object names: not in the kustomization, and read apart
ALTERNATIVE_MANIFESTS = ("keda-scaledobject-streams.yaml",)


@pytest.fixture(scope="session")
def compose() -> dict[str, Any]:
    return load_yaml(ROOT / "compose.yaml")  # type: ignore[no-any-return]


@pytest.fixture(scope="session")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]  # type: ignore[no-any-return]


def kustomize(directory: Path = K8S) -> list[dict[str, Any]]:
    """``kubectl kustomize DIRECTORY``: what ``kubectl apply -k`` would send."""
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl is not installed: `make test` installs Debian's kubernetes-client (make tools)"
    rendered = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, check=False)
    assert rendered.returncode == 0, rendered.stderr
    return [doc for doc in yaml.safe_load_all(rendered.stdout) if doc]


def write_fleet(tmp_path: Path, models: str) -> Path:
    """``python deploy/k8s/fleet.py models.toml OUT`` for ``models``: returns OUT, a kustomization directory."""
    spec = importlib.util.spec_from_file_location("fleet", K8S / "fleet.py")
    assert spec is not None and spec.loader is not None
    fleet = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fleet)
    (tmp_path / "models.toml").write_text(models)
    fleet.generate(tmp_path / "models.toml", tmp_path / "out")
    return tmp_path / "out"


@pytest.fixture(scope="session")
def rendered() -> list[dict[str, Any]]:
    return kustomize()


def by_name(docs: list[dict[str, Any]]) -> Objects:
    return {(doc["kind"], doc["metadata"]["name"]): doc for doc in docs}


@pytest.fixture(scope="session")
def k8s(rendered: list[dict[str, Any]]) -> Objects:
    objects = by_name(rendered)
    for name in OPTIONAL_MANIFESTS:
        objects |= by_name(list(yaml.safe_load_all((K8S / name).read_text())))
    return objects


@pytest.fixture(scope="session")
def keda_streams() -> Objects:
    """keda-scaledobject-streams.yaml: the ScaledObject for CONVEYOR_QUEUE_BACKEND=streams."""
    return by_name(list(yaml.safe_load_all((K8S / "keda-scaledobject-streams.yaml").read_text())))


@pytest.fixture(scope="session")
def lock() -> dict[str, list[dict[str, Any]]]:
    packages: dict[str, list[dict[str, Any]]] = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        packages.setdefault(package["name"], []).append(package)
    return packages


@pytest.fixture(scope="session")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())  # type: ignore[no-any-return]
