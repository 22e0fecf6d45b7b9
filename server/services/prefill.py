"""Prefill-only scoring for /v1/moderations and /v1/guard/check (worker thread).

One forward over the (left-padded) batch; the probe reads each row's last prompt token,
exactly where the chat path reads it, so a moderation score equals (to float rounding: the
chat path sums the logit inside the forward) the prefill score a chat completion of the
same prompt gets.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from neuronguard.models.generation import SamplingParams, decode, left_pad
from neuronguard.server.metrics import Metrics
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import JobContext


def prefill_activations(runtime: Runtime, prompts: Sequence[Sequence[int]], ctx: JobContext) -> torch.Tensor:
    """[b, k] activations of the probe neurons at each prompt's last token."""
    ctx.check()
    assert runtime.probe_selection is not None, "the services refuse to score without a bundle"
    loaded = runtime.loaded
    batch = left_pad(prompts, loaded.tokenizer.pad_token_id, loaded.device)
    steps = decode(loaded.model, batch, SamplingParams(max_new_tokens=1), sites=loaded.sites, probe=runtime.probe_selection)
    try:
        step = next(steps)
    finally:
        steps.close()
    assert step.probe_activations is not None
    return step.probe_activations


def score_prompts(
    runtime: Runtime, metrics: Metrics, prompts: Sequence[Sequence[int]], ctx: JobContext
) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [b], per-neuron logit contributions [b, k]) of the prefill probe."""
    probe = runtime.prefill_probe
    acts = prefill_activations(runtime, prompts, ctx)[:, : probe.k]
    start = time.perf_counter()
    contributions = probe.contributions(acts)  # [b, k]
    scores = probe.score(acts)  # [b]
    metrics.probe_latency.observe(time.perf_counter() - start)
    for score in scores.tolist():
        metrics.probe_score.labels("prefill").observe(score)
    metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
    return scores.cpu(), contributions.cpu()
