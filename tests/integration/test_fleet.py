"""``conveyor up`` as the supervisor of one host's fleet: models added, scaled and removed over the admin API,
workers restarted when they die, a crash-looping model failed alone, and the fleet back after a restart."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from launcher import processes, redis_server
from launcher.models_file import load
from launcher.redis_server import RedisServer
from tests.conftest import alive, descendants, queue_depth, wait_for
from worker.engines.fake import fake_tokens

ADMIN = {"Authorization": "Bearer fleet-admin-key"}
CHAT = "fleet-chat"
MODELS = f"""# the test fleet
[[models]]
name = "{CHAT}"  # stays up through everything
engine = "fake"
task = "generate"
"""


@dataclass
class Up:
    """A ``conveyor up`` process and what it printed."""

    process: subprocess.Popen[bytes]
    base: str
    redis_url: str
    lines: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers=ADMIN, timeout=30)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.reader is not None:
            self.reader.join(10)
        if self.process.stdout is not None:
            self.process.stdout.close()


@pytest.fixture
def start_up(own_redis: RedisServer, tmp_path: Path) -> Iterator[Any]:
    """Starts ``conveyor up`` on the test's models file (``tmp_path/models.toml``) and Redis; stops them all after."""
    models = tmp_path / "models.toml"
    models.write_text(MODELS)
    started: list[Up] = []

    def start() -> Up:
        port = redis_server.free_port()
        env = os.environ | {
            "CONVEYOR_REDIS_URL": own_redis.url,
            "CONVEYOR_DATA_DIR": str(tmp_path / "data"),
            "CONVEYOR_ADMIN_KEY": ADMIN["Authorization"].removeprefix("Bearer "),
            "CONVEYOR_UP_RESTART_BACKOFF": "0.1",
            "CONVEYOR_UP_RESTART_LIMIT": "3",
            "CONVEYOR_UP_HUNG_SECONDS": "2",
        }
        command = processes.conveyor_command(
            "up", "--models-file", str(models), "--port", str(port), "--host", "127.0.0.1"
        )
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        up = Up(process, f"http://127.0.0.1:{port}", own_redis.url)
        up.reader = threading.Thread(  # joined by stop() before it closes the pipe the thread reads
            target=lambda: up.lines.extend(line.decode() for line in process.stdout or ()), daemon=True
        )
        up.reader.start()
        started.append(up)
        wait_for(lambda: "Conveyor is up" in up.output, timeout=60, what="conveyor up's banner")
        return up

    yield start
    for up in started:
        up.stop()


def model_card(up: Up, name: str) -> dict[str, Any] | None:
    """The model's card in /v1/models (None when it is not there, or the gateway does not answer)."""
    try:
        cards = {card["id"]: card for card in httpx.get(f"{up.base}/v1/models").json()["data"]}
    except httpx.TransportError:
        return None
    return cards.get(name)


