"""The CPU floor of the gateway's web stack: what uvicorn + FastAPI cost per request before Conveyor does anything.

    uv run --frozen --extra cpu python -m bench.framework_floor [--seconds 10] [--concurrency 16]

A bare uvicorn process (the gateway's own server: uvloop, httptools) under the same aiohttp client as
``bench.profile``, four ways: an embeddings-shaped POST whose body FastAPI validates into Conveyor's
``EmbeddingRequest`` and which answers a constant JSON body; the same route making one Lua call to a real
redis-server through redis-py first (what admission makes); a raw ASGI callable answering the same bytes; and the raw
callable validating the body as the hot routes do (``model_validate_json``) and making the same Lua call. redis-py
packs commands with hiredis, as in Conveyor (``conveyor.redis_packing``). Prints the server's CPU per request for
each: the part of the gateway's CPU per request that no change inside Conveyor's own code can remove.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from bench.common import machine, table
from bench.profile import cpu_per_request
from launcher import processes, redis_server
from launcher.redis_server import free_port

ANSWER = b'{"object":"list","data":[{"object":"embedding","index":0,"embedding":[0.0]}],"model":"m"}'

SERVER = """
import sys
import uvicorn
from fastapi import FastAPI, Response
from redis.asyncio import Redis
from bench.raw_asgi import read_body
from conveyor import redis_packing
from conveyor.protocol import EmbeddingRequest

redis_packing.install()

ANSWER = %r
app = FastAPI()
redis = Redis.from_url(sys.argv[3]) if len(sys.argv) > 3 else None
script = redis.register_script("return ARGV[1]") if redis is not None else None


@app.post("/v1/embeddings")
async def embeddings(body: EmbeddingRequest) -> Response:
    if script is not None:
        await script(keys=["k"], args=[body.model])
    return Response(ANSWER, media_type="application/json")


async def raw(scope, receive, send):
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    if script is not None and scope["method"] == "POST":  # as the hot routes: the body validated in pydantic's core
        await script(keys=["k"], args=[EmbeddingRequest.model_validate_json(body).model])
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": ANSWER})


if __name__ == "__main__":
    target = raw if sys.argv[2] == "raw" else app
    uvicorn.run(target, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
"""


def measure(kind: str, seconds: float, concurrency: int, redis_url: str | None = None) -> tuple[float, float]:
    """(requests/s, server CPU ms per request) of one kind of server."""
    port = free_port()
    server = processes.spawn(
        [sys.executable, "-c", SERVER % ANSWER, str(port), kind, *([redis_url] if redis_url else [])]
    )
    try:
        base = f"http://127.0.0.1:{port}"
        processes.wait_http_ok(f"{base}/openapi.json", server, 30)  # FastAPI's schema; the raw callable answers all
        done, elapsed, used = cpu_per_request(base, "m", seconds, concurrency, {"server": server.pid})
        return done / elapsed, used["server"]
    finally:
        processes.stop(server, grace=5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        port = free_port()
        redis = redis_server.start(port, Path(tmp))
        try:
            kinds = [
                ("fastapi", "FastAPI route, body validated into EmbeddingRequest", None),
                (
                    "fastapi",
                    "the same route + one Lua call to Redis (redis-py), as admission makes",
                    f"redis://127.0.0.1:{port}",
                ),
                ("raw", "raw ASGI", None),
                (
                    "raw",
                    "raw ASGI, body validated (model_validate_json) + one Lua call, as the hot routes make",
                    f"redis://127.0.0.1:{port}",
                ),
            ]
            for kind, label, redis_url in kinds:
                rate, cpu = measure(kind, args.seconds, args.concurrency, redis_url)
                rows.append([label, f"{rate:,.0f}", f"{cpu:.3f}"])
        finally:
            redis.terminate()
            redis.wait(10)
    print(f"uvicorn (uvloop, httptools) answering a constant body, {args.concurrency} clients; {machine()}\n")
    print(table(["server", "requests/s", "server CPU ms per request"], rows))


if __name__ == "__main__":
    main()
