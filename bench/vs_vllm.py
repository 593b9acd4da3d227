"""Conveyor versus vLLM's own OpenAI server: same models, same machine, same client, one run.

    uv run --frozen --extra cpu python -m bench.vs_vllm [--quick]

For each model, Conveyor (gateway + Redis + one worker) is started and measured, stopped, then vLLM's server is
started on the same weights with the same engine arguments and measured with the same client code, so the two never
share the CPU. Embeddings: many single-text requests and batches of 64, at concurrency 1/16/64. Generation: 100-token
streamed completions at concurrency 1/8/32 (TTFT and latency), then 50 concurrent streams, counting errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass

import aiohttp

from bench.common import machine, ms, percentile, stack, table
from tests.conftest import scrape
from tests.engine.vllm_server import vllm_server
from worker import model_prep

EMBED, CHAT = model_prep.MINILM, model_prep.SMOLLM2
BIND = "0-1"  # the engine may use both cores in either setup


@dataclass
class Cell:
    latencies: list[float]
    ttfts: list[float]
    items: int
    seconds: float
    errors: int
    per_step: float = 0.0  # engine requests finished per engine step: the batch size vLLM ran


def engine_counts(metrics_url: str) -> tuple[float, float]:
    """(engine requests finished, engine steps) from vLLM's own metrics."""
    samples = scrape(metrics_url)
    requests = sum(v for k, v in samples.items() if k.startswith("vllm:request_success_total{"))
    steps = sum(v for k, v in samples.items() if k.startswith("vllm:iteration_tokens_total_count{"))
    return requests, steps


@contextlib.asynccontextmanager
async def batch_size(metrics_url: str, cell_box: list[Cell]) -> AsyncIterator[None]:
    before = await asyncio.to_thread(engine_counts, metrics_url)
    yield
    after = await asyncio.to_thread(engine_counts, metrics_url)
    steps = after[1] - before[1]
    cell_box[0].per_step = (after[0] - before[0]) / steps if steps else 0.0


async def _drive(cell: Cell, concurrency: int, total: int, call: Callable[[int], Awaitable[None]]) -> Cell:
    """``total`` calls, ``concurrency`` at a time; fills in the cell's duration and error count."""
    indices = iter(range(total))

    async def loop() -> None:
        for index in indices:
            try:
                await call(index)
            except (aiohttp.ClientError, RuntimeError):
                cell.errors += 1

    started = time.perf_counter()
    await asyncio.gather(*(loop() for _ in range(concurrency)))
    cell.seconds = time.perf_counter() - started
    return cell


async def embeddings(client: aiohttp.ClientSession, batch: int, concurrency: int, total: int) -> Cell:
    cell = Cell([], [], 0, 0.0, 0)

    async def call(index: int) -> None:
        texts = [f"Sentence {index}-{j} about topic {(index + j) % 11}." for j in range(batch)]
        started = time.perf_counter()
        async with client.post("/v1/embeddings", json={"model": EMBED, "input": texts}) as response:
            response.raise_for_status()
            data = (await response.json())["data"]
        cell.latencies.append(time.perf_counter() - started)
        cell.items += len(data)

    return await _drive(cell, concurrency, total, call)


