"""Guarded continuous batching: many requests decode together, each with the reference decoder's guard.

`GuardedBatchEngine` takes `EngineRequest`s and yields per-request `TokenEvent`s (with the
guard readout of each step), then a `FinishedEvent` or an `ErrorEvent`. This package is the
only code that touches transformers' continuous-batching internals.
"""

from neuronguard.models.engine.core import TRANSFORMERS_VERSION, GuardedBatchEngine, RequestHandle
from neuronguard.models.engine.types import (
    EngineConfig,
    EngineEvent,
    EngineRequest,
    EngineStats,
    ErrorEvent,
    FinishedEvent,
    FinishReason,
    TokenEvent,
)

__all__ = [
    "TRANSFORMERS_VERSION",
    "EngineConfig",
    "EngineEvent",
    "EngineRequest",
    "EngineStats",
    "ErrorEvent",
    "FinishReason",
    "FinishedEvent",
    "GuardedBatchEngine",
    "RequestHandle",
    "TokenEvent",
]
