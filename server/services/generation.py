"""Guarded generation: one request's guard over its steps, on the serial worker or the batching engine.

The prefill probe reads the served model's activations at the last prompt token from the
prefill that generation needs anyway (no second prompt forward). Each generated token is
held back until the stream probe has read the model's activations *on that token* (the
next step's forward): a token reaches the client only after the guard has seen it, so
streaming cannot bypass the guard. The last token of a length-limited generation costs
one extra forward to be scored. `GuardedStream` is that rule; the serial engine feeds it
`decode`'s steps, the batched engine its `TokenEvent`s (server/scheduler.py).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from prometheus_client import Histogram
from transformers import PreTrainedTokenizerBase

from neuronguard.models.artifact.probe import Probe
from neuronguard.models.engine import EngineRequest, TokenEvent
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
    """Probe score from one request's readout logits [heads]; observes latency and score.

    The logit was summed inside the forward pass, so the latency histogram times only the
    scoring done after it (the read is outside the timer: on a GPU it waits for the forward).
    """
    logit = float(logits[head])
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


def decode_params(runtime: Runtime, job: GenerationJob) -> SamplingParams:
    """The decoder's parameters: one step more than the budget when scoring (to score the last token)."""
    budget = job.params.max_new_tokens + 1 if job.policy.scores else job.params.max_new_tokens
    return replace(job.params, max_new_tokens=budget, stop_token_ids=runtime.stop_token_ids)


class GuardedStream:
    """One request's guard over its decoding steps, the same for both engines.

    Feed it every step (`step`), in order; it scores the readout (prefill probe on step 0,
    the smoothed stream probe after), holds each token back until its own score allowed
    it, releases text through the stop-string stream and says when the request is over.
    `emit` receives each `TextDelta` (called on the thread that feeds the steps).
    """

    def __init__(self, runtime: Runtime, metrics: Metrics, job: GenerationJob, emit: Callable[[TextDelta], None]) -> None:
        self.runtime, self.metrics, self.job, self._emit = runtime, metrics, job, emit
        self.budget = job.params.max_new_tokens
        self.scoring = job.policy.scores
        self.patched = job.policy.patches and runtime.patch_source is not None
        self.stream = TextStream(runtime.loaded.tokenizer, job.stops)
        self.verdicts = _Verdicts(job.policy, patched=self.patched)
        self.score_metrics = {stage: metrics.probe_score.labels(stage) for stage in ("prefill", "stream")}
        self.released = 0
        self.last_release = job.arrival
        self.pending: int | None = None
        self.pending_logprob: Logprob | None = None
        self.logprobs: list[Logprob] = []
        self.finish: FinishReason = "length"
        self.blocked: Stage | None = None
        self.stopped_by_string = False
        self.smoothed: float | None = None
        metrics.prompt_tokens.inc(len(job.prompt_ids))

    def decode_params(self) -> SamplingParams:
        return decode_params(self.runtime, self.job)

    def _release(self, token: int, logprob: Logprob | None) -> bool:
        self.released += 1
        delta, stop = self.stream.push(token)
        now = time.perf_counter()
        metric = self.metrics.ttft if self.released == 1 else self.metrics.itl
        metric.observe(now - (self.job.arrival if self.released == 1 else self.last_release))
        self.last_release = now
        if logprob is not None:
            self.logprobs.append(logprob)
        if delta or logprob is not None:
            self._emit(TextDelta(delta, (logprob,) if logprob is not None else ()))
        return stop

    def step(self, index: int, token: int, readout: torch.Tensor | None, patched_positions: int = 0,
             logprob: Logprob | None = None) -> bool:
        """Feed step `index` (its sampled token, the readout [heads] at the row it read); True when the request ends."""
        runtime, metrics = self.runtime, self.metrics
        metrics.patched_tokens.inc(patched_positions)
        if self.scoring:
            if readout is None:
                raise RuntimeError("the guard readout is missing for a scored step")
            stage: Stage = "prefill" if index == 0 else "stream"
            probe, head = (runtime.prefill_probe, PREFILL_HEAD) if stage == "prefill" else (runtime.stream_probe, STREAM_HEAD)
            score = score_one(probe, readout, head, metrics.probe_latency, self.score_metrics[stage])
            if stage == "stream":  # the stream probe decides on its smoothed score (the bundle's EMA)
                score = self.smoothed = probe.smooth(self.smoothed, score)
            decision = self.job.policy.decide(score, stage)
            self.verdicts.record(stage, score, decision)
            if decision == "block":
                self.finish, self.blocked = "content_filter", stage
                return True
            if self.pending is not None and self._release(self.pending, self.pending_logprob):  # it passed the probe
                self.finish, self.stopped_by_string = "stop", True
                return True
            self.pending = None
        if index == self.budget:  # the extra step that scored the last token
            return True
        metrics.generation_tokens.inc()
        if token in runtime.stop_token_ids:
            self.finish = "stop"
            return True
        if self.scoring:
            self.pending, self.pending_logprob = token, logprob
        elif self._release(token, logprob):
            self.finish, self.stopped_by_string = "stop", True
            return True
        return False

    def result(self) -> GenerationResult:
        """The request's result once no step follows: the held-back text flushed, the verdicts counted."""
        if not self.stopped_by_string:
            tail = self.stream.flush()
            if tail:
                self._emit(TextDelta(tail))
        self.verdicts.count(self.metrics)
        return GenerationResult(self.finish, self.released, self.verdicts.report(), self.blocked, self.stream.text,
                                self.logprobs)


class EngineSteps:
    """A `GuardedStream` fed by the batching engine's `TokenEvent`s (a `scheduler.StepConsumer`)."""

    def __init__(self, guard: GuardedStream) -> None:
        self.guard = guard

    def step(self, event: TokenEvent) -> bool:
        return self.guard.step(event.index, event.token, event.readout_logits, event.patched_positions)

    def result(self) -> GenerationResult:
        return self.guard.result()


def engine_request(runtime: Runtime, job: GenerationJob) -> EngineRequest:
    policy = job.policy
    return EngineRequest(tuple(job.prompt_ids), decode_params(runtime, job), readout=policy.scores,
                         patch=policy.patches and runtime.patch_source is not None)


def serial_only(params: SamplingParams) -> str | None:
    """Why the batching engine cannot decode with `params` (it has no logits processing but its sampler), else None."""
    if params.logprobs is not None:
        return "logprobs"
    if params.presence_penalty or params.frequency_penalty:
        return "presence_penalty" if params.presence_penalty else "frequency_penalty"
    if params.logit_bias:
        return "logit_bias"
    return None


def run_generation(runtime: Runtime, metrics: Metrics, job: GenerationJob, ctx: JobContext) -> GenerationResult:
    """Decode one request alone (the serial engine), emitting a `TextDelta` per released chunk."""
    guard = GuardedStream(runtime, metrics, job, ctx.emit)
    loaded = runtime.loaded
    params = guard.decode_params()
    batch = left_pad([job.prompt_ids], loaded.tokenizer.pad_token_id, loaded.device)
    steps = decode(loaded.model, batch, params, sites=loaded.sites,
                   readout=runtime.readout if guard.scoring else None,
                   patch_source=runtime.patch_source if guard.patched else None)
    try:
        for step in steps:
            ctx.check()
            logprob = _logprob(loaded.tokenizer, step) if params.logprobs is not None and step.index < guard.budget else None
            readout = step.readout_logits[0] if step.readout_logits is not None else None
            if guard.step(step.index, int(step.tokens[0]), readout, step.patched_positions, logprob):
                break
    finally:
        steps.close()  # removes every hook, also on errors and cancellation
    return guard.result()