async def completions(client: aiohttp.ClientSession, concurrency: int, total: int, tokens: int = 100) -> Cell:
    cell = Cell([], [], 0, 0.0, 0)

    async def call(index: int) -> None:
        body = {
            "model": CHAT,
            "prompt": f"Story number {index}: once upon a time",
            "max_tokens": tokens,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        started = time.perf_counter()
        first = 0.0
        async with client.post("/v1/completions", json=body) as response:
            response.raise_for_status()
            async for raw in response.content:
                line = raw.decode().rstrip("\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if not first and chunk.get("choices"):
                    first = time.perf_counter() - started
                if chunk.get("usage"):
                    cell.items += chunk["usage"]["completion_tokens"]
        cell.ttfts.append(first)
        cell.latencies.append(time.perf_counter() - started)

    return await _drive(cell, concurrency, total, call)


def _client(base_url: str) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        base_url=base_url, connector=aiohttp.TCPConnector(limit=256), timeout=aiohttp.ClientTimeout(total=900)
    )


async def measure_embed(urls: Urls, quick: bool) -> dict[tuple[str, int], Cell]:
    out: dict[tuple[str, int], Cell] = {}
    async with _client(urls.base) as client:
        await embeddings(client, 1, 4, 16)  # warm-up
        for concurrency in (1, 16, 64):
            for batch in (1, 64):
                if batch == 1:
                    total = 64 if quick else (128 if concurrency == 1 else 512)
                else:
                    total = max(concurrency, 4 if quick else 16)
                box: list[Cell] = []
                async with batch_size(urls.metrics, box):
                    box.append(await embeddings(client, batch, concurrency, total))
                out[(f"{batch} text{'s' if batch > 1 else ''}", concurrency)] = box[0]
    return out


async def measure_generate(urls: Urls, quick: bool) -> dict[tuple[str, int], Cell]:
    out: dict[tuple[str, int], Cell] = {}
    async with _client(urls.base) as client:
        await completions(client, 2, 2, 8)  # warm-up
        for concurrency in (1, 8, 32):
            total = concurrency if quick else max(3, concurrency * 2 if concurrency < 32 else concurrency)
            out[("100 tokens", concurrency)] = await completions(client, concurrency, total)
        out[("50 streams", 50)] = await completions(client, 50, 50)
    return out


@dataclass
class Urls:
    base: str
    metrics: str  # where vLLM's own metrics are: the worker's /metrics, or the server's


@contextlib.contextmanager
def conveyor(model: str, task: str, worker_env: dict[str, str] | None = None) -> Iterator[Urls]:
    with stack([model]) as running:
        env = {"CONVEYOR_WORKER_CPU_THREADS_BIND": BIND, **(worker_env or {})}
        info = running.worker(model, "--task", task, timeout=900, env=env)
        yield Urls(running.base_url, f"http://127.0.0.1:{info.metrics_port}/metrics")


@contextlib.contextmanager
def vllm(model: str, task: str) -> Iterator[Urls]:
    weights = model_prep.resolve(model)
    with vllm_server(str(weights), model, task=task, cpu_threads_bind=BIND, timeout=900) as server:
        yield Urls(server.base_url, f"{server.base_url}/metrics")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer requests per cell (a smoke run)")
    args = parser.parse_args()
    results: dict[str, dict[str, dict[tuple[str, int], Cell]]] = {"embed": {}, "generate": {}}
    for system, starter in (("Conveyor", conveyor), ("vLLM server", vllm)):
        with starter(EMBED, "embed") as base:
            results["embed"][system] = asyncio.run(measure_embed(base, args.quick))
        with starter(CHAT, "generate") as base:
            results["generate"][system] = asyncio.run(measure_generate(base, args.quick))
    print(report(results))


def report(results: dict[str, dict[str, dict[tuple[str, int], Cell]]]) -> str:
    lines = [f"Conveyor vs vLLM's own OpenAI server, {machine()}; client on the same machine.", ""]
    rows = []
    for key in results["embed"]["Conveyor"]:
        ours, theirs = results["embed"]["Conveyor"][key], results["embed"]["vLLM server"][key]
        rate_ours, rate_theirs = ours.items / ours.seconds, theirs.items / theirs.seconds
        rows.append(
            [
                f"embeddings, {key[0]} per request",
                key[1],
                f"{rate_ours:.0f}",
                f"{rate_theirs:.0f}",
                f"{rate_ours / rate_theirs:.2f}x",
                f"{ms(percentile(ours.latencies, 50))} / {ms(percentile(ours.latencies, 95))}",
                f"{ms(percentile(theirs.latencies, 50))} / {ms(percentile(theirs.latencies, 95))}",
                f"{ours.per_step:.1f} / {theirs.per_step:.1f}",
                f"{ours.errors} / {theirs.errors}",
            ]
        )
    lines.append(
        table(
            [
                "workload",
                "concurrency",
                "Conveyor emb/s",
                "vLLM emb/s",
                "ratio",
                "Conveyor p50 / p95 ms",
                "vLLM p50 / p95 ms",
                "batch per engine step (C / v)",
                "errors (C / v)",
            ],
            rows,
        )
    )
    lines.append("")
    rows = []
    for key in results["generate"]["Conveyor"]:
        ours, theirs = results["generate"]["Conveyor"][key], results["generate"]["vLLM server"][key]
        rate_ours, rate_theirs = ours.items / ours.seconds, theirs.items / theirs.seconds
        rows.append(
            [
                key[0],
                key[1],
                f"{rate_ours:.0f}",
                f"{rate_theirs:.0f}",
                f"{rate_ours / rate_theirs:.2f}x",
                f"{ms(percentile(ours.ttfts, 50))} / {ms(percentile(ours.latencies, 95))}",
                f"{ms(percentile(theirs.ttfts, 50))} / {ms(percentile(theirs.latencies, 95))}",
                f"{ours.errors} / {theirs.errors}",
            ]
        )
    lines.append(
        table(
            [
                "completions",
                "concurrency",
                "Conveyor tok/s",
                "vLLM tok/s",
                "ratio",
                "Conveyor TTFT p50 / p95 latency ms",
                "vLLM TTFT p50 / p95 latency ms",
                "errors (C / v)",
            ],
            rows,
        )
    )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
