"""``bench.vllm_serve``: cells alternate between the systems, the order swapped each round; the table pairs rounds."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

import pytest

from bench import vllm_serve
from bench.vs_vllm import Urls

EMBED = vllm_serve.WORKLOADS[0]


def embed_cell(rate: float) -> dict[str, Any]:
    latencies = {f"p{p}_e2el_ms": rate for p in (50, 95, 99)}
    return {"request_throughput": rate, "num_prompts": 10, "completed": 10, **latencies}


def test_cells_alternate_between_the_systems_and_the_order_swaps_each_round(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[str] = []
    runs: list[tuple[str, int, str]] = []

    def starter(system: str) -> Any:
        @contextlib.contextmanager
        def start(model: str, task: str) -> Iterator[Urls]:
            started.append(system)
            yield Urls(system, "")

        return start

    def run_client(urls: Urls, workload: Any, concurrency: int, quick: bool, label: str) -> dict[str, Any]:
        runs.append((urls.base, concurrency, label))
        return embed_cell(float(len(runs)))

    systems = list(vllm_serve.SYSTEMS)
    monkeypatch.setattr(vllm_serve, "SYSTEMS", {name: starter(name) for name in systems})
    monkeypatch.setattr(vllm_serve, "run_client", run_client)
    monkeypatch.setattr(vllm_serve, "call_sizes", lambda urls: (0.0, 0.0))
    workload = dataclasses.replace(EMBED, concurrencies=(16, 8))

    results = vllm_serve.measure(systems, [workload], quick=False, rounds=2)

    a, b = systems
    assert started == [a, b]  # both up at once, for the whole workload
    measured = [(system, concurrency) for system, concurrency, label in runs if label != "warm-up"]
    assert measured == [(a, 16), (b, 16), (a, 8), (b, 8), (b, 16), (a, 16), (b, 8), (a, 8)]
    assert [len(results[("embed", system, c)]) for system in systems for c in (16, 8)] == [2, 2, 2, 2]


def test_the_table_gives_each_systems_median_and_the_ratio_of_each_rounds_pair() -> None:
    ours = [embed_cell(r) for r in (100.0, 90.0, 120.0)]
    theirs = [embed_cell(r) for r in (100.0, 100.0, 100.0)]
    results = {("embed", "Conveyor", 8): ours, ("embed", "vLLM server", 8): theirs}

    row = next(line for line in vllm_serve.report(results).splitlines() if line.startswith("| 8 |"))

    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1] == "100.0"  # Conveyor's median rate
    assert cells[7] == "1.00x"  # the median of 1.00, 0.90 and 1.20
    assert cells[8] == "1.00 0.90 1.20"
