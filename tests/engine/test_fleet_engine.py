"""A real vLLM model added to and removed from the fleet while ``conveyor up`` runs (the repository's models)."""

from __future__ import annotations

from pathlib import Path

import httpx
import numpy as np

from tests.conftest import alive, descendants, wait_for
from tests.engine.conftest import ADMIN_KEY, EMBED, START_TIMEOUT, RealStack

EXTRA = "minilm-extra"
TEXT = "a queue of requests"


def _embed(base_url: str, model: str) -> httpx.Response | None:
    """The gateway's answer; None while it does not answer (``conveyor up`` restarting it)."""
    try:
        return httpx.post(f"{base_url}/v1/embeddings", json={"model": model, "input": TEXT}, timeout=120)
    except httpx.TransportError:
        return None


def _vector(base_url: str, model: str) -> np.ndarray | None:
    answer = _embed(base_url, model)
    return np.array(answer.json()["data"][0]["embedding"]) if answer and answer.status_code == 200 else None


def _workers(real_stack: RealStack, model: str) -> set[int]:
    found = set()
    for pid in descendants(real_stack.pid):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if model.encode() in command and alive(pid):
            found.add(pid)
    return found


def test_a_real_model_is_added_and_removed_while_conveyor_up_runs(real_stack: RealStack) -> None:
    headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
    with httpx.Client(base_url=real_stack.base_url, headers=headers, timeout=30) as admin:
        spec = {"name": EXTRA, "path": EMBED, "task": "embed", "cpu_threads_bind": "0"}
        assert admin.post("/admin/models", json=spec).status_code == 201
        wait_for(lambda: _vector(real_stack.base_url, EXTRA) is not None, timeout=START_TIMEOUT, what="the new model")
        added, default = _vector(real_stack.base_url, EXTRA), _vector(real_stack.base_url, EMBED)
        assert added is not None and default is not None
        assert float(added @ default / (np.linalg.norm(added) * np.linalg.norm(default))) > 0.999  # the same weights
        pids = _workers(real_stack, EXTRA)
        assert pids
        assert admin.delete(f"/admin/models/{EXTRA}").status_code == 200

    def gone() -> bool:
        answer = _embed(real_stack.base_url, EXTRA)
        return answer is not None and answer.status_code == 404

    wait_for(gone, timeout=120, what="the removed model answering 404")
    wait_for(lambda: not any(alive(pid) for pid in pids), timeout=60, what="its processes gone (vLLM's included)")
    assert _vector(real_stack.base_url, EMBED) is not None  # the rest of the fleet is untouched