def workers_of(up: Up, model: str) -> set[int]:
    """Pids of the running worker processes of ``model`` below this ``conveyor up``."""
    found = set()
    for pid in descendants(up.process.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"worker" in command and model.encode() in command and alive(pid):
            found.add(pid)
    return found


def serving(up: Up, name: str, workers: int) -> bool:
    card = model_card(up, name)
    return bool(card and card["live_workers"] == workers and card["fleet"] and card["fleet"]["state"] == "serving")


def test_a_model_is_added_scaled_and_removed_over_http_and_the_file_follows(start_up: Any, tmp_path: Path) -> None:
    up: Up = start_up()
    with up.client() as admin:
        added = admin.post("/admin/models", json={"name": "fleet-embed", "engine": "fake", "task": "embed"})
        assert added.status_code == 201, added.text
        wait_for(
            lambda: (
                httpx.post(f"{up.base}/v1/embeddings", json={"model": "fleet-embed", "input": "hi"}).status_code == 200
            ),
            timeout=30,
            what="the added model's first answer",
        )
        assert [m.name for m in load(tmp_path / "models.toml").models] == [CHAT, "fleet-embed"]
        assert admin.patch("/admin/models/fleet-embed", json={"replicas": 2}).status_code == 200
        wait_for(lambda: serving(up, "fleet-embed", 2), timeout=30, what="two workers")
        pids = workers_of(up, "fleet-embed")
        assert len(pids) == 2
        assert admin.delete("/admin/models/fleet-embed").json()["deleted"] is True

        def forgotten() -> bool:
            refused = httpx.post(f"{up.base}/v1/embeddings", json={"model": "fleet-embed", "input": "hi"})
            return refused.status_code == 404 and refused.json()["error"]["code"] == "model_not_found"

        wait_for(forgotten, timeout=60, what="the model forgotten")
    assert model_card(up, "fleet-embed") is None
    assert [pid for pid in pids if alive(pid)] == []  # drained and gone, no orphan
    text = (tmp_path / "models.toml").read_text()
    assert "fleet-embed" not in text and "# stays up through everything" in text  # the file's comments stay
    assert serving(up, CHAT, 1)


def test_two_models_on_one_gpu_are_refused_unless_shared(start_up: Any) -> None:
    up: Up = start_up()
    with up.client() as admin:
        first = {"name": "gpu-a", "engine": "fake", "task": "generate", "gpus": ["0"]}
        assert admin.post("/admin/models", json=first).status_code == 201
        clash = admin.post("/admin/models", json={"name": "gpu-b", "engine": "fake", "gpus": ["0"]})
        assert clash.status_code == 400
        error = clash.json()["error"]
        assert error["code"] == "gpu_conflict" and "gpu-a" in error["message"] and "share_gpus" in error["message"]
        bad = admin.post("/admin/models", json={"name": "x", "engine": "nope"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "engine"
        assert admin.post("/admin/models", json=first).status_code == 409


def test_a_killed_worker_is_restarted_and_a_crash_loop_fails_only_its_model(start_up: Any) -> None:
    up: Up = start_up()
    (victim,) = workers_of(up, CHAT)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: (model_card(up, CHAT) or {}).get("fleet", {}).get("restarts") == 1, timeout=30, what="a restart")
    wait_for(lambda: serving(up, CHAT, 1), timeout=30, what="the chat model serving again")
    assert workers_of(up, CHAT) != {victim}
    assert "it was killed (SIGKILL); restarting" in up.output
    crashing = {"name": "fleet-crash", "engine": "fake", "env": {"CONVEYOR_WORKER_MAX_JOBS": "-5"}}
    with up.client() as admin:
        assert admin.post("/admin/models", json=crashing).status_code == 201

        def failed() -> bool:
            status = admin.get("/admin/models/fleet-crash").json()["status"]
            return bool(status and status["state"] == "failed")

        wait_for(failed, timeout=30, what="the crash-looping model marked failed")
        status = admin.get("/admin/models/fleet-crash").json()["status"]
    assert any("CONVEYOR_WORKER_MAX_JOBS" in line for line in status["last_log"])
    assert "exited 3 times" in status["message"]
    refused = httpx.post(f"{up.base}/v1/completions", json={"model": "fleet-crash", "prompt": "x"})
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "model_failed"
    answer = httpx.post(f"{up.base}/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": 2})
    assert answer.status_code == 200  # the rest of the fleet never stopped
    assert workers_of(up, "fleet-crash") == set()


def test_conveyor_up_restarted_brings_the_same_fleet_back(start_up: Any) -> None:
    first: Up = start_up()
    with first.client() as admin:
        assert admin.post("/admin/models", json={"name": "fleet-added", "engine": "fake"}).status_code == 201
    wait_for(lambda: serving(first, "fleet-added", 1), timeout=30, what="the added model")
    family = descendants(first.process.pid)
    first.stop()
    assert first.process.returncode == 0 and [pid for pid in family if alive(pid)] == []
    second: Up = start_up()
    wait_for(lambda: serving(second, "fleet-added", 1) and serving(second, CHAT, 1), timeout=30, what="the fleet")


def test_a_changed_model_rolls_new_workers_in_before_the_old_ones_drain(start_up: Any) -> None:
    up: Up = start_up()
    (old,) = workers_of(up, CHAT)
    failures: list[int] = []
    done = threading.Event()

    def load() -> None:  # requests all through the roll: none may fail
        with httpx.Client(base_url=up.base, timeout=30) as client:
            while not done.is_set():
                answer = client.post("/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": 2})
                if answer.status_code != 200:
                    failures.append(answer.status_code)

    loader = threading.Thread(target=load)
    loader.start()
    try:
        with up.client() as admin:
            changed = admin.patch(f"/admin/models/{CHAT}", json={"env": {"CONVEYOR_WORKER_MAX_JOBS": "4"}})
            assert changed.status_code == 200 and changed.json()["env"] == {"CONVEYOR_WORKER_MAX_JOBS": "4"}
        wait_for(lambda: workers_of(up, CHAT) - {old} and old not in workers_of(up, CHAT), timeout=60, what="the roll")
    finally:
        done.set()
        loader.join(30)
    assert failures == []
    output = up.output
    assert output.index(f"model {CHAT} changed") < output.index("new workers serving; draining 1 old one(s)")
    assert serving(up, CHAT, 1)


