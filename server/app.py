"""The app factory. Importing this module loads nothing; the lifespan loads the model.

Loading runs in a background thread after start-up, so `/health` answers at once and
`/ready` answers 503 until model, bundle and patch source are loaded (and, with
`--engine batched`, the batching engine has started on them). A load failure keeps
`/ready` at 503 with the reason and calls `on_load_error` (the `serve` command exits).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from typing import Any

from fastapi import FastAPI

from neuronguard.models.engine import EngineConfig, GuardedBatchEngine
from neuronguard.models.hooks import count_hooks
from neuronguard.errors import UsageError
from neuronguard.server.errors import install_error_handlers
from neuronguard.server.metrics import Metrics
from neuronguard.server.middleware import RequestMiddleware
from neuronguard.server.routes import install_routes
from neuronguard.server.runtime import Runtime, load_runtime
from neuronguard.server.scheduler import BatchScheduler, Scheduler
from neuronguard.server.services.common import ServiceContext
from neuronguard.server.settings import Settings
from neuronguard.server.state import AppState, Services

log = logging.getLogger("neuronguard.server")
Loader = Callable[[Settings], Runtime]


def _registered_hooks(runtime: Runtime, engine_hooks: int = 0) -> int:
    """Hooks on the served model and patch source beyond the `engine_hooks` the batching engine keeps."""
    models = [runtime.loaded.model] + ([runtime.patch_source.model] if runtime.patch_source else [])
    return sum(count_hooks(m) for m in models) - engine_hooks


def _hooks_gauge(state: AppState, runtime: Runtime) -> Callable[[], float]:
    """The registered-hooks gauge, read at each scrape. While a patched request is in flight the
    engine hooks the patch source during each step: the count then waits for a pause between steps."""

    def read() -> float:
        batch = state.batch
        # A tensor-parallel engine cannot pause for one rank: its count may include a twin pass's own hooks.
        if batch is None or not batch.patched_in_flight or not batch.engine.running or batch.engine.tensor_parallel_size > 1:
            return _registered_hooks(runtime, state.engine_hooks)
        with batch.engine.exclusive():
            return _registered_hooks(runtime, state.engine_hooks)

    return read


def _hook_guard(state: AppState) -> Callable[[], None]:
    """After every serial job (inside the engine's pause): leaked hooks would leak into the next
    request, so stop serving."""

    def check() -> None:
        runtime = state.runtime
        if runtime is None:
            return
        if _registered_hooks(runtime, state.engine_hooks) > 0:  # below 0 only while a failed engine is replaced
            _broke(state, "hooks leaked on the shared model; restart the server")

    return check


def _broke(state: AppState, reason: str) -> None:
    """The server failed after it served: it stops being ready (and live, `AppState.broken`)."""
    state.failure = reason
    state.metrics.ready.set(0)
    log.critical(reason)


def _refuse_when_broken(state: AppState) -> Callable[[], None]:
    """Before every serial job: a job admitted just before a failure was found must not run into it."""

    def check() -> None:
        if state.broken:
            raise RuntimeError(state.failure)

    return check


def start_engine(runtime: Runtime, settings: Settings) -> GuardedBatchEngine:
    """The batching engine on the served model, with the guard's readout and the patch source."""
    config = EngineConfig(num_blocks=settings.engine_kv_blocks, max_batch_tokens=settings.engine_max_batch_tokens,
                          max_requests_per_batch=min(settings.max_queue, 64))
    return GuardedBatchEngine(runtime.loaded, readout=runtime.readout, patch_source=runtime.patch_source, config=config)


def _failed(state: AppState, exc: BaseException, what: str,
            on_load_error: Callable[[BaseException], None] | None) -> None:
    """A start-up failure: /ready keeps answering 503 with the reason; `serve` exits."""
    state.failure = str(exc) if isinstance(exc, UsageError) else f"{what} failed ({type(exc).__name__}: {exc})"
    log.error("start-up failed: %s", state.failure, exc_info=None if isinstance(exc, UsageError) else exc)
    if on_load_error is not None:
        on_load_error(exc)


async def _load(state: AppState, loader: Loader, on_load_error: Callable[[BaseException], None] | None) -> None:
    settings = state.settings
    try:
        runtime = await asyncio.to_thread(loader, settings)
    except Exception as exc:  # noqa: BLE001 - any load failure is reported, never raised into the loop
        _failed(state, exc, "loading", on_load_error)
        return
    exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext
    if settings.engine == "batched":
        try:
            engine = await asyncio.to_thread(start_engine, runtime, settings)
        except Exception as exc:  # noqa: BLE001 - reported like a load failure
            _failed(state, exc, "starting the batching engine", on_load_error)
            return
        state.engine_hooks = _registered_hooks(runtime)  # the engine's step hooks, installed for its lifetime
        # Under tensor parallelism a failed step stops every rank's engine: only a new process group starts again.
        restart = (lambda: start_engine(runtime, settings)) if engine.tensor_parallel_size == 1 else None
        batch = state.batch = BatchScheduler(
            engine, state.metrics, settings.max_queue, restart=restart,
            on_stopped=lambda: _broke(state, "the batching engine stopped after a failed step; restart the server"))

        def paused() -> AbstractContextManager[Any]:
            current = batch.engine
            return current.exclusive() if current.running else nullcontext()  # a stopped engine has nothing to pause

        exclusive = paused
        metrics = state.metrics
        metrics.batch_size.set_function(lambda: batch.engine.stats().last_batch_requests)
        metrics.kv_cache_usage.set_function(lambda: batch.engine.stats().kv_cache_usage)
    state.scheduler = Scheduler(state.metrics, settings.max_queue, after_job=_hook_guard(state), exclusive=exclusive,
                                before_job=_refuse_when_broken(state))
    state.runtime = runtime
    state.services = Services.build(ServiceContext(runtime, state.scheduler, settings, state.metrics, state.batch))
    bundle = runtime.bundle.name if runtime.bundle is not None else "none"
    state.metrics.registered_hooks.set_function(_hooks_gauge(state, runtime))
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
            if state.batch is not None:  # uvicorn has drained the HTTP requests: what is left gets the grace period
                await asyncio.to_thread(state.batch.close, settings.graceful_shutdown_s)
            if state.scheduler is not None:
                await asyncio.to_thread(state.scheduler.close)
            state.runtime = state.scheduler = state.services = state.batch = None

    app = FastAPI(title="NeuronGuard", version="0.1.0", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.neuronguard = state
    install_error_handlers(app)
    install_routes(app)
    app.add_middleware(RequestMiddleware, metrics=state.metrics, keys=settings.key_values(),
                       max_body_bytes=settings.max_body_bytes, routes=list(app.routes))
    return app
