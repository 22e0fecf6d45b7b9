"""Paged SDPA in groups of requests, for CPU steps where attention is arithmetic.

The engine packs every request of a step into one sequence and, with SDPA, attends every
query to every key of the step under a block-diagonal mask: at 32 requests in flight that is
32 times the arithmetic each request needs, and on a CPU it is about a third of the step.
Attending consecutive requests in groups of about `keys_per_group` keys, each group's
queries to its own keys under its own block of the same mask, computes the same attention
with a fraction of the arithmetic. Small groups would cost more in calls than they save;
one group (a single request, or a short step) is exactly the dense call.

The step's layout comes from the engine's kwargs: `cu_seq_lens_q` and, once the paged cache
has returned the step's keys, `cu_seq_lens_k` (each request's span of queries and keys).
Any other call of an attention module (no paged cache, or no mask tensor) goes to
transformers' SDPA unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.generation.continuous_batching import PagedAttentionCache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask

GROUPED_SDPA = "neuronguard_grouped_sdpa"
CPU_KEYS_PER_GROUP = 384  # measured on the organism, 2-core CPU: 192-768 all within a few % (docs/benchmarks.md)


def group_bounds(cu_seq_lens_k: Sequence[int], keys_per_group: int) -> list[int]:
    """Request boundaries [0, ..., n] of consecutive groups holding at least `keys_per_group` keys (the last
    group may hold fewer)."""
    n = len(cu_seq_lens_k) - 1
    bounds = [0]
    for r in range(1, n + 1):
        if r == n or cu_seq_lens_k[r] - cu_seq_lens_k[bounds[-1]] >= keys_per_group:
            bounds.append(r)
    return bounds


def _grouped_attention(keys_per_group: int) -> Callable[..., tuple[torch.Tensor, None]]:
    """An attention function with transformers' signature (module, query, key, value, mask, **kwargs)."""

    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                  attention_mask: torch.Tensor | None, cache: PagedAttentionCache | None = None,
                  **kwargs: object) -> tuple[torch.Tensor, None]:
        if not isinstance(cache, PagedAttentionCache) or not isinstance(attention_mask, torch.Tensor):
            return sdpa_attention_forward(module, query, key, value, attention_mask, cache=cache, **kwargs)
        key, value = cache.update(key_states=key, value_states=value, layer_idx=module.layer_idx, kwargs=kwargs)
        cu_q = kwargs["cu_seq_lens_q"].tolist()  # type: ignore[union-attr]
        cu_k = kwargs["cu_seq_lens_k"].tolist()  # type: ignore[union-attr]  # this layer's, set by the update
        bounds = group_bounds(cu_k, keys_per_group)
        if len(bounds) <= 2:
            return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
        outputs = []
        for a, b in zip(bounds, bounds[1:]):
            q0, q1, k0, k1 = cu_q[a], cu_q[b], cu_k[a], cu_k[b]
            if q1 > q0:
                out, _ = sdpa_attention_forward(module, query[:, :, q0:q1], key[:, :, k0:k1], value[:, :, k0:k1],
                                                attention_mask[..., q0:q1, k0:k1], **kwargs)
                outputs.append(out)  # [1, queries, heads, head_dim]
        return torch.cat(outputs, dim=1), None

    return attention


@contextmanager
def grouped_attention(models: Sequence[nn.Module], keys_per_group: int) -> Iterator[None]:
    """Run the paged steps of `models` (SDPA models, already warmed up by the engine) with grouped attention;
    their own implementation comes back on exit."""
    previous = [model.config._attn_implementation for model in models]
    if any(p != "sdpa" for p in previous):
        raise ValueError(f"grouped attention replaces SDPA only, the models use {previous}")
    name = f"{GROUPED_SDPA}_{keys_per_group}"  # one registration per group size: engines may differ
    AttentionInterface.register(name, _grouped_attention(keys_per_group))
    ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask)  # other calls build the masks SDPA gets
    try:
        for model in models:
            model.config._attn_implementation = name
        yield
    finally:
        for model, implementation in zip(models, previous):
            model.config._attn_implementation = implementation
