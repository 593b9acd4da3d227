from __future__ import annotations

from dataclasses import dataclass

import pytest

from tests.conftest import Gateway, Processes, Worker

CHAT = "fake-chat"
EMBED = "fake-embed"
IDLE = "idle-model"  # configured, never served


@dataclass
class Stack:
    gateway: Gateway
    chat_worker: Worker
    embed_worker: Worker


@pytest.fixture(scope="session")
def stack(session_processes: Processes) -> Stack:
    gateway = session_processes.gateway(models=f"{CHAT},{EMBED},{IDLE}")
    chat = session_processes.fake_worker(CHAT)
    embed = session_processes.fake_worker(EMBED, "--task", "embed", embed=True)
    return Stack(gateway, chat, embed)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/integration/" in str(item.fspath):
            item.add_marker(pytest.mark.integration)
