"""What the deployment checks share: paths, the ports and margins the files must agree on, and readers."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "conveyor.json"
GATEWAY_PORT = 8000
WORKER_METRICS_PORT = 9100
KUBERNETES_VERSION = "1.31"  # the Kubernetes API the manifests are validated against (kubernetes-validate)
GRACE_MARGIN_S = 5  # at least this much time for engine shutdown after the worker's own grace period


class _ComposeLoader(yaml.SafeLoader):
    """SafeLoader that understands compose's `!reset` and `!override` merge tags."""


def _tagged(loader: yaml.SafeLoader, node: yaml.Node) -> Any:
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node)
    return loader.construct_scalar(node)


for _tag in ("!reset", "!override"):
    _ComposeLoader.add_constructor(_tag, _tagged)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


def resolve(value: Any) -> str:
    """A compose value with `${VAR:-default}` / `${VAR:?err}` / `${VAR}` replaced by the value used when unset."""
    text = str(value)
    text = re.sub(r"\$\{[A-Za-z0-9_]+:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{[A-Za-z0-9_]+:?\?[^}]*\}", "<required>", text)
    return re.sub(r"\$\{[A-Za-z0-9_]+\}", "", text)


def seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return float(duration)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def container_port(mapping: str | int) -> int:
    return int(str(mapping).split(":")[-1].split("/")[0])


def compose_workers(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if name.startswith("worker")}


Objects = dict[tuple[str, str], dict[str, Any]]


def of_kind(k8s: Objects, kind: str) -> dict[str, dict[str, Any]]:
    return {name: obj for (k, name), obj in k8s.items() if k == kind}


def workloads(k8s: Objects) -> dict[str, dict[str, Any]]:
    """Deployments and StatefulSets by name (Redis is a StatefulSet)."""
    return of_kind(k8s, "Deployment") | of_kind(k8s, "StatefulSet")


def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (only,) = deployment["spec"]["template"]["spec"]["containers"]
    return only


def k8s_workers(k8s: Objects) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in of_kind(k8s, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def env(of: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in of.get("env", []) if "value" in e}
