"""Guarded generation, run on the model worker thread (one request at a time).

The prefill probe reads the served model's activations at the last prompt token from the
prefill that generation needs anyway (no second prompt forward). Each generated token is
held back until the stream probe has read the model's activations *on that token* (the
next step's forward): a token reaches the client only after the guard has seen it, so
streaming cannot bypass the guard. The last token of a length-limited generation costs
one extra forward to be scored.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch
from prometheus_client import Histogram
from transformers import PreTrainedTokenizerBase

from neuronguard.models.artifact.probe import Probe
from neuronguard.models.generation import SamplingParams, Step, decode, left_pad
from neuronguard.server.guard import Decision, GuardPolicy, Stage
from neuronguard.server.metrics import Metrics
from neuronguard.server.protocol import FinishReason, GuardReport
from neuronguard.server.runtime import PREFILL_HEAD, STREAM_HEAD, Runtime
from neuronguard.server.scheduler import JobContext
from neuronguard.server.text import TextStream


@dataclass(frozen=True)
class GenerationJob:
    prompt_ids: list[int]
    params: SamplingParams  # max_new_tokens is the client's budget
    policy: GuardPolicy
    stops: list[str]
    arrival: float  # time.perf_counter() when the request arrived


@dataclass(frozen=True)
class Logprob:
    """A released token's log-probability and its top alternatives, as text."""

    token: str
    logprob: float
    top: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class TextDelta:
    text: str
    logprobs: tuple[Logprob, ...] = ()  # of the tokens released with this text


@dataclass
class GenerationResult:
    finish_reason: FinishReason
    completion_tokens: int
    guard: GuardReport | None
    blocked_stage: Stage | None = None
    text: str = ""
    logprobs: list[Logprob] = field(default_factory=list)  # one per released token when asked for


@dataclass
class _Verdicts:
    """The guard's verdicts for one request: the prefill one, and the first stream flag.

    Plain tuples per token; the pydantic report is built once, at the end.
    """

    policy: GuardPolicy
    patched: bool
    prefill: tuple[float, Decision] | None = None
    stream: tuple[float, Decision] | None = None  # first flagged (or blocking) token, else the last allowed one

    def record(self, stage: Stage, score: float, decision: Decision) -> None:
        if stage == "prefill":
            self.prefill = (score, decision)
        elif self.stream is None or self.stream[1] == "allow":
            self.stream = (score, decision)

    def _report(self, stage: Stage, verdict: tuple[float, Decision]) -> GuardReport:
        threshold = self.policy.prefill_threshold if stage == "prefill" else self.policy.stream_threshold
        return GuardReport(mode=self.policy.mode, stage=stage, decision=verdict[1], score=verdict[0],
                           threshold=threshold, flagged=verdict[1] != "allow", patched=self.patched)

    def report(self) -> GuardReport | None:
        """What the response shows: a stream flag if there was one, else the prefill verdict."""
        if self.stream is not None and self.stream[1] != "allow":
            return self._report("stream", self.stream)
        return self._report("prefill", self.prefill) if self.prefill is not None else None

    def count(self, metrics: Metrics) -> None:
        """One decision per stage per request (the alert rules count requests by prefill decisions)."""
        for stage, verdict in (("prefill", self.prefill), ("stream", self.stream)):
            if verdict is not None:
                metrics.guard_decisions.labels(stage, verdict[1]).inc()


def score_one(probe: Probe, logits: torch.Tensor, head: int, latency: Histogram, scores: Histogram) -> float:
    """Probe score of row 0 from the step's readout logits [b, heads]; observes latency and score.

    The logit was summed inside the forward pass, so the latency histogram times only the
    scoring done after it (the read is outside the timer: on a GPU it waits for the forward).
    """
    logit = float(logits[0, head])
    start = time.perf_counter()
    score = probe.score_logit(logit)
    latency.observe(time.perf_counter() - start)
    scores.observe(score)
    return score


_FLOOR = -9999.0  # JSON has no -inf: a token the bias ruled out reports this (as vLLM does)


