"""A request's choices: each one is a generation job of its own, with its own guard decision.

Chat and legacy completions share this: the sampling parameters of choice i (seed + i), the
jobs on the batching engine or the serial worker, waiting for every result, and the SSE stream that interleaves the
choices' chunks as their tokens are released and ends with `data: [DONE]`.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Protocol

from fastapi import Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from neuronguard.models.generation import SamplingParams
from neuronguard.server.errors import APIError
from neuronguard.server.protocol import GenerationRequest, Usage
from neuronguard.server.scheduler import JobHandle
from neuronguard.server.services.common import ServiceContext, fail_closed, request_id, settle, submit
from neuronguard.server.services.generation import (
    EngineSteps,
    GenerationJob,
    GenerationResult,
    GuardedStream,
    TextDelta,
    engine_request,
    run_generation,
    serial_only,
)

MIN_TEMPERATURE = 1e-4  # below this, sampling is greedy in all but name
Event = tuple[int, TextDelta | GenerationResult]  # (choice index, a released delta or the choice's result)


def sampling(body: GenerationRequest, budget: int, index: int, logprobs: int | None) -> SamplingParams:
    """Choice `index`'s parameters: with a seed, it samples with seed + index (reproducible, not identical)."""
    # logits / temperature overflows to inf below ~1e-37 (a 503 guard_error); such temperatures are greedy anyway
    temperature = body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0
    return SamplingParams(
        max_new_tokens=budget, temperature=temperature, top_p=body.top_p,
        seed=None if body.seed is None else body.seed + index,
        presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty,
        logit_bias=body.bias(), logprobs=logprobs,
    )


def check_bias(vocab_size: int, body: GenerationRequest) -> None:
    for token in body.bias() or {}:
        if token >= vocab_size:
            raise APIError(400, f"logit_bias token id {token} is outside the vocabulary (0..{vocab_size - 1})",
                           param="logit_bias", code="invalid_request")


def usage(prompt_tokens: int, results: Sequence[GenerationResult]) -> Usage:
    completion = sum(r.completion_tokens for r in results)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion)


def sse(payload: BaseModel | dict | str) -> str:
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json", exclude_none=True)
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def batchable(ctx: ServiceContext, job: GenerationJob) -> bool:
    """Whether the batching engine can decode `job` exactly as the serial engine would.

    Logprobs, penalties and logit_bias need the serial decoder's logits processing, and a
    request longer than one engine request's KV capacity does not fit the paged cache: those
    run on the serial worker (inside the engine's pause), never with a parameter dropped.
    """
    batch = ctx.batch
    if batch is None or serial_only(job.params) is not None:
        return False
    return len(job.prompt_ids) + job.params.max_new_tokens + 1 <= batch.engine.max_request_tokens


def start(ctx: ServiceContext, job: GenerationJob) -> JobHandle:
    """Start one choice's job on the batching engine when it can take it, else on the serial worker."""
    runtime, metrics = ctx.runtime, ctx.metrics
    if ctx.batch is not None and batchable(ctx, job):
        return ctx.batch.submit(engine_request(runtime, job),
                                lambda c: EngineSteps(GuardedStream(runtime, metrics, job, c.emit)))
    reason = serial_only(job.params)
    what = f"'{reason}'" if reason is not None else "a request longer than the batching engine's per-request KV capacity"
    return ctx.serial(what, reason).submit(lambda c: run_generation(runtime, metrics, job, c))


def _result(handle: JobHandle) -> GenerationResult:
    """A finished job's result (a job only ends without one when this request cancelled it)."""
    if not isinstance(handle.value, GenerationResult):
        raise RuntimeError("a generation job ended without a result")
    return handle.value


class Choices:
    """The queued jobs of one request, in choice order."""

    def __init__(self, ctx: ServiceContext, jobs: Sequence[GenerationJob]) -> None:
        self.handles: list[JobHandle] = submit([lambda job=job: start(ctx, job) for job in jobs])

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()

    async def results(self, request: Request) -> list[GenerationResult]:
        async def one(handle: JobHandle) -> GenerationResult:
            await handle.result()
            return _result(handle)

        return await settle(request, self.handles, asyncio.gather(*(one(h) for h in self.handles)))

    async def events(self) -> AsyncIterator[Event]:
        """Every choice's deltas as they are released, each choice ending with its result."""
        if len(self.handles) == 1:  # the common case needs no merging
            handle = self.handles[0]
            async for delta in handle.events():
                yield 0, delta
            yield 0, _result(handle)
            return
        merged: asyncio.Queue[Event | BaseException] = asyncio.Queue()

        async def pump(index: int, handle: JobHandle) -> None:
            try:
                async for delta in handle.events():
                    merged.put_nowait((index, delta))
                merged.put_nowait((index, _result(handle)))
            except Exception as exc:  # noqa: BLE001 - re-raised in the consumer
                merged.put_nowait(exc)

        pumps = [asyncio.ensure_future(pump(i, h)) for i, h in enumerate(self.handles)]
        try:
            for _ in range(len(pumps)):
                while True:
                    item = await merged.get()
                    if isinstance(item, BaseException):
                        raise item
                    yield item
                    if isinstance(item[1], GenerationResult):
                        break
        finally:
            for task in pumps:
                task.cancel()


class Renderer(Protocol):
    """How one endpoint frames the stream's events as chunks."""

    def opening(self, index: int) -> list[BaseModel]: ...

    def delta(self, index: int, delta: TextDelta) -> BaseModel: ...

    def finish(self, index: int, result: GenerationResult) -> list[BaseModel]: ...

    def usage(self, usage: Usage) -> BaseModel: ...


async def stream(request: Request, choices: Choices, renderer: Renderer, *, include_usage: bool, prompt_tokens: int,
                 done: Callable[[list[GenerationResult]], None]) -> StreamingResponse:
    """An SSE response; failures before the first event are plain HTTP errors, later ones an error event."""
    events = choices.events()
    first = await settle(request, choices.handles, anext(events))

    async def frames() -> AsyncIterator[str]:
        results: dict[int, GenerationResult] = {}
        try:
            for index in range(len(choices.handles)):
                for chunk in renderer.opening(index):
                    yield sse(chunk)
            event: Event | None = first
            while event is not None:
                index, item = event
                if isinstance(item, GenerationResult):
                    results[index] = item
                    for chunk in renderer.finish(index, item):
                        yield sse(chunk)
                else:
                    yield sse(renderer.delta(index, item))
                event = await anext(events, None)
            ordered = [results[i] for i in sorted(results)]
            if include_usage:
                yield sse(renderer.usage(usage(prompt_tokens, ordered)))
            done(ordered)
        except Exception as exc:  # fail closed mid-stream: no more content, an error event instead
            yield sse(fail_closed(exc, request_id(request)).body())
        finally:
            choices.cancel()  # no-op when finished; stops decoding when the client went away
            await events.aclose()
        yield sse("[DONE]")

    return StreamingResponse(frames(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
