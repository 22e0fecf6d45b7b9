"""Probe features: the served model's activations of chosen neurons.

- Prefill features: the last prompt token of each chat-rendered prompt (what the server's
  probe sees before the first token).
- Stream features: each generated token's activation while the model decodes its own
  completion (what the server's stream probe sees mid-generation).

In a torchrun group each rank runs its shard of the batches and the rows are gathered back
in prompt order on every rank, so whatever is fitted on them is the same as in one process.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

from neuronguard.detector.forward import pad_batch, rank_batches
from neuronguard.models.batching import forward_kwargs
from neuronguard.models.chat import Request, encode_prompt
from neuronguard.models.distributed import all_gather
from neuronguard.models.generation import SamplingParams, decode, stop_ids
from neuronguard.models.artifact.neurons import NeuronSelection
from neuronguard.models.hooks import capture
from neuronguard.models.loading import LoadedModel


@torch.inference_mode()
def last_token_features(model: LoadedModel, prompts: Sequence[Request], selection: NeuronSelection, batch_size: int = 32) -> torch.Tensor:
    """[n, k] activations at the last prompt token (left padding puts it at position -1)."""
    out = []
    with capture(model.model, selection, sites=model.sites, positions="last") as cap:
        for part in rank_batches(prompts, batch_size, "prompt features", leave=False):
            cap.clear()
            batch = pad_batch(model, [encode_prompt(model.tokenizer, p) for p in part])
            model.model(**forward_kwargs(model.model, batch))
            out.append(cap.last().cpu())
    return torch.cat(all_gather(out))


Pooling = Literal["last", "mean", "max"]


@torch.inference_mode()
def pooled_features(model: LoadedModel, prompts: Sequence[Request], selection: NeuronSelection, pooling: Pooling,
                    batch_size: int = 32) -> torch.Tensor:
    """[n, k] activations pooled over every position of each rendered prompt (all turns, the
    system message included): the last token, or the mean or max over the prompt's positions."""
    if pooling == "last":
        return last_token_features(model, prompts, selection, batch_size)
    out = []
    with capture(model.model, selection, sites=model.sites, positions="all") as cap:
        for part in rank_batches(prompts, batch_size, f"{pooling}-pooled features", leave=False):
            cap.clear()
            batch = pad_batch(model, [encode_prompt(model.tokenizer, p) for p in part])
            model.model(**forward_kwargs(model.model, batch))
            acts = cap.activations()  # [b, s, k]
            mask = batch.attention_mask.bool().cpu()[:, :, None]
            if pooling == "mean":
                out.append((acts * mask).sum(1) / mask.sum(1))
            else:
                out.append(acts.masked_fill(~mask, float("-inf")).amax(1))
    return torch.cat(all_gather(out))


def decoded_features(
    model: LoadedModel, prompts: Sequence[Request], selection: NeuronSelection, params: SamplingParams, batch_size: int = 32
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One decode per batch, as the server runs it: ([n, k] activations at each prompt's last token,
    per prompt [t, k] activations at its generated tokens, stop token excluded)."""
    if not params.stop_token_ids:
        params = SamplingParams(**{**params.__dict__, "stop_token_ids": stop_ids(model.tokenizer, model.model)})
    prefill: list[torch.Tensor] = []
    per_prompt: list[torch.Tensor] = []
    for part in rank_batches(prompts, batch_size, "decoded features", leave=False):
        batch = pad_batch(model, [encode_prompt(model.tokenizer, p) for p in part])
        rows: list[list[torch.Tensor]] = [[] for _ in part]
        alive = torch.ones(len(part), dtype=torch.bool)
        for step in decode(model.model, batch, params, sites=model.sites, probe=selection):
            if step.index == 0:  # step 0 reads the last prompt token; step i reads generated token i-1
                prefill.append(step.probe_activations.cpu())
            else:
                for row in torch.nonzero(alive).flatten().tolist():
                    rows[row].append(step.probe_activations[row].cpu())
            alive &= ~step.finished.cpu()
        empty = torch.empty(0, len(selection))
        per_prompt += [torch.stack(r) if r else empty for r in rows]
    return torch.cat(all_gather(prefill)), all_gather(per_prompt)
