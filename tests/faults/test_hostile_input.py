"""Hostile and broken clients change nothing: clear 4xx answers, bounded metrics, no tracebacks, no leaks."""

from __future__ import annotations

import json
import socket
import uuid
from pathlib import Path

import httpx
import openai
import pytest

from tests.conftest import Processes, metric, scrape, wait_for

MODEL = "hostile"
KEY = "sk-hostile-0123456789"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}


@pytest.fixture
def gateway_log(tmp_path: Path) -> Path:
    return tmp_path / "gateway.log"


def test_auth_comes_before_the_body_is_read(procs: Processes) -> None:
    gateway = procs.gateway(api_keys=KEY, max_body_bytes="1048576")
    url = f"{gateway.base_url}/v1/chat/completions"
    big = b"x" * (2 * 1048576)
    assert httpx.post(url, content=big, headers={"content-type": "application/json"}).status_code == 401
    too_large = httpx.post(url, content=big, headers={"authorization": f"Bearer {KEY}"})
    assert too_large.status_code == 413 and too_large.json()["error"]["code"] == "request_too_large"

    def chunks() -> object:
        for _ in range(40):
            yield b"x" * 65536  # no Content-Length: refused once it grows past the limit

    chunked = httpx.post(url, content=chunks(), headers={"authorization": f"Bearer {KEY}"})  # type: ignore[arg-type]
    assert chunked.status_code == 413
    wrong = httpx.post(url, json=CHAT, headers={"authorization": "Bearer sk-hostile-0123456788"})
    assert wrong.status_code == 401 and set(wrong.json()["error"]) == {"message", "type", "param", "code"}
    for path in ("/docs", "/openapi.json", "/redoc"):
        assert httpx.get(f"{gateway.base_url}{path}").status_code == 404


@pytest.mark.parametrize("timeout", ["NaN", "-1", "0", "inf", "1e400", "99999999", "soon"])
def test_bad_timeout_headers_are_400(procs: Processes, timeout: str) -> None:
    gateway = procs.gateway(models=MODEL)
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT, headers={"x-conveyor-timeout": timeout})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == "x-conveyor-timeout"


def test_deep_nesting_and_bad_unicode_are_400_not_500(procs: Processes, gateway_log: Path) -> None:
    procs.fake_worker(MODEL)
    gateway = procs.gateway(log=gateway_log)
    url = f"{gateway.base_url}/v1/chat/completions"
    deep = '{"model": "hostile", "messages": [{"role": "user", "content": ' + "[" * 5000 + "]" * 5000 + "}]}"
    surrogate = '{"model": "hostile", "messages": [{"role": "user", "content": "\\ud800"}]}'
    nested_extra = json.dumps(CHAT)[:-1] + ', "extra": ' + "[" * 900 + "]" * 900 + "}"
    for body in (deep, surrogate, nested_extra, "{", "[]", '"text"', "\xff\xfe"):
        response = httpx.post(
            url, content=body.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}
        )
        assert response.status_code == 400, (body[:60], response.status_code, response.text[:200])
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "Traceback" not in gateway_log.read_text()


def test_metric_labels_stay_bounded_whatever_clients_send(procs: Processes) -> None:
    gateway = procs.gateway(models=MODEL)

    def send_random(count: int) -> set[str]:
        with httpx.Client(base_url=gateway.base_url) as client:
            for _ in range(count):
                client.post("/v1/chat/completions", json=CHAT | {"model": uuid.uuid4().hex})
                client.get(f"/v1/{uuid.uuid4().hex}")
        return set(scrape(f"{gateway.base_url}/metrics"))

    series = send_random(20)
    assert send_random(200) == series  # 400 more random names and paths: not one new series
    samples = scrape(f"{gateway.base_url}/metrics")
    assert metric(samples, "conveyor_requests_total", model="other", status="404") == 440


def test_error_bodies_carry_no_internal_address(procs: Processes) -> None:
    port = socket.socket()
    port.bind(("127.0.0.1", 0))
    dead = port.getsockname()[1]
    port.close()
    procs.redis_url = f"redis://127.0.0.1:{dead}/0"  # nothing listens there
    gateway = procs.gateway(models=MODEL)
    response = httpx.post(f"{gateway.base_url}/v1/chat/completions", json=CHAT, timeout=10)
    assert response.status_code == 503 and response.json()["error"]["code"] == "redis_unavailable"
    assert str(dead) not in response.text and "127.0.0.1" not in response.text


def test_disconnects_are_499_without_tracebacks_and_cancel_their_jobs(procs: Processes, gateway_log: Path) -> None:
    worker = procs.fake_worker(MODEL, "--fake-token-delay", "0.05")
    gateway = procs.gateway(log=gateway_log)
    body = CHAT | {"max_tokens": 400}

    def running() -> float:
        return metric(worker.metrics(), "conveyor_worker_running_jobs")

    # a sync request whose client leaves while its job runs
    with httpx.Client(timeout=httpx.Timeout(0.5)) as client, pytest.raises(httpx.ReadTimeout):
        client.post(f"{gateway.base_url}/v1/chat/completions", json=body)
    wait_for(lambda: metric(worker.metrics(), "conveyor_worker_jobs_total", outcome="cancelled") == 1, what="cancel")
    # a stream whose client leaves before the first byte
    with socket.create_connection(("127.0.0.1", gateway.port)) as raw:
        payload = json.dumps(body | {"stream": True}).encode()
        raw.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(payload)
            + payload
        )
        wait_for(lambda: running() == 1, what="the stream's job to run")
    wait_for(lambda: metric(worker.metrics(), "conveyor_worker_jobs_total", outcome="cancelled") == 2, what="cancel")
    wait_for(lambda: running() == 0, what="nothing running")
    samples = scrape(f"{gateway.base_url}/metrics")
    wait_for(
        lambda: metric(scrape(f"{gateway.base_url}/metrics"), "conveyor_requests_total", status="499") == 2,
        what="two 499s counted",
    )
    assert metric(samples, "conveyor_open_streams") == 0
    assert "Traceback" not in gateway_log.read_text()


def test_sdk_sees_openai_errors_for_a_missing_key(procs: Processes) -> None:
    gateway = procs.gateway(api_keys=KEY)
    with pytest.raises(openai.AuthenticationError):
        gateway.client(api_key="not-the-key-at-all").models.list()
