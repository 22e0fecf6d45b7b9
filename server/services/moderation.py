"""POST /v1/moderations and /v1/guard/check: the prefill probe without generation."""

from __future__ import annotations

import time
import uuid

import torch
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
    ServiceContext,
    encode_messages,
    log_unknown_fields,
    no_guard,
    policy_for,
    settle,
    submit,
    tokenize_off_loop,
)
from neuronguard.server.services.prefill import score_prompts

CATEGORY = "harmful"  # the probe predicts one thing: whether the model's answer would be harmful
# OpenAI's categories, reported false / 0.0 so typed clients get every key; the probe scores none of them.
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/intent", "self-harm/instructions", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
MAX_INPUTS = 64
TOP_CONTRIBUTIONS = 10


def _encode_prompt(runtime: Runtime, text: str, param: str) -> list[int]:
    """A prompt's ids, or a 400 (unencodable, or longer than the context)."""
    return encode_messages(runtime, [ChatMessage(role="user", content=text)], param)


def moderation_result(score: float, threshold: float) -> ModerationResult:
    flagged = score >= threshold
    return ModerationResult(
        flagged=flagged,
        categories={**dict.fromkeys(OPENAI_CATEGORIES, False), CATEGORY: flagged},
        category_scores={**dict.fromkeys(OPENAI_CATEGORIES, 0.0), CATEGORY: score},
        category_applied_input_types={**{c: [] for c in OPENAI_CATEGORIES}, CATEGORY: ["text"]},
    )


class ModerationService:
    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    async def _score(self, request: Request, prompts: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        runtime, metrics = self.ctx.runtime, self.ctx.metrics
        scheduler = self.ctx.serial("prefill-only scoring (moderations, guard checks)")
        handles = submit([lambda: scheduler.submit(lambda c: score_prompts(runtime, metrics, prompts, c))])
        return await settle(request, handles, handles[0].result())

    async def moderate(self, body: ModerationRequest, request: Request) -> ModerationResponse:
        runtime = self.ctx.runtime
        if runtime.bundle is None:
            raise no_guard(None)
        log_unknown_fields(request, body)
        texts = body.texts()
        if len(texts) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request", param="input", code="invalid_request")
        prompts = await tokenize_off_loop(lambda: [_encode_prompt(runtime, text, "input") for text in texts])
        scores, _ = await self._score(request, prompts)
        threshold = runtime.prefill_probe.threshold
        results = [moderation_result(s, threshold) for s in scores.tolist()]
        return ModerationResponse(id=f"modr-{uuid.uuid4().hex}", model=runtime.served_name, results=results)

    async def check(self, body: GuardCheckRequest, request: Request) -> GuardCheckResponse:
        start = time.perf_counter()
        runtime = self.ctx.runtime
        if runtime.bundle is None or runtime.probe_selection is None:
            raise no_guard(None)
        log_unknown_fields(request, body)
        if (body.messages is None) == (body.prompt is None):
            raise APIError(400, "give exactly one of 'messages' or 'prompt'", param="messages", code="invalid_request")
        policy = policy_for(runtime, self.ctx.settings, body.guard)
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
            neurons_used=runtime.prefill_probe.k,
            latency_ms=(time.perf_counter() - start) * 1000,
            top_contributions=[
                Contribution(layer=int(selection.layers[i]), index=int(selection.indices[i]), contribution=float(row[i]))
                for i in top
            ],
        )
