"""Conveyor versus vLLM's own server, driven by vLLM's own benchmark client (``vllm.benchmarks.serve``).

    uv run --frozen --extra cpu python -m bench.vllm_serve [--only embed|generate] [--systems conveyor,vllm] [--quick]
        [--rounds 3]

A client nobody here wrote: ``vllm bench serve``'s random dataset (fixed seed, so both systems get the same prompts),
its ``openai-embeddings`` and ``openai-chat`` backends, ``--max-concurrency`` closed loops. For each model Conveyor
(gateway + Redis + one worker, ``bench.vs_vllm.conveyor``) and vLLM's server on the same weights with the same engine
arguments are both started, and the cells alternate between them: at each concurrency one system, then the other, so
the machine's drift in speed (10-20% within minutes here) falls on both alike. Only one is loaded at a time; the other
waits idle. ``--rounds N`` measures every cell N times, the systems' order swapped each round (A B, B A, ...); the
table then gives each system's median and the ratio of every round's pair. Each cell's result is also written as
vLLM's JSON to ``.artifacts/bench/vllm_serve/``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import io
import json
import statistics
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.bulk import offline_rate
from bench.common import add_worker_env, machine, table, worker_env
from bench.vs_vllm import CHAT, EMBED, Urls, conveyor, vllm
from tests.conftest import scrape
from worker import model_prep

OUT = Path(".artifacts/bench/vllm_serve")
SYSTEMS: dict[str, Callable[[str, str], AbstractContextManager[Urls]]] = {"Conveyor": conveyor, "vLLM server": vllm}
#: one cell's result as vLLM's client saves it
Result = dict[str, Any]
#: (task, system, concurrency) -> that cell's result in each round
Results = dict[tuple[str, str, int], list[Result]]


@dataclass(frozen=True)
class Workload:
    task: str  # embed | generate
    model: str
    backend: str
    endpoint: str
    input_len: int
    output_len: int
    concurrencies: tuple[int, ...]

    def prompts(self, concurrency: int, quick: bool) -> int:
        """A cell's requests: enough for ~15 s of embeddings and ~30 s of chat at the lower concurrencies here, so that
        a stall (a batch shape the engine meets the first time) or the clients' rounds (they start in lockstep) weigh
        little."""
        if quick:
            return concurrency * (4 if self.task == "embed" else 1)
        if self.task == "embed":
            return max(concurrency * 40, 2000)
        return max(concurrency * 4, 32)


WORKLOADS = (
    Workload("embed", EMBED, "openai-embeddings", "/v1/embeddings", 32, 0, (64, 16, 8, 1)),
    Workload("generate", CHAT, "openai-chat", "/v1/chat/completions", 128, 100, (64, 32, 16, 8, 4)),
)


def run_client(
    urls: Urls, workload: Workload, concurrency: int, quick: bool, label: str, prompts: int | None = None
) -> dict[str, Any]:
    """One ``vllm bench serve`` run (``prompts`` requests, or the cell's usual count); its result dictionary (the JSON
    it saves)."""
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()  # type: ignore[no-untyped-call]
    add_cli_args(parser)
    metrics = "e2el" if workload.task == "embed" else "ttft,tpot,e2el"
    argv = [
        *("--backend", workload.backend, "--base-url", urls.base, "--endpoint", workload.endpoint),
        *("--model", workload.model, "--tokenizer", str(model_prep.resolve(workload.model))),
        *("--dataset-name", "random", "--random-input-len", str(workload.input_len), "--seed", "0"),
        *("--num-prompts", str(prompts or workload.prompts(concurrency, quick)), "--max-concurrency", str(concurrency)),
        *("--percentile-metrics", metrics, "--metric-percentiles", "50,95,99", "--disable-tqdm"),
        *("--save-result", "--result-dir", str(OUT), "--result-filename", f"{label}.json", "--label", label),
    ]
    if workload.task == "generate":
        argv += ["--random-output-len", str(workload.output_len), "--ignore-eos", "--temperature", "0"]
    with contextlib.redirect_stdout(io.StringIO()):  # its own report; the table below has what matters
        result: dict[str, Any] = main(parser.parse_args(argv))
    return result


def offline_ceiling(workload: Workload, count: int = 2560) -> float | None:
    """Texts/s of vLLM's offline ``LLM.embed`` over prompts like the client's: the engine's own ceiling for this work,
    with no server in front of it."""
    return offline_rate(random_prompts(workload, count))


def random_prompts(workload: Workload, count: int) -> list[str]:
    """``count`` prompts as the client sends them (its random dataset, same seed and length)."""
    from transformers import AutoTokenizer
    from vllm.benchmarks.datasets import RandomDataset

    tokenizer = AutoTokenizer.from_pretrained(str(model_prep.resolve(workload.model)))
    sampled = RandomDataset(random_seed=0).sample(
        tokenizer=tokenizer,  # type: ignore[arg-type]  # a Hugging Face tokenizer, as vLLM's own client passes
        num_requests=count,
        input_len=workload.input_len,
        output_len=1,
    )
    return [str(request.prompt) for request in sampled]


def measure(
    systems: list[str],
    workloads: list[Workload],
    quick: bool,
    worker_env: dict[str, str] | None = None,
    rounds: int = 1,
) -> Results:
    OUT.mkdir(parents=True, exist_ok=True)
    results: Results = {}
    for workload in workloads:
        with contextlib.ExitStack() as running:
            urls = {}
            for system in systems:
                starter = SYSTEMS[system]
                if system == "Conveyor" and worker_env:
                    starter = functools.partial(conveyor, worker_env=worker_env)
                urls[system] = running.enter_context(starter(workload.model, workload.task))
                run_client(urls[system], workload, workload.concurrencies[-1], True, "warm-up")
            for round_ in range(rounds):
                for concurrency in workload.concurrencies:
                    for system in systems if round_ % 2 == 0 else systems[::-1]:
                        result = _cell_run(urls[system], workload, system, concurrency, quick, round_)
                        results.setdefault((workload.task, system, concurrency), []).append(result)
    return results


def _cell_run(urls: Urls, workload: Workload, system: str, concurrency: int, quick: bool, round_: int) -> Result:
    label = _label(workload, system, concurrency) + (f"-r{round_}" if round_ else "")
    before = call_sizes(urls) if system == "Conveyor" else None
    result = run_client(urls, workload, concurrency, quick, label)
    if before is not None:
        after = call_sizes(urls)
        calls = after[1] - before[1]
        result["requests_per_engine_call"] = (after[0] - before[0]) / calls if calls else None
    return result


def call_sizes(urls: Urls) -> tuple[float, float]:
    """(embedding requests, engine calls) from the worker's ``conveyor_worker_embedding_call_requests``."""
    samples = scrape(urls.metrics)
    name = "conveyor_worker_embedding_call_requests"
    return (
        sum(v for k, v in samples.items() if k.startswith(f"{name}_sum{{")),
        sum(v for k, v in samples.items() if k.startswith(f"{name}_count{{")),
    )


