"""Typed application state kept on `app.state.neuronguard` by the lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from neuronguard.server.errors import APIError
from neuronguard.server.metrics import Metrics
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import Scheduler
from neuronguard.server.settings import Settings


@dataclass
class AppState:
    settings: Settings
    metrics: Metrics
    runtime: Runtime | None = None
    scheduler: Scheduler | None = None
    failure: str | None = None  # why the server cannot serve (load error, leaked hooks)

    @property
    def ready(self) -> bool:
        return self.runtime is not None and self.scheduler is not None and self.failure is None

    def require(self) -> tuple[Runtime, Scheduler]:
        """The loaded runtime and scheduler, or a 503 while loading (or after a failure)."""
        if not self.ready:
            raise APIError(503, "the model is not loaded yet: retry later", code="not_ready", headers={"Retry-After": "5"})
        assert self.runtime is not None and self.scheduler is not None
        return self.runtime, self.scheduler
