"""``bench.serving_ceiling``: CPU per request by difference of two runs, and the ceiling it implies."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import pytest

from bench import serving_ceiling
from bench.serving_ceiling import Run, Served
from bench.vs_vllm import Urls


def test_cpu_per_request_is_the_difference_of_the_two_runs_so_a_runs_fixed_cost_cancels() -> None:
    # 0.5 s of CPU each run costs once (sampling the prompts), then 0.75 ms (client) and 9.5 ms (system) a request
    runs = [Run(n, 0.5 + n * 0.00075, 3.0 + n * 0.0095, 190.0) for n in (6000, 2000)]
    served = Served("x", runs)
    assert served.per_request("client_cpu") == pytest.approx(0.00075)
    assert served.per_request("system_cpu") == pytest.approx(0.0095)


def test_the_ceiling_shares_the_cores_between_the_engines_work_and_the_clients() -> None:
    assert serving_ceiling.ceiling(2, 0.0085, 0.00075) == pytest.approx(2 / 0.00925)


def test_the_report_gives_each_systems_rate_and_the_ceiling_as_fractions_of_offline() -> None:
    runs = [Run(2000, 2.0 + 2000 * 0.001, 0.0, 150.0), Run(6000, 2.0 + 6000 * 0.001, 6000 * 0.011, 180.0)]
    text = serving_ceiling.report([Served("S", runs)], offline_rate=200.0, offline_cpu=0.009, cores=2)
    row = next(line for line in text.splitlines() if line.startswith("| S |"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells[1:4] == ["1.000", "16.500", "+7.500"]  # client, system (by difference), system beyond offline
    assert cells[4:6] == ["180.0", "0.90x"]  # the larger run's rate, against offline's 200
    assert cells[6] == "200.0 = 1.000x"  # 2 cores / (9 + 1 ms)


def test_serve_counts_each_runs_cpu_and_a_process_started_during_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"own": 10.0, "tree": {1: 100.0}}
    asked: list[int | None] = []

    @contextlib.contextmanager
    def start(model: str, task: str) -> Iterator[Urls]:
        yield Urls("base", "metrics")

    def run_client(urls: Urls, workload: Any, concurrency: int, quick: bool, label: str, prompts: Any = None) -> Any:
        asked.append(prompts)
        clock["own"] += 1.0
        clock["tree"] = {**clock["tree"], 1: clock["tree"][1] + 5.0}
        if prompts == 20:
            clock["tree"][2] = 3.0  # a process started during this run
        return {"request_throughput": 42.0}

    monkeypatch.setattr(serving_ceiling, "SYSTEMS", {"S": start})
    monkeypatch.setattr(serving_ceiling, "run_client", run_client)
    monkeypatch.setattr(serving_ceiling, "own_cpu", lambda: clock["own"])
    monkeypatch.setattr(serving_ceiling, "tree_cpu", lambda: dict(clock["tree"]))

    served = serving_ceiling.serve("S", 64, (20, 60))

    assert asked == [None, 20, 60]  # a warm-up of the usual quick size, then the two counts
    first, second = served.runs
    assert (first.requests, first.client_cpu, first.system_cpu) == (20, 1.0, 8.0)  # 5 + the new process's 3
    assert (second.requests, second.client_cpu, second.system_cpu) == (60, 1.0, 5.0)  # pid 2 did not move
