"""The app factory. Importing this module loads nothing; the lifespan loads the model.

Loading runs in a background thread after start-up, so `/health` answers at once and
`/ready` answers 503 until model, bundle and patch source are loaded. A load failure keeps
`/ready` at 503 with the reason and calls `on_load_error` (the `serve` command exits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from fastapi import FastAPI

from neuronguard.models.hooks import count_hooks
from neuronguard.errors import UsageError
from neuronguard.server.errors import install_error_handlers
from neuronguard.server.metrics import Metrics
from neuronguard.server.middleware import RequestMiddleware
from neuronguard.server.routes import install_routes
from neuronguard.server.runtime import Runtime, load_runtime
from neuronguard.server.scheduler import Scheduler
from neuronguard.server.services.common import ServiceContext
from neuronguard.server.settings import Settings
from neuronguard.server.state import AppState, Services

log = logging.getLogger("neuronguard.server")
Loader = Callable[[Settings], Runtime]


def _registered_hooks(runtime: Runtime) -> int:
    models = [runtime.loaded.model] + ([runtime.patch_source.model] if runtime.patch_source else [])
    return sum(count_hooks(m) for m in models)


def _hook_guard(state: AppState) -> Callable[[], None]:
    """After every job: leaked hooks would leak into the next request, so stop serving."""

    def check() -> None:
        runtime = state.runtime
        if runtime is None:
            return
        if _registered_hooks(runtime):
            state.failure = "hooks leaked on the shared model; restart the server"
            state.metrics.ready.set(0)
            log.critical(state.failure)

    return check


async def _load(state: AppState, loader: Loader, on_load_error: Callable[[BaseException], None] | None) -> None:
    settings = state.settings
    try:
        runtime = await asyncio.to_thread(loader, settings)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, never raised into the loop
        state.failure = str(exc) if isinstance(exc, UsageError) else f"loading failed ({type(exc).__name__}: {exc})"
        log.error("start-up failed: %s", state.failure, exc_info=None if isinstance(exc, UsageError) else exc)
        if on_load_error is not None:
            on_load_error(exc)
        return
    state.scheduler = Scheduler(state.metrics, settings.max_queue, after_job=_hook_guard(state))
    state.runtime = runtime
    state.services = Services.build(ServiceContext(runtime, state.scheduler, settings, state.metrics))
    bundle = runtime.bundle.name if runtime.bundle is not None else "none"
    state.metrics.registered_hooks.set_function(lambda: _registered_hooks(runtime))  # read live at each scrape
    state.metrics.model_info.labels(runtime.served_name, bundle).set(1)
    state.metrics.ready.set(1)
    log.info("ready", extra={"model": runtime.served_name, "bundle": bundle})


def create_app(
    settings: Settings,
    *,
    loader: Loader = load_runtime,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The app for `settings` (built by the caller: nothing is read from the environment here)."""
    state = AppState(settings=settings, metrics=Metrics())

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.metrics.ready.set(0)
        loading = asyncio.create_task(_load(state, loader, on_load_error))
        try:
            yield
        finally:
            state.metrics.ready.set(0)
            if not loading.done():
                loading.cancel()  # the loader thread finishes on its own; its result is dropped
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.close)
            state.runtime = state.scheduler = state.services = None

    app = FastAPI(title="NeuronGuard", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.neuronguard = state
    install_error_handlers(app)
    install_routes(app)
    app.add_middleware(RequestMiddleware, metrics=state.metrics, keys=settings.key_values(),
                       max_body_bytes=settings.max_body_bytes, routes=list(app.routes))
    return app
