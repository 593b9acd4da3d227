"""The CPU floor of a queue path on Conveyor's own libraries: the thinnest gateway and worker they allow, measured
as ``bench.profile`` measures Conveyor.

    uv run --frozen --extra cpu python -m bench.queue_floor [--seconds 20] [--concurrency 16]

Each request crosses the path Conveyor's takes, with nothing else: a uvicorn process (uvloop, httptools) with a raw
ASGI callable validates the body into ``EmbeddingRequest`` (pydantic's ``model_validate_json``), enqueues it with one
Lua call through redis-py (a depth check and an ``RPUSH``; commands packed by hiredis, as in Conveyor), and waits for
its answer, which one task reads from the process's reply list (``BLPOP``, then ``LPOP`` of what else is there) and
hands over by request id. One worker process takes jobs with ``BLPOP`` and ``LPOP`` and pushes a constant answer (32
floats, as the fake engine gives) for each to its gateway's list in one pipeline. No fair order, deadlines, leases,
API keys, metrics, disconnect watch, retries or errors: what is left is the web server, the Redis client, the event
loop and the kernel's sockets. Prints the CPU per request of each process and Redis next to the goal of issue 20
(gateway + worker <= 0.35 ms, Redis <= 0.05 ms), so the part of Conveyor's own figures that its features cost, and
the part no Conveyor built on these libraries can remove, can be told apart.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import machine, table
from bench.profile import FAKE_MODEL, cpu_per_request
from launcher import processes, redis_server
from launcher.redis_server import free_port

GATEWAY = """
import asyncio, os, sys
import uvicorn
from redis.asyncio import Redis
from bench.raw_asgi import read_body
from conveyor import redis_packing
from conveyor.protocol import EmbeddingRequest

redis_packing.install()
redis = Redis.from_url(sys.argv[2])
INBOX = "floor:inbox:" + os.urandom(8).hex()
ENQUEUE = redis.register_script(
    "if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end "
    "redis.call('RPUSH', KEYS[1], ARGV[2]) return 1"
)
waiting = {}


async def read_inbox():
    while True:
        popped = await redis.blpop([INBOX], timeout=1)
        if popped is None:
            continue
        for raw in [popped[1], *(await redis.lpop(INBOX, 256) or [])]:
            request_id, _, answer = raw.partition(b" ")
            future = waiting.pop(request_id, None)
            if future is not None:
                future.set_result(answer)


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while (message := await receive())["type"] != "lifespan.shutdown":
            if message["type"] == "lifespan.startup":
                app.reader = asyncio.create_task(read_inbox())
                await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
        return
    body = await read_body(receive)
    answer = b"{}"
    if scope["method"] == "POST":
        EmbeddingRequest.model_validate_json(body)
        request_id = os.urandom(8).hex().encode()
        future = waiting[request_id] = asyncio.get_running_loop().create_future()
        await ENQUEUE(keys=["floor:queue"], args=[1000, INBOX.encode() + b" " + request_id + b" " + body])
        answer = await future
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": answer})


uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""

WORKER = """
import asyncio, json, sys
import uvloop
from redis.asyncio import Redis
from conveyor import redis_packing

redis_packing.install()

VECTOR = [round(i / 31 - 0.5, 6) for i in range(32)]
ANSWER = json.dumps({"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": VECTOR}],
                     "model": "m", "usage": {"prompt_tokens": 4, "total_tokens": 4}}).encode()


async def main():
    redis = Redis.from_url(sys.argv[1])
    while True:
        popped = await redis.blpop(["floor:queue"], timeout=1)
        if popped is None:
            continue
        jobs = [popped[1], *(await redis.lpop("floor:queue", 64) or [])]
        pipe = redis.pipeline(transaction=False)
        for job in jobs:
            inbox, request_id, _ = job.split(b" ", 2)
            pipe.rpush(inbox, request_id + b" " + ANSWER)
        await pipe.execute()


uvloop.run(main())
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        redis_port, gateway_port = free_port(), free_port()
        url = f"redis://127.0.0.1:{redis_port}/0"
        redis = redis_server.start(redis_port, Path(tmp))
        gateway = processes.spawn([sys.executable, "-c", GATEWAY, str(gateway_port), url])
        worker = processes.spawn([sys.executable, "-c", WORKER, url])
        try:
            base = f"http://127.0.0.1:{gateway_port}"
            processes.wait_http_ok(f"{base}/ready", gateway, 30)  # a GET is answered without the queue
            pids = {"gateway": gateway.pid, "worker": worker.pid, "Redis": redis.pid}
            done, elapsed, used = cpu_per_request(base, FAKE_MODEL, args.seconds, args.concurrency, pids)
        finally:
            for process in (gateway, worker, redis):
                processes.stop(process, grace=5)
    print(f"The thinnest queue path on Conveyor's libraries, {args.concurrency} clients; {machine()}")
    print(f"{done} requests in {elapsed:.1f} s ({done / elapsed:,.0f}/s)\n")
    rows = [[name, f"{ms:.3f}", f"{1000 / ms:,.0f}"] for name, ms in used.items()]
    rows.append(["gateway + worker", f"{used['gateway'] + used['worker']:.3f}", "-"])
    print(table(["process", "CPU ms per request", "requests/s per core"], rows))
    print("\nissue 20's goal: gateway + worker <= 0.35 ms, Redis <= 0.05 ms, >= 4,000 requests/s per gateway core")


if __name__ == "__main__":
    main()
