"""Fixtures shared by every tier: a real redis-server (or Redis Cluster) per session and factories for real
gateway/worker processes."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import tempfile
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

import pytest
import redis
from openai import OpenAI
from prometheus_client.parser import text_string_to_metric_families
from redis.cluster import ClusterNode

from conveyor import key_layout
from conveyor.contract import QueueBackend
from conveyor.redis_client import parse_cluster
from conveyor.registry import WorkerInfo
from launcher import processes, redis_cluster, redis_server
from launcher.redis_cluster import RedisClusterServer
from launcher.redis_server import RedisServer

BACKEND_VARIABLE = "CONVEYOR_QUEUE_BACKEND"


@dataclass(frozen=True)
class RedisSetup:
    """What the process tiers run on: a queue backend, on one redis-server or on a Redis Cluster."""

    name: str
    backend: QueueBackend
    cluster: bool = False


SETUPS = [
    RedisSetup("arq", QueueBackend.ARQ),
    RedisSetup("streams", QueueBackend.STREAMS),
    RedisSetup("cluster", QueueBackend.STREAMS, cluster=True),
]


#: the tiers whose tests on the session's Redis (or, for the tenancy tier, the Redis it starts for its module) also
#: run on a cluster (the engine tier's vLLM starts are too slow to pay a third time)
CLUSTER_TIERS = {"integration", "tenancy"}
#: the fixtures of a Redis a cluster can stand in for (a test that stops its Redis has another)
CLUSTER_FIXTURES = {"redis_url", "tenancy_redis"}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Every test that (through its fixtures) takes ``redis_setup`` runs once per setup: ``arq``, ``streams`` and,
    in ``CLUSTER_TIERS`` and on the session's shared Redis (``redis_url``), ``cluster``. A test with a Redis of its
    own (``own_redis``, its own server, Sentinel group or ``conveyor up``'s embedded Redis) runs on one redis-server
    only, with arq and with streams."""
    if "redis_setup" not in metafunc.fixturenames:
        return
    on_cluster = bool(CLUSTER_FIXTURES & set(metafunc.fixturenames))
    cluster = on_cluster and metafunc.definition.path.parent.name in CLUSTER_TIERS
    setups = [s for s in SETUPS if cluster or not s.cluster]
    metafunc.parametrize("redis_setup", setups, ids=[s.name for s in setups], indirect=True, scope="session")


@pytest.fixture(scope="session")
def redis_setup(request: pytest.FixtureRequest) -> RedisSetup:
    """The session's setup, one of ``SETUPS`` (see ``pytest_generate_tests``): ``-k cluster`` picks the cluster's."""
    setup: RedisSetup = request.param
    return setup


@pytest.fixture(scope="session")
def queue_backend(redis_setup: RedisSetup) -> Iterator[QueueBackend]:
    """Every tier of real processes runs once per queue backend (and the streams backend once more on a Redis
    Cluster): each process started here (gateways, workers, ``conveyor up``) inherits ``CONVEYOR_QUEUE_BACKEND``."""
    backend = redis_setup.backend
    before = os.environ.get(BACKEND_VARIABLE)
    os.environ[BACKEND_VARIABLE] = backend.value
    yield backend
    if before is None:
        os.environ.pop(BACKEND_VARIABLE, None)
    else:
        os.environ[BACKEND_VARIABLE] = before


