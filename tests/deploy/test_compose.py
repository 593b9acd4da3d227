"""The compose stack (no Docker engine runs here: the file is read and cross-checked): the whole stack, one GPU per
worker, grace periods that cover the drain, models the gateway expects, the shared file store, the CPU override."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.deploy.files import (
    DEPLOY,
    GATEWAY_PORT,
    GRACE_MARGIN_S,
    ROOT,
    WORKER_METRICS_PORT,
    compose_workers,
    container_port,
    load_yaml,
    resolve,
    seconds,
)
from worker.settings import WorkerSettings


def test_compose_has_the_whole_stack(services: dict[str, Any]) -> None:
    assert {"redis", "gateway", "prometheus", "grafana"} <= services.keys()
    assert len(compose_workers(services)) >= 2, "one worker service per model (embed + chat)"


@pytest.mark.parametrize("compose_file", ["compose.yaml", "deploy/compose.cpu.yaml"])
def test_every_build_and_bind_mount_points_at_existing_files(compose_file: str) -> None:
    for name, service in load_yaml(ROOT / compose_file)["services"].items():
        build = service.get("build")
        if build:
            context = ROOT / build.get("context", ".")
            assert context.is_dir(), name
            assert (context / build.get("dockerfile", "Dockerfile")).is_file(), name
        for volume in service.get("volumes", []):
            source = str(volume).split(":")[0]
            if source.startswith(".") and "$" not in source:
                assert (ROOT / source).exists(), f"{name}: {source}"


def test_workers_reserve_distinct_gpus(services: dict[str, Any]) -> None:
    seen: set[str] = set()
    for name, worker in compose_workers(services).items():
        assert worker["build"]["args"]["ENGINE_EXTRA"] == "gpu", name
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        ids = {resolve(i) for i in device["device_ids"]}
        assert len(ids) == 1, name
        assert not ids & seen, f"{name}: one GPU per worker, not shared"
        seen |= ids


def test_worker_stop_grace_period_covers_the_drain(services: dict[str, Any]) -> None:
    for name, worker in compose_workers(services).items():
        default = WorkerSettings.model_fields["grace_period"].default
        grace = int(resolve(worker["environment"].get("CONVEYOR_WORKER_GRACE_PERIOD", default)))
        assert seconds(worker["stop_grace_period"]) >= grace + GRACE_MARGIN_S, name


def test_workers_serve_exactly_the_gateway_models(services: dict[str, Any]) -> None:
    models = set()
    for name, worker in compose_workers(services).items():
        model = resolve(worker["environment"]["CONVEYOR_WORKER_MODEL"])
        command = [resolve(part) for part in worker["command"]]
        assert command[command.index("--model") + 1] == model, name
        assert isinstance(json.loads(worker["environment"]["CONVEYOR_WORKER_ENGINE_ARGS"]), dict), name
        assert int(worker["environment"]["CONVEYOR_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT, name
        assert str(WORKER_METRICS_PORT) in [str(p) for p in worker.get("expose", [])], name
        if "CONVEYOR_WORKER_MODEL_PATH" not in worker["environment"]:
            assert worker["environment"]["HF_HUB_OFFLINE"] == "0", (
                f"{name}: a hub id needs the hub (worker default: offline)"
            )
        models.add(model)
    gateway_models = set(resolve(services["gateway"]["environment"]["CONVEYOR_GATEWAY_MODELS"]).split(","))
    assert gateway_models == models


def test_gateway_waits_for_healthy_redis_and_publishes_its_port(services: dict[str, Any]) -> None:
    assert services["redis"]["healthcheck"]["test"]
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(gateway["environment"]["CONVEYOR_GATEWAY_PORT"]) == GATEWAY_PORT
    assert [container_port(p) for p in gateway["ports"]] == [GATEWAY_PORT]
    for worker in compose_workers(services).values():
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["environment"]["CONVEYOR_REDIS_URL"] == gateway["environment"]["CONVEYOR_REDIS_URL"]


def test_cpu_override_swaps_the_engine_and_drops_gpus(services: dict[str, Any]) -> None:
    cpu = load_yaml(DEPLOY / "compose.cpu.yaml")["services"]
    workers = compose_workers(cpu)
    assert workers.keys() == compose_workers(services).keys()
    models = set()
    for name, worker in workers.items():
        assert worker["build"]["args"]["ENGINE_EXTRA"] == "cpu", name
        assert worker["build"]["additional_contexts"]["wheels"], name
        assert worker["deploy"] == {}, f"{name}: `deploy: !reset` removes the GPU reservation"
        models.add(worker["environment"]["CONVEYOR_WORKER_MODEL"])
    assert set(cpu["gateway"]["environment"]["CONVEYOR_GATEWAY_MODELS"].split(",")) == models


def test_compose_gateway_and_workers_share_one_file_store(services: dict[str, Any]) -> None:
    sharing = {"gateway": services["gateway"], **compose_workers(services)}
    for name, service in sharing.items():
        env = service.get("environment", {})
        assert env.get("CONVEYOR_FILES_URL") == "/files", name
        assert "conveyor-files:/files" in service.get("volumes", []), name
