"""What admission charges a request before the engine saw it: text at 4 characters a token, token ids exactly, the
output it may produce."""

from __future__ import annotations

from conveyor.contract import JobKind
from conveyor.token_estimate import charge


def test_token_ids_count_exactly_and_text_by_characters() -> None:
    assert charge(JobKind.EMBEDDING, {"input": [1, 2, 3]}, 99) == 3
    assert charge(JobKind.EMBEDDING, {"input": [[1, 2], [3]]}, 99) == 3
    assert charge(JobKind.EMBEDDING, {"input": ["abcd", "abcde"]}, 99) == 1 + 2


def test_generation_reserves_its_output_for_every_choice() -> None:
    body = {"prompt": "abcdefgh", "max_tokens": 10, "n": 3}
    assert charge(JobKind.COMPLETION, body, 99) == 2 + 30
    assert charge(JobKind.COMPLETION, {"prompt": "abcdefgh"}, 99) == 2 + 99


def test_chat_counts_each_message_and_its_text_parts() -> None:
    messages = [
        {"role": "system", "content": "abcd"},
        {"role": "user", "content": [{"type": "text", "text": "abcdefgh"}, {"type": "image_url", "image_url": {}}]},
    ]
    assert charge(JobKind.CHAT, {"messages": messages, "max_completion_tokens": 5}, 99) == (4 + 1) + (4 + 2) + 5
