"""What managed API keys cost a request: latency at concurrency 16 with the fake engine, with a static key (no limits,
no accounting: the baseline), a managed key without limits (its lookup and usage accounting) and a managed key with
every limit set (the windows read and charged in the admission script, the charge reconciled at finish).

    uv run --frozen --extra cpu python -m bench.admission_cost [--seconds 8] [--rounds 3]

The three run in turn, ``--rounds`` times over, on one stack (a real redis-server, a gateway, a fake-engine worker per
model), so machine noise spreads over all of them. Prints p50/p95 per configuration and workload, the p50 added over
the static key, and the CPU the gateway, Redis and the workers spent per request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
from typing import Any

from bench.common import Stack, closed_loop, cpu_seconds, machine, ms, percentile, stack, table

STATIC_KEY = "bench-static-key"
CHAT: dict[str, Any] = {
    "model": "bench-chat",
    "messages": [{"role": "user", "content": "Say something."}],
    "max_tokens": 16,
}
EMBED: dict[str, Any] = {"model": "bench-embed", "input": "a sentence to embed"}
WORKLOADS: dict[str, tuple[str, dict[str, Any]]] = {
    "chat": ("/v1/chat/completions", CHAT),
    "embeddings": ("/v1/embeddings", EMBED),
}
CONCURRENCY = 16
#: limits far above what the bench reaches: every request is checked against them, none is refused
CLI = (sys.executable, "-m", "launcher.cli", "--log-level", "ERROR")
CPU_COLUMNS = ("gateway", "Redis", "workers")
HIGH_LIMITS = ("--rpm", "1000000000", "--tpm", "1000000000000", "--max-queued", "1000000")


def create_key(redis_url: str, name: str, *limits: str) -> str:
    done = subprocess.run(
        [*CLI, "keys", "--redis-url", redis_url, "create", "--name", name, *limits, "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    secret: str = json.loads(done.stdout)["value"]
    return secret


def run(seconds: float, rounds: int) -> None:
    with stack(["bench-chat", "bench-embed"], {"CONVEYOR_GATEWAY_API_KEYS": STATIC_KEY}) as s:
        s.worker("bench-chat", "--engine", "fake", "--task", "generate")
        s.worker("bench-embed", "--engine", "fake", "--task", "embed")
        keys = {
            "static key (baseline)": STATIC_KEY,
            "managed key, no limits": create_key(s.redis_url, "bench-plain"),
            "managed key, rpm+tpm+max-queued": create_key(s.redis_url, "bench-limited", *HIGH_LIMITS),
        }
        asyncio.run(measure(s, keys, seconds, rounds))


async def measure(s: Stack, keys: dict[str, str], seconds: float, rounds: int) -> None:
    latencies: dict[tuple[str, str], list[float]] = {}
    cpu: dict[tuple[str, str], list[float]] = {}
    gateway, workers = s.children[0].pid, [child.pid for child in s.children[1:]]

    def used() -> list[float]:
        """CPU seconds so far of the gateway, Redis and the workers (``CPU_COLUMNS``)."""
        return [cpu_seconds(gateway), cpu_seconds(s.redis_pid), sum(cpu_seconds(w) for w in workers)]

    for path, body in WORKLOADS.values():  # warm up both paths
        await closed_loop(s.base_url, path, body, 1.0, CONCURRENCY, {"Authorization": f"Bearer {STATIC_KEY}"})
    for _ in range(rounds):
        for config, secret in keys.items():
            for workload, (path, body) in WORKLOADS.items():
                before = used()
                loaded = await closed_loop(
                    s.base_url, path, body, seconds, CONCURRENCY, {"Authorization": f"Bearer {secret}"}
                )
                spent = [(b - a) / len(loaded.latencies) for a, b in zip(before, used(), strict=True)]
                latencies.setdefault((config, workload), []).extend(loaded.latencies)
                totals = cpu.setdefault((config, workload), [0.0, 0.0, 0.0])
                cpu[(config, workload)] = [t + x / rounds for t, x in zip(totals, spent, strict=True)]
    baseline = next(iter(keys))
    rows = []
    for (config, workload), values in latencies.items():
        p50 = percentile(values, 50)
        added = p50 - percentile(latencies[(baseline, workload)], 50)
        per_request = [f"{x * 1e3:.3f}" for x in cpu[(config, workload)]]
        rows.append([workload, config, len(values), ms(p50), ms(percentile(values, 95)), ms(added), *per_request])
    rows.sort(key=lambda row: (str(row[0]), list(keys).index(str(row[1]))))
    print(f"\nAdmission cost of API keys, concurrency {CONCURRENCY}, fake engine ({machine()})")
    headers = ["workload", "key", "requests", "p50 ms", "p95 ms", "added p50 ms"]
    print(table(headers + [f"{name} CPU ms/req" for name in CPU_COLUMNS], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=8.0, help="load per configuration and workload, per round")
    parser.add_argument("--rounds", type=int, default=3, help="times the configurations take turns")
    args = parser.parse_args()
    run(args.seconds, args.rounds)


if __name__ == "__main__":
    main()
