"""Bulk embeddings: a large file through Conveyor's Batches API, versus vLLM's own server and vLLM offline.

    uv run --frozen --extra cpu python -m bench.bulk [--lines 50000]

Same model (all-MiniLM-L6-v2), same engine arguments, both cores for the engine, one system at a time:
1. Conveyor: upload the JSONL, create the batch, poll until it completes (lines/s from creation to completion);
   the gateway's and the worker's peak RSS while it runs.
2. vLLM's OpenAI server, the fastest a client gets: 64 texts per request, the best of concurrency 2/4/8/16 (probed
   on a tenth of the lines), then every line at that concurrency.
3. vLLM offline: ``LLM.embed`` over every text in one call, in its own process.
4. Interactive latency as ``make up`` runs it (embedding engine on core 0, chat engine on core 1): single-text
   embeddings and 16-token chats, p50/p95, idle and while the batch runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from openai import OpenAI
from openai.types import Batch

from bench.common import machine, ms, percentile, stack, table
from bench.soak import rss_mib
from tests.engine.vllm_server import vllm_server
from worker import model_prep

EMBED, CHAT = model_prep.MINILM, model_prep.SMOLLM2
PER_REQUEST = 64


def texts(count: int) -> list[str]:
    return [f"Sentence {i} is about topic {i % 11}, and a few more words to embed." for i in range(count)]


def write_jsonl(path: Path, count: int) -> None:
    with path.open("w") as out:
        for i, text in enumerate(texts(count)):
            body = {"model": EMBED, "input": text}
            out.write(json.dumps({"custom_id": f"l{i}", "method": "POST", "url": "/v1/embeddings", "body": body}))
            out.write("\n")


class PeakRss:
    """The largest RSS of some processes, sampled every 0.2 s while it runs."""

    def __init__(self, pids: dict[str, int]) -> None:
        self.pids, self.peak = pids, dict.fromkeys(pids, 0.0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for name, pid in self.pids.items():
                self.peak[name] = max(self.peak[name], rss_mib(pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def upload(client: OpenAI, jsonl: Path) -> str:
    with jsonl.open("rb") as handle:
        return client.files.create(file=handle, purpose="batch").id


def complete(client: OpenAI, file_id: str, count: int) -> tuple[float, Batch]:
    """Create a batch of the file and wait for it: seconds from creation to completion, and the batch."""
    started = time.perf_counter()
    batch = client.batches.create(input_file_id=file_id, endpoint="/v1/embeddings", completion_window="24h")
    while batch.status not in ("completed", "failed", "expired", "cancelled"):
        time.sleep(0.25)
        batch = client.batches.retrieve(batch.id)
    seconds = time.perf_counter() - started
    counts = batch.request_counts
    if batch.status != "completed" or counts is None or counts.completed != count:
        raise RuntimeError(f"batch ended {batch.status} with {counts}")
    return seconds, batch


def run_batch(client: OpenAI, jsonl: Path, count: int) -> float:
    """Seconds from the batch's creation to its completion (the upload is not counted)."""
    return complete(client, upload(client, jsonl), count)[0]


def conveyor_bulk(jsonl: Path, count: int) -> tuple[float, dict[str, float]]:
    with stack([EMBED]) as running:
        worker = running.worker(EMBED, "--task", "embed", timeout=900, env={"CONVEYOR_WORKER_CPU_THREADS_BIND": "0-1"})
        client = OpenAI(base_url=f"{running.base_url}/v1", api_key="none", timeout=600)
        run_batch(client, _small(jsonl, 640), 640)  # warm-up
        with PeakRss({"gateway": running.children[0].pid, "worker": worker.pid}) as rss:
            seconds = run_batch(client, jsonl, count)
        return seconds, rss.peak


def _small(jsonl: Path, count: int) -> Path:
    small = jsonl.with_name("warm-up.jsonl")
    write_jsonl(small, count)
    return small


