"""Redis on Kubernetes: a StatefulSet whose data lives on a claim with the append-only file on (no emptyDir), reached
through the `redis` Service that CONVEYOR_REDIS_URL names; and the external-redis Component, which removes it and
points the URL elsewhere (rendered by ``kubectl kustomize`` in an overlay of its own, on the default manifests and
on a fleet)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import kubernetes_validate
import pytest
import yaml

from tests.deploy.conftest import by_name, kustomize, write_fleet
from tests.deploy.files import K8S, KUBERNETES_VERSION, Objects, container, load_yaml, of_kind, workloads

COMPONENT = K8S / "components" / "external-redis"
FLEET = """
[[models]]
name = "bge-m3"
task = "embed"
replicas = 2
"""


def _flags(args: list[str]) -> dict[str, str]:
    """redis-server's ``--name value`` arguments as a mapping."""
    assert len(args) % 2 == 0 and all(a.startswith("--") for a in args[::2]), args
    return {name.removeprefix("--"): value for name, value in zip(args[::2], args[1::2], strict=True)}


def _size(quantity: str) -> int:
    """Bytes of a Kubernetes quantity (``8Gi``) or a redis-server memory size (``1536mb``: binary, too)."""
    units = {"ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40, "kb": 2**10, "mb": 2**20, "gb": 2**30}
    return int(quantity[:-2]) * units[quantity[-2:].lower()]


def test_redis_is_a_statefulset_on_a_claim_with_the_append_only_file(k8s: Objects) -> None:
    assert ("Deployment", "redis") not in k8s, "a Deployment's pod has no claim of its own that follows it"
    redis = k8s[("StatefulSet", "redis")]
    spec = redis["spec"]
    assert spec["replicas"] == 1  # one primary; more replicas would be independent Redises, not copies
    (template,) = spec["volumeClaimTemplates"]
    assert template["spec"]["accessModes"] == ["ReadWriteOnce"]
    flags = _flags(container(redis)["args"])
    limit = _size(container(redis)["resources"]["limits"]["memory"])
    # noeviction refuses writes only past maxmemory: without it, or with it at the limit, Redis is OOM-killed
    assert _size(flags["maxmemory"]) <= limit * 3 // 4, "room for client buffers and an AOF rewrite's fork"
    assert flags["maxmemory-policy"] == "noeviction"  # never drop a queued job or batch state to make room
    assert _size(template["spec"]["resources"]["requests"]["storage"]) >= 3 * _size(flags["maxmemory"]), (
        "room for the AOF of a full Redis, grown to twice its size, and its rewrite"
    )
    mounts = {m["mountPath"]: m["name"] for m in container(redis)["volumeMounts"]}
    assert mounts["/data"] == template["metadata"]["name"]  # /data: redis-server's working directory in its image
    pod = spec["template"]["spec"]
    assert template["metadata"]["name"] not in {v["name"] for v in pod.get("volumes", [])}, "the claim, not a volume"
    assert not [v for v in pod.get("volumes", []) if "emptyDir" in v], "no emptyDir holds Redis state"
    # `kubectl delete -k` (or deleting the StatefulSet) keeps the data
    assert spec["persistentVolumeClaimRetentionPolicy"] == {"whenDeleted": "Retain", "whenScaled": "Retain"}
    assert flags["appendonly"] == "yes" and flags["appendfsync"] == "everysec"
    assert "dir" not in flags or flags["dir"] == "/data"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["fsGroup"] == pod["securityContext"]["runAsUser"], "the claim is Redis's to write"
    assert container(redis)["readinessProbe"] and container(redis)["livenessProbe"]


def test_redis_services_the_url_and_the_statefulset_name(k8s: Objects) -> None:
    (config,) = of_kind(k8s, "ConfigMap").values()
    redis = k8s[("StatefulSet", "redis")]
    labels = redis["spec"]["template"]["metadata"]["labels"]
    client = k8s[("Service", "redis")]["spec"]
    assert config["data"]["CONVEYOR_REDIS_URL"] == f"redis://redis:{client['ports'][0]['port']}/0"
    assert client.get("clusterIP") != "None", "clients keep one address wherever the pod runs"
    governing = k8s[("Service", redis["spec"]["serviceName"])]["spec"]
    assert governing["clusterIP"] == "None"  # a StatefulSet's governing Service is headless
    for service in (client, governing):
        assert service["selector"].items() <= labels.items()


def _overlay(tmp_path: Path, base: Path) -> list[dict[str, Any]]:
    """``kubectl kustomize`` of an overlay of ``base`` that uses the external-redis Component (paths relative, as
    kustomize wants them)."""
    overlay = tmp_path / "overlay"
    overlay.mkdir()
    kustomization = {
        "apiVersion": "kustomize.config.k8s.io/v1beta1",
        "kind": "Kustomization",
        "resources": [os.path.relpath(base, overlay)],
        "components": [os.path.relpath(COMPONENT, overlay)],
    }
    (overlay / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    return kustomize(overlay)


def _component_url() -> str:
    """The CONVEYOR_REDIS_URL the Component's ConfigMap patch sets."""
    component = load_yaml(COMPONENT / "kustomization.yaml")
    assert component["kind"] == "Component"
    (url,) = [
        doc["data"]["CONVEYOR_REDIS_URL"]
        for patch in component["patches"]
        for doc in [yaml.safe_load(patch["patch"])]
        if isinstance(doc, dict) and doc.get("kind") == "ConfigMap"
    ]
    return str(url)


@pytest.mark.parametrize("base", ["default", "fleet"])
def test_the_external_redis_component_removes_redis_and_sets_the_url(tmp_path: Path, base: str) -> None:
    rendered = _overlay(tmp_path, write_fleet(tmp_path, FLEET) if base == "fleet" else K8S)
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    objects = by_name(rendered)
    assert not of_kind(objects, "StatefulSet"), "the in-cluster Redis is gone"
    assert "redis" not in workloads(objects)
    names = {doc["metadata"].get("labels", {}).get("app.kubernetes.io/name") for doc in rendered}
    assert "redis" not in names, "nothing of redis.yaml is left"
    (config,) = of_kind(objects, "ConfigMap").values()
    url = config["data"]["CONVEYOR_REDIS_URL"]
    assert url == _component_url()
    assert url != "redis://redis:6379/0"
    assert str(urlsplit(url).hostname).endswith(".invalid"), "a placeholder that cannot resolve"
    deployments = of_kind(objects, "Deployment")
    assert "conveyor-gateway" in deployments and len(deployments) >= 2  # the gateway and a worker, at least
    for name, deployment in deployments.items():
        (variable,) = [e for e in container(deployment)["env"] if e["name"] == "CONVEYOR_REDIS_URL"]
        ref = variable["valueFrom"]["secretKeyRef"]
        assert ref == {"name": "conveyor-secrets", "key": "redis-url", "optional": True}, name
        assert {"configMapRef": {"name": "conveyor-config"}} in container(deployment)["envFrom"], name
