"""Request migration on vLLM: which requests a continuation can reproduce exactly, the completion request that
continues a cut stream (vLLM cannot resume a request: prompt plus the tokens sent become a new prompt), a
continuation's chunks shaped as the original stream's, and a non-streamed answer built from a stream's chunks as
vLLM's own response object. Importing this module imports no vLLM (``worker.engines.vllm_engine``)."""

from __future__ import annotations

import json
import time
from typing import Any

from conveyor.contract import JobKind
from worker import responses
from worker.engines.base import Resume, token_limit


def unresumable(kind: JobKind, body: dict[str, Any], engine_args: dict[str, Any]) -> str | None:
    """A continuation runs as a completion of the prompt's token ids plus those sent (vLLM has no way to resume a
    request), so what that cannot reproduce exactly is refused: more than one choice, logprobs, guided decoding,
    tools, an echoed prompt, and the chat parsers (reasoning, tool calls) that split a model's text."""
    for field in UNRESUMABLE_FIELDS:
        if body.get(field):
            return f"`{field}` is set"
    for field in ("presence_penalty", "frequency_penalty"):  # vLLM counts them over the output tokens only
        if body.get(field):
            return f"`{field}` is set"
    if int(body.get("n") or 1) > 1 or int(body.get("best_of") or 1) > 1:
        return "n > 1: several choices cannot be continued"
    if (body.get("response_format") or {}).get("type", "text") != "text":
        return "guided decoding (response_format)"
    if kind is JobKind.COMPLETION and not isinstance(body.get("prompt"), str | None):
        prompt = body["prompt"]
        if not (isinstance(prompt, list) and (all(isinstance(t, int) for t in prompt) or len(prompt) == 1)):
            return "several prompts"
    for option in ("reasoning_parser", "tool_call_parser", "enable_auto_tool_choice"):
        if engine_args.get(option):
            return f"the engine runs with {option}"
    return None


def answer(kind: JobKind, chunks: list[dict[str, Any]]) -> bytes:
    """vLLM's own response object, built from the stream's chunks and dumped as vLLM's server dumps the one its
    non-streamed path builds (``run``): the same fields, defaults included."""
    from vllm.entrypoints.openai.chat_completion.protocol import (
        ChatCompletionResponse,
        ChatCompletionResponseChoice,
        ChatMessage,
    )
    from vllm.entrypoints.openai.completion.protocol import CompletionResponse, CompletionResponseChoice
    from vllm.entrypoints.serve.engine.protocol import UsageInfo

    built = responses.from_chunks(kind, chunks)
    (choice,) = built["choices"]
    ids = [i for c in chunks for part in c.get("choices") or () for i in part.get("token_ids") or ()]
    # a chat's prompt ids come with its first chunk, a completion's in that chunk's choice
    places = [part for c in chunks for part in (c, *(c.get("choices") or ()))]
    prompt = next((part["prompt_token_ids"] for part in places if part.get("prompt_token_ids")), None)
    common = {key: built.get(key) for key in ("id", "created", "model", "system_fingerprint")}
    usage = UsageInfo.model_validate(built["usage"] or {})
    fields = {
        "index": 0,
        "finish_reason": choice["finish_reason"],
        "stop_reason": choice.get("stop_reason"),
        "token_ids": ids or None,
    }
    if kind is JobKind.CHAT:
        message = ChatMessage(role="assistant", content=choice["message"]["content"])
        chat = ChatCompletionResponse(
            **common,
            choices=[ChatCompletionResponseChoice(message=message, **fields)],
            usage=usage,
            prompt_token_ids=prompt,
        )
        return chat.model_dump_json().encode()
    text = CompletionResponseChoice(text=choice["text"], prompt_token_ids=prompt, **fields)
    return CompletionResponse(**common, choices=[text], usage=usage).model_dump_json().encode()


