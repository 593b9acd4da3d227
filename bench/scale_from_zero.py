"""Time from the first request to its answer for a model scaled to zero, through ``conveyor up``.

A throwaway ``conveyor up`` runs one model with ``min_workers = 0`` (the fake engine, and with ``--real`` also the
packaged all-MiniLM-L6-v2 on vLLM); once it shows ``scaled_to_zero`` (no worker process), one request is sent and
timed until its answer, then once more with the worker up (warm), then again after the model went back to zero.

    uv run --frozen --extra cpu python -m bench.scale_from_zero [--real] [--rounds N]
"""

from __future__ import annotations

import argparse
import os
import platform
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import httpx

from launcher import processes, redis_server

IDLE_SECONDS = 2.0
MODELS = {
    "fake": ('engine = "fake"\ntask = "embed"\n', {"model": "zero", "input": "wake up"}),
    "minilm": ('path = "all-minilm-l6-v2"\ntask = "embed"\ncpu_threads_bind = "0"\n', {"input": "wake up"}),
}


def _state(base: str) -> str:
    try:
        cards = httpx.get(f"{base}/v1/models", timeout=5).json()["data"]
    except (httpx.HTTPError, KeyError, ValueError):
        return ""
    return next((str(c["status"]) for c in cards if c["id"] == "zero"), "")


def _wait(base: str, state: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while _state(base) != state:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the model did not become {state} within {timeout:.0f} s")
        time.sleep(0.1)


def measure(kind: str, rounds: int) -> list[tuple[str, float]]:
    spec, body = MODELS[kind]
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = Path(tmp) / "models.toml"
        models.write_text(f'[[models]]\nname = "zero"\nmin_workers = 0\nidle_seconds = {IDLE_SECONDS}\n{spec}')
        port = redis_server.free_port()
        env = os.environ | {"CONVEYOR_DATA_DIR": os.environ.get("CONVEYOR_DATA_DIR", str(Path(tmp) / "data"))}
        env.pop("CONVEYOR_REDIS_URL", None)  # its own embedded Redis
        command = processes.conveyor_command("up", "--models-file", str(models), "--port", str(port))
        up = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        try:
            for round_ in range(rounds):
                _wait(base, "scaled_to_zero", timeout=120)
                started = time.monotonic()
                cold = httpx.post(f"{base}/v1/embeddings", json=body | {"model": "zero"}, timeout=600)
                cold_seconds = time.monotonic() - started
                cold.raise_for_status()
                started = time.monotonic()
                httpx.post(f"{base}/v1/embeddings", json=body | {"model": "zero"}, timeout=60).raise_for_status()
                rows += [(f"{kind} round {round_ + 1}: first request, from zero", cold_seconds)]
                rows += [(f"{kind} round {round_ + 1}: next request, worker up", time.monotonic() - started)]
        finally:
            up.send_signal(signal.SIGINT)
            up.wait(120)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real", action="store_true", help="also the packaged MiniLM on vLLM (needs the cpu extra)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    rows = measure("fake", args.rounds)
    if args.real:
        rows += measure("minilm", args.rounds)
    where = f"{platform.machine()}, {os.cpu_count()} cores; idle {IDLE_SECONDS} s"
    print(f"\nscale from zero through conveyor up ({where})")
    print("| request | seconds to its answer |\n|---|---|")
    for what, seconds in rows:
        print(f"| {what} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
