"""Logs an operator can use: one format, the request id on every line about a request (the same id the client got),
each failure logged once at its level, no prompt text."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.conftest import Processes, wait_for

SECRET = "a prompt nobody may read in a log"


def records(path: Path) -> list[dict[str, str]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_deadline_miss_is_logged_once_by_each_side_with_its_request_id(spawn: Processes, tmp_path: Path) -> None:
    spawn.env["CONVEYOR_LOG_FORMAT"] = "json"
    gateway_log, worker_log = tmp_path / "gateway.log", tmp_path / "worker.log"
    gateway = spawn.gateway(log=gateway_log, models="logged-chat")
    spawn.fake_worker("logged-chat", "--fake-token-delay", "0.05", log=worker_log)
    body = {"model": "logged-chat", "messages": [{"role": "user", "content": SECRET}], "max_tokens": 200}
    response = httpx.post(
        f"{gateway.base_url}/v1/chat/completions", json=body, headers={"x-conveyor-timeout": "0.5"}, timeout=30
    )
    assert response.status_code == 504
    request_id = response.headers["x-request-id"]  # an error answer names its request too

    def about_it(path: Path) -> list[dict[str, str]]:
        return [r for r in records(path) if r.get("request_id") == request_id]

    wait_for(lambda: len(about_it(worker_log)) >= 1, timeout=10, what="the worker's line about the job")
    (gateway_line,) = about_it(gateway_log)
    assert gateway_line["level"] == "WARNING" and "504" in gateway_line["message"]
    assert gateway_line["model"] == "logged-chat" and gateway_line["ts"].endswith("Z")
    (worker_line,) = about_it(worker_log)  # the worker's deadline and the gateway's cancel race: either is right
    assert (worker_line["level"], worker_line["message"].split(" after ")[0]) in {
        ("INFO", "chat job ended cancelled"),
        ("WARNING", "chat job ended expired"),
    }
    for path in (gateway_log, worker_log):
        assert SECRET not in path.read_text()