def test_the_gateway_is_restarted_when_it_exits(start_up: Any) -> None:
    up: Up = start_up()
    (gateway,) = {pid for pid in descendants(up.process.pid) if b"gateway" in Path(f"/proc/{pid}/cmdline").read_bytes()}
    os.kill(gateway, signal.SIGKILL)
    wait_for(lambda: "gateway exited with code -9; restarting it" in up.output, timeout=30, what="the restart")
    wait_for(lambda: serving(up, CHAT, 1), timeout=30, what="the API back")


def test_a_redis_restarted_empty_gets_the_fleet_back_from_the_models_file(
    start_up: Any, own_redis: RedisServer
) -> None:
    up: Up = start_up()
    own_redis.stop()  # SIGKILL, no persistence: it comes back empty
    own_redis.start()
    wait_for(lambda: "restoring it from the models file" in up.output, timeout=30, what="the fleet restored")
    wait_for(lambda: serving(up, CHAT, 1), timeout=30, what="the model serving again")
    with up.client() as admin:
        assert [m["name"] for m in admin.get("/admin/models").json()["data"]] == [CHAT]


def test_a_change_that_cannot_start_leaves_the_old_workers_serving_and_can_be_reverted(start_up: Any) -> None:
    up: Up = start_up()
    (old,) = workers_of(up, CHAT)
    with up.client() as admin:
        assert admin.patch(f"/admin/models/{CHAT}", json={"env": {"CONVEYOR_WORKER_MAX_JOBS": "-5"}}).status_code == 200
        wait_for(lambda: admin.get(f"/admin/models/{CHAT}").json()["status"]["state"] == "failed", timeout=30, what="x")
        answer = httpx.post(f"{up.base}/v1/completions", json={"model": CHAT, "prompt": "x", "max_tokens": 2})
        assert answer.status_code == 200 and workers_of(up, CHAT) == {old}  # the old worker never stopped
        assert admin.patch(f"/admin/models/{CHAT}", json={"env": {}}).status_code == 200
        wait_for(
            lambda: admin.get(f"/admin/models/{CHAT}").json()["status"]["state"] == "serving", timeout=30, what="y"
        )
    assert workers_of(up, CHAT) == {old}  # reverted: the worker that ran this spec all along stays


def test_requests_still_queued_for_a_removed_model_are_answered_404(start_up: Any) -> None:
    up: Up = start_up()
    slow = {"CONVEYOR_WORKER_MAX_JOBS": "1", "CONVEYOR_WORKER_FAKE_TOKEN_DELAY": "0.2"}
    with up.client() as admin:
        assert (
            admin.post("/admin/models", json={"name": "fleet-slow", "engine": "fake", "env": slow}).status_code == 201
        )
        wait_for(lambda: serving(up, "fleet-slow", 1), timeout=30, what="the slow model")
        answers: dict[int, httpx.Response] = {}

        def ask(i: int) -> None:  # 10 tokens: 2 s each, one at a time
            body = {"model": "fleet-slow", "prompt": "x", "max_tokens": 10}
            answers[i] = httpx.post(f"{up.base}/v1/completions", json=body, timeout=60)

        askers = [threading.Thread(target=ask, args=(i,)) for i in range(3)]
        for asker in askers:
            asker.start()
        wait_for(lambda: queue_depth(up.redis_url, "fleet-slow") == 3, timeout=10, what="three queued")
        assert admin.delete("/admin/models/fleet-slow").status_code == 200
        for asker in askers:
            asker.join(60)
    statuses = sorted(answer.status_code for answer in answers.values())
    assert statuses == [200, 404, 404]  # the running one finished; the queued ones were told, not left to time out
    refused = next(answer for answer in answers.values() if answer.status_code == 404)
    assert "was removed before this request ran" in refused.json()["error"]["message"]


