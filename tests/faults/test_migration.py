"""Request migration against real processes: a stream whose worker is SIGKILLed or drained mid-way goes on on
another worker, and the client sees exactly the stream an uninterrupted run gives (the fake engine is autoregressive
on token ids: a continuation from a wrong, missing or repeated token would read differently from there on)."""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass, field

import openai
import pytest
import redis

from conveyor import key_layout
from tests.conftest import Gateway, Processes, Worker, metric, queue_depth, wait_for
from worker.engines.fake import fake_tokens

MODEL = "migrating"
MESSAGES = [{"role": "user", "content": "tell me a long story"}]
TOKENS = 120
#: short leases, so a SIGKILLed worker's job is claimed again within about a second
QUICK = {"CONVEYOR_WORKER_LEASE_SECONDS": "1", "CONVEYOR_WORKER_POLL_DELAY": "0.2"}


@dataclass
class Received:
    deltas: list[str] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    finishes: list[str] = field(default_factory=list)
    completion_tokens: int | None = None
    error: str = ""
    ended: bool = False


def stream(
    gateway: Gateway,
    tokens: int = TOKENS,
    messages: list[dict[str, str]] = MESSAGES,
    got: Received | None = None,
) -> Received:
    """One streamed chat through the official SDK, every chunk kept in ``got`` as it arrives."""
    got = got or Received()
    client = gateway.client(timeout=120)
    try:
        chunks = client.chat.completions.create(
            model=MODEL,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=tokens,
            stream=True,
            stream_options={"include_usage": True},
        )
        for chunk in chunks:
            got.ids.add(chunk.id)
            for choice in chunk.choices:
                if choice.delta.content:
                    got.deltas.append(choice.delta.content)
                if choice.finish_reason:
                    got.finishes.append(choice.finish_reason)
            if chunk.usage is not None:
                got.completion_tokens = chunk.usage.completion_tokens
    except openai.APIError as exc:
        got.error = f"{exc.code}: {exc.message}"
    got.ended = True
    return got


def in_background(gateway: Gateway, tokens: int = TOKENS, messages: list[dict[str, str]] = MESSAGES) -> Received:
    """A stream read in a thread: its ``Received`` fills as chunks arrive; ``ended`` once it has."""
    got = Received()
    threading.Thread(target=stream, args=(gateway, tokens, messages, got), daemon=True).start()
    return got


def running(worker: Worker) -> float:
    return metric(worker.metrics(), "conveyor_worker_running_jobs")


def the_one_streaming(workers: list[Worker]) -> Worker:
    return next(w for w in workers if w.process.poll() is None and running(w) > 0)


@pytest.fixture
def uninterrupted(procs: Processes) -> tuple[Gateway, Received]:
    """The gateway, and the stream an uninterrupted run gives (on a worker that is stopped again)."""
    gateway = procs.gateway(models=MODEL)
    first = procs.fake_worker(MODEL, env=QUICK)
    reference = stream(gateway)
    first.process.send_signal(signal.SIGTERM)
    assert first.process.wait(20) == 0
    assert not reference.error and len(reference.deltas) == TOKENS
    return gateway, reference


def assert_same(got: Received, reference: Received) -> None:
    assert got.error == ""
    assert got.deltas == reference.deltas  # no token repeated, none missing, in order
    assert got.finishes == ["length"]  # one end
    assert got.completion_tokens == TOKENS  # every token counted once
    assert len(got.ids) == 1


def expected(messages: list[dict[str, str]] = MESSAGES, tokens: int = TOKENS) -> list[str]:
    """What the fake engine streams for these messages uninterrupted."""
    return fake_tokens("\n".join(f"{m['role']}: {m['content']}" for m in messages), tokens)


def kill_the_streaming_worker(workers: list[Worker], got: Received, how: signal.Signals = signal.SIGKILL) -> Worker:
    """Once the stream has moved on, signal whichever worker runs it; returns that worker, exited."""
    before = len(got.deltas)
    wait_for(lambda: got.ended or len(got.deltas) > before, timeout=60, what="the stream to move on")
    victim = the_one_streaming(workers)
    victim.process.send_signal(how)
    victim.process.wait(20)
    return victim


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_stream_cut_mid_way_goes_on_on_another_worker(
    procs: Processes, uninterrupted: tuple[Gateway, Received], how: signal.Signals
) -> None:
    """SIGKILL: the lease lapses and the other worker continues. SIGTERM with a 1 s grace: the drain hands the
    running stream over at its deadline instead of cutting it."""
    gateway, reference = uninterrupted
    env = QUICK | {"CONVEYOR_WORKER_GRACE_PERIOD": "1"}
    workers = [procs.fake_worker(MODEL, "--fake-token-delay", "0.05", env=env) for _ in range(2)]
    got = in_background(gateway)
    victim = kill_the_streaming_worker(workers, got, how)
    wait_for(lambda: got.ended, timeout=90, what="the stream to end")
    assert_same(got, reference)
    survivor = next(w for w in workers if w is not victim)
    assert metric(survivor.metrics(), "conveyor_worker_migrations_total", outcome="resumed") == 1


