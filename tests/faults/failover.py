"""A Redis failover under load, as the Sentinel and Cluster fault tests drive it: threads send non-streamed chat,
streamed chat and embeddings through the official SDK one after another, every outcome is kept, and afterwards each
must be what the README promises for a failover.

The promise, checked for every request sent through it: answered correctly, or refused 503 ``redis_unavailable``
while no master answers, or (a stream open then) ended by an error event; a request whose job or answer was among the
old master's last writes that never reached the replica (replication is asynchronous) answers 504 at its deadline, so
a 504 may only come to a request sent before the failover completed. Nothing hangs, no process exits, and every kind
of request is answered again afterwards."""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai

from tests.conftest import Gateway, Worker, wait_for

MESSAGES = [{"role": "user", "content": "tell me about failovers"}]
TOKENS = 20
#: each request's deadline (``X-Conveyor-Timeout``): a job lost with the old master answers 504 within this
DEADLINE = 10
HEADERS = {"x-conveyor-timeout": str(DEADLINE)}
#: the load: threads per kind, each sending one request after another
KINDS = {"chat": 2, "stream": 2, "embed": 1}
#: what a request may get during a failover, besides its answer (and a 504 for one sent before it completed)
REFUSALS = {"503 redis_unavailable", "stream redis_unavailable"}


@dataclass(frozen=True)
class Models:
    chat: str
    embed: str


@dataclass
class Outcome:
    kind: str
    started: float
    result: str  # "ok", "wrong answer", or the status and error code


def answer(client: openai.OpenAI, kind: str, models: Models) -> str:
    """One request of ``kind``: its text (or the vector's digits) as the client saw it."""
    if kind == "embed":
        vector = client.embeddings.create(model=models.embed, input="a failover", extra_headers=HEADERS)
        return ",".join(f"{x:.6f}" for x in vector.data[0].embedding)
    if kind == "chat":
        reply = client.chat.completions.create(
            model=models.chat,
            messages=MESSAGES,  # type: ignore[arg-type]
            max_tokens=TOKENS,
            extra_headers=HEADERS,
        )
        return f"{reply.choices[0].message.content}|{reply.choices[0].finish_reason}"
    chunks = client.chat.completions.create(
        model=models.chat,
        messages=MESSAGES,  # type: ignore[arg-type]
        max_tokens=TOKENS,
        stream=True,
        extra_headers=HEADERS,
    )
    text, finishes = "", []
    for chunk in chunks:
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finishes += [choice.finish_reason] if choice.finish_reason else []
    return f"{text}|{','.join(finishes)}"


def outcome(client: openai.OpenAI, kind: str, expected: str, models: Models) -> Outcome:
    started = time.monotonic()
    try:
        result = "ok" if answer(client, kind, models) == expected else "wrong answer"
    except openai.APIStatusError as exc:
        result = f"{exc.status_code} {exc.code}"
    except openai.APIConnectionError as exc:  # the gateway dropped the connection, or did not answer in time
        result = f"connection {type(exc).__name__}"
    except openai.APIError as exc:  # an error event inside a stream
        result = f"stream {exc.code}"
    return Outcome(kind, started, result)


class Load:
    """Threads sending requests one after another until stopped, every outcome kept."""

    def __init__(self, gateway: Gateway, expected: dict[str, str], models: Models) -> None:
        self.outcomes: list[Outcome] = []
        self.stopping = threading.Event()
        self.threads = [
            threading.Thread(
                target=self._loop, args=(gateway.client(timeout=DEADLINE + 20), kind, expected[kind], models)
            )
            for kind, count in KINDS.items()
            for _ in range(count)
        ]
        for thread in self.threads:
            thread.start()

    def _loop(self, client: openai.OpenAI, kind: str, expected: str, models: Models) -> None:
        while not self.stopping.is_set():
            self.outcomes.append(outcome(client, kind, expected, models))

    def answered(self, kind: str, since: float = 0.0) -> int:
        return sum(o.kind == kind and o.result == "ok" and o.started >= since for o in self.outcomes)

    def stop(self) -> bool:
        """Whether every thread ended (none hangs: each request is bounded by its deadline)."""
        self.stopping.set()
        for thread in self.threads:
            thread.join(DEADLINE + 30)
        return not any(thread.is_alive() for thread in self.threads)


def fail_over_under_load(
    gateway: Gateway,
    workers: list[Worker],
    models: Models,
    kill: Callable[[], None],
    failed_over: Callable[[], bool],
    gateway_log: Path | None = None,
    reregistering: float = 0.0,
) -> None:
    """Load, ``kill`` the master, wait until ``failed_over``, and check the promise (the module's docstring); the
    failover's times are printed (measured, not asserted). ``gateway_log``: the file the gateway writes to, shown
    with an unexpected outcome. ``reregistering``: for this long after the failover a request may also be refused
    503 ``no_live_worker`` (a failover longer than the workers' registration lasts: until they register again)."""
    reference = gateway.client(timeout=30)
    expected = {kind: answer(reference, kind, models) for kind in KINDS}
    assert expected["chat"] == expected["stream"] and expected["chat"].endswith("|length")

    load = Load(gateway, expected, models)
    try:
        wait_for(lambda: all(load.answered(kind) >= 2 for kind in KINDS), timeout=30, what="answers before the kill")
        killed = time.monotonic()
        kill()
        wait_for(failed_over, 30, "the failover")
        promoted = time.monotonic()
        wait_for(
            lambda: all(load.answered(kind, since=promoted) >= 1 for kind in KINDS),
            timeout=30,
            what="every kind of request answered after the failover",
        )
        served_again = time.monotonic()
    finally:
        ended = load.stop()
    assert ended, "a request hung"

    results = Counter(o.result for o in load.outcomes)
    print(
        f"\nfailover: replica promoted {promoted - killed:.1f} s after the kill, every kind answered again"
        f" {served_again - promoted:.1f} s later; outcomes: {dict(results)}"
    )
    unexpected = [
        o
        for o in load.outcomes
        if o.result != "ok"
        and o.result not in REFUSALS
        and not (o.result == "504 deadline_exceeded" and o.started < promoted)
        and not (o.result == "503 no_live_worker" and o.started < promoted + reregistering)
    ]
    assert unexpected == [], gateway_log.read_text()[-20_000:] if gateway_log else unexpected
    assert all(w.process.poll() is None for w in workers) and gateway.process.poll() is None
    assert httpx.get(f"{gateway.base_url}/ready", timeout=10).json()["ready"] is True
