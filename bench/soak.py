"""Soak: mixed traffic for a long time with faults injected, sampling memory, Redis keys and outcomes over time.

    uv run --frozen --extra cpu python -m bench.soak [--minutes 30] [--sample-every 180] [--fault-every 120]

The stack: a redis-server with an append-only file, one gateway (an API key, a 256 KiB body limit), two fake chat
workers and one fake embedding worker, all with default settings. Clients send, at random: chat (sync and
streamed), embeddings, streams and sync requests they leave on purpose, requests whose deadline passes, and bad
input (no key, broken JSON, a NaN timeout, an oversized body, random model names, random paths). Every answer is
checked: the text has the words asked for, a stream is complete and ends with [DONE], every input has its vector.

Faults, one in turn every ``--fault-every`` seconds: a chat engine that dies on command (its worker exits 3), a chat
worker SIGKILLed, Redis killed for 5 s and started again. Like a supervisor, the soak restarts every worker
that exits.

Each sample stops the traffic until nothing is in flight, then reads the RSS of the gateway and of the embedding
worker (neither is ever restarted), Redis' keys, the memory they hold (``MEMORY USAGE``, summed) and its clients
(after the jobs of clients that left have stopped), the gateway's open files, and the outcomes so
far. Outcomes: ``ok`` (the right answer), ``refused`` (the right 4xx or 504 for what was sent), ``left`` (the client
left on purpose), ``fault`` (a 5xx or a stream error while a fault was open), ``unexpected`` (anything else), and
``lost`` (no answer by the request's deadline). Exits 1 when anything was lost or unexpected or memory grew 5% or more
between the first sample under traffic and the last.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis

from bench.common import machine, table
from conveyor import key_layout
from launcher import processes, redis_server
from launcher.redis_server import RedisServer

CHAT, EMBED = "soak-chat", "soak-embed"
KEY = "soak-key"
BODY_LIMIT = 256 * 1024
TOKEN_DELAY = 0.01  # seconds per fake token
DEADLINE = 60.0  # x-conveyor-timeout of every request that should be answered
FAULT_GRACE = 20.0  # failures this long after a fault recovered still count as the fault's
EMBED_DIM = 32  # the fake engine's default


@dataclass
class Outcomes:
    counts: Counter[str] = field(default_factory=Counter)
    fault_windows: list[tuple[float, float]] = field(default_factory=list)
    #: why the unexpected ones failed, and when (seconds into the soak) each reason was first seen
    unexpected: Counter[str] = field(default_factory=Counter)
    first_seen: dict[str, float] = field(default_factory=dict)
    started: float = field(default_factory=time.monotonic)

    def during_fault(self, started: float) -> bool:
        now = time.monotonic()
        return any(start <= now and started <= end + FAULT_GRACE for start, end in self.fault_windows)

    def failed(self, started: float, what: str) -> None:
        if self.during_fault(started):
            self.counts["fault"] += 1
        else:
            self.counts["unexpected"] += 1
            self.unexpected[what] += 1
            self.first_seen.setdefault(what, time.monotonic() - self.started)


def reason(response: httpx.Response) -> str:
    """``<status> <error code>``: what a refusal was, in few enough words to count."""
    try:
        code = response.json()["error"]["code"]
    except (ValueError, KeyError, TypeError):
        code = "?"
    return f"{response.status_code} {code}"


def headers(timeout: float = DEADLINE) -> dict[str, str]:
    return {"authorization": f"Bearer {KEY}", "x-conveyor-timeout": str(timeout)}


def chat_body(tokens: int, stream: bool = False) -> dict[str, object]:
    text = f"soak {random.random()}"
    return {"model": CHAT, "messages": [{"role": "user", "content": text}], "max_tokens": tokens, "stream": stream}


async def chat_sync(client: httpx.AsyncClient) -> tuple[str, str]:
    tokens = random.randint(1, 30)
    response = await client.post("/v1/chat/completions", json=chat_body(tokens), headers=headers())
    if response.status_code != 200:
        return "error", f"chat {reason(response)}"
    words = len(response.json()["choices"][0]["message"]["content"].split())
    return ("ok", "") if words == tokens else ("wrong", f"chat: {words} words for {tokens}")


async def chat_stream(client: httpx.AsyncClient, leave_after: int | None = None) -> tuple[str, str]:
    tokens = random.randint(5, 40)
    async with client.stream("POST", "/v1/chat/completions", json=chat_body(tokens, True), headers=headers()) as r:
        if r.status_code != 200:
            await r.aread()
            return "error", f"stream {reason(r)}"
        words, done, events = 0, False, 0
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            events += 1
            if leave_after is not None and events >= leave_after:
                return "left", ""
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "error" in event:
                return "error", f"stream error event {event['error'].get('code')}"
            for choice in event.get("choices", []):
                words += len((choice.get("delta", {}).get("content") or "").split())
    return ("ok", "") if done and words == tokens else ("wrong", f"stream: {words} words for {tokens}, done={done}")


async def embeddings(client: httpx.AsyncClient) -> tuple[str, str]:
    texts = [f"text {random.random()}" for _ in range(random.randint(1, 4))]
    response = await client.post("/v1/embeddings", json={"model": EMBED, "input": texts}, headers=headers())
    if response.status_code != 200:
        return "error", f"embeddings {reason(response)}"
    data = response.json()["data"]
    right = len(data) == len(texts) and all(len(item["embedding"]) == EMBED_DIM for item in data)
    return ("ok", "") if right else ("wrong", "embeddings: wrong shape")


async def leave_sync(client: httpx.AsyncClient) -> tuple[str, str]:
    """A 1 s job whose client gives up after 0.1 s."""
    with contextlib.suppress(httpx.TimeoutException):
        await client.post("/v1/chat/completions", json=chat_body(100), headers=headers(), timeout=0.1)
        return "wrong", "a 1 s job answered within 0.1 s"
    return "left", ""


def expect(status: int) -> Callable[[httpx.Response], tuple[str, str]]:
    def check(response: httpx.Response) -> tuple[str, str]:
        if response.status_code == status and "error" in response.json():
            return "refused", ""
        if response.status_code >= 500:
            return "error", f"wanted {status}, got {reason(response)}"
        return "wrong", f"wanted {status}, got {reason(response)}"

    return check


def refusal(
    method: str, path: str, status: int, **kwargs: object
) -> Callable[[httpx.AsyncClient], Awaitable[tuple[str, str]]]:
    async def call(client: httpx.AsyncClient) -> tuple[str, str]:
        return expect(status)(await client.request(method, path, **kwargs))  # type: ignore[arg-type]

    return call


async def past_deadline(client: httpx.AsyncClient) -> tuple[str, str]:
    response = await client.post("/v1/chat/completions", json=chat_body(100), headers=headers(timeout=0.3))
    return expect(504)(response)


async def unknown_model(client: httpx.AsyncClient) -> tuple[str, str]:
    body = {"model": f"nobody-{random.getrandbits(48):x}", "input": "x"}
    return expect(404)(await client.post("/v1/embeddings", json=body, headers=headers()))


async def unknown_path(client: httpx.AsyncClient) -> tuple[str, str]:
    return expect(404)(await client.get(f"/v1/{random.getrandbits(48):x}", headers=headers()))


TRAFFIC: list[tuple[int, Callable[[httpx.AsyncClient], Awaitable[tuple[str, str]]]]] = [
    (25, chat_sync),
    (15, chat_stream),
    (20, embeddings),
    (5, lambda client: chat_stream(client, leave_after=2)),
    (5, leave_sync),
    (5, past_deadline),
    (5, unknown_model),
    (3, unknown_path),
    (4, refusal("POST", "/v1/embeddings", 401, json={"model": EMBED, "input": "x"})),
    (4, refusal("POST", "/v1/embeddings", 400, content=b'{"model": "', headers=headers())),
    (
        3,
        refusal(
            "POST",
            "/v1/embeddings",
            400,
            json={"model": EMBED, "input": "x"},
            headers=headers() | {"x-conveyor-timeout": "NaN"},
        ),
    ),
    (2, refusal("POST", "/v1/embeddings", 413, content=b"x" * (BODY_LIMIT + 1), headers=headers())),
]


@dataclass
class Fleet:
    """The soak's processes, and a supervisor that restarts any worker that exits."""

    redis: RedisServer
    gateway: subprocess.Popen[bytes]
    base_url: str
    workers: dict[str, tuple[str, subprocess.Popen[bytes]]] = field(default_factory=dict)
    exits: Counter[str] = field(default_factory=Counter)

    def start_worker(self, slot: str, model: str, embed: bool) -> None:
        args = ["--engine", "fake", "--task", "embed" if embed else "generate", "--fake-token-delay", str(TOKEN_DELAY)]
        process, _ = processes.start_worker(self.redis.url, model, args, output=subprocess.DEVNULL)
        self.workers[slot] = (model, process)

    async def supervise(self) -> None:
        while True:
            for slot, (model, process) in list(self.workers.items()):
                if process.poll() is not None:
                    self.exits[f"exit {process.returncode}"] += 1
                    with contextlib.suppress(RuntimeError, TimeoutError):  # Redis may be down: try again next round
                        await asyncio.to_thread(self.start_worker, slot, model, model == EMBED)
            await asyncio.sleep(0.5)

    def stop(self) -> None:
        for _, process in self.workers.values():
            processes.stop(process, grace=10)
        processes.stop(self.gateway, grace=10)
        self.redis.stop()


