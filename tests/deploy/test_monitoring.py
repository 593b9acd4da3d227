"""Prometheus and Grafana files. Whether every panel's query returns data is proven against a real Prometheus in the
dashboard tier (tests/dashboards/) and the engine tier; here: promtool, the generator, the wiring of the files."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
from collections.abc import Iterator
from typing import Any

from grafana_foundation_sdk.cog import plugins
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.dashboard import Dashboard

from tests.deploy.files import DASHBOARD, DEPLOY, GATEWAY_PORT, container_port, load_yaml


def test_prometheus_discovers_every_gateway_and_worker_through_a_gateway(services: dict[str, Any]) -> None:
    """The discovery itself runs against a real Prometheus in the dashboard tier; here: the compose wiring."""
    config = load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    urls = {job["job_name"]: sd["url"] for job in config["scrape_configs"] for sd in job.get("http_sd_configs", [])}
    base = f"http://gateway:{GATEWAY_PORT}/internal/scrape-targets"
    assert urls == {"conveyor-gateway": f"{base}?role=gateway", "conveyor-worker": f"{base}?role=worker"}
    assert "gateway" in services
    volumes = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes
    promtool = shutil.which("promtool")
    assert promtool, "promtool comes with Debian's prometheus package (make tools)"
    checked = subprocess.run([promtool, "check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                             capture_output=True, text=True)  # fmt: skip
    assert checked.returncode == 0, checked.stdout + checked.stderr


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


def test_the_dashboard_file_is_what_its_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("dashboard_source", DEPLOY / "grafana" / "dashboard.py")
    assert spec is not None and spec.loader is not None
    source = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(source)
    assert DASHBOARD.read_text() == source.render(), "run: python deploy/grafana/dashboard.py"


def test_every_panel_is_described(dashboard: dict[str, Any]) -> None:
    for panel in _panels(dashboard["panels"]):
        if panel["type"] != "row":
            assert panel.get("description"), panel["title"]


def test_dashboard_layout_and_datasource(dashboard: dict[str, Any]) -> None:
    datasources = load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
    (datasource,) = datasources["datasources"]
    assert datasource["type"] == "prometheus"
    assert datasource["url"] == "http://prometheus:9090"
    assert dashboard["uid"]
    assert dashboard["title"]
    ids = [panel["id"] for panel in _panels(dashboard["panels"])]
    assert len(ids) == len(set(ids))
    for panel in _panels(dashboard["panels"]):
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert panel["targets"], panel["title"]


def test_grafana_provisioning_matches_the_compose_mounts(services: dict[str, Any]) -> None:
    mounts = dict(v.removesuffix(":ro").split(":", 1) for v in services["grafana"]["volumes"])
    assert mounts["./deploy/grafana/provisioning"] == "/etc/grafana/provisioning"
    (provider,) = load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "conveyor.yml")["providers"]
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    prom_ports = [container_port(p) for p in services["prometheus"]["ports"]]
    assert prom_ports == [9090]


def _lost(ours: Any, kept: Any, path: str = "") -> list[str]:
    """Paths of ``ours`` that ``kept`` does not have (or has with another value)."""
    if isinstance(ours, dict):
        return [p for key in ours for p in
                (_lost(ours[key], kept[key], f"{path}/{key}") if key in kept else [f"{path}/{key}"])]  # fmt: skip
    if isinstance(ours, list):
        if len(ours) != len(kept):
            return [path]
        return [p for i, (a, b) in enumerate(zip(ours, kept, strict=True)) for p in _lost(a, b, f"{path}[{i}]")]
    return [] if ours == kept else [path]


def test_the_dashboard_is_valid_by_grafanas_own_schema(dashboard: dict[str, Any]) -> None:
    """Read through Grafana's typed dashboard models (generated from its schema): every field is one the schema
    knows (an unknown one is dropped on the way) and keeps its value."""
    plugins.register_default_plugins()
    parsed = json.loads(json.dumps(Dashboard.from_json(dashboard), cls=JSONEncoder))
    assert _lost(dashboard, parsed) == []
