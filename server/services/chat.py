"""POST /v1/chat/completions: guarded generation, as one JSON response or an SSE stream."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from neuronguard.server.protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChoiceLogprobs,
    ChunkChoice,
    Delta,
    TokenLogprob,
    TopLogprob,
    Usage,
    completion_id,
)
from neuronguard.server.services.choices import Choices, check_bias, sampling, stream, usage
from neuronguard.server.services.common import (
    ServiceContext,
    check_context,
    check_model,
    encode_messages,
    log_extra,
    log_unknown_fields,
    policy_for,
    tokenize_off_loop,
)
from neuronguard.server.services.generation import GenerationJob, GenerationResult, Logprob, TextDelta

log = logging.getLogger("neuronguard.server")


def chat_logprobs(entries: Sequence[Logprob]) -> ChoiceLogprobs:
    """OpenAI's chat shape: one entry per released token, with its top alternatives."""
    return ChoiceLogprobs(content=[
        TokenLogprob(token=e.token, logprob=e.logprob, bytes=list(e.token.encode()),
                     top_logprobs=[TopLogprob(token=t, logprob=lp, bytes=list(t.encode())) for t, lp in e.top])
        for e in entries
    ])


def log_choices(request: Request, what: str, results: Sequence[GenerationResult], prompt_tokens: int) -> None:
    for index, result in enumerate(results):
        guard = result.guard
        log.info(what, extra=log_extra(
            request, choice=index, finish_reason=result.finish_reason, prompt_tokens=prompt_tokens,
            completion_tokens=result.completion_tokens, decision=guard.decision if guard else None,
            score=round(guard.score, 6) if guard else None, stage=guard.stage if guard else None,
            mode=guard.mode if guard else "off"))


class _ChatChunks:
    """Frames a chat stream: a role chunk per choice, content deltas, a final chunk with the guard report."""

    def __init__(self, service: ChatService, body: ChatCompletionRequest) -> None:
        runtime = service.ctx.runtime
        self.base = {"id": completion_id(), "created": int(time.time()), "model": runtime.served_name,
                     "system_fingerprint": runtime.system_fingerprint}
        self.refusal = service.ctx.settings.refusal_message
        self.logprobs = bool(body.logprobs)
        self.single = body.n == 1

    def _chunk(self, choice: ChunkChoice, **extra: object) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.base, choices=[choice], **extra)  # type: ignore[arg-type]

    def opening(self, index: int) -> list[ChatCompletionChunk]:
        return [self._chunk(ChunkChoice(index=index, delta=Delta(role="assistant", content="")))]

    def delta(self, index: int, delta: TextDelta) -> ChatCompletionChunk:
        logprobs = chat_logprobs(delta.logprobs) if self.logprobs else None
        return self._chunk(ChunkChoice(index=index, delta=Delta(content=delta.text), logprobs=logprobs))

    def finish(self, index: int, result: GenerationResult) -> list[ChatCompletionChunk]:
        refusal = [self._chunk(ChunkChoice(index=index, delta=Delta(content=self.refusal)))]
        final = self._chunk(ChunkChoice(index=index, delta=Delta(), finish_reason=result.finish_reason, guard=result.guard),
                            guard=result.guard if self.single else None)
        return (refusal if result.blocked_stage == "prefill" else []) + [final]

    def usage(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(**self.base, choices=[], usage=usage)  # type: ignore[arg-type]


class ChatService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create(self, body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        runtime, settings = self.ctx.runtime, self.ctx.settings
        check_model(runtime, body.model)
        log_unknown_fields(request, body)
        policy = policy_for(runtime, settings, body.guard)
        check_bias(runtime.vocab_size, body)
        ids = await tokenize_off_loop(encode_messages, runtime, body.messages)
        budget = body.token_budget()
        if budget is None:
            budget = min(settings.max_tokens_default, runtime.context_length - len(ids))
        check_context(runtime, len(ids), budget, "messages")
        jobs = [GenerationJob(ids, sampling(body, budget, i, body.logprobs_n()), policy, body.stop or [], arrival)
                for i in range(body.n)]
        choices = Choices(self.ctx, jobs)
        if settings.log_prompts:
            log.info("prompt", extra=log_extra(request, messages=[m.model_dump() for m in body.messages]))
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, choices, _ChatChunks(self, body), include_usage=include_usage,
                                prompt_tokens=len(ids),
                                done=lambda results: log_choices(request, "chat completion", results, len(ids)))
        results = await choices.results(request)
        log_choices(request, "chat completion", results, len(ids))
        completion = ChatCompletion(
            id=completion_id(),
            model=runtime.served_name,
            system_fingerprint=runtime.system_fingerprint,
            choices=[self._choice(i, r, body) for i, r in enumerate(results)],
            usage=usage(len(ids), results),
            guard=results[0].guard if body.n == 1 else None,
        )
        return JSONResponse(completion.model_dump(mode="json", exclude_none=True))

    def _choice(self, index: int, result: GenerationResult, body: ChatCompletionRequest) -> Choice:
        content = self.ctx.settings.refusal_message if result.finish_reason == "content_filter" else result.text
        return Choice(index=index, message=AssistantMessage(content=content), finish_reason=result.finish_reason,
                      logprobs=chat_logprobs(result.logprobs) if body.logprobs else None, guard=result.guard)

