"""A Redis Sentinel deployment on loopback, from the same redis-server binary: one master, one replica and three
sentinels (quorum 2) watching the service ``conveyor``. The master can be killed to make the sentinels fail over."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import redis

from launcher import processes, redis_server
from tests.conftest import wait_for

SERVICE = "conveyor"
#: the sentinels call the master down after this long without an answer
DOWN_AFTER_MS = 1000


@dataclass
class SentinelGroup:
    workdir: Path
    master_port: int = 0
    replica_port: int = 0
    sentinel_ports: list[int] = field(default_factory=list)
    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    @property
    def url(self) -> str:
        """``CONVEYOR_REDIS_URL`` for every process of the deployment."""
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{SERVICE}/0"

    def start(self) -> None:
        self.master_port, self.replica_port = redis_server.free_port(), redis_server.free_port()
        self.started.append(redis_server.start(self.master_port, self.workdir / "master"))
        replica_of = ["--replicaof", "127.0.0.1", str(self.master_port)]
        self.started.append(redis_server.start(self.replica_port, self.workdir / "replica", extra=replica_of))
        for n in range(3):
            port, folder = redis_server.free_port(), self.workdir / f"sentinel-{n}"
            folder.mkdir(parents=True)
            conf = folder / "sentinel.conf"  # a sentinel rewrites its own file: one each
            conf.write_text(
                f"sentinel monitor {SERVICE} 127.0.0.1 {self.master_port} 2\n"
                f"sentinel down-after-milliseconds {SERVICE} {DOWN_AFTER_MS}\n"
                f"sentinel failover-timeout {SERVICE} 10000\n"
            )
            self.started.append(redis_server.start(port, folder, config=[str(conf), "--sentinel"]))
            self.sentinel_ports.append(port)
        wait_for(self._watching, timeout=30, what="the sentinels to see the replica and each other")

    def _watching(self) -> bool:
        with redis.Redis(port=self.replica_port) as replica:
            if replica.info("replication").get("master_link_status") != "up":
                return False
        for port in self.sentinel_ports:
            with redis.Redis(port=port) as sentinel:
                state = sentinel.sentinel_master(SERVICE)
                if int(state["num-slaves"]) < 1 or int(state["num-other-sentinels"]) < 2:
                    return False
        return True

    def master_seen_by_sentinels(self) -> set[int]:
        ports = set()
        for port in self.sentinel_ports:
            with redis.Redis(port=port) as sentinel:
                ports.add(int(sentinel.sentinel_get_master_addr_by_name(SERVICE)[1]))
        return ports

    def kill_master(self) -> None:
        """SIGKILL, as a crash: what it had not yet sent to its replica is gone."""
        master = self.started[0]
        master.kill()
        master.wait(10)

    def stop(self) -> None:
        for process in reversed(self.started):
            processes.stop(process, grace=5)
