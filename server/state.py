"""Typed application state kept on `app.state.neuronguard` by the lifespan."""

from __future__ import annotations

import time
from dataclasses import dataclass

from neuronguard.server.errors import APIError
from neuronguard.server.metrics import Metrics
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import BatchScheduler, Scheduler
from neuronguard.server.services.chat import ChatService
from neuronguard.server.services.common import ServiceContext
from neuronguard.server.services.completions import CompletionService
from neuronguard.server.services.models import ModelCatalog
from neuronguard.server.services.moderation import ModerationService
from neuronguard.server.settings import Settings


@dataclass(frozen=True)
class Services:
    """Every service, built once when the model is loaded; the routes dispatch to them."""

    chat: ChatService
    completions: CompletionService
    moderation: ModerationService
    models: ModelCatalog

    @classmethod
    def build(cls, ctx: ServiceContext) -> Services:
        return cls(ChatService(ctx), CompletionService(ctx), ModerationService(ctx), ModelCatalog(ctx, int(time.time())))


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runtime: Runtime | None = None
    scheduler: Scheduler | None = None
    batch: BatchScheduler | None = None  # the batching engine's bridge (`--engine batched`)
    engine_hooks: int = 0  # hooks the batching engine keeps on the models while it runs
    services: Services | None = None
    failure: str | None = None  # why the server cannot serve (load error, leaked hooks)

    @property
    def ready(self) -> bool:
        return self.services is not None and self.failure is None

    @property
    def broken(self) -> bool:
        """Failed after it was serving (leaked hooks, a batching engine that cannot be replaced):
        only a restart helps, so liveness fails too."""
        return self.services is not None and self.failure is not None

    def require(self) -> Services:
        """The services, or a 503 while loading (or after a failure)."""
        if not self.ready:
            raise APIError(503, "the model is not loaded yet: retry later", code="not_ready", headers={"Retry-After": "5"})
        assert self.services is not None
        return self.services