@pytest.fixture(scope="session")
def session_cluster(
    redis_setup: RedisSetup, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisClusterServer | None]:
    """The 3-master Redis Cluster of the ``cluster`` setup (None on the others): a test that checks which master
    holds a key asks it (``node_of``)."""
    if not redis_setup.cluster:
        yield None
        return
    cluster = redis_cluster.start(tmp_path_factory.mktemp("redis-cluster"))
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def redis_url(
    queue_backend: QueueBackend, session_cluster: RedisClusterServer | None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The session's Redis: one redis-server, or the cluster's ``redis+cluster://`` URL."""
    if session_cluster is not None:
        yield session_cluster.url
        return
    port = redis_server.free_port()
    server = redis_server.start(port, tmp_path_factory.mktemp("redis"))
    yield f"redis://127.0.0.1:{port}/0"
    server.terminate()
    server.wait(10)


@pytest.fixture
def own_redis(redis_setup: RedisSetup, queue_backend: QueueBackend, tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server of this test's own: it may be stopped and restarted, and what it holds reaches no other test."""
    if redis_setup.cluster:
        pytest.skip("own_redis is one redis-server to stop and restart; the cluster setup has none")
    server = RedisServer(redis_server.free_port(), tmp_path / "redis")
    server.start()
    yield server
    server.stop()


def sync_redis(url: str) -> redis.Redis:
    """A blocking client of the session's Redis for a test's own look: ``redis.RedisCluster`` on a cluster URL (it
    answers the key commands a test asks; typed as Redis as ``redis_client.connect`` does)."""
    target = parse_cluster(url)
    if target is None:
        return redis.Redis.from_url(url)
    nodes = [ClusterNode(host, port) for host, port in target.nodes]  # type: ignore[no-untyped-call]
    cluster = redis.RedisCluster(startup_nodes=nodes, username=target.username, password=target.password)
    return cast(redis.Redis, cluster)


@dataclass
class Gateway:
    port: int
    process: subprocess.Popen[bytes]
    redis_url: str = ""
    clients: list[OpenAI] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client(self, api_key: str = "unused", **kwargs: object) -> OpenAI:
        client = OpenAI(base_url=f"{self.base_url}/v1", api_key=api_key, max_retries=0, **kwargs)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def close_clients(self) -> None:
        for client in self.clients:
            client.close()
        self.clients.clear()


@dataclass
class Worker:
    info: WorkerInfo
    process: subprocess.Popen[bytes]

    def metrics(self) -> dict[str, float]:
        """The worker's /metrics as {'name{label="v",...}': value}."""
        return scrape(f"http://127.0.0.1:{self.info.metrics_port}/metrics")


def scrape(url: str) -> dict[str, float]:
    with urllib.request.urlopen(url, timeout=5) as response:
        text = response.read().decode()
    samples: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            samples[f"{sample.name}{{{labels}}}"] = sample.value
    return samples


#: one file store for every process of a test session: they share the session's Redis, so a chunk any worker takes
#: must be readable by it (the fault tier gives each test its own Redis and store)
SESSION_FILES = Path(tempfile.mkdtemp(prefix="conveyor-files-"))


@dataclass
class Processes:
    redis_url: str
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    #: the file store every gateway and worker of these processes share (batch inputs and outputs)
    files_dir: Path = field(default_factory=lambda: SESSION_FILES)
    #: environment of every process started here (e.g. another ``CONVEYOR_FILES_URL``)
    env: dict[str, str] = field(default_factory=dict)

    @property
    def shared_env(self) -> dict[str, str]:
        return {"CONVEYOR_FILES_URL": str(self.files_dir), **self.env}

    def gateway(self, log: Path | None = None, env: dict[str, str] | None = None, **settings: str) -> Gateway:
        """A gateway process; its output goes to ``log`` when given; ``env`` adds variables of its own."""
        port = redis_server.free_port()
        env = self.shared_env | (env or {}) | {f"CONVEYOR_GATEWAY_{k.upper()}": v for k, v in settings.items()}
        with log.open("wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as output:
            process = processes.start_gateway(self.redis_url, port, env, output=output)
        self.started.append(process)
        self.gateways.append(Gateway(port, process, self.redis_url))
        return self.gateways[-1]

    def worker(
        self, model: str, *args: str, env: dict[str, str] | None = None, timeout: float = 30.0, log: Path | None = None
    ) -> Worker:
        with log.open("wb") if log else contextlib.nullcontext(subprocess.DEVNULL) as output:
            process, info = processes.start_worker(
                self.redis_url, model, args, env=self.shared_env | (env or {}), output=output, timeout=timeout
            )
        self.started.append(process)
        return Worker(info, process)

    def fake_worker(
        self, model: str, *args: str, embed: bool = False, env: dict[str, str] | None = None, log: Path | None = None
    ) -> Worker:
        task = "embed" if embed else "generate"
        return self.worker(model, "--engine", "fake", "--task", task, *args, env=env, log=log)

    def stop_all(self) -> None:
        for gateway in self.gateways:
            gateway.close_clients()
        for process in reversed(self.started):
            processes.stop(process, grace=10)
        self.started.clear()


@pytest.fixture(scope="session", autouse=True)
def _session_files() -> Iterator[None]:
    yield
    shutil.rmtree(SESSION_FILES, ignore_errors=True)


@pytest.fixture(scope="session")
def session_processes(redis_url: str) -> Iterator[Processes]:
    procs = Processes(redis_url)
    yield procs
    procs.stop_all()


@pytest.fixture
def spawn(redis_url: str) -> Iterator[Processes]:
    """Processes that live for one test."""
    procs = Processes(redis_url)
    yield procs
    procs.stop_all()


def queue_depth(redis_url: str, model: str) -> int:
    """Jobs waiting or running on a model's interactive lane, on either backend's layout (as the registry counts)."""
    with sync_redis(redis_url) as client:
        return int(client.zcard(key_layout.queue_name(model))) + int(client.xlen(key_layout.stream_lane_key(model)))


def wait_for(condition: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll a condition on another process's state (metrics, registry) until it holds."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def metric(samples: dict[str, float], name: str, **labels: str) -> float:
    """Sum of the samples of ``name`` whose labels include ``labels``."""
    total = 0.0
    for key, value in samples.items():
        sample_name, _, rest = key.partition("{")
        if sample_name == name and all(f'{k}="{v}"' in rest for k, v in labels.items()):
            total += value
    return total


def models_arg(names: Sequence[str]) -> str:
    return ",".join(names)


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def run_embedding_batch(client: OpenAI, model: str, lines: int, timeout: float = 60) -> None:
    """Upload ``lines`` embedding requests, run them as a batch and wait until it completed."""
    body = "".join(
        json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings",
                    "body": {"model": model, "input": f"batch line {i}"}}) + "\n"
        for i in range(lines)
    )  # fmt: skip
    batch_input = client.files.create(file=("in.jsonl", io.BytesIO(body.encode())), purpose="batch")
    batch = client.batches.create(input_file_id=batch_input.id, endpoint="/v1/embeddings", completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", timeout=timeout, what="the batch")


def descendants(pid: int) -> set[int]:
    """Every live process below ``pid`` (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found: set[int] = set()
    todo = [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"