async def kill_a_chat_worker(fleet: Fleet, client: httpx.AsyncClient) -> str:
    _, process = fleet.workers["chat-0"]
    process.send_signal(signal.SIGKILL)
    await wait_until(lambda: fleet.workers["chat-0"][1] is not process, 60)
    return "SIGKILL chat worker"


async def redis_outage(fleet: Fleet, client: httpx.AsyncClient) -> str:
    fleet.redis.stop()
    await asyncio.sleep(5)  # the outage itself
    fleet.redis.start()
    return "Redis killed 5 s"


async def engine_death(fleet: Fleet, client: httpx.AsyncClient) -> str:
    before = sum(fleet.exits.values())
    body = chat_body(5) | {"fake_fault": "die"}
    with contextlib.suppress(httpx.HTTPError):
        await client.post("/v1/chat/completions", json=body, headers=headers(timeout=20), timeout=30)
    await wait_until(
        lambda: sum(fleet.exits.values()) > before and all(p.poll() is None for _, p in fleet.workers.values()), 60
    )
    return "chat engine dies"


#: the engine death first: the failure it leaves in the registry (10 min) is then there in every sample under traffic
FAULTS = (engine_death, kill_a_chat_worker, redis_outage)


async def wait_until(condition: Callable[[], bool], within: float) -> None:
    """Poll the state of other processes (nothing to await) until ``condition`` holds or ``within`` seconds pass."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while not condition():  # noqa: ASYNC110
                await asyncio.sleep(0.1)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


@dataclass
class Sample:
    minute: float
    requests: int
    gateway_rss: float
    worker_rss: float
    redis_keys: int
    redis_data: float
    redis_clients: int
    gateway_fds: int
    counts: Counter[str]
    faults: str


class Traffic:
    def __init__(self, client: httpx.AsyncClient, outcomes: Outcomes, concurrency: int) -> None:
        self.client, self.outcomes, self.concurrency = client, outcomes, concurrency
        self.flowing = asyncio.Event()
        self.in_flight = 0
        self.requests = 0
        self.weights = [w for w, _ in TRAFFIC]
        self.calls = [c for _, c in TRAFFIC]

    async def loop(self) -> None:
        while True:
            await self.flowing.wait()
            call = random.choices(self.calls, self.weights)[0]
            self.in_flight += 1
            self.requests += 1
            started = time.monotonic()
            try:
                kind, what = await call(self.client)
            except httpx.TimeoutException:
                kind, what = "lost", "no answer by the deadline"
            except httpx.HTTPError as exc:
                kind, what = "error", f"{type(exc).__name__}: {exc}"
            finally:
                self.in_flight -= 1
            if kind in ("error", "wrong"):
                self.outcomes.failed(started, what)
            else:
                self.outcomes.counts[kind] += 1

    async def pause(self) -> None:
        self.flowing.clear()
        await wait_until(lambda: self.in_flight == 0, DEADLINE + 30)


def soak(minutes: float, sample_every: float, fault_every: float, concurrency: int = 16) -> list[Sample]:
    with tempfile.TemporaryDirectory() as tmp:
        fleet = start_fleet(Path(tmp))
        try:
            return asyncio.run(drive(fleet, minutes, sample_every, fault_every, concurrency))
        finally:
            fleet.stop()


def start_fleet(workdir: Path) -> Fleet:
    server = RedisServer(redis_server.free_port(), workdir / "redis", persist=True)
    server.start()
    port = redis_server.free_port()
    env = {
        "CONVEYOR_GATEWAY_MODELS": f"{CHAT},{EMBED}",
        "CONVEYOR_GATEWAY_API_KEYS": KEY,
        "CONVEYOR_GATEWAY_MAX_BODY_BYTES": str(BODY_LIMIT),
    }
    gateway = processes.start_gateway(server.url, port, env, output=subprocess.DEVNULL)
    fleet = Fleet(server, gateway, f"http://127.0.0.1:{port}")
    fleet.start_worker("chat-0", CHAT, embed=False)
    fleet.start_worker("chat-1", CHAT, embed=False)
    fleet.start_worker("embed", EMBED, embed=True)
    return fleet


async def drive(
    fleet: Fleet, minutes: float, sample_every: float, fault_every: float, concurrency: int
) -> list[Sample]:
    outcomes = Outcomes()
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(base_url=fleet.base_url, timeout=DEADLINE + 15, limits=limits) as client:
        traffic = Traffic(client, outcomes, concurrency)
        tasks = [asyncio.create_task(traffic.loop()) for _ in range(concurrency)]
        tasks.append(asyncio.create_task(fleet.supervise()))
        samples = [take_sample(fleet, traffic, 0.0, "")]
        started = time.monotonic()
        end = started + minutes * 60
        next_sample, next_fault, fault_index, faults_since = sample_every, fault_every, 0, []
        traffic.flowing.set()
        try:
            while time.monotonic() < end:
                elapsed = time.monotonic() - started
                if elapsed >= next_fault:
                    fault = FAULTS[fault_index % len(FAULTS)]
                    fault_index += 1
                    outcomes.fault_windows.append((time.monotonic(), float("inf")))
                    faults_since.append(await fault(fleet, client))
                    print(f"{elapsed:.0f} s: {faults_since[-1]}", file=sys.stderr, flush=True)
                    outcomes.fault_windows[-1] = (outcomes.fault_windows[-1][0], time.monotonic())
                    next_fault += fault_every
                elif elapsed >= next_sample:
                    await traffic.pause()
                    samples.append(take_sample(fleet, traffic, elapsed / 60, ", ".join(faults_since)))
                    print(row(samples[-1]), file=sys.stderr, flush=True)
                    faults_since = []
                    traffic.flowing.set()
                    next_sample += sample_every
                else:
                    await asyncio.sleep(0.2)
            await traffic.pause()
            samples.append(take_sample(fleet, traffic, (time.monotonic() - started) / 60, ", ".join(faults_since)))
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        for what, count in outcomes.unexpected.most_common():
            print(f"unexpected: {count} x {what} (first {outcomes.first_seen[what]:.0f} s in)", file=sys.stderr)
        samples[-1].counts.update({f"worker {k}": v for k, v in fleet.exits.items()})
        return samples


def at_rest(r: redis.Redis) -> None:
    """Wait (bounded) until the jobs of clients that left have been stopped: no job, lease or queue is left."""
    deadline = time.monotonic() + 30
    patterns = ("arq:*", key_layout.queue_name("*"))
    while any(next(r.scan_iter(p), None) for p in patterns) and time.monotonic() < deadline:
        time.sleep(0.1)


def take_sample(fleet: Fleet, traffic: Traffic, minute: float, faults: str) -> Sample:
    with redis.Redis.from_url(fleet.redis.url) as r:
        at_rest(r)
        names = list(r.scan_iter(count=1000))
        key_bytes = sum(int(r.memory_usage(name) or 0) for name in names)
        info = r.info("clients")
    embed_pid = fleet.workers["embed"][1].pid
    return Sample(
        minute=minute,
        requests=traffic.requests,
        gateway_rss=rss_mib(fleet.gateway.pid),
        worker_rss=rss_mib(embed_pid),
        redis_keys=len(names),
        redis_data=key_bytes / 1024,
        redis_clients=int(info["connected_clients"]),
        gateway_fds=len(os.listdir(f"/proc/{fleet.gateway.pid}/fd")),
        counts=Counter(traffic.outcomes.counts),
        faults=faults,
    )


HEADERS = [
    "minute", "requests", "gateway RSS MiB", "embed worker RSS MiB", "Redis keys", "Redis key KiB", "Redis clients",
    "gateway fds", "ok", "refused", "left", "fault", "unexpected", "lost", "faults since last row",
]  # fmt: skip


def row(s: Sample) -> list[object]:
    c = s.counts
    return [
        f"{s.minute:.1f}", s.requests, f"{s.gateway_rss:.1f}", f"{s.worker_rss:.1f}", s.redis_keys,
        f"{s.redis_data:.1f}", s.redis_clients, s.gateway_fds, c["ok"], c["refused"], c["left"], c["fault"],
        c["unexpected"], c["lost"], s.faults or "-",
    ]  # fmt: skip


def growth(first: float, last: float) -> float:
    return (last - first) / first * 100 if first else 0.0


def report(samples: list[Sample]) -> bool:
    """Print the table and the verdict; True when the soak held."""
    print(f"Soak on {machine()}\n")
    print(table(HEADERS, [row(s) for s in samples]))
    warm, last = samples[1], samples[-1]
    grew = {
        "gateway RSS": growth(warm.gateway_rss, last.gateway_rss),
        "embed worker RSS": growth(warm.worker_rss, last.worker_rss),
        "Redis key memory": growth(warm.redis_data, last.redis_data),
        "Redis keys": growth(warm.redis_keys, last.redis_keys),
    }
    print(
        "\ngrowth from the first sample under traffic to the last: "
        + ", ".join(f"{name} {value:+.1f}%" for name, value in grew.items())
    )
    exits = {k: v for k, v in last.counts.items() if k.startswith("worker exit")}
    print(f"worker exits (each restarted): {exits or 'none'}")
    held = last.counts["lost"] == 0 and last.counts["unexpected"] == 0 and all(g < 5 for g in grew.values())
    print("verdict: " + ("held" if held else "FAILED"))
    return held


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--sample-every", type=float, default=180, help="seconds between samples")
    parser.add_argument("--fault-every", type=float, default=120, help="seconds between injected faults")
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    samples = soak(args.minutes, args.sample_every, args.fault_every, args.concurrency)
    sys.exit(0 if report(samples) else 1)


if __name__ == "__main__":
    main()
