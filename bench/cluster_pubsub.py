"""What a streamed frame costs a Redis Cluster's masters, published classic (``PUBLISH``) or sharded (``SPUBLISH``).

    uv run --frozen --extra cpu python -m bench.cluster_pubsub [--shards 3] [--frames 20000] [--rounds 3]

A fresh cluster of ``--shards`` masters (``launcher.redis_cluster``); one subscriber on the master that owns a stream
channel's slot, as the gateway holds it (``gateway.pubsub``); frames of 100 bytes published from a script on that
slot, as a worker's frame script does (``worker.frames``), 50 per script call. Each master's CPU is read before and
after: the owning master's, and the others' (classic ``PUBLISH`` copies every message over the cluster bus to every
node, which then looks for subscribers of its own). The two take turns, round after round; the median round is shown.
CPU is read from ``/proc`` in clock ticks (10 ms): below ~0.5 us per frame at 20,000 frames is within one tick.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import redis

from bench.common import cpu_seconds, machine, table
from conveyor import key_layout
from launcher import redis_cluster

FRAME = b"x" * 100
PER_CALL = 50
SCRIPT = "for i = 1, tonumber(ARGV[2]) do redis.call(ARGV[1], KEYS[1], ARGV[3]) end"
COMMANDS = {"classic": ("PUBLISH", "SUBSCRIBE", "message"), "sharded": ("SPUBLISH", "SSUBSCRIBE", "smessage")}


def one_round(cluster: redis_cluster.RedisClusterServer, kind: str, frames: int) -> tuple[float, float, float]:
    """(seconds, us of the owning master's CPU per frame, us of the other masters' CPU per frame)."""
    publish, subscribe, message = COMMANDS[kind]
    channel = key_layout.stream_channel("bench-model", f"job-{kind}-{time.monotonic_ns()}")
    owner = cluster.node_of(channel)
    pids = {port: process.pid for port, process in zip(cluster.ports, cluster.processes, strict=True)}
    with redis.Redis(port=owner) as client, redis.Redis(port=owner) as listener:
        connection = listener.connection_pool.get_connection()
        connection.send_command(subscribe, channel)
        assert connection.read_response()[0].decode() == subscribe.lower()
        before = {port: cpu_seconds(pid) for port, pid in pids.items()}
        started = time.monotonic()
        for _ in range(frames // PER_CALL):
            client.eval(SCRIPT, 1, channel, publish, PER_CALL, FRAME)
        received = 0
        while received < frames // PER_CALL * PER_CALL:
            reply = connection.read_response()
            received += reply[0].decode() == message
        elapsed = time.monotonic() - started
        used = {port: cpu_seconds(pid) - before[port] for port, pid in pids.items()}
        listener.connection_pool.release(connection)
    sent = frames // PER_CALL * PER_CALL
    others = sum(seconds for port, seconds in used.items() if port != owner)
    return elapsed, used[owner] / sent * 1e6, others / sent * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=3)
    parser.add_argument("--frames", type=int, default=20000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    runs: dict[str, list[tuple[float, float, float]]] = {kind: [] for kind in COMMANDS}
    with tempfile.TemporaryDirectory() as workdir:
        cluster = redis_cluster.start(Path(workdir), masters=args.shards)
        try:
            for _ in range(args.rounds):
                for kind in COMMANDS:
                    runs[kind].append(one_round(cluster, kind, args.frames))
        finally:
            cluster.stop()
    rows = []
    for kind, results in runs.items():
        seconds, owner, others = sorted(results)[args.rounds // 2]
        rows.append([kind, args.frames, f"{args.frames / seconds:,.0f}", f"{owner:.1f}", f"{others:.1f}"])
    headers = ["pub/sub", "frames", "frames/s", "owning master us/frame", f"other {args.shards - 1} masters us/frame"]
    title = f"A stream's frames on a {args.shards}-master cluster, published from a script on its slot; {machine()}"
    print(f"{title}\n\n{table(headers, rows)}")


if __name__ == "__main__":
    main()
