"""The dashboard on the real engine: a real Prometheus on the shipped scrape config discovers `conveyor up`'s
gateway and vLLM workers, traffic runs, and EVERY query of EVERY panel returns a number, the vLLM row included
(so vLLM's `vllm:` names arrive intact). Each panel's data is drawn as a PNG in `.artifacts/dashboard/` for a
person to look at, since no Grafana runs here."""

from __future__ import annotations

import time
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.conftest import run_embedding_batch, wait_for
from tests.dashboards.prom import panels, plot, prometheus, require_answers
from tests.engine.conftest import CHAT, EMBED, RealStack

ARTIFACTS = Path(__file__).resolve().parents[2] / ".artifacts" / "dashboard"


def test_every_panel_returns_data_on_the_real_engine(real_stack: RealStack, tmp_path: Path) -> None:
    with (
        prometheus(real_stack.base_url, tmp_path) as prom,
        OpenAI(base_url=f"{real_stack.base_url}/v1", api_key="unused", max_retries=0) as client,
    ):
        started = time.monotonic()
        wait_for(lambda: prom.scrapes(gateways=1, workers=2), timeout=60, what="the gateway and both workers scraped")
        for i in range(8):
            client.embeddings.create(model=EMBED, input=f"a sentence to embed, number {i}")
        for i in range(3):
            stream = client.chat.completions.create(
                model=CHAT, messages=[{"role": "user", "content": f"Count to {i + 3}."}], max_tokens=16, stream=True
            )
            assert list(stream)
        client.chat.completions.create(model=CHAT, messages=[{"role": "user", "content": "Hi"}], max_tokens=8)
        with pytest.raises(openai.NotFoundError):  # a failure, for the failure panels
            client.embeddings.create(model="no-such-model", input="x")
        run_embedding_batch(client, EMBED, 4, timeout=120)
        # the API-key panels need a managed key, which this session's shared Redis must not get (every gateway on it
        # would demand keys from then on): the dashboards tier evaluates them
        every = [panel for panel in panels() if not panel.keyed]
        assert any(panel.engine for panel in every)
        require_answers(prom, every, timeout=60)
        assert prom.query("vllm:num_requests_running"), "vLLM's metric names did not survive the scrape"
        drawn = plot(prom, every, time.monotonic() - started, ARTIFACTS)
        assert len(drawn) == len(every) and all(path.stat().st_size > 0 for path in drawn)
