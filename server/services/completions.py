"""POST /v1/completions: legacy text completions of raw prompts, guarded like chat.

The prompt is encoded as given (the tokenizer's BOS, no chat template), so the prefill probe
reads its last token. A list of prompts gets `n` choices each, in prompt order (choice
`p * n + j` is prompt p's j-th; with a seed it samples with seed + j).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from neuronguard.server.errors import APIError
from neuronguard.server.protocol import (
    MAX_CHOICES,
    Completion,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    Usage,
    completion_id,
)
from neuronguard.server.services.chat import log_choices
from neuronguard.server.services.choices import Choices, check_bias, sampling, stream, usage
from neuronguard.server.services.common import (
    ServiceContext,
    check_context,
    check_model,
    encode_text,
    log_extra,
    log_unknown_fields,
    policy_for,
    tokenize_off_loop,
)
from neuronguard.server.services.generation import GenerationJob, GenerationResult, Logprob, TextDelta

log = logging.getLogger("neuronguard.server")
DEFAULT_MAX_TOKENS = 16  # OpenAI's default for this endpoint


def completion_logprobs(entries: Sequence[Logprob], offset: int = 0) -> CompletionLogprobs:
    """OpenAI's legacy shape: parallel lists, `text_offset` counted from the start of the choice's text."""
    offsets = []
    for entry in entries:
        offsets.append(offset)
        offset += len(entry.token)
    return CompletionLogprobs(tokens=[e.token for e in entries], token_logprobs=[e.logprob for e in entries],
                              top_logprobs=[dict(e.top) for e in entries], text_offset=offsets)


class _CompletionChunks:
    """Frames a completion stream: text chunks per choice, then a final chunk with the guard report."""

    def __init__(self, service: CompletionService, body: CompletionRequest, choices: int) -> None:
        runtime = service.ctx.runtime
        self.base = {"id": completion_id("cmpl"), "created": int(time.time()), "model": runtime.served_name,
                     "system_fingerprint": runtime.system_fingerprint}
        self.refusal = service.ctx.settings.refusal_message
        self.logprobs = body.logprobs is not None
        self.single = choices == 1
        self.offsets = [0] * choices

    def opening(self, index: int) -> list[Completion]:
        return []

    def delta(self, index: int, delta: TextDelta) -> Completion:
        logprobs = completion_logprobs(delta.logprobs, self.offsets[index]) if self.logprobs else None
        self.offsets[index] += sum(len(e.token) for e in delta.logprobs)
        return Completion(**self.base, choices=[CompletionChoice(index=index, text=delta.text, logprobs=logprobs)])  # type: ignore[arg-type]

    def finish(self, index: int, result: GenerationResult) -> list[Completion]:
        refusal = [Completion(**self.base, choices=[CompletionChoice(index=index, text=self.refusal)])]  # type: ignore[arg-type]
        final = Completion(**self.base, guard=result.guard if self.single else None,  # type: ignore[arg-type]
                           choices=[CompletionChoice(index=index, text="", finish_reason=result.finish_reason,
                                                     guard=result.guard)])
        return (refusal if result.blocked_stage == "prefill" else []) + [final]

    def usage(self, usage: Usage) -> Completion:
        return Completion(**self.base, choices=[], usage=usage)  # type: ignore[arg-type]


class CompletionService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def create(self, body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
        arrival = time.perf_counter()
        runtime, settings = self.ctx.runtime, self.ctx.settings
        check_model(runtime, body.model)
        log_unknown_fields(request, body)
        prompts = body.prompts()
        if len(prompts) * body.n > MAX_CHOICES:
            raise APIError(400, f"{len(prompts)} prompts x n={body.n} is over {MAX_CHOICES} choices per request",
                           param="n", code="invalid_request")
        policy = policy_for(runtime, settings, body.guard)
        check_bias(runtime.vocab_size, body)
        encoded = await tokenize_off_loop(lambda: [encode_text(runtime, p) for p in prompts])
        budget = body.max_tokens or DEFAULT_MAX_TOKENS
        for ids in encoded:
            check_context(runtime, len(ids), budget, "prompt")
        jobs = [GenerationJob(ids, sampling(body, budget, j, body.logprobs), policy, body.stop or [], arrival)
                for ids in encoded for j in range(body.n)]
        choices = Choices(self.ctx, jobs)
        if settings.log_prompts:
            log.info("prompt", extra=log_extra(request, prompts=prompts))
        prompt_tokens = sum(len(ids) for ids in encoded)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return await stream(request, choices, _CompletionChunks(self, body, len(jobs)), include_usage=include_usage,
                                prompt_tokens=prompt_tokens,
                                done=lambda results: log_choices(request, "completion", results, prompt_tokens))
        results = await choices.results(request)
        log_choices(request, "completion", results, prompt_tokens)
        completion = Completion(
            id=completion_id("cmpl"),
            model=runtime.served_name,
            system_fingerprint=runtime.system_fingerprint,
            choices=[self._choice(i, r, body) for i, r in enumerate(results)],
            usage=usage(prompt_tokens, results),
            guard=results[0].guard if len(results) == 1 else None,
        )
        return JSONResponse(completion.model_dump(mode="json", exclude_none=True))

    def _choice(self, index: int, result: GenerationResult, body: CompletionRequest) -> CompletionChoice:
        text = self.ctx.settings.refusal_message if result.finish_reason == "content_filter" else result.text
        logprobs = completion_logprobs(result.logprobs) if body.logprobs is not None else None
        return CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=logprobs,
                                guard=result.guard)