def _label(workload: Workload, system: str, concurrency: int) -> str:
    return f"{workload.task}-{'conveyor' if system == 'Conveyor' else 'vllm'}-c{concurrency}"


def saved(systems: list[str], workloads: list[Workload]) -> Results:
    """The last saved results (their first round) of the systems not measured in this run (to compare one side after a
    change)."""
    results = {}
    for workload in workloads:
        for system in (s for s in SYSTEMS if s not in systems):
            for concurrency in workload.concurrencies:
                path = OUT / f"{_label(workload, system, concurrency)}.json"
                if path.exists():
                    results[(workload.task, system, concurrency)] = [json.loads(path.read_text())]
    return results


def report(results: Results, ceiling: float | None = None) -> str:
    rounds = max((len(cells) for cells in results.values()), default=1)
    lines = [f"vllm.benchmarks.serve against Conveyor and vLLM's server, {machine()}; client on the same machine."]
    if rounds > 1:
        lines.append(f"{rounds} rounds: a system's figures are its medians; the ratio, the median of each round's.")
    lines.append("")
    for workload in WORKLOADS:
        rate = "request_throughput" if workload.task == "embed" else "output_throughput"
        rows = []
        for concurrency in sorted({key[2] for key in results if key[0] == workload.task}, reverse=True):
            cells = {s: results.get((workload.task, s, concurrency), []) for s in SYSTEMS}
            row: list[object] = [concurrency]
            for cell in cells.values():
                row += _cell(workload, cell)
            ours, theirs = cells["Conveyor"], cells["vLLM server"]
            ratios = [a[rate] / b[rate] for a, b in zip(ours, theirs, strict=False)]  # by round; a saved side has one
            row.append(f"{statistics.median(ratios):.2f}x" if ratios else "-")
            if rounds > 1:
                row.append(" ".join(f"{r:.2f}" for r in ratios) or "-")
            if workload.task == "embed":
                merged = [m for m in (c.get("requests_per_engine_call") for c in ours) if m]
                row.append(f"{statistics.median(merged):.1f}" if merged else "-")
            rows.append(row)
        if not rows:
            continue
        if workload.task == "embed":
            title = f"single-text embeddings ({workload.input_len} tokens)"
            each = ["req/s", "p50 / p95 / p99 ms", "failed"]
        else:
            title = f"chat, {workload.input_len} in / {workload.output_len} out"
            each = ["tok/s", "TTFT p50 ms", "p95 latency ms", "failed"]
        headers = [f"{title}: concurrency"]
        headers += [f"{s} {h}" for s in SYSTEMS for h in each] + ["ratio"]
        if rounds > 1:
            headers.append("ratio each round")
        if workload.task == "embed":
            headers.append("Conveyor requests per engine call")
        lines += [table(headers, rows), ""]
        if workload.task == "embed" and ceiling:
            lines += [f"vLLM's offline LLM.embed over {workload.input_len}-token prompts of the same dataset, all in "
                      f"one call (the engine's ceiling, no server): {ceiling:.1f} texts/s", ""]  # fmt: skip
    return "\n".join(lines)


