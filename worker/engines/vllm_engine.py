"""The real engine: vLLM's ``AsyncLLM`` in-process, driven through vLLM's own OpenAI serving objects.

Nothing of the OpenAI API is re-implemented here. ``start`` parses vLLM's own server CLI (``make_arg_parser``) into
the same namespace ``vllm serve`` would build, creates ``AsyncLLM`` from it and lets vLLM's ``init_app_state`` build
the serving objects (``OpenAIServingChat``, ``OpenAIServingCompletion``, ``ServingEmbedding``, ...) exactly as the
HTTP server does. Each job body is validated into vLLM's request model and handed to the matching serving object;
its response is dumped like the server's ``JSONResponse`` does, and the JSON of each SSE chunk is passed on as text,
untouched, to be relayed to the client as it is.

Importing this module imports no vLLM (vLLM starts its CPU workers with spawn, and the environment below must be set
before vLLM reads it): everything vLLM happens in ``start``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import os
import platform
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter, ValidationError

from conveyor.contract import JobKind, json_bytes, loads
from conveyor.errors import (
    ConveyorError,
    EngineFailure,
    InvalidRequest,
    ModelNotFound,
    NotFound,
    Overloaded,
    Unauthorized,
)
from conveyor.paths import data_dir
from worker.embed_batcher import inputs_of
from worker.engines import vllm_continuation
from worker.engines.base import Engine, Piece, Resume
from worker.model_prep import PACKAGED_MODELS, resolve
from worker.settings import WorkerSettings

log = logging.getLogger(__name__)

_ERROR_CLASSES: dict[int, type[ConveyorError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    404: NotFound,
    413: InvalidRequest,
    422: InvalidRequest,
    429: Overloaded,
    501: InvalidRequest,  # vLLM: "the model does not support ..." (NotImplementedError)
}


#: vLLM counters that grow with every engine step (as prometheus-client names their families)
PROGRESS_COUNTERS = frozenset({"vllm:prompt_tokens", "vllm:generation_tokens"})


def engine_environment(cpu_kvcache_space: int, cpu_threads_bind: str = "auto") -> dict[str, str]:
    """What vLLM must find in its environment before it is imported (a process's own values win for the defaults).

    The CPU knobs are harmless on GPUs; ``HF_HUB_OFFLINE`` and ``VLLM_CACHE_ROOT`` are only defaults.
    """
    env = {
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
        "VLLM_CACHE_ROOT": os.environ.get("VLLM_CACHE_ROOT", str(data_dir() / "vllm")),
        "VLLM_CPU_KVCACHE_SPACE": str(cpu_kvcache_space),
        # vLLM's loggers go through the worker's (conveyor.logs): one format for every line
        "VLLM_CONFIGURE_LOGGING": os.environ.get("VLLM_CONFIGURE_LOGGING", "0"),
    }
    if cpu_threads_bind != "auto":
        env["VLLM_CPU_OMP_THREADS_BIND"] = cpu_threads_bind
    return env


def bound_cores(cpu_threads_bind: str) -> set[int] | None:
    """The cores of a ``VLLM_CPU_OMP_THREADS_BIND`` list such as ``0``, ``0-1`` or ``0-3,8``; None for ``auto``,
    ``nobind`` and per-rank lists (``0-3|4-7``)."""
    if cpu_threads_bind in ("auto", "nobind", "all") or "|" in cpu_threads_bind:
        return None
    cores: set[int] = set()
    for part in cpu_threads_bind.split(","):
        first, _, last = part.partition("-")
        cores.update(range(int(first), int(last or first) + 1))
    return cores


def error_from_vllm(error: dict[str, Any]) -> ConveyorError:
    """A ``ConveyorError`` from vLLM's error object (``ErrorResponse.error``: message, type, param, code=status)."""
    status = int(error.get("code") or 500)
    message = str(error.get("message") or "engine error")
    cls = _ERROR_CLASSES.get(status) or (InvalidRequest if 400 <= status < 500 else EngineFailure)
    if status == 404 and (error.get("param") == "model" or "model" in message.lower()):
        cls = ModelNotFound
    return cls(message, param=error.get("param"))


def _validation_error(exc: ValidationError) -> InvalidRequest:
    errors = exc.errors()
    parts = []
    for err in errors[:5]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if "[" not in str(p) and "-" not in str(p))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    first_loc = [str(p) for p in errors[0].get("loc", ())] if errors else []
    param = next((p for p in first_loc if "[" not in p and "-" not in p), None)
    return InvalidRequest("; ".join(dict.fromkeys(parts)) or "invalid request", param=param)


