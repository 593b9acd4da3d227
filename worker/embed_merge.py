"""Many embedding requests as one engine call, and the answer split back so each gets exactly what it would alone:
its vectors (indices from 0), its own usage, its own id (vLLM names an answer ``embd-<request id>``).

Splitting needs each input's token count (``Engine.token_counts``); when the counts do not add up to the usage the
engine reported, ``split`` gives up (None) and the caller runs each request alone.
"""

from __future__ import annotations

import json
from typing import Any


def inputs_of(value: Any) -> list[Any]:
    """An embedding request's inputs: one text or token array, or a list of them."""
    if isinstance(value, str) or (isinstance(value, list) and value and all(isinstance(x, int) for x in value)):
        return [value]
    return list(value)


def params_key(body: dict[str, Any]) -> str:
    """Requests with the same key (every field but ``input``) may share an engine call."""
    return json.dumps({k: v for k, v in body.items() if k != "input"}, sort_keys=True)


def split(
    answer: dict[str, Any],
    inputs: list[list[Any]],
    counts: list[list[int]],
    merged_id: str,
    request_ids: list[str],
) -> list[dict[str, Any]] | None:
    """The answer of one call over the concatenated ``inputs``, cut back into one answer per request."""
    usage = answer.get("usage") or {}
    total = sum(sum(c) for c in counts)
    if usage.get("prompt_tokens") != total or len(answer.get("data", [])) != sum(len(i) for i in inputs):
        return None
    answer_id = answer.get("id")
    prefix = answer_id[: -len(merged_id)] if isinstance(answer_id, str) and answer_id.endswith(merged_id) else None
    head = {k: v for k, v in answer.items() if k not in ("data", "usage")}
    out, at = [], 0
    for request_items, request_counts, request_id in zip(inputs, counts, request_ids, strict=True):
        data = [item | {"index": i} for i, item in enumerate(answer["data"][at : at + len(request_items)])]
        at += len(request_items)
        tokens = sum(request_counts)
        single = dict(head)
        if prefix is not None:
            single["id"] = prefix + request_id
        out.append(single | {"data": data, "usage": usage | {"prompt_tokens": tokens, "total_tokens": tokens}})
    return out