def _logprob(tokenizer: PreTrainedTokenizerBase, step: Step) -> Logprob:
    """Row 0's chosen-token log-probability with its alternatives, decoded token by token."""
    assert step.logprobs is not None and step.top_logprobs is not None
    values, ids = step.top_logprobs
    texts = tokenizer.batch_decode([[i] for i in [int(step.tokens[0]), *ids[0].tolist()]], skip_special_tokens=False,
                                   clean_up_tokenization_spaces=False)
    floor = lambda v: max(float(v), _FLOOR)  # noqa: E731
    return Logprob(texts[0], floor(step.logprobs[0]), tuple(zip(texts[1:], map(floor, values[0].tolist()))))


def run_generation(runtime: Runtime, metrics: Metrics, job: GenerationJob, ctx: JobContext) -> GenerationResult:
    """Decode one request under its guard policy, emitting a `TextDelta` per released chunk."""
    policy = job.policy
    loaded = runtime.loaded
    budget = job.params.max_new_tokens
    scoring = policy.scores
    params = replace(job.params, max_new_tokens=budget + 1 if scoring else budget, stop_token_ids=runtime.stop_token_ids)
    batch = left_pad([job.prompt_ids], loaded.tokenizer.pad_token_id, loaded.device)
    source = runtime.patch_source if policy.patches else None
    stream = TextStream(loaded.tokenizer, job.stops)
    verdicts = _Verdicts(policy, patched=source is not None)
    metrics.prompt_tokens.inc(len(job.prompt_ids))
    score_metrics = {stage: metrics.probe_score.labels(stage) for stage in ("prefill", "stream")}
    released = 0
    last_release = job.arrival
    pending: int | None = None
    pending_logprob: Logprob | None = None
    logprobs: list[Logprob] = []
    wants_logprobs = params.logprobs is not None
    finish: FinishReason = "length"
    blocked: Stage | None = None
    stopped_by_string = False

    def release(token: int, logprob: Logprob | None) -> bool:
        nonlocal released, last_release
        released += 1
        delta, stop = stream.push(token)
        now = time.perf_counter()
        metrics.ttft.observe(now - job.arrival) if released == 1 else metrics.itl.observe(now - last_release)
        last_release = now
        if logprob is not None:
            logprobs.append(logprob)
        if delta or logprob is not None:
            ctx.emit(TextDelta(delta, (logprob,) if logprob is not None else ()))
        return stop

    smoothed: float | None = None
    steps = decode(loaded.model, batch, params, sites=loaded.sites,
                   readout=runtime.readout if scoring else None, patch_source=source)
    try:
        for step in steps:
            ctx.check()
            metrics.patched_tokens.inc(step.patched_positions)
            if scoring:
                assert step.readout_logits is not None
                stage: Stage = "prefill" if step.index == 0 else "stream"
                probe, head = (runtime.prefill_probe, PREFILL_HEAD) if stage == "prefill" else (runtime.stream_probe, STREAM_HEAD)
                score = score_one(probe, step.readout_logits, head, metrics.probe_latency, score_metrics[stage])
                if stage == "stream":  # the stream probe decides on its smoothed score (the bundle's EMA)
                    score = smoothed = probe.smooth(smoothed, score)
                decision = policy.decide(score, stage)
                verdicts.record(stage, score, decision)
                if decision == "block":
                    finish, blocked = "content_filter", stage
                    break
                if pending is not None and release(pending, pending_logprob):  # the pending token passed the probe
                    finish, stopped_by_string = "stop", True
                    break
                pending = None
            if step.index == budget:  # the extra forward that scored the last token
                break
            metrics.generation_tokens.inc()
            token = int(step.tokens[0])
            if token in runtime.stop_token_ids:
                finish = "stop"
                break
            logprob = _logprob(loaded.tokenizer, step) if wants_logprobs else None
            if scoring:
                pending, pending_logprob = token, logprob
            elif release(token, logprob):
                finish, stopped_by_string = "stop", True
                break
    finally:
        steps.close()  # removes every hook, also on errors and cancellation
    if not stopped_by_string:
        tail = stream.flush()
        if tail:
            ctx.emit(TextDelta(tail))
    verdicts.count(metrics)
    return GenerationResult(finish, released, verdicts.report(), blocked, stream.text, logprobs)
