"""The Kubernetes manifests as ``kubectl kustomize`` renders them: valid against the Kubernetes API schema
(kubernetes-validate), wired together (selectors, ports, config, secrets), probes that match what each process
promises, grace periods that cover the drain and the longest stream, disruption budgets, and KEDA triggers (one
file per queue backend) whose fields are the ones KEDA's redis and redis-streams scalers read. Redis itself:
test_k8s_redis.py."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest

from conveyor.contract import QueueBackend
from conveyor.key_layout import bulk_queue_name, queue_name, stream_lane_key
from conveyor.redis_settings import RedisSettings
from tests.deploy.conftest import ALTERNATIVE_MANIFESTS, OPTIONAL_MANIFESTS, kustomize, write_fleet
from tests.deploy.files import (
    GATEWAY_PORT,
    GRACE_MARGIN_S,
    K8S,
    KUBERNETES_VERSION,
    WORKER_METRICS_PORT,
    Objects,
    compose_workers,
    container,
    env,
    k8s_workers,
    load_yaml,
    of_kind,
    resolve,
    workloads,
)

#: trigger metadata KEDA's redis scaler reads (kedacore/keda pkg/scalers/redis_scaler.go, v2.8.0 onward: the
#: `activationListLength` field came with kedacore/keda#3415; reading a sorted set with ZCARD with #1013, v2.0.0)
KEDA_REDIS_FIELDS = {
    "address", "addresses", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "listName",
    "listLength", "activationListLength", "databaseIndex", "username", "usernameFromEnv", "password",
    "passwordFromEnv", "enableTLS", "unsafeSsl",
}  # fmt: skip

#: trigger metadata KEDA's redis-streams scaler reads (pkg/scalers/redis_streams_scaler.go, redisStreamsMetadata and
#: redisConnectionInfo in redis_scaler.go; `streamLength` (XLEN) from v2.11.0, kedacore/keda#4390). `consumerGroup`,
#: `pendingEntriesCount` and `lagCount` are readable too but switch XLEN off (Validate): not allowed here.
KEDA_REDIS_STREAMS_FIELDS = {
    "address", "addresses", "addressFromEnv", "host", "hostFromEnv", "port", "portFromEnv", "stream",
    "streamLength", "activationLagCount", "databaseIndex", "username", "usernameFromEnv", "password",
    "passwordFromEnv", "enableTLS", "unsafeSsl",
}  # fmt: skip


def test_every_rendered_object_is_valid_for_the_kubernetes_api(rendered: list[dict[str, Any]]) -> None:
    assert rendered
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        assert "namespace" not in doc["metadata"], f"{doc['metadata']['name']}: manifests are namespace-less"


def test_kustomization_lists_the_manifests() -> None:
    resources = set(load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", *OPTIONAL_MANIFESTS, *ALTERNATIVE_MANIFESTS}
    assert resources == on_disk


def test_deployments_and_services_wire_up(k8s: Objects) -> None:
    deployments = workloads(k8s)
    configmaps = of_kind(k8s, "ConfigMap")
    assert {"redis", "conveyor-gateway"} <= deployments.keys()
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for source in container(deployment).get("envFrom", []):
            assert source["configMapRef"]["name"] in configmaps, name
        for variable in container(deployment).get("env", []):
            ref = variable.get("valueFrom", {}).get("secretKeyRef")
            assert ref is None or ref.get("optional") is True, f"{name}: no Secret is shipped, keep it optional"
    for name, service in of_kind(k8s, "Service").items():
        (target,) = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = container(target)["ports"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in [p["name"] for p in ports] + [p["containerPort"] for p in ports], name


def test_gateway_probes(k8s: Objects) -> None:
    (config,) = of_kind(k8s, "ConfigMap").values()
    gateway = container(k8s[("Deployment", "conveyor-gateway")])
    ports = {p["name"]: p["containerPort"] for p in gateway["ports"]}
    assert ports == {"http": GATEWAY_PORT}
    assert int(config["data"]["CONVEYOR_GATEWAY_PORT"]) == GATEWAY_PORT
    # readiness: this gateway can serve (one model without a worker must not empty the Service)
    assert gateway["readinessProbe"]["httpGet"] == {"path": "/ready?scope=gateway", "port": "http"}
    assert gateway["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert k8s[("Service", "conveyor-gateway")]["spec"]["ports"][0]["port"] == GATEWAY_PORT


def test_a_stopping_gateway_lets_the_longest_stream_finish(k8s: Objects) -> None:
    (config,) = of_kind(k8s, "ConfigMap").values()
    deployment = k8s[("Deployment", "conveyor-gateway")]
    pause = int(container(deployment)["lifecycle"]["preStop"]["exec"]["command"][1])
    longest = float(config["data"]["CONVEYOR_GATEWAY_REQUEST_TIMEOUT"])
    grace = float(config["data"]["CONVEYOR_GATEWAY_SHUTDOWN_GRACE"])
    assert grace >= longest
    assert deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= pause + grace + GRACE_MARGIN_S


def test_every_deployment_has_a_disruption_budget(k8s: Objects) -> None:
    budgets = of_kind(k8s, "PodDisruptionBudget").values()
    for name, deployment in of_kind(k8s, "Deployment").items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets), name


def test_workers_get_one_gpu_and_time_to_drain(k8s: Objects, services: dict[str, Any]) -> None:
    (config,) = of_kind(k8s, "ConfigMap").values()
    grace = int(config["data"]["CONVEYOR_WORKER_GRACE_PERIOD"])
    workers = k8s_workers(k8s)
    assert len(workers) >= 2
    models = set()
    for name, deployment in workers.items():
        spec = deployment["spec"]
        worker = container(deployment)
        assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + GRACE_MARGIN_S, name
        assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0, f"{name}: a surge pod waits for a free GPU"
        assert {p["name"]: p["containerPort"] for p in worker["ports"]} == {"metrics": WORKER_METRICS_PORT}
        assert worker["livenessProbe"]["httpGet"] == {"path": "/health", "port": "metrics"}, name
        assert worker["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}, name
        assert int(config["data"]["CONVEYOR_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
        annotations = spec["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == WORKER_METRICS_PORT, name
        assert worker["args"][worker["args"].index("--model") + 1] == "$(CONVEYOR_WORKER_MODEL)", name
        assert isinstance(json.loads(env(worker)["CONVEYOR_WORKER_ENGINE_ARGS"]), dict), name
        models.add(env(worker)["CONVEYOR_WORKER_MODEL"])
    assert set(config["data"]["CONVEYOR_GATEWAY_MODELS"].split(",")) == models
    assert config["data"]["HF_HUB_OFFLINE"] == "0", "the default models are hub ids; the worker defaults to offline"
    compose_models = {resolve(w["environment"]["CONVEYOR_WORKER_MODEL"]) for w in compose_workers(services).values()}
    assert models == compose_models, "compose and kubernetes deploy the same default models"


def test_images_match_compose(k8s: Objects, services: dict[str, Any]) -> None:
    assert container(k8s[("Deployment", "conveyor-gateway")])["image"] == services["gateway"]["image"]
    worker_images = {w["image"] for w in compose_workers(services).values()}
    assert {container(d)["image"] for d in k8s_workers(k8s).values()} == worker_images
    redis_image = container(k8s[("StatefulSet", "redis")])["image"]
    assert redis_image == services["redis"]["image"]


def _scaled_from_zero_on_both_lanes(
    scaled: dict[str, dict[str, Any]], k8s: Objects, trigger_type: str, fields: set[str], key: str
) -> list[tuple[str, dict[str, Any]]]:
    """Each ScaledObject's model (of its target worker) and triggers, after the checks both queue backends share:
    at zero workers the gateway lets the model's requests wait (else they are 503s); every trigger has the type,
    reads only fields its scaler reads, reaches the redis Service's port, is active at one outstanding job and has
    string metadata. Returns (model, trigger) pairs for the layout's own checks."""
    assert scaled
    workers = k8s_workers(k8s)
    redis_port = k8s[("Service", "redis")]["spec"]["ports"][0]["port"]
    (config,) = of_kind(k8s, "ConfigMap").values()
    may_wait = config["data"].get("CONVEYOR_GATEWAY_SCALE_TO_ZERO", "").split(",")
    pairs = []
    for name, obj in scaled.items():
        model = env(container(workers[obj["spec"]["scaleTargetRef"]["name"]]))["CONVEYOR_WORKER_MODEL"]
        if obj["spec"]["minReplicaCount"] == 0:
            assert model in may_wait, f"{name}: at zero workers the gateway would answer 503 instead of queueing"
        for trigger in obj["spec"]["triggers"]:
            assert trigger["type"] == trigger_type, name
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata is strings"
            assert set(trigger["metadata"]) <= fields, f"{name}: a field KEDA's {trigger_type} scaler does not read"
            assert int(trigger["metadata"]["address"].rsplit(":", 1)[1]) == redis_port
            assert int(trigger["metadata"][key]) > 0
            pairs.append((model, trigger))
    return pairs


