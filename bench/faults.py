"""Redis outages, measured: Redis killed for 5 s and 30 s, with and without an append-only file, while a job runs.

    uv run --frozen --extra cpu python -m bench.faults [--outages 5 30]

Each row is a fresh stack (redis-server, gateway, two fake chat workers with default settings). A 2-token-per-50-ms
chat job is running when Redis is killed (SIGKILL, as a crash); Redis is started again on the same port after the
outage. Printed: how many workers exited, whether the job held through the outage was answered in full, and how
long after Redis' return the first new request was answered 200 (polled every 50 ms). The fault tier runs the 5 s
case as a test (``tests/faults/test_failures.py``).
"""

from __future__ import annotations

import argparse
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import machine, table
from launcher import processes, redis_server
from launcher.redis_server import RedisServer
from tests.conftest import metric, scrape, wait_for

MODEL = "faulty"
MESSAGES = [{"role": "user", "content": "tell me a story"}]
TOKEN_DELAY = 0.05


@dataclass
class OutageResult:
    seconds: float
    persist: bool
    worker_exits: int
    words_asked: int
    words_answered: int
    serving_again_after: float


def serves(base_url: str) -> bool:
    try:
        response = httpx.post(
            f"{base_url}/v1/chat/completions",
            json={"model": MODEL, "messages": MESSAGES, "max_tokens": 2},
            headers={"x-conveyor-timeout": "2"},
            timeout=3,
        )
    except httpx.HTTPError:
        return False
    return response.status_code == 200


def running_jobs(metrics_port: int) -> float:
    return metric(scrape(f"http://127.0.0.1:{metrics_port}/metrics"), "conveyor_worker_running_jobs")


def outage(
    server: RedisServer, base_url: str, workers: list[tuple[subprocess.Popen[bytes], int]], seconds: float
) -> OutageResult:
    """Kill ``server`` for ``seconds`` while a job runs on one of ``workers`` (process, metrics port)."""
    words = int((seconds + 3) / TOKEN_DELAY)  # still running when Redis comes back
    answer: dict[str, object] = {}

    def long_job() -> None:
        body = {"model": MODEL, "messages": MESSAGES, "max_tokens": words}
        answer["response"] = httpx.post(f"{base_url}/v1/chat/completions", json=body, timeout=seconds + 60)

    caller = threading.Thread(target=long_job)
    caller.start()
    wait_for(lambda: sum(running_jobs(port) for _, port in workers) == 1, 10, "the job to run")
    server.stop()
    time.sleep(seconds)  # the outage itself
    server.start()
    back = time.monotonic()
    wait_for(lambda: serves(base_url), 30, "an answer after Redis returned")
    serving_again_after = time.monotonic() - back
    caller.join(seconds + 90)
    response = answer.get("response")
    answered = 0
    if isinstance(response, httpx.Response) and response.status_code == 200:
        answered = len(response.json()["choices"][0]["message"]["content"].split())
    exits = sum(process.poll() is not None for process, _ in workers)
    return OutageResult(seconds, server.persist, exits, words, answered, serving_again_after)


def outage_on_a_fresh_stack(seconds: float, persist: bool) -> OutageResult:
    with tempfile.TemporaryDirectory() as tmp:
        server = RedisServer(redis_server.free_port(), Path(tmp) / "redis", persist)
        server.start()
        port = redis_server.free_port()
        children: list[subprocess.Popen[bytes]] = []
        try:
            gateway = processes.start_gateway(
                server.url, port, {"CONVEYOR_GATEWAY_MODELS": MODEL}, output=subprocess.DEVNULL
            )
            children.append(gateway)
            workers = []
            for _ in range(2):
                args = ["--engine", "fake", "--task", "generate", "--fake-token-delay", str(TOKEN_DELAY)]
                process, info = processes.start_worker(server.url, MODEL, args, output=subprocess.DEVNULL)
                children.append(process)
                workers.append((process, info.metrics_port))
            return outage(server, f"http://127.0.0.1:{port}", workers, seconds)
        finally:
            for child in reversed(children):
                processes.stop(child, grace=10)
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--outages", type=float, nargs="+", default=[5, 30], help="outage lengths, seconds")
    args = parser.parse_args()
    rows = []
    for seconds in args.outages:
        for persist in (False, True):
            r = outage_on_a_fresh_stack(seconds, persist)
            rows.append(
                [
                    f"{r.seconds:g}",
                    "append-only file" if r.persist else "none",
                    r.worker_exits,
                    f"{r.words_answered} of {r.words_asked} words",
                    f"{r.serving_again_after:.2f}",
                ]
            )
    print(f"Redis outages on {machine()}\n")
    print(table(["outage s", "persistence", "worker exits", "job held through it", "serving again after s"], rows))


if __name__ == "__main__":
    main()
