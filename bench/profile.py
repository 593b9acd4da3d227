"""Where the queue path's CPU goes: py-spy samples the gateway and a fake embedding worker under load.

    uv run --frozen --extra cpu python -m bench.profile [--seconds 20] [--concurrency 16] [--engine vllm]
        [--workload chat] [--system vllm] [--worker-env CONVEYOR_WORKER_FAKE_TOKEN_DELAY=0.07]

Prints the request rate, each process's CPU per request, and per process the frames with the most samples: where
the time is spent itself (self) and which of Conveyor's own functions hold it (inclusive). With ``--engine vllm`` the
worker runs the real all-MiniLM-L6-v2 (SmolLM2 with ``--workload chat``) on both cores; the engine's own processes
under it (engine core, model worker) are counted (CPU, preemptions) but not sampled, as sampling the model's threads
took a core from it. ``--system vllm`` puts vLLM's own OpenAI server in Conveyor's place (same weights, engine
arguments and load) to compare the two side by side. The raw
stacks are kept in the printed directory (``py-spy record -f raw``: one ``stack count`` line each; flamegraph tools
read them).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from bench.common import add_worker_env, closed_loop, cpu_seconds, machine, stack, worker_env
from bench.vs_vllm import BIND
from tests.conftest import descendants
from worker import model_prep
from worker.model_prep import MINILM, SMOLLM2

FAKE_MODEL = "profile-embed"
TEXT = "a sentence to embed"
OWN_CODE = ("gateway/", "worker/", "conveyor/")


async def load(base_url: str, model: str, seconds: float, concurrency: int, chat: bool = False) -> tuple[int, int]:
    """Closed-loop clients for ``seconds``: (requests answered, stream chunks received). Chat requests are streamed
    100-token completions."""
    if chat:
        path = "/v1/chat/completions"
        body = {"model": model, "messages": [{"role": "user", "content": TEXT}], "max_tokens": 100,
                "ignore_eos": True, "stream": True}  # fmt: skip
    else:
        path, body = "/v1/embeddings", {"model": model, "input": TEXT, "encoding_format": "float"}
    loaded = await closed_loop(base_url, path, body, seconds, concurrency)
    return len(loaded.latencies), loaded.chunks


def cpu_per_request(
    base_url: str, model: str, seconds: float, concurrency: int, pids: dict[str, int]
) -> tuple[int, float, dict[str, float]]:
    """After a 2 s warm-up, ``load`` for ``seconds``: (requests answered, seconds taken, each process's CPU ms per
    request, by name)."""
    asyncio.run(load(base_url, model, 2, concurrency))
    before, started = {name: cpu_seconds(pid) for name, pid in pids.items()}, time.monotonic()
    done, _ = asyncio.run(load(base_url, model, seconds, concurrency))
    elapsed = time.monotonic() - started
    return done, elapsed, {name: 1000 * (cpu_seconds(pid) - before[name]) / done for name, pid in pids.items()}


@dataclass(frozen=True)
class Served:
    base_url: str
    sampled: dict[str, int]  # the processes py-spy samples, by name
    #: the engine's processes (counted, not sampled: py-spy on the model's threads took a core from the engine)
    engine: dict[str, int]
    redis_port: int = 0  # 0: no Redis (vLLM's own server)
    redis_pid: int = 0


def machine_busy() -> float:
    """CPU seconds every core of the machine has spent on anything but idling, so far (``/proc/stat``)."""
    ticks = [int(n) for n in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    busy = sum(ticks[:8]) - ticks[3] - ticks[4]  # user nice system [idle iowait] irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def named_children(pid: int) -> dict[str, int]:
    """A process's descendants by their own name: vLLM's engine core (``VLLM::EngineCore``) and, on the CPU, the
    worker process that runs the model under it."""
    return {Path(f"/proc/{child}/comm").read_text().strip() or str(child): child for child in sorted(descendants(pid))}


def preemptions(pid: int) -> int:
    """Times the scheduler took the CPU from any of a process's threads while it could still run
    (``nonvoluntary_ctxt_switches``); a thread that yields or sleeps gives its core up itself and is not counted."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
            status = (task / "status").read_text()
            total += int(status.split("nonvoluntary_ctxt_switches:")[1].split()[0])
    return total


def _frame(frame: str) -> str:
    name, _, location = frame.partition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    return f"{name} [{'/'.join(path.split('/')[-2:])}]"