def _cell(workload: Workload, rounds: list[Result]) -> list[object]:
    """A system's figures in one cell: the medians of its rounds, and its failed requests in all of them."""
    if not rounds:
        return ["-"] * (3 if workload.task == "embed" else 4)

    def median(field: str) -> float:
        return statistics.median(cell[field] for cell in rounds)

    failed = sum(cell.get("failed", cell["num_prompts"] - cell["completed"]) for cell in rounds)
    if workload.task == "embed":
        latency = " / ".join(f"{median(f'p{p}_e2el_ms'):.0f}" for p in (50, 95, 99))
        return [f"{median('request_throughput'):.1f}", latency, failed]
    return [
        f"{median('output_throughput'):.1f}",
        f"{median('p50_ttft_ms'):.0f}",
        f"{median('p95_e2el_ms'):.0f}",
        failed,
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=[w.task for w in WORKLOADS], help="one workload instead of both")
    parser.add_argument("--systems", default="conveyor,vllm", help="comma-separated: conveyor, vllm")
    parser.add_argument("--quick", action="store_true", help="few prompts per cell (a smoke run)")
    parser.add_argument("--concurrencies", help="comma-separated, instead of each workload's own list")
    parser.add_argument("--offline", action="store_true", help="also vLLM's offline LLM.embed on such prompts")
    parser.add_argument("--rounds", type=int, default=1, help="measure every cell this many times, in turns")
    add_worker_env(parser, "CONVEYOR_WORKER_EMBED_BATCH_WAIT=0.002")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    names = {"conveyor": "Conveyor", "vllm": "vLLM server"}
    systems = [names[s.strip()] for s in args.systems.split(",") if s.strip()]
    workloads = [w for w in WORKLOADS if args.only in (None, w.task)]
    if args.concurrencies:
        wanted = tuple(int(c) for c in args.concurrencies.split(","))
        workloads = [dataclasses.replace(w, concurrencies=wanted) for w in workloads]
    results = measure(systems, workloads, args.quick, worker_env(args), args.rounds)
    earlier = saved(systems, workloads)
    embed = WORKLOADS[0]
    ceiling = offline_ceiling(embed) if args.offline and any(w.task == embed.task for w in workloads) else None
    print(report({**earlier, **results}, ceiling))
    if earlier:
        others = ", ".join(sorted({key[1] for key in earlier}))
        print(f"(the {others} columns are results saved in {OUT} by an earlier run)")


if __name__ == "__main__":
    main()