def request(
    kind: JobKind, body: dict[str, Any], resume: Resume, model: str, max_model_len: int | None
) -> tuple[list[str], dict[str, Any] | None]:
    """How a cut stream goes on: the chunks to send first (made here: the finish of one cut after its last token,
    the usage of one cut after its finish), and the completion request of prompt plus sent token ids that generates
    the rest (None when nothing is left to generate)."""
    assert resume.prompt_token_ids is not None
    prompt = [*resume.prompt_token_ids, *resume.token_ids]
    limit = token_limit(body)
    if limit is None:  # the original's default: the rest of the context (chat), or vLLM's 16 in all (completion)
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest

        completion = len(resume.prompt_token_ids) + int(CompletionRequest.model_fields["max_tokens"].default)
        limit = ((max_model_len or 0) if kind is JobKind.CHAT else completion) - len(prompt)
    usage = bool((body.get("stream_options") or {}).get("include_usage"))
    if resume.finished or limit <= 0:  # cut after its finish (or its last token): only its end is left
        made = (
            [] if resume.finished else [json.dumps({"choices": [{"index": 0, "text": "", "finish_reason": "length"}]})]
        )
        if usage:
            made.append(json.dumps({"choices": [], "usage": _usage_of(len(prompt), 0)}))
        return made, None
    continued = {field: body[field] for field in CONTINUATION_FIELDS if field in body}
    if body.get("min_tokens"):
        continued["min_tokens"] = max(int(body["min_tokens"]) - len(resume.token_ids), 0)
    continued |= {
        "model": body.get("model") or model,
        "prompt": prompt,
        "max_tokens": limit,
        "stream_options": {"include_usage": usage},
        "return_token_ids": True,  # what it adds, for a later continuation
    }
    return [], continued


#: request fields whose effect a continuation (a completion of token ids) cannot reproduce
UNRESUMABLE_FIELDS = (
    # vLLM holds back the text that might start a stop string, while the tokens under it count as sent
    "stop",
    "logprobs",
    "top_logprobs",
    "prompt_logprobs",
    "echo",
    "use_beam_search",
    "tools",
    "functions",
    "structured_outputs",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "guided_grammar",
    "continue_final_message",
)
#: the sampling fields a continuation takes over from the original request (chat or completion)
CONTINUATION_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "stop_token_ids",
    "repetition_penalty",
    "ignore_eos",
    "logit_bias",
    "allowed_token_ids",
    "bad_words",
    "skip_special_tokens",
    "spaces_between_special_tokens",
    "include_stop_str_in_output",
    "priority",
    "user",
    "cache_salt",
)


def _usage_of(prompt: int, completion: int) -> dict[str, int]:
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def as_original(kind: JobKind, chunk: dict[str, Any], request_id: str, model: str, resume: Resume) -> dict[str, Any]:
    """A continuation's completion chunk as the original stream would have sent it: a chat chunk for a chat (its
    text the delta's content), the original id, and usage counting the prompt as first rendered and every completion
    token once."""
    assert resume.prompt_token_ids is not None
    out = {"created": int(time.time()), "model": model} | chunk
    if kind is JobKind.CHAT:
        out |= {"id": f"chatcmpl-{request_id}", "object": "chat.completion.chunk"}
        out["choices"] = [
            {
                "index": choice.get("index", 0),
                "delta": {"content": choice["text"]} if choice.get("text") else {},
                "logprobs": None,
                "finish_reason": choice.get("finish_reason"),
                **({"stop_reason": choice["stop_reason"]} if choice.get("stop_reason") is not None else {}),
                **({"token_ids": choice["token_ids"]} if choice.get("token_ids") else {}),  # the client asked
            }
            for choice in chunk.get("choices") or ()
        ]
    else:
        out |= {"id": f"cmpl-{request_id}", "object": "text_completion"}
    usage = chunk.get("usage")
    if usage:
        sent = len(resume.token_ids)
        out["usage"] = usage | _usage_of(len(resume.prompt_token_ids), int(usage.get("completion_tokens", 0)) + sent)
    return out