def test_keda_scales_a_worker_from_zero_on_both_of_its_lanes(k8s: Objects) -> None:
    """arq: queued plus running work of the interactive queue and of the bulk lane (ZCARD of each sorted set),
    active at one job."""
    scaled = of_kind(k8s, "ScaledObject")
    pairs = _scaled_from_zero_on_both_lanes(scaled, k8s, "redis", KEDA_REDIS_FIELDS, "listLength")
    for model in {model for model, _ in pairs}:
        lanes = {t["metadata"]["listName"] for m, t in pairs if m == model}
        assert lanes == {queue_name(model), bulk_queue_name(model)}
    for _, trigger in pairs:
        assert trigger["metadata"]["activationListLength"] == "0"  # active (0 -> 1) at one outstanding job


def test_the_configmap_names_the_queue_backend_the_shipped_keda_file_scales_on(
    k8s: Objects, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every gateway and worker reads CONVEYOR_QUEUE_BACKEND from the ConfigMap (they must agree), and a value they
    accept; keda-scaledobject.yaml watches arq's lanes, so the shipped backend is arq (streams: switch both)."""
    (config,) = of_kind(k8s, "ConfigMap").values()
    for name in ("CONVEYOR_REDIS_URL", "CONVEYOR_QUEUE_BACKEND"):
        monkeypatch.setenv(name, config["data"][name])
    assert RedisSettings().queue_backend is QueueBackend.ARQ


def test_keda_on_the_streams_backend_scales_on_the_length_of_both_streams(k8s: Objects, keda_streams: Objects) -> None:
    """CONVEYOR_QUEUE_BACKEND=streams: XLEN of each lane's stream (waiting plus running), active at one job; the same
    object (name, target, scaling) as the arq file's, so one replaces the other."""
    scaled = of_kind(keda_streams, "ScaledObject")
    assert scaled.keys() == of_kind(k8s, "ScaledObject").keys(), "apply one file or the other, never both"
    for name, obj in scaled.items():
        arq_spec = {k: v for k, v in k8s[("ScaledObject", name)]["spec"].items() if k != "triggers"}
        assert {k: v for k, v in obj["spec"].items() if k != "triggers"} == arq_spec
    pairs = _scaled_from_zero_on_both_lanes(scaled, k8s, "redis-streams", KEDA_REDIS_STREAMS_FIELDS, "streamLength")
    for model in {model for model, _ in pairs}:
        lanes = {t["metadata"]["stream"] for m, t in pairs if m == model}
        assert lanes == {stream_lane_key(model), stream_lane_key(model, bulk=True)}
    for _, trigger in pairs:
        assert "consumerGroup" not in trigger["metadata"], "with a consumer group KEDA counts XPENDING or lag, not XLEN"
        assert trigger["metadata"]["activationLagCount"] == "0"  # active (0 -> 1) at one outstanding job


def test_k8s_gateway_and_workers_mount_the_files_claim_where_the_config_points(
    k8s: Objects,
) -> None:
    (config,) = of_kind(k8s, "ConfigMap").values()
    path = config["data"]["CONVEYOR_FILES_URL"]
    (claim,) = of_kind(k8s, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod of every Deployment writes to it
    for name, deployment in of_kind(k8s, "Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert path in mounts, name
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name


FLEET = """
[[models]]
name = "Qwen/Qwen3-8B"
path = "Qwen/Qwen3-8B-FP8"
task = "generate"
gpus = ["0", "1", "2"]
engine_args = { max_model_len = 32768 }

[[models]]
name = "bge-m3"
task = "embed"
replicas = 2
env = { HF_HUB_OFFLINE = "0" }
"""


def test_a_fleet_is_generated_from_one_models_file(tmp_path: Path) -> None:
    rendered = kustomize(write_fleet(tmp_path, FLEET))
    for doc in rendered:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in rendered}
    (config,) = of_kind(objects, "ConfigMap").values()
    assert config["data"]["CONVEYOR_GATEWAY_MODELS"] == "Qwen/Qwen3-8B,bge-m3"
    workers = k8s_workers(objects)
    assert workers.keys() == {"conveyor-worker-qwen-qwen3-8b", "conveyor-worker-bge-m3"}
    qwen, bge = workers["conveyor-worker-qwen-qwen3-8b"], workers["conveyor-worker-bge-m3"]
    assert (qwen["spec"]["replicas"], bge["spec"]["replicas"]) == (3, 2)  # one pod per GPU; replicas
    assert {
        "CONVEYOR_WORKER_MODEL": "Qwen/Qwen3-8B", "CONVEYOR_WORKER_MODEL_PATH": "Qwen/Qwen3-8B-FP8",
        "CONVEYOR_WORKER_TASK": "generate", "CONVEYOR_WORKER_ENGINE_ARGS": '{"max_model_len": 32768}',
    }.items() <= env(container(qwen)).items()  # fmt: skip
    assert env(container(bge))["HF_HUB_OFFLINE"] == "0" and "CONVEYOR_WORKER_MODEL_PATH" not in env(container(bge))
    for name, deployment in workers.items():
        assert container(deployment)["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        budget = objects[("PodDisruptionBudget", name)]
        assert budget["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert "conveyor-gateway" in of_kind(objects, "Deployment")
    assert "redis" in of_kind(objects, "StatefulSet")  # the shared redis.yaml, on its claim


def test_a_worker_of_several_gpus_gets_as_many_in_its_pod(tmp_path: Path) -> None:
    fleet = '[[models]]\nname = "big"\ntask = "generate"\ngpus = ["0,1", "2,3"]\n'
    objects = {(doc["kind"], doc["metadata"]["name"]): doc for doc in kustomize(write_fleet(tmp_path, fleet))}
    (big,) = k8s_workers(objects).values()
    assert big["spec"]["replicas"] == 2 and container(big)["resources"]["limits"]["nvidia.com/gpu"] == 2
