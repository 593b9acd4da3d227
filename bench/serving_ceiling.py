"""How close any server can come to vLLM's offline ``LLM.embed`` here, with vLLM's own client on the same cores.

    uv run --frozen --extra cpu python -m bench.serving_ceiling [--prompts 2000] [--concurrency 64]

Issue 20 asks for single-text embeddings (all-MiniLM-L6-v2, vLLM's random dataset, 32 tokens) served at >= 0.92x
of offline ``LLM.embed``. On this machine the benchmark client, the server and the engine share the cores, so the
CPU a request costs outside the engine is taken from the engine. This measures that CPU:

- **the client's per request**: ``vllm bench serve`` (``bench.vllm_serve``'s client, in this process) is run twice
  against each system, with N and then 3N prompts. The difference of this process's CPU over the difference in
  requests is the client's per request; what a run costs once (sampling and tokenising its prompts) cancels out.
- **each system's per request**, the same way: its whole process tree (server, Redis, worker, the engine's
  processes).
- **offline ``LLM.embed``'s per text**: its whole process tree, over 3N such prompts in one call (``bench.bulk``).

The ceiling: with nothing at all between the client and the engine, the machine's cores would serve at most
cores / (offline CPU per text + client CPU per request) requests a second. Every server adds CPU of its own to that,
so none can pass it. It is printed as a fraction of offline's rate, next to what each system reached.
"""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

from bench.bulk import offline_run
from bench.common import cpu_seconds, machine, table
from bench.vllm_serve import SYSTEMS, WORKLOADS, random_prompts, run_client


@dataclass(frozen=True)
class Run:
    requests: int
    #: CPU seconds over the run: this process's (the client) and the system's process tree
    client_cpu: float
    system_cpu: float
    requests_per_second: float


@dataclass(frozen=True)
class Served:
    system: str
    runs: list[Run]

    def per_request(self, field: str) -> float:
        """CPU seconds per request of ``field``, from the difference between the smallest and the largest run."""
        small, large = min(self.runs, key=lambda r: r.requests), max(self.runs, key=lambda r: r.requests)
        return (getattr(large, field) - getattr(small, field)) / (large.requests - small.requests)


def own_cpu() -> float:
    return cpu_seconds(os.getpid())


def tree_cpu() -> dict[int, float]:
    """CPU seconds of each process under this one, by pid."""
    import psutil  # vLLM's dependency, as the CPU engine's extra installs it

    out = {}
    for process in psutil.Process().children(recursive=True):
        with contextlib.suppress(OSError):  # it ended meanwhile
            out[process.pid] = cpu_seconds(process.pid)
    return out


def serve(system: str, concurrency: int, counts: Sequence[int]) -> Served:
    workload = WORKLOADS[0]
    runs = []
    with SYSTEMS[system](workload.model, workload.task) as urls:
        run_client(urls, workload, concurrency, True, "warm-up")
        for count in counts:
            client, processes = own_cpu(), tree_cpu()
            result = run_client(urls, workload, concurrency, False, f"ceiling-{count}", prompts=count)
            after = tree_cpu()
            system_cpu = sum(cpu - processes.get(pid, 0.0) for pid, cpu in after.items())
            runs.append(Run(count, own_cpu() - client, system_cpu, float(result["request_throughput"])))
    return Served(system, runs)


def ceiling(cores: int, offline_cpu_per_text: float, client_cpu_per_request: float) -> float:
    """Requests/s with no serving cost at all: the cores shared by the engine's work and the client's."""
    return cores / (offline_cpu_per_text + client_cpu_per_request)


def report(served: list[Served], offline_rate: float, offline_cpu: float, cores: int) -> str:
    rows: list[list[object]] = []
    for each in served:
        client, system = each.per_request("client_cpu"), each.per_request("system_cpu")
        rate = max(each.runs, key=lambda r: r.requests).requests_per_second
        reach = ceiling(cores, offline_cpu, client)
        rows.append(
            [
                each.system,
                f"{client * 1000:.3f}",
                f"{system * 1000:.3f}",
                f"{(system - offline_cpu) * 1000:+.3f}",
                f"{rate:.1f}",
                f"{rate / offline_rate:.2f}x",
                f"{reach:.1f} = {reach / offline_rate:.3f}x",
            ]
        )
    headers = [
        "system",
        "client CPU per request, ms",
        "system CPU per request, ms",
        "beyond offline's per text, ms",
        "requests/s",
        "of offline",
        "ceiling: no serving cost at all",
    ]
    return (
        f"Single-text embeddings, {machine()}\n"
        f"offline LLM.embed: {offline_rate:.1f} texts/s, {offline_cpu * 1000:.3f} ms of CPU per text\n\n"
        + table(headers, rows)
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2000, help="N: each system runs N, then 3N prompts")
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    if args.prompts < 1:
        parser.error("--prompts must be at least 1")
    counts = (args.prompts, 3 * args.prompts)
    served = [serve(system, args.concurrency, counts) for system in SYSTEMS]
    offline = offline_run(random_prompts(WORKLOADS[0], counts[-1]))
    if offline is None:
        raise SystemExit("offline LLM.embed failed before measuring (its error is above)")
    print(report(served, offline.texts_per_second, offline.cpu_per_text, len(os.sched_getaffinity(0))))


if __name__ == "__main__":
    main()
