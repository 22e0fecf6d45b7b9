"""POST /v1/chat/completions: guarded generation, as one JSON response or an SSE stream."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from neuronguard.models.generation import SamplingParams
from neuronguard.server.errors import APIError
from neuronguard.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorBody,
    ErrorResponse,
    Usage,
    completion_id,
)
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import JobHandle
from neuronguard.server.services.common import (
    ClientGone,
    check_context,
    encode_messages,
    fail_closed,
    log_extra,
    policy_for,
    submit,
    tokenize_off_loop,
    until_done_or_gone,
)
from neuronguard.server.services.generation import GenerationJob, GenerationResult, TextDelta, run_generation
from neuronguard.server.state import AppState

log = logging.getLogger("neuronguard.server")
MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy in all but name


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


class ChatService:
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def create(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        runtime, scheduler = self.state.require()
        settings = self.state.settings
        policy = policy_for(runtime, settings, body.guard)
        ids = await tokenize_off_loop(encode_messages, runtime, body.messages)
        budget = body.token_budget()
        if budget is None:
            budget = min(settings.max_tokens_default, runtime.context_length - len(ids))
        check_context(runtime, len(ids), budget, "messages")
        # logits / temperature overflows to inf below ~1e-37 (a 503 guard_error); such temperatures are greedy anyway
        temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
        params = SamplingParams(max_new_tokens=budget, temperature=temperature, top_p=body.top_p, seed=body.seed)
        job = GenerationJob(ids, params, policy, body.stop or [], arrival)
        metrics = self.state.metrics
        handle = submit(scheduler, lambda ctx: run_generation(runtime, metrics, job, ctx))
        if settings.log_prompts:
            log.info("prompt", extra=log_extra(request, messages=[m.model_dump() for m in body.messages]))
        if body.stream:
            return await self._stream(body, request, runtime, handle, len(ids))
        try:
            result: GenerationResult = await until_done_or_gone(request, handle, handle.result())
        except ClientGone:
            raise APIError(499, "client closed the request", type="client_closed") from None
        except Exception as exc:
            raise fail_closed(exc, log_extra(request)["request_id"]) from None
        self._log(request, result, len(ids))
        content = settings.refusal_message if result.finish_reason == "content_filter" else result.text
        completion = ChatCompletion(
            id=completion_id(),
            model=runtime.served_name,
            choices=[Choice(message=AssistantMessage(content=content), finish_reason=result.finish_reason)],
            usage=_usage(len(ids), result),
            guard=result.guard,
        )
        return JSONResponse(completion.model_dump(mode="json", exclude_none=True))

    async def _stream(
        self, body: ChatCompletionRequest, request: Request, runtime: Runtime, handle: JobHandle, prompt_tokens: int
    ) -> StreamingResponse:
        """Wait for the job's first event, so failures before any output are plain HTTP errors."""
        events = handle.events()
        first: TextDelta | None = None
        try:
            first = await until_done_or_gone(request, handle, anext(events, None))
        except ClientGone:
            raise APIError(499, "client closed the request", type="client_closed") from None
        except Exception as exc:
            raise fail_closed(exc, log_extra(request)["request_id"]) from None
        chunk_id, created = completion_id(), int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        refusal = self.state.settings.refusal_message

        def chunk(delta: Delta, finish: str | None = None, **extra: object) -> str:
            payload = ChatCompletionChunk(
                id=chunk_id, created=created, model=runtime.served_name,
                choices=[ChunkChoice(delta=delta, finish_reason=finish)], **extra,  # type: ignore[arg-type]
            )
            return sse(payload.model_dump(mode="json", exclude_none=True))

        async def frames() -> AsyncIterator[str]:
            try:
                yield chunk(Delta(role="assistant", content=""))
                if first is not None:
                    yield chunk(Delta(content=first.text))
                    async for event in events:
                        yield chunk(Delta(content=event.text))
                result: GenerationResult = handle.value
                if result.blocked_stage == "prefill":
                    yield chunk(Delta(content=refusal))
                yield chunk(Delta(), result.finish_reason, guard=result.guard)
                if include_usage:
                    usage = _usage(prompt_tokens, result).model_dump()
                    yield sse({"id": chunk_id, "object": "chat.completion.chunk", "created": created,
                               "model": runtime.served_name, "choices": [], "usage": usage})
                self._log(request, result, prompt_tokens)
            except Exception as exc:  # fail closed mid-stream: no more content, an error event instead
                error = fail_closed(exc, log_extra(request)["request_id"])
                yield sse(ErrorResponse(error=ErrorBody(message=error.message, type=error.type, code=error.code)).model_dump())
            finally:
                handle.cancel()  # no-op when finished; stops decoding when the client went away
            yield sse("[DONE]")

        return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    def _log(self, request: Request, result: GenerationResult, prompt_tokens: int) -> None:
        guard = result.guard
        log.info(
            "chat completion",
            extra=log_extra(
                request, finish_reason=result.finish_reason, prompt_tokens=prompt_tokens,
                completion_tokens=result.completion_tokens,
                decision=guard.decision if guard else None, score=round(guard.score, 6) if guard else None,
                stage=guard.stage if guard else None, mode=guard.mode if guard else "off",
            ),
        )


def _usage(prompt_tokens: int, result: GenerationResult) -> Usage:
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=result.completion_tokens,
                 total_tokens=prompt_tokens + result.completion_tokens)
