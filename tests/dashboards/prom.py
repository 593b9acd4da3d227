"""A real Prometheus (Debian's ``prometheus`` package; ``make test`` installs it) on the shipped scrape config, and
the dashboard's panel queries evaluated on it. Used by the dashboard tier (fake engines) and the engine tier (vLLM).

The shipped ``deploy/prometheus/prometheus.yml`` is used as it is, except for three things a test must change: the
gateway's address (``gateway:8000`` in Compose), the intervals (1 s instead of 10-15 s), and its own listen address.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from launcher import redis_server
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "conveyor.json"
#: what the test puts in for Grafana's variables: every model, and a window that spans the whole test
VARIABLES = {"$model": ".*", "$__rate_interval": "5m"}


@dataclass
class Panel:
    title: str
    exprs: list[str]
    legends: list[str]

    @property
    def engine(self) -> bool:
        """Reads vLLM's own metrics (only a real engine exports them)."""
        return any("vllm:" in expr for expr in self.exprs)

    @property
    def keyed(self) -> bool:
        """Reads the metrics of managed API keys (only traffic with such a key makes them)."""
        return any("conveyor_key_" in expr for expr in self.exprs)


def panels() -> list[Panel]:
    found = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        targets = panel.get("targets", [])
        if targets:
            found.append(Panel(panel["title"], [t["expr"] for t in targets], [t["legendFormat"] for t in targets]))
    return found


def concrete(expr: str) -> str:
    for name, value in VARIABLES.items():
        expr = expr.replace(name, value)
    return expr


@dataclass
class Prometheus:
    url: str

    def api(self, path: str, **params: str) -> Any:
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            body = json.loads(response.read())
        assert body["status"] == "success", body
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's result vector."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def query_range(self, expr: str, seconds: float, step: float = 1.0) -> list[dict[str, Any]]:
        now = time.time()
        data = self.api("query_range", query=expr, start=str(now - seconds), end=str(now), step=str(step))
        return list(data["result"])

    def finite(self, expr: str) -> bool:
        """The query returns at least one sample that is a number (not NaN: a quantile of no observations)."""
        return any(math.isfinite(float(sample["value"][1])) for sample in self.query(concrete(expr)))

    def scrapes(self, gateways: int, workers: int) -> bool:
        """Prometheus scrapes exactly this many gateways and workers successfully."""
        jobs = self.healthy_jobs()
        return jobs.get("conveyor-gateway", 0) == gateways and jobs.get("conveyor-worker", 0) == workers

    def healthy_jobs(self) -> dict[str, int]:
        """Targets Prometheus scrapes successfully, counted per job."""
        counts: dict[str, int] = {}
        for target in self.api("targets", state="active")["activeTargets"]:
            if target["health"] == "up":
                counts[target["labels"]["job"]] = counts.get(target["labels"]["job"], 0) + 1
        return counts


def binary() -> str:
    found = shutil.which("prometheus")
    assert found, "Prometheus is not installed: `make test` installs Debian's package (make tools)"
    return found


def config_for(gateway_url: str, listen: str) -> dict[str, Any]:
    text = SHIPPED_CONFIG.read_text()
    assert "http://gateway:8000" in text, "the shipped config no longer discovers targets through the gateway"
    config: dict[str, Any] = yaml.safe_load(text.replace("http://gateway:8000", gateway_url))
    config["global"]["scrape_interval"] = config["global"]["evaluation_interval"] = "1s"
    for job in config["scrape_configs"]:
        for sd in job.get("http_sd_configs", []):
            sd["refresh_interval"] = "1s"
        for static in job.get("static_configs", []):
            static["targets"] = [listen if t == "localhost:9090" else t for t in static["targets"]]
    return config


@contextmanager
def prometheus(gateway_url: str, workdir: Path) -> Iterator[Prometheus]:
    """Prometheus on the shipped config, discovering the stack behind ``gateway_url``."""
    listen = f"127.0.0.1:{redis_server.free_port()}"
    config = workdir / "prometheus.yml"
    config.write_text(yaml.safe_dump(config_for(gateway_url, listen)))
    log = workdir / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [binary(), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address={listen}", "--log.level=warn"],
            stdout=output, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Prometheus(f"http://{listen}")
    try:
        wait_for(lambda: _ready(server, process, log), timeout=60, what="Prometheus ready")
        yield server
    finally:
        process.terminate()
        process.wait(30)


def _ready(server: Prometheus, process: subprocess.Popen[bytes], log: Path) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}")
    try:
        with urllib.request.urlopen(f"{server.url}/-/ready", timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def unanswered(server: Prometheus, selected: list[Panel]) -> list[str]:
    """The panel queries that return no number."""
    return [f"{panel.title}: {expr}" for panel in selected for expr in panel.exprs if not server.finite(expr)]


def require_answers(server: Prometheus, selected: list[Panel], timeout: float) -> None:
    """Wait until every query of ``selected`` returns a number; fail naming those that do not."""
    missing: list[str] = []

    def answered() -> bool:
        missing[:] = unanswered(server, selected)
        return not missing

    try:
        wait_for(answered, timeout=timeout, what="every panel query answered")
    except AssertionError:
        raise AssertionError("panel queries without data:\n" + "\n".join(missing)) from None


def legend_of(legend: str, labels: dict[str, str]) -> str:
    """A Grafana legend format (``{{model}} p95``) filled in with a series' labels."""
    return re.sub(r"\{\{(\w+)\}\}", lambda match: labels.get(match.group(1), ""), legend)


def plot(server: Prometheus, selected: list[Panel], seconds: float, out: Path) -> list[Path]:
    """Each panel's queries over the last ``seconds``, as a PNG per panel (what Grafana would draw)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    written = []
    for number, panel in enumerate(selected, 1):
        figure, axes = plt.subplots(figsize=(8, 3.5))
        for expr, legend in zip(panel.exprs, panel.legends, strict=True):
            for series in server.query_range(concrete(expr), seconds):
                xs = [float(t) - time.time() for t, _ in series["values"]]
                ys = [float(v) for _, v in series["values"]]
                axes.plot(xs, ys, label=legend_of(legend, series["metric"])[:60])
        axes.set_title(panel.title)
        axes.set_xlabel("seconds ago")
        if axes.get_legend_handles_labels()[0]:
            axes.legend(fontsize=6, loc="upper left")
        path = out / f"{number:02d}-{''.join(c if c.isalnum() else '-' for c in panel.title.lower())}.png"
        figure.savefig(path, dpi=80, bbox_inches="tight")
        plt.close(figure)
        written.append(path)
    return written
