"""What the batching engine takes and gives back: requests with their guard policy, per-request events.

These are plain values: the server's scheduler, the tests and the benchmarks see only these,
never the continuous-batching engine they run on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

from neuronguard.models.generation import SamplingParams

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass(frozen=True)
class EngineConfig:
    """Sizing of the paged KV cache and of each step; explicit values, so CPU runs need no memory probe.

    `max_batch_tokens` caps the tokens packed into one forward (longer prompts are prefilled in
    chunks); `num_blocks * page_size` is the KV capacity shared by all requests, and bounds one
    request's prompt plus generation. Prefix sharing reuses the KV blocks of identical prompt
    prefixes; the engine turns it off when it has a patch source (a patched request must not read
    KV computed without the patch, nor an unpatched one KV computed with it).
    """

    num_blocks: int = 256
    page_size: int = 32
    max_batch_tokens: int = 256
    max_requests_per_batch: int = 64
    prefix_sharing: bool = True
    scheduler: Literal["fifo", "prefill_first"] = "fifo"
    attention_group_keys: int | None = None

    def __post_init__(self) -> None:
        for name in ("num_blocks", "page_size", "max_batch_tokens", "max_requests_per_batch"):
            if getattr(self, name) < 1:
                raise ValueError(f"engine {name} must be at least 1, got {getattr(self, name)}")
        if self.attention_group_keys is not None and self.attention_group_keys < 0:
            raise ValueError(f"engine attention_group_keys must be 0 (off) or more, got {self.attention_group_keys}")
        if self.page_size < 4:
            raise ValueError(f"engine page_size must be at least 4, got {self.page_size}")


@dataclass(frozen=True)
class EngineRequest:
    """One generation request and its guard policy.

    `params` is the reference decoder's `SamplingParams`: greedy (temperature 0) and sampled
    requests, each with its own seed, share a batch. `readout` asks for the engine's linear
    readout on every step; `patch` asks for live patching from the engine's patch source.
    """

    prompt_ids: tuple[int, ...]
    params: SamplingParams = field(default_factory=SamplingParams)
    readout: bool = False
    patch: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompt_ids", tuple(int(t) for t in self.prompt_ids))


@dataclass(frozen=True)
class TokenEvent:
    """One decoding step of one request, as `models.generation.Step` is for a batch row.

    `readout_logits` [heads] (float32, CPU) is the readout at the row this step read: the last
    prompt token on step 0, then the token chosen on the previous step. It is None unless the
    request asked for the readout. `patched_positions` counts this request's positions patched
    since its previous event (prefill chunks included).
    """

    request_id: str
    index: int
    token: int
    readout_logits: torch.Tensor | None
    finished: bool
    patched_positions: int = 0


@dataclass(frozen=True)
class FinishedEvent:
    """The request is over: a stop token, its budget, or a cancel (which gets no final token)."""

    request_id: str
    reason: FinishReason
    completion_tokens: int


@dataclass(frozen=True)
class ErrorEvent:
    """The request failed (engine error, guard readout missing, shutdown); nothing more follows."""

    request_id: str
    message: str


EngineEvent = TokenEvent | FinishedEvent | ErrorEvent


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for metrics: the latest step's batch and the KV cache's use."""

    active_requests: int
    last_batch_requests: int
    last_batch_tokens: int
    steps: int
    tokens_computed: int  # positions run through the model since start (prefix sharing skips some)
    kv_cache_usage: float  # fraction of the KV cache's sectors in use (blocks kept for prefix sharing count)