async def server_rate(base_url: str, all_texts: list[str], concurrency: int) -> float:
    requests = [all_texts[i : i + PER_REQUEST] for i in range(0, len(all_texts), PER_REQUEST)]
    pending = iter(requests)
    async with aiohttp.ClientSession(base_url=base_url, timeout=aiohttp.ClientTimeout(total=900)) as session:

        async def loop() -> None:
            for chunk in pending:
                async with session.post("/v1/embeddings", json={"model": EMBED, "input": chunk}) as response:
                    response.raise_for_status()
                    await response.read()

        started = time.perf_counter()
        await asyncio.gather(*(loop() for _ in range(concurrency)))
        return len(all_texts) / (time.perf_counter() - started)


def vllm_server_bulk(count: int) -> tuple[float, int]:
    weights = str(model_prep.resolve(EMBED))
    with vllm_server(weights, EMBED, task="embed", cpu_threads_bind="0-1", timeout=900) as server:
        asyncio.run(server_rate(server.base_url, texts(640), 4))  # warm-up
        probes = {c: asyncio.run(server_rate(server.base_url, texts(count // 10), c)) for c in (2, 4, 8, 16)}
        best = max(probes, key=lambda c: probes[c])
        return asyncio.run(server_rate(server.base_url, texts(count), best)), best


OFFLINE = """
import json, sys, time
import psutil
from vllm import LLM
llm = LLM(model=sys.argv[1], runner="pooling", dtype="float32", enforce_eager=True)
with open(sys.argv[2]) as f:
    texts = json.load(f)
def cpu():  # this process and its engine core's, user and system
    tree = [psutil.Process(), *psutil.Process().children(recursive=True)]
    return sum(sum(p.cpu_times()[:2]) for p in tree)
llm.embed(texts[:640], use_tqdm=False)
started, cpu_before = time.perf_counter(), cpu()
llm.embed(texts, use_tqdm=False)
print("RATE", len(texts) / (time.perf_counter() - started), (cpu() - cpu_before) / len(texts))
"""


@dataclass(frozen=True)
class Offline:
    """vLLM's offline ``LLM.embed`` over a list of texts in one call."""

    texts_per_second: float
    #: CPU seconds per text, its whole process tree (the caller's process and the engine core's)
    cpu_per_text: float


def offline_rate(inputs: list[str]) -> float | None:
    """Texts/s of ``LLM.embed`` over ``inputs`` in one call (``offline_run``)."""
    run = offline_run(inputs)
    return run.texts_per_second if run else None


def offline_run(inputs: list[str]) -> Offline | None:
    """``LLM.embed`` over ``inputs`` in one call, with the engine arguments Conveyor and vLLM's server run (both
    cores); None (and why, on stderr) when the offline engine failed before measuring."""
    from worker.engines.vllm_engine import engine_environment

    env = {**os.environ, **engine_environment(2, "0-1")}
    weights = str(model_prep.resolve(EMBED))
    with tempfile.NamedTemporaryFile("w", suffix=".json") as file:
        json.dump(inputs, file)
        file.flush()
        argv = [sys.executable, "-c", OFFLINE, weights, file.name]
        done = subprocess.run(argv, env=env, capture_output=True, text=True)
    rate = next((line for line in done.stdout.splitlines() if line.startswith("RATE")), None)
    if done.returncode != 0:  # vLLM's CPU backend may abort at interpreter exit, after the rate was printed
        print(f"offline LLM.embed exited {done.returncode}:\n{done.stderr[-2000:]}", file=sys.stderr)
    if rate is None:
        return None
    _, texts_per_second, cpu_per_text = rate.split()
    return Offline(float(texts_per_second), float(cpu_per_text))


def probe(client: OpenAI, count: int, until: threading.Event | None = None) -> dict[str, list[float]]:
    """Sequential single-text embeddings (and a 16-token chat every fourth): their latencies; ``count`` of them, or
    as many as fit before ``until`` is set."""
    out: dict[str, list[float]] = {"embedding": [], "chat": []}
    i = 0
    while (until is None and i < count) or (until is not None and not until.is_set()):
        t = time.perf_counter()
        client.embeddings.create(model=EMBED, input=f"an interactive sentence {i}")
        out["embedding"].append(time.perf_counter() - t)
        if i % 4 == 0:
            t = time.perf_counter()
            client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": f"Say a word ({i})."}], max_tokens=16
            )
            out["chat"].append(time.perf_counter() - t)
        i += 1
    return out


def interactive(jsonl: Path, count: int) -> dict[str, dict[str, list[float]]]:
    with stack([EMBED, CHAT]) as running:
        running.worker(EMBED, "--task", "embed", timeout=900, env={"CONVEYOR_WORKER_CPU_THREADS_BIND": "0"})
        running.worker(CHAT, "--task", "generate", timeout=900, env={"CONVEYOR_WORKER_CPU_THREADS_BIND": "1"})
        client = OpenAI(base_url=f"{running.base_url}/v1", api_key="none", timeout=600)
        probe(client, 8)  # warm-up
        idle = probe(client, 80)
        result: dict[str, list[float]] = {}
        finished = threading.Event()

        def during() -> None:
            time.sleep(5)  # the batch is validated and its chunks are running
            result.update(probe(client, 0, until=finished))

        prober = threading.Thread(target=during)
        prober.start()
        try:
            run_batch(client, jsonl, count)
        finally:
            finished.set()
            prober.join()
        return {"idle": idle, "during": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lines", type=int, default=50_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["CONVEYOR_FILES_URL"] = str(Path(tmp) / "files")  # every process started here shares it
        jsonl = Path(tmp) / "input.jsonl"
        write_jsonl(jsonl, args.lines)
        ours, rss = conveyor_bulk(jsonl, args.lines)
        print(f"Conveyor: {args.lines / ours:,.0f} lines/s, peak RSS {rss}", file=sys.stderr, flush=True)
        server, best = vllm_server_bulk(args.lines)
        print(f"vLLM server: {server:,.0f} lines/s at concurrency {best}", file=sys.stderr, flush=True)
        offline = offline_rate(texts(args.lines))
        print(f"vLLM offline: {offline} lines/s", file=sys.stderr, flush=True)
        latency = interactive(jsonl, args.lines)
    rate = args.lines / ours
    print(f"Bulk embeddings, {args.lines} lines of ~16 tokens, {EMBED}, {machine()}\n")
    print(
        table(
            ["system", "lines/s", "Conveyor is"],
            [
                ["Conveyor batch (Files + Batches API)", f"{rate:,.0f}", "-"],
                [f"vLLM server, {PER_REQUEST} texts/request, concurrency {best}", f"{server:,.0f}",
                 f"{rate / server:.2f}x"],
                ["vLLM offline LLM.embed", f"{offline:,.0f}" if offline else "failed",
                 f"{rate / offline:.2f}x" if offline else "-"],
            ],
        )
    )  # fmt: skip
    print(f"\npeak RSS during the batch: gateway {rss['gateway']:.0f} MiB, worker {rss['worker']:.0f} MiB\n")
    rows = []
    for kind in ("embedding", "chat"):
        idle, during = latency["idle"][kind], latency["during"][kind]
        p95_idle, p95_during = percentile(idle, 95), percentile(during, 95)
        rows.append(
            [kind, ms(percentile(idle, 50)), ms(p95_idle), ms(percentile(during, 50)), ms(p95_during),
             f"{p95_during / p95_idle:.2f}x"]
        )  # fmt: skip
    print(table(["interactive", "idle p50 ms", "idle p95 ms", "during p50 ms", "during p95 ms", "p95 ratio"], rows))


if __name__ == "__main__":
    main()