def vllm_cli_args(served_model_name: str, weights: str, task: str = "auto", cpu: bool = True) -> list[str]:
    """The ``vllm serve`` arguments this engine runs with (the tests start vLLM's own server with the same)."""
    argv = ["--model", weights, "--served-model-name", served_model_name]
    if cpu:  # fp32 (bf16 measured 3x slower on AVX2), eager (starts faster, never slower here)
        argv += ["--dtype", "float32", "--enforce-eager"]
    if task == "embed":
        argv += ["--runner", "pooling"]
    elif task == "generate":
        argv += ["--runner", "generate"]
    return argv


class VLLMEngine(Engine):
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.capabilities = frozenset()
        self.max_model_len = None
        self.start_seconds: float | None = None
        self._llm: Any = None  # vllm.v1.engine.async_llm.AsyncLLM
        self._state: Any = None  # starlette State holding vLLM's serving objects
        self._max_num_seqs = 1
        self._embedding_adapter: Any = None
        self._score_adapter: Any = None

    # ---- lifecycle -----------------------------------------------------------------------------------------

    @property
    def concurrency(self) -> int:
        return self._max_num_seqs

    def _weights(self) -> str:
        weights = self.settings.weights
        if Path(weights).expanduser().exists():
            return str(Path(weights).expanduser())
        if weights.lower() in PACKAGED_MODELS:  # an offline packaged model: locate (or convert) it
            return str(resolve(weights))
        return weights  # a hub id

    async def start(self) -> None:
        started = time.monotonic()
        os.environ.update(engine_environment(self.settings.cpu_kvcache_space, self.settings.cpu_threads_bind))
        cores = bound_cores(self.settings.cpu_threads_bind)
        if cores:  # the worker's own Python work (tokenising, JSON) stays on its engine's cores too
            os.sched_setaffinity(0, cores)
        weights = await asyncio.to_thread(self._weights)

        from starlette.datastructures import State
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state
        from vllm.entrypoints.launchers.cli_args import (
            make_arg_parser,
            validate_parsed_serve_args,
        )
        from vllm.platforms import current_platform
        from vllm.usage.usage_lib import UsageContext
        from vllm.utils.argparse_utils import FlexibleArgumentParser
        from vllm.v1.engine.async_llm import AsyncLLM

        on_cpu = bool(current_platform.is_cpu())
        parser = make_arg_parser(FlexibleArgumentParser())  # type: ignore[no-untyped-call]
        args: argparse.Namespace = parser.parse_args(
            vllm_cli_args(self.settings.model, weights, self.settings.task, on_cpu)
        )
        for key, value in self.settings.engine_args.items():  # any `vllm serve` option, by its Python name
            if not hasattr(args, key):
                raise ValueError(f"engine_args: {key!r} is not a vLLM engine or server option")
            setattr(args, key, value)
        validate_parsed_serve_args(args)
        engine_args = AsyncEngineArgs.from_cli_args(args)
        log.info("starting vLLM (%s, cpu=%s) for %s from %s", platform.machine(), on_cpu, self.settings.model, weights)
        # No local variable holds the engine: vLLM keeps some import-time exception tracebacks, which pin this
        # frame, and a local here would keep AsyncLLM alive after stop() (its __del__ then fails at exit).
        self._llm = AsyncLLM.from_engine_args(engine_args, usage_context=UsageContext.OPENAI_API_SERVER)
        try:
            tasks = tuple(await self._llm.get_supported_tasks())
            self._state = State()
            await init_app_state(self._llm, self._state, args, tasks)
        except BaseException:
            await self.stop()
            raise
        caps = {"generate"} if "generate" in tasks else set()
        if "embed" in tasks and getattr(self._state, "serving_embedding", None) is not None:
            caps.add("embed")
        if getattr(self._state, "serving_scores", None) is not None:  # embedding models, 1-label classifiers
            caps.add("score")
        self.capabilities = frozenset(caps)
        self.max_model_len = int(self._llm.model_config.max_model_len)
        self._max_num_seqs = int(self._llm.vllm_config.scheduler_config.max_num_seqs)
        self.start_seconds = time.monotonic() - started
        log.info(
            "vLLM ready in %.1f s: tasks=%s max_model_len=%s max_num_seqs=%s",
            self.start_seconds,
            tasks,
            self.max_model_len,
            self._max_num_seqs,
        )

    async def stop(self) -> None:
        llm, self._llm, self._state = self._llm, None, None
        if llm is not None:
            llm.shutdown()
            del llm
            gc.collect()  # let AsyncLLM.__del__ run now, not at interpreter exit when its module globals are gone

    def running_requests(self) -> int:
        return int(self._llm.get_num_unfinished_requests()) if self._llm is not None else 0

    def schedules_by_priority(self) -> bool:
        return self._llm is not None and self._llm.vllm_config.scheduler_config.policy == "priority"

    def scores_by_embedding(self) -> bool:
        state = self._state
        scores = getattr(state, "serving_scores", None)
        embeds = getattr(state, "serving_embedding", None)
        return scores is not None and embeds is not None and scores.io_processor_name == "bi-encoder"

    def alive(self) -> bool:
        """vLLM's own verdict: its engine-core process died, or its output loop ended (``AsyncLLM.errored``)."""
        return self._llm is not None and not self._llm.errored

    def progress(self) -> int:
        """Tokens vLLM has processed (prompt and generated), from its own counters: they grow with every step."""
        from prometheus_client import REGISTRY

        total = 0.0
        for family in REGISTRY.collect():
            if family.name in PROGRESS_COUNTERS:
                total += sum(sample.value for sample in family.samples if sample.name.endswith("_total"))
        return int(total)

    # ---- requests ------------------------------------------------------------------------------------------

    def _serving(self, name: str) -> Any:
        if self._state is None:
            raise EngineFailure("engine not started")
        serving = getattr(self._state, name, None)
        if serving is None:
            raise InvalidRequest(f"model {self.settings.model!r} does not support this endpoint")
        return serving

    def _request(self, kind: JobKind, body: dict[str, Any], request_id: str, stream: bool) -> Any:
        """Validate ``body`` into vLLM's own request model (what FastAPI does in vLLM's server)."""
        if kind is JobKind.EMBEDDING and body.get("encoding_format") in ("bytes", "bytes_only"):
            raise InvalidRequest("encoding_format must be 'float' or 'base64'", param="encoding_format")
        data = {**body, "request_id": request_id}
        if not self.schedules_by_priority():
            data.pop("priority", None)  # it ordered the queue; vLLM refuses one it cannot schedule by
        if kind.generates:
            data["stream"] = stream
        try:
            if kind is JobKind.RERANK:
                from vllm.entrypoints.pooling.scoring.protocol import RerankRequest

                return RerankRequest.model_validate(data)
            if kind is JobKind.SCORE:
                if self._score_adapter is None:
                    from vllm.entrypoints.pooling.scoring.protocol import ScoreRequest

                    self._score_adapter = TypeAdapter(ScoreRequest)
                return self._score_adapter.validate_python(data)
            if kind is JobKind.CHAT:
                from vllm.entrypoints.openai.chat_completion.protocol import (
                    ChatCompletionRequest,
                )

                return ChatCompletionRequest.model_validate(data)
            if kind is JobKind.COMPLETION:
                from vllm.entrypoints.openai.completion.protocol import (
                    CompletionRequest,
                )

                return CompletionRequest.model_validate(data)
            if self._embedding_adapter is None:
                from vllm.entrypoints.pooling.embed.protocol import EmbeddingRequest

                self._embedding_adapter = TypeAdapter(EmbeddingRequest)
            return self._embedding_adapter.validate_python(data)
        except ValidationError as exc:
            raise _validation_error(exc) from None
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None

    async def _call(self, kind: JobKind, request: Any) -> Any:
        """Call the serving object; exceptions become errors the way vLLM's exception handlers map them."""
        from vllm.entrypoints.serve.exception_handling.error_response import (
            create_error_response,
        )

        try:
            if kind is JobKind.CHAT:
                result = await self._serving("openai_serving_chat").create_chat_completion(request)
            elif kind is JobKind.COMPLETION:
                result = await self._serving("openai_serving_completion").create_completion(request)
            elif kind is JobKind.EMBEDDING:
                result = await self._serving("serving_embedding")(request)
            else:  # score and rerank: ServingScores answers both, as vLLM's server routes them
                result = await self._serving("serving_scores")(request)
        except ConveyorError:
            raise
        except Exception as exc:  # vLLM's server turns every exception into an error response
            raise error_from_vllm(create_error_response(exc).error.model_dump()) from exc
        # vLLM's non-streamed generators swallow CancelledError (after aborting the request) and return a
        # "Client disconnected" error instead: a cancelled caller must see its cancellation.
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise asyncio.CancelledError
        return result

    async def run(self, kind: JobKind, body: dict[str, Any], request_id: str) -> bytes:
        result = await self._call(kind, self._request(kind, body, request_id, stream=False))
        _raise_if_error(result)
        if not kind.generates:  # pooling answers are a starlette JSONResponse (or ORJSONResponse): its body is the JSON
            body_bytes = getattr(result, "body", None)
            if not isinstance(body_bytes, bytes | bytearray | memoryview):
                raise EngineFailure(f"unexpected {kind.value} response from vLLM")
            if getattr(result, "status_code", 200) != 200:
                raise error_from_vllm(json.loads(bytes(body_bytes))["error"])
            return bytes(body_bytes)  # relayed as it is: nobody parses ~200 KB of floats on the way
        if not hasattr(result, "model_dump_json"):
            raise EngineFailure("vLLM returned a stream for a non-streamed request")
        dumped: str = result.model_dump_json()  # the fields vLLM's server sends (JSONResponse(result.model_dump()))
        return dumped.encode()

    async def embed_many(
        self, bodies: list[dict[str, Any]], request_ids: list[str]
    ) -> list[dict[str, Any] | bytes | Exception]:
        """One pass through vLLM's own embedding pipeline for all the requests' inputs, answered per request.

        The merged request is validated, rendered (tokenised, truncated) and sent to the engine by
        ``ServingEmbedding``'s own steps; each prompt keeps the engine request id it would have alone
        (``embd-<request id>-<i>``), and each request's answer is built by vLLM's own response builder from its own
        outputs, so its vectors, usage and id are what it would get alone. A request vLLM refuses gets its own error;
        when the merged call fails for another reason each request runs alone, so each gets the error it would get.
        """
        if len(bodies) == 1 or self._state is None:
            return await super().embed_many(bodies, request_ids)
        requests: list[Any] = []
        out: list[dict[str, Any] | bytes | Exception | None] = [None] * len(bodies)
        for i, (body, rid) in enumerate(zip(bodies, request_ids, strict=True)):
            try:
                requests.append((i, self._request(JobKind.EMBEDDING, body, rid, stream=False)))
            except ConveyorError as exc:
                out[i] = exc
        if len(requests) > 1 and not self._serving("serving_embedding").io_processor.enable_chunked_processing:
            try:
                answers = await self._embed_merged([r for _, r in requests])
            except Exception as exc:
                if not self.alive():
                    raise
                log.debug("a merged embedding call failed (%s); its requests run alone", exc)
            else:
                for (i, _), answer in zip(requests, answers, strict=True):
                    out[i] = answer
        alone = [i for i, result in enumerate(out) if result is None]
        rest = await super().embed_many([bodies[i] for i in alone], [request_ids[i] for i in alone])
        for i, result in zip(alone, rest, strict=True):
            out[i] = result
        return [result for result in out if result is not None]

    async def _embed_merged(self, requests: list[Any]) -> list[bytes]:
        from vllm.entrypoints.pooling.embed.protocol import EmbeddingCompletionRequest

        if not all(isinstance(r, EmbeddingCompletionRequest) for r in requests):
            raise InvalidRequest("only text inputs are merged")  # chat-style inputs: each runs alone
        serving = self._serving("serving_embedding")
        inputs = [inputs_of(r.input) for r in requests]
        merged = requests[0].model_copy(update={"input": [text for items in inputs for text in items]})
        ctx = await serving._init_ctx(serving.io_processor, merged, None)
        await serving._preprocessing(serving.io_processor, ctx)
        ctx.prompt_request_ids = [
            f"{serving.request_id_prefix}-{r.request_id}-{i}"
            for r, items in zip(requests, inputs, strict=True)
            for i in range(len(items))
        ]
        await serving._prepare_generators(ctx)
        await serving._collect_batch(ctx)
        serving.io_processor.post_process_online(ctx)
        if len(ctx.final_res_batch) != len(ctx.prompt_request_ids):
            raise EngineFailure("vLLM answered a merged embedding call with a different number of outputs")
        answers, at = [], 0
        for request, items in zip(requests, inputs, strict=True):
            response = serving._openai_json_response(
                ctx.final_res_batch[at : at + len(items)],
                f"{serving.request_id_prefix}-{request.request_id}",
                ctx.created_time,
                ctx.model_name,
                request.encoding_format,
                request.embed_dtype,
                request.endianness,
            )
            at += len(items)
            answers.append(bytes(response.body))
        return answers

    def unresumable(self, kind: JobKind, body: dict[str, Any]) -> str | None:
        return vllm_continuation.unresumable(kind, body, self.settings.engine_args)

    def answer(self, kind: JobKind, chunks: list[dict[str, Any]]) -> bytes:
        return vllm_continuation.answer(kind, chunks)

    async def _continue(
        self, kind: JobKind, body: dict[str, Any], request_id: str, resume: Resume
    ) -> AsyncIterator[str]:
        made, request = vllm_continuation.request(kind, body, resume, self.settings.model, self.max_model_len)
        for payload in made:
            yield payload
        if request is not None:
            async for payload in self._stream_events(JobKind.COMPLETION, request, request_id):
                yield payload

    async def stream(
        self, kind: JobKind, body: dict[str, Any], request_id: str, resume: Resume | None = None
    ) -> AsyncIterator[Piece]:
        """vLLM's stream, asked for its token ids (``return_token_ids``), which are taken out of each chunk again
        unless the client asked for them too; a continuation (``resume``) is a completion of the prompt's token ids
        plus those already sent, its chunks given the shape, id and usage of the original stream."""
        if not kind.generates:
            raise InvalidRequest(f"{kind.value} requests cannot be streamed", param="stream")
        keep_ids = bool(body.get("return_token_ids"))
        if resume is not None:
            if resume.prompt_token_ids is None:
                raise EngineFailure("the stream cannot be continued: its prompt's token ids were not recorded")
            pieces = self._continue(kind, body, request_id, resume)
        else:
            pieces = self._stream_events(kind, body | {"return_token_ids": True}, request_id)
        async for payload in pieces:
            chunk = loads(payload)
            keep_prompt = keep_ids and resume is None  # a continuation's prompt is not the one the client sent
            prompt_ids = chunk.get("prompt_token_ids") if keep_prompt else chunk.pop("prompt_token_ids", None)
            ids: list[int] = []
            for choice in chunk.get("choices") or ():  # a completion's prompt ids come in its choice
                ids += (choice.get("token_ids") if keep_ids else choice.pop("token_ids", None)) or ()
                in_choice = choice.get("prompt_token_ids") if keep_prompt else choice.pop("prompt_token_ids", None)
                prompt_ids = prompt_ids or in_choice
            finished = any(choice.get("finish_reason") for choice in chunk.get("choices") or ())
            if resume is not None:
                chunk = vllm_continuation.as_original(kind, chunk, request_id, self.settings.model, resume)
            payload = json_bytes(chunk).decode()
            prompt = tuple(int(i) for i in prompt_ids) if isinstance(prompt_ids, list) else None
            yield Piece(payload, tuple(ids), prompt, finished, bool(chunk.get("usage")))

    async def _stream_events(self, kind: JobKind, body: dict[str, Any], request_id: str) -> AsyncIterator[str]:
        """The JSON of each chunk of vLLM's SSE stream."""
        result = await self._call(kind, self._request(kind, body, request_id, stream=True))
        _raise_if_error(result)
        if hasattr(result, "model_dump"):  # vLLM answered in one piece
            raise EngineFailure("vLLM returned a full response for a streamed request")
        try:
            async for event in result:
                for line in str(event).splitlines():
                    if not line.startswith("data:"):
                        continue  # blank separators, SSE comments (keep-alives)
                    payload = line[5:].strip()
                    if payload == "[DONE]":
                        return
                    if payload.startswith('{"error"'):  # vLLM's in-stream error event
                        raise error_from_vllm(json.loads(payload)["error"])
                    yield payload
        finally:
            # On cancellation vLLM's generator already saw CancelledError and aborted the request; on an early
            # close (the consumer stopped iterating) closing it raises GeneratorExit inside, which aborts too.
            await result.aclose()


def _raise_if_error(result: Any) -> None:
    error = getattr(result, "error", None)
    if error is not None and hasattr(error, "code") and type(result).__name__ == "ErrorResponse":
        raise error_from_vllm(error.model_dump())