def test_sixteen_streams_survive_their_worker_draining(procs: Processes) -> None:
    """A roll's drain under load: 16 streams on one worker, a new worker beside it, the old one SIGTERMed with a
    short grace: none is cut, each reads as it would uninterrupted."""
    gateway = procs.gateway(models=MODEL)
    old = procs.fake_worker(MODEL, "--fake-token-delay", "0.05", env=QUICK | {"CONVEYOR_WORKER_GRACE_PERIOD": "1"})
    contents = [[{"role": "user", "content": f"story number {i}"}] for i in range(16)]
    streams = [in_background(gateway, messages=messages) for messages in contents]
    wait_for(lambda: running(old) == 16, timeout=30, what="16 streams running")
    new = procs.fake_worker(MODEL, "--fake-token-delay", "0.05", env=QUICK)
    old.process.send_signal(signal.SIGTERM)
    assert old.process.wait(30) == 0
    wait_for(lambda: all(s.ended for s in streams), timeout=90, what="every stream to end")
    assert [s.error for s in streams] == [""] * 16
    assert [s.deltas for s in streams] == [expected(messages) for messages in contents]
    assert [s.completion_tokens for s in streams] == [TOKENS] * 16
    assert metric(new.metrics(), "conveyor_worker_migrations_total", outcome="resumed") == 16


def killed_in_a_row(procs: Processes, kills: int, max_migrations: int, token_delay: str) -> Received:
    """A 1000-token stream whose worker is SIGKILLed ``kills`` times, a fresh worker ready to go on each time."""
    gateway = procs.gateway(models=MODEL)
    env = QUICK | {"CONVEYOR_WORKER_MAX_MIGRATIONS": str(max_migrations), "CONVEYOR_WORKER_MAX_TRIES": "50"}
    workers = [procs.fake_worker(MODEL, "--fake-token-delay", token_delay, env=env)]
    got = in_background(gateway, tokens=1000)
    for _ in range(kills):
        workers.append(procs.fake_worker(MODEL, "--fake-token-delay", token_delay, env=env))  # the next to go on
        kill_the_streaming_worker(workers, got)
    wait_for(lambda: got.ended, timeout=120, what="the stream to end")
    return got


def test_twenty_kills_in_a_row_and_the_stream_reads_as_if_nothing_happened(procs: Processes) -> None:
    # room for more moves than kills: with a 1 s lease, a worker starved of CPU on a busy machine loses its job too
    # (a run here, beside an engine-tier run, moved the stream 25 times for 20 kills)
    got = killed_in_a_row(procs, kills=20, max_migrations=60, token_delay="0.02")
    assert got.error == "" and got.deltas == expected(tokens=1000) and got.completion_tokens == 1000


def test_a_stream_cut_once_more_than_its_limit_ends_with_worker_lost_where_it_was(procs: Processes) -> None:
    got = killed_in_a_row(procs, kills=3, max_migrations=2, token_delay="0.05")
    assert "worker_lost" in got.error and "moved 2 times" in got.error
    assert got.deltas == expected(tokens=1000)[: len(got.deltas)] and got.finishes == []


@pytest.mark.parametrize("how", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_non_streamed_generation_cut_mid_way_is_continued_not_restarted(
    procs: Processes, how: signal.Signals
) -> None:
    """Its progress is recorded every 0.5 s: the next worker continues from there, and the one answer equals an
    uninterrupted run's, with usage counting each token once."""
    gateway = procs.gateway(models=MODEL)
    env = QUICK | {"CONVEYOR_WORKER_GRACE_PERIOD": "1"}
    workers = [procs.fake_worker(MODEL, "--fake-token-delay", "0.05", env=env) for _ in range(2)]
    answers: list[openai.types.chat.ChatCompletion] = []

    def ask() -> None:
        client = gateway.client(timeout=120)
        answers.append(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=TOKENS))  # type: ignore[arg-type]

    threading.Thread(target=ask, daemon=True).start()
    wait_for(lambda: any(running(w) for w in workers), timeout=30, what="the generation running")
    victim = the_one_streaming(workers)
    with redis.Redis.from_url(procs.redis_url) as client:

        def recorded() -> int:
            return sum(int(client.llen(key)) for key in client.scan_iter(key_layout.progress_key("*", "*")))

        wait_for(lambda: recorded() >= 20, timeout=30, what="some of its progress recorded")
    victim.process.send_signal(how)
    victim.process.wait(20)
    wait_for(lambda: bool(answers), timeout=90, what="the answer")
    (answer,) = answers
    assert answer.choices[0].message.content == "".join(expected())
    assert answer.usage is not None and answer.usage.completion_tokens == TOKENS
    survivor = next(w for w in workers if w is not victim)
    assert metric(survivor.metrics(), "conveyor_worker_migrations_total", outcome="resumed") == 1


def test_a_request_for_a_model_at_zero_waits_and_is_answered_once_a_worker_starts(procs: Processes) -> None:
    """No worker at all (KEDA at minReplicaCount 0): the stream waits in the queue instead of a 503, and the first
    worker that starts answers it in full."""
    gateway = procs.gateway(models=MODEL, scale_to_zero=MODEL)
    got = in_background(gateway, tokens=20)
    wait_for(lambda: queue_depth(procs.redis_url, MODEL) == 1, timeout=30, what="the request queued")
    assert not got.ended  # waiting, not refused
    procs.fake_worker(MODEL)
    wait_for(lambda: got.ended, timeout=30, what="the answer")
    assert got.error == "" and got.deltas == expected(tokens=20) and got.completion_tokens == 20
