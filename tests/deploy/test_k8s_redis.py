"""Redis on Kubernetes: a StatefulSet whose data lives on a claim with the append-only file on (no emptyDir), reached
through the `redis` Service that CONVEYOR_REDIS_URL names."""

from __future__ import annotations

from tests.deploy.files import Objects, container, of_kind


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