def summary(raw: Path, top: int = 12) -> list[str]:
    own_self: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if not frames:
            continue
        samples = int(count)
        total += samples
        names = [_frame(f) for f in frames.split(";")]
        own_self[names[-1]] += samples
        for name in set(names):
            if any(part in name for part in OWN_CODE) and "cli.py" not in name and "main.py" not in name:
                inclusive[name] += samples
    lines = [f"  self (of {total} samples):"]
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in own_self.most_common(top)]
    lines.append("  inclusive, Conveyor's own functions:")
    lines += [f"    {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return lines


def _library(frame: str) -> str:
    """What runs in a frame, by the package its code is in (py-spy names files from their package down): the event
    loop itself is C, so its samples show as ``Runner.run``; the socket writes are C under asyncio's ``writelines``."""
    name, _, location = frame.partition(" (")
    path = location.rstrip(")").rsplit(":", 1)[0]
    if path == "asyncio/runners.py":
        return "the event loop itself (uvloop, C)"
    if path == "asyncio/streams.py" and name.endswith("writelines"):
        return "socket writes (asyncio's writelines)"
    package = path.split("/", 1)[0].removesuffix(".py")
    if f"{package}/" in OWN_CODE or package == "launcher":
        return "Conveyor's own code"
    return f"{package} (standard library)" if package in ("asyncio", "json") else package


def by_library(raw: Path, ms_per_request: float, top: int = 12) -> list[str]:
    """The process's CPU per request split by what ran (the leaf frame of each sample)."""
    counts: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        frames, _, count = line.rpartition(" ")
        if frames:
            counts[_library(frames.split(";")[-1])] += int(count)
    total = sum(counts.values()) or 1
    lines = ["  ms per request by what runs (self samples):"]
    lines += [f"    {ms_per_request * n / total:6.3f}  {name}" for name, n in counts.most_common(top)]
    return lines


def redis_commands(port: int, requests: int, top: int = 8) -> list[str]:
    """Redis's own time per request by command (``INFO commandstats``, reset before the load): a script's commands
    count inside its EVALSHA and again on their own lines."""
    with redis.Redis(port=port) as client:
        stats = client.info("commandstats")
        io = client.info("stats")
    rows = sorted(stats.items(), key=lambda item: -float(item[1]["usec"]))[:top]
    reads, writes = (int(io.get(f"total_{kind}_processed", 0)) / requests for kind in ("reads", "writes"))
    lines = [f"  socket reads {reads:.2f} and writes {writes:.2f} per request (INFO stats: one read brings a pipeline)"]
    lines += ["  by command (INFO commandstats; EVALSHA includes its scripts' commands):"]
    lines += [
        f"    {name.removeprefix('cmdstat_'):>16}  {int(row['calls']) / requests:5.2f} calls  "
        f"{float(row['usec']) / requests:6.1f} us per request"
        for name, row in rows
    ]
    return lines


@contextlib.contextmanager
def conveyor(model: str, engine: str, task: str, settings: dict[str, str]) -> Iterator[Served]:
    """Gateway, Redis and one worker (and its engine core, with the real engine) with the worker ``settings``."""
    if engine == "fake":
        worker_args, env = ["--engine", "fake", "--task", task], settings
    else:
        worker_args, env = ["--task", task], {"CONVEYOR_WORKER_CPU_THREADS_BIND": BIND, **settings}
    with stack([model]) as running:
        worker = running.worker(model, *worker_args, env=env, timeout=900)
        sampled = {"gateway": running.children[0].pid, "worker": worker.pid}
        yield Served(running.base_url, sampled, named_children(worker.pid), running.redis_ports[0], running.redis_pid)


@contextlib.contextmanager
def vllm_own_server(model: str, task: str) -> Iterator[Served]:
    """vLLM's own OpenAI server on the same weights and engine arguments (its API server and engine core)."""
    from tests.engine.vllm_server import vllm_server

    weights = str(model_prep.resolve(model))
    with vllm_server(weights, model, task=task, cpu_threads_bind=BIND, timeout=900) as server:
        yield Served(server.base_url, {"vLLM API server": server.pid}, named_children(server.pid))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--engine", choices=["fake", "vllm"], default="fake")
    parser.add_argument("--workload", choices=["embed", "chat"], default="embed", help="chat: streamed, 100 tokens")
    parser.add_argument(
        "--system", choices=["conveyor", "vllm"], default="conveyor", help="vllm: vLLM's own server (real engine)"
    )
    parser.add_argument(
        "--rate", type=int, default=200, help="py-spy samples per second; 0: no stacks, only the CPU counters"
    )
    add_worker_env(parser, "CONVEYOR_WORKER_FAKE_TOKEN_DELAY=0.07")
    args = parser.parse_args()
    chat = args.workload == "chat"
    task = "generate" if chat else "embed"
    if args.system == "vllm" and args.engine == "fake":
        parser.error("--system vllm runs the real engine: add --engine vllm")
    model = FAKE_MODEL if args.engine == "fake" else (SMOLLM2 if chat else MINILM)
    py_spy = shutil.which("py-spy") or shutil.which("py-spy", path=str(Path(sys.executable).parent))
    if py_spy is None:
        raise SystemExit("py-spy is not installed (it is a dev dependency: uv sync)")
    out = Path(tempfile.mkdtemp(prefix="conveyor-profile-"))
    settings = worker_env(args)
    if settings and args.system == "vllm":
        parser.error("--worker-env sets Conveyor's worker: not with --system vllm")
    served = conveyor(model, args.engine, task, settings) if args.system == "conveyor" else vllm_own_server(model, task)
    with served as system:
        pids = system.sampled | system.engine
        asyncio.run(load(system.base_url, model, 2, args.concurrency, chat))  # warm-up
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        preempted_before = {name: preemptions(pid) for name, pid in pids.items()}
        redis_before = cpu_seconds(system.redis_pid) if system.redis_pid else 0.0
        machine_before = machine_busy()
        if system.redis_port:
            with redis.Redis(port=system.redis_port) as client:
                client.config_resetstat()
        samplers = [
            subprocess.Popen(
                [py_spy, "record", "--rate", str(args.rate), "--duration", str(int(args.seconds)), "--format", "raw",
                 "--nonblocking", "--output", str(out / f"{name}.txt"), "--pid", str(pid)],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            for name, pid in system.sampled.items()
            if args.rate
        ]  # fmt: skip
        started = time.monotonic()
        requests, chunks = asyncio.run(load(system.base_url, model, args.seconds, args.concurrency, chat))
        seconds = time.monotonic() - started
        used = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
        preempted = {name: preemptions(pid) - preempted_before[name] for name, pid in pids.items()}
        redis_used = cpu_seconds(system.redis_pid) - redis_before if system.redis_pid else 0.0
        machine_used = machine_busy() - machine_before
        commands = redis_commands(system.redis_port, requests) if system.redis_port else []
        for sampler in samplers:
            sampler.wait()
    system_name = "the queue path" if args.system == "conveyor" else "vLLM's own server"
    print(f"Profile of {system_name}, {args.engine} {task} engine, concurrency {args.concurrency}, {machine()}")
    sampling = f"sampled by py-spy at {args.rate} Hz" if args.rate else "not sampled"
    print(f"{requests} requests in {seconds:.1f} s ({requests / seconds:,.0f}/s), {sampling}")
    if chunks:
        print(f"{chunks} stream chunks ({chunks / seconds:,.0f}/s)")
    counted = sum(used.values()) + redis_used
    outside = 100 * (machine_used - counted) / seconds
    print(f"the machine busy {100 * machine_used / seconds:.0f}% of one core; of that, outside the processes below")
    print(f"(the load generator, py-spy, the rest): {outside:.0f}% of one core")
    if system.redis_pid:
        per_chunk = f", {1000 * redis_used / chunks:.3f} ms per stream chunk" if chunks else ""
        print(f"Redis: {1000 * redis_used / requests:.3f} ms of CPU per request{per_chunk}")
        print("\n".join(commands))
    for name in pids:
        per_chunk = f", {1000 * used[name] / chunks:.3f} ms per stream chunk ({chunks} chunks)" if chunks else ""
        ceiling = f" (at most {requests / used[name]:,.0f} requests/s per core)" if used[name] else ""
        print(f"\n{name}: {1000 * used[name] / requests:.2f} ms of CPU per request{ceiling}{per_chunk}")
        print(f"  preempted {preempted[name] / seconds:,.0f} times/s (threads' nonvoluntary context switches)")
        if (out / f"{name}.txt").exists():
            print("\n".join(summary(out / f"{name}.txt")))
            print("\n".join(by_library(out / f"{name}.txt", 1000 * used[name] / requests)))
    if samplers:
        print(f"\nraw stacks: {out}")


if __name__ == "__main__":
    main()
