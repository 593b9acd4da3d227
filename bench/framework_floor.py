"""The CPU floor of the gateway's web stack: what uvicorn + FastAPI cost per request before Conveyor does anything.

    uv run --frozen --extra cpu python -m bench.framework_floor [--seconds 10] [--concurrency 16]

Serves two endpoints in a bare uvicorn process (the gateway's own server settings, uvloop and httptools) and loads each
with the same aiohttp client as ``bench.profile``: an embeddings-shaped POST whose body FastAPI validates into
Conveyor's ``EmbeddingRequest`` and which answers a constant JSON body, and a raw ASGI callable answering the same
bytes without FastAPI. Prints the server's CPU per request for each: the part of the gateway's CPU per request that
no change inside Conveyor's own code can remove.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import time

from bench.common import cpu_seconds, machine, table
from bench.profile import load
from launcher import processes
from launcher.redis_server import free_port

ANSWER = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0]}],"model":"m"}'

SERVER = """
import sys
import uvicorn
from fastapi import FastAPI, Response
from conveyor.protocol import EmbeddingRequest

ANSWER = %r
app = FastAPI()


@app.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest) -> Response:
    return Response(ANSWER, media_type="application/json")


async def raw(scope, receive, send):
    if scope["type"] != "http":
        return
    more = True
    while more:
        more = (await receive()).get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    target = app if sys.argv[2] == "fastapi" else raw
    uvicorn.run(target, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def measure(kind: str, seconds: float, concurrency: int) -> tuple[float, float]:
    """(requests/s, server CPU ms per request) of one kind of server."""
    port = free_port()
    server = processes.spawn([sys.executable, "-c", SERVER % ANSWER, str(port), kind])
    try:
        base = f"http://127.0.0.1:{port}"
        _wait_port(port)
        asyncio.run(load(base, "m", 2, concurrency))  # warm-up
        before, started = cpu_seconds(server.pid), time.monotonic()
        done, _ = asyncio.run(load(base, "m", seconds, concurrency))
        elapsed = time.monotonic() - started
        return done / elapsed, 1000 * (cpu_seconds(server.pid) - before) / done
    finally:
        processes.stop(server, grace=5)


def _wait_port(port: int) -> None:
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    rows = []
    for kind, label in (("fastapi", "FastAPI route, body validated into EmbeddingRequest"), ("raw", "raw ASGI")):
        rate, cpu = measure(kind, args.seconds, args.concurrency)
        rows.append([label, f"{rate:,.0f}", f"{cpu:.3f}"])
    print(f"uvicorn (uvloop, httptools) answering a constant body, {args.concurrency} clients; {machine()}\n")
    print(table(["server", "requests/s", "server CPU ms per request"], rows))


if __name__ == "__main__":
    main()
