"""POST /v1/moderations and /v1/guard/check: the prefill probe without generation."""

from __future__ import annotations

import time
import uuid

from fastapi import Request

from neuronguard.server.errors import APIError
from neuronguard.server.protocol import (
    ChatMessage,
    Contribution,
    GuardCheckRequest,
    GuardCheckResponse,
    ModerationRequest,
    ModerationResponse,
    ModerationResult,
)
from neuronguard.server.runtime import Runtime
from neuronguard.server.services.common import (
    ClientGone,
    encode_messages,
    fail_closed,
    policy_for,
    request_id,
    submit,
    tokenize_off_loop,
    until_done_or_gone,
)
from neuronguard.server.services.prefill import score_prompts
from neuronguard.server.state import AppState

CATEGORY = "harmful"  # the probe predicts one thing: whether the model's answer would be harmful
MAX_INPUTS = 64
TOP_CONTRIBUTIONS = 10


def _encode_prompt(runtime: Runtime, text: str, param: str) -> list[int]:
    """A prompt's ids, or a 400 (unencodable, or longer than the context)."""
    return encode_messages(runtime, [ChatMessage(role="user", content=text)], param)


class ModerationService:
    def __init__(self, state: AppState) -> None:
        self.state = state

    async def _score(self, request: Request, prompts: list[list[int]]):
        runtime, scheduler = self.state.require()
        metrics = self.state.metrics
        handle = submit(scheduler, lambda ctx: score_prompts(runtime, metrics, prompts, ctx))
        try:
            return await until_done_or_gone(request, handle, handle.result())
        except ClientGone:
            raise APIError(499, "client closed the request", type="client_closed") from None
        except Exception as exc:
            raise fail_closed(exc, request_id(request)) from None

    async def moderate(self, body: ModerationRequest, request: Request) -> ModerationResponse:
        runtime, _ = self.state.require()
        texts = body.texts()
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input", code="invalid_request")
        prompts = await tokenize_off_loop(lambda: [_encode_prompt(runtime, text, "input") for text in texts])
        scores, _ = await self._score(request, prompts)
        threshold = runtime.bundle.probe.threshold
        results = [
            ModerationResult(flagged=s >= threshold, categories={CATEGORY: s >= threshold}, category_scores={CATEGORY: s})
            for s in scores.tolist()
        ]
        return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=runtime.served_name, results=results)

    async def check(self, body: GuardCheckRequest, request: Request) -> GuardCheckResponse:
        start = time.perf_counter()
        runtime, _ = self.state.require()
        if (body.messages is None) == (body.prompt is None):
            raise APIError(400, "give exactly one of 'messages' or 'prompt'", param="messages", code="invalid_request")
        policy = policy_for(runtime, self.state.settings, body.guard)
        if body.messages is not None:
            ids = await tokenize_off_loop(encode_messages, runtime, body.messages)
        else:
            ids = await tokenize_off_loop(_encode_prompt, runtime, body.prompt or "", "prompt")
        scores, contributions = await self._score(request, [ids])
        score = float(scores[0])
        row = contributions[0]  # [k]
        top = row.abs().argsort(descending=True)[:TOP_CONTRIBUTIONS].tolist()
        selection = runtime.probe_selection
        decision = policy.decide(score, "prefill")
        return GuardCheckResponse(
            flagged=decision != "allow",
            score=score,
            threshold=policy.prefill_threshold,
            decision=decision,
            neurons_used=runtime.bundle.probe.k,
            latency_ms=(time.perf_counter() - start) * 1000,
            top_contributions=[
                Contribution(layer=int(selection.layers[i]), index=int(selection.indices[i]), contribution=float(row[i]))
                for i in top
            ],
        )