def test_a_worker_that_stops_heartbeating_is_killed_and_restarted(start_up: Any) -> None:
    up: Up = start_up()
    (frozen,) = workers_of(up, CHAT)
    os.kill(frozen, signal.SIGSTOP)  # alive, but its heartbeat lapses: the registry declares it dead
    wait_for(lambda: "stopped heartbeating: killing it (hung)" in up.output, timeout=30, what="the hang noticed")
    wait_for(lambda: serving(up, CHAT, 1) and frozen not in workers_of(up, CHAT), timeout=30, what="a new worker")
    assert not alive(frozen)


def test_a_model_at_zero_starts_a_worker_for_a_waiting_request_and_stops_it_when_idle(start_up: Any) -> None:
    up: Up = start_up()
    spec = {"name": "fleet-zero", "engine": "fake", "task": "generate", "min_workers": 0, "idle_seconds": 1}
    with up.client() as admin:
        assert admin.post("/admin/models", json=spec).status_code == 201
    wait_for(lambda: (model_card(up, "fleet-zero") or {}).get("status") == "scaled_to_zero", timeout=10)
    card = model_card(up, "fleet-zero")
    assert card and card["fleet"]["state"] == "scaled_to_zero" and card["live_workers"] == 0
    assert workers_of(up, "fleet-zero") == set()
    assert httpx.get(f"{up.base}/ready").status_code == 200  # a model at zero takes requests: it is ready
    body = {"model": "fleet-zero", "prompt": "wake up", "max_tokens": 3}
    answer = httpx.post(f"{up.base}/v1/completions", json=body, timeout=60)  # waits in the queue, not a 503
    assert answer.status_code == 200, answer.text
    assert len(answer.json()["choices"][0]["text"].split()) == 3
    assert "fleet-zero: 1 job(s) waiting; starting 1 worker(s)" in up.output
    wait_for(lambda: workers_of(up, "fleet-zero") == set(), timeout=30, what="the idle model's worker stopped")
    wait_for(lambda: (model_card(up, "fleet-zero") or {}).get("status") == "scaled_to_zero", timeout=10)
    with httpx.stream("POST", f"{up.base}/v1/completions", json=body | {"stream": True}, timeout=60) as stream:
        events = [line for line in stream.iter_lines() if line.startswith("data:")]
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)  # a stream from zero too


def test_a_roll_under_sixteen_streams_cuts_none(start_up: Any) -> None:
    """``PATCH /admin/models`` rolls the model while 16 long streams run on its worker: the old worker drains (1 s
    grace here) and hands its streams to the new one, which continues each where it was (request migration)."""
    up: Up = start_up()
    env = {"CONVEYOR_WORKER_FAKE_TOKEN_DELAY": "0.05", "CONVEYOR_WORKER_GRACE_PERIOD": "1"}
    spec = {"name": "fleet-streams", "engine": "fake", "task": "generate", "env": env}
    with up.client() as admin:
        assert admin.post("/admin/models", json=spec).status_code == 201
        wait_for(lambda: serving(up, "fleet-streams", 1), timeout=30, what="the model serving")
        (old,) = workers_of(up, "fleet-streams")
        results: dict[int, list[str]] = {}

        def read(i: int) -> None:
            body = {"model": "fleet-streams", "prompt": f"story {i}", "max_tokens": 200, "stream": True}
            with httpx.stream("POST", f"{up.base}/v1/completions", json=body, timeout=90) as stream:
                results[i] = [line for line in stream.iter_lines() if line.startswith("data:")]

        readers = [threading.Thread(target=read, args=(i,)) for i in range(16)]
        for reader in readers:
            reader.start()
        wait_for(lambda: queue_depth(up.redis_url, "fleet-streams") == 16, timeout=30, what="16 streams")  # or running
        changed = admin.patch("/admin/models/fleet-streams", json={"env": env | {"CONVEYOR_WORKER_MAX_JOBS": "32"}})
        assert changed.status_code == 200
        for reader in readers:
            reader.join(120)
    assert old not in workers_of(up, "fleet-streams")  # the roll happened while they ran
    assert "new workers serving; draining 1 old one(s)" in up.output
    assert sorted(results) == list(range(16))
    for i, events in results.items():
        assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events)
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == "".join(
            fake_tokens(f"story {i}", 200)
        )
