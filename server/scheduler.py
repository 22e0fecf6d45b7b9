"""Two ways to run jobs on the model; asyncio handlers submit them and await their events.

`Scheduler`, the serial engine: one worker thread runs jobs one at a time. Hooks are global
state on a shared model, so a job's hooks exist only while it runs, and no other request's
forward pass can see them. Its queue is bounded: a full queue is an `Overloaded` error (HTTP
503 with Retry-After) instead of unbounded latency. Each job reports through an asyncio queue
(one event per released token when streaming) and checks its cancel flag every decoding
step, so a client that goes away stops its generation at the next token. Next to the
batching engine, each serial job runs inside the engine's `exclusive()` pause.

`BatchScheduler`, the batched engine: a thin bridge to `GuardedBatchEngine`. Each job is an
`EngineRequest` and a `StepConsumer` that the engine thread feeds every `TokenEvent`; when
the consumer says the request is over (a block, a stop) the engine request is cancelled
before its next step. Events reach the same asyncio queues, so callers see one `JobHandle`
for both engines.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import itertools
import threading
import weakref
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any, Protocol

from neuronguard.models.engine import (
    EngineEvent,
    EngineRequest,
    ErrorEvent,
    FinishedEvent,
    GuardedBatchEngine,
    TokenEvent,
)
from neuronguard.server.metrics import Metrics

log = logging.getLogger("neuronguard.server")


class Overloaded(Exception):
    """The job queue is full."""


class EngineStopped(Exception):
    """The batching engine stopped after a failed step and cannot be replaced in this process."""


class Cancelled(Exception):
    """Raised inside a job when its request went away."""


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value


class _Outbox:
    """Events from worker threads to one event loop, with one wake-up per batch instead of one per event.

    Waking a loop from another thread writes to its self-pipe: with 32 requests streaming from
    one engine step that was 32 system calls per step. Here the first event after a drain wakes
    the loop, the ones that follow before it runs join the same drain, in order.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._lock = threading.Lock()
        self._items: list[tuple[asyncio.Queue[Any], Any]] = []

    def put(self, events: asyncio.Queue[Any], item: Any) -> None:
        """Queue `item` for `events` (any thread); `RuntimeError` once the loop is closed."""
        if self._loop.is_closed():
            raise RuntimeError("the event loop is closed")
        with self._lock:
            wake = not self._items
            self._items.append((events, item))
        if wake:
            self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        with self._lock:
            items, self._items = self._items, []
        for events, item in items:
            events.put_nowait(item)


_outboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Outbox] = weakref.WeakKeyDictionary()
_outboxes_lock = threading.Lock()


def _outbox(loop: asyncio.AbstractEventLoop) -> _Outbox:
    with _outboxes_lock:
        box = _outboxes.get(loop)
        if box is None:
            box = _outboxes[loop] = _Outbox(loop)
        return box


class JobContext:
    """What a job body sees on the worker thread: an event sink and its cancel flag."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> None:
        self._outbox = _outbox(loop)
        self._events = events
        self.cancelled = threading.Event()
        self.on_cancel: Callable[[], None] | None = None  # stops the job's engine request, if it has one

    def cancel(self) -> None:
        self.cancelled.set()
        if self.on_cancel is not None:
            self.on_cancel()

    def emit(self, event: Any) -> None:
        try:
            self._outbox.put(self._events, event)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            self.cancelled.set()

    def check(self) -> None:
        if self.cancelled.is_set():
            raise Cancelled


JobBody = Callable[[JobContext], Any]


class JobHandle:
    """The asyncio side of a job: iterate its events, await its result, or cancel it."""

    def __init__(self, ctx: JobContext, events: asyncio.Queue[Any]) -> None:
        self._ctx = ctx
        self._events = events
        self.value: Any = None

    def cancel(self) -> None:
        self._ctx.cancel()

    async def events(self) -> AsyncIterator[Any]:
        """Events emitted by the job; afterwards `value` holds its return value. Re-raises its exception."""
        while True:
            item = await self._events.get()
            if isinstance(item, _Done):
                self.value = item.value
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item

    async def result(self) -> Any:
        async for _ in self.events():
            pass
        return self.value


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


class Scheduler:
    """A bounded FIFO of jobs served by a single worker thread."""

    def __init__(self, metrics: Metrics, max_queue: int, after_job: Callable[[], None] | None = None,
                 exclusive: Callable[[], AbstractContextManager[Any]] = nullcontext,
                 before_job: Callable[[], None] | None = None) -> None:
        self._metrics = metrics
        self._before_job = before_job  # raises to refuse a job (it fails, the worker goes on)
        self._exclusive = exclusive  # held around each job and its check: the batching engine's pause
        self._queue: queue.Queue[tuple[JobBody, JobContext, asyncio.Queue[Any]] | None] = queue.Queue(maxsize=max_queue)
        self._after_job = after_job
        self._thread = threading.Thread(target=self._work, name="neuronguard-model-worker", daemon=True)
        self._thread.start()

    def submit(self, body: JobBody) -> JobHandle:
        """Queue a job (call from the event loop); raises `Overloaded` when the queue is full."""
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        ctx = JobContext(loop, events)
        try:
            self._queue.put_nowait((body, ctx, events))
        except queue.Full:
            raise Overloaded from None
        self._metrics.queue_depth.set(self._queue.qsize())
        return JobHandle(ctx, events)

    def _work(self) -> None:
        while True:
            item = self._queue.get()
            self._metrics.queue_depth.set(self._queue.qsize())
            if item is None:
                return
            body, ctx, _ = item
            if ctx.cancelled.is_set():
                ctx.emit(_Done(None))
                continue
            self._metrics.running.inc()
            try:
                with self._exclusive():
                    if self._before_job is not None:
                        self._before_job()
                    try:
                        ctx.emit(_Done(body(ctx)))
                    finally:
                        if self._after_job is not None:
                            self._after_job()
            except Cancelled:
                ctx.emit(_Done(None))
            except BaseException as exc:  # noqa: BLE001 - the worker must survive any job
                ctx.emit(_Failure(exc))
            finally:
                self._metrics.running.dec()

    def close(self, timeout_s: float = 10.0) -> None:
        """Let queued jobs finish, then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("model worker did not stop within %.0f s", timeout_s)


class StepConsumer(Protocol):
    """What a batched job does with its request's steps (on the engine thread: keep it short)."""

    def step(self, event: TokenEvent) -> bool:
        """Take one step; True when the request is over (the engine stops it before its next step)."""
        ...

    def result(self) -> Any:
        """The job's value once it is over."""
        ...


class BatchScheduler:
    """Jobs as requests of one `GuardedBatchEngine`: at most `max_requests` in flight, then `Overloaded`.

    A step that raises stops the engine's loop, and its requests end with an error (their HTTP
    answers fail closed). With `restart`, the next request finds a new engine in its place, so
    one failed step costs the requests of that step, never the server. Without (tensor
    parallelism: every rank's engine stopped), `on_stopped` is told once and requests get
    `EngineStopped` until the process is replaced.
    """

    def __init__(self, engine: GuardedBatchEngine, metrics: Metrics, max_requests: int,
                 restart: Callable[[], GuardedBatchEngine] | None = None,
                 on_stopped: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._metrics = metrics
        self._max_requests = max_requests
        self._restart = restart
        self._on_stopped = on_stopped
        self._closing = False
        self._in_flight = 0
        self.patched_in_flight = 0  # requests that run the patch source's hooks during steps
        self._lock = threading.Lock()
        self._ids = itertools.count()

    def _running_engine(self) -> GuardedBatchEngine:
        """The engine, replaced first when a failed step has stopped it (and a restart is allowed)."""
        engine = self.engine
        if engine.running or self._closing:
            return engine
        if self._restart is None:
            if self._on_stopped is not None:
                self._on_stopped()
                self._on_stopped = None
            raise EngineStopped
        log.error("the batching engine stopped after a failed step: starting a new one")
        engine.shutdown(drain=False)  # removes its hooks and frees its cache
        self.engine = self._restart()
        self._metrics.engine_restarts.inc()
        return self.engine

    def submit(self, request: EngineRequest, consumer: Callable[[JobContext], StepConsumer]) -> JobHandle:
        """Queue a request (call from the event loop); `consumer(ctx)` builds what its steps go to.

        Raises `Overloaded` when `max_requests` are in flight, `ValueError` for a request the
        engine cannot take, `EngineStopped` when a failed engine cannot be replaced, and
        `RuntimeError` when the engine is shutting down.
        """
        loop = asyncio.get_running_loop()
        events: asyncio.Queue[Any] = asyncio.Queue()
        ctx = JobContext(loop, events)
        with self._lock:
            if self._in_flight >= self._max_requests:
                raise Overloaded
            self._in_flight += 1
            self.patched_in_flight += request.patch
        self._metrics.running.inc()
        rid = f"job-{next(self._ids)}"
        sink = _EngineSink(self, ctx, consumer(ctx), rid, request.patch)
        try:
            engine = self._running_engine()
            sink.engine = engine
            engine.submit(request, sink, request_id=rid)
        except BaseException:
            sink.close()
            raise
        ctx.on_cancel = lambda: engine.cancel(rid)
        if ctx.cancelled.is_set():  # cancelled while it was being submitted
            engine.cancel(rid)
        return JobHandle(ctx, events)

    def _closed(self, patched: bool) -> None:
        with self._lock:
            self._in_flight -= 1
            self.patched_in_flight -= patched
        self._metrics.running.dec()

    def close(self, timeout_s: float) -> None:
        """Let the requests in flight finish (SIGTERM drain), for at most `timeout_s`; then stop the engine."""
        self._closing = True
        self.engine.shutdown(drain=True, timeout=timeout_s)


class _EngineSink:
    """One request's engine events into its job: steps to the consumer, the end to the job's result."""

    def __init__(self, owner: BatchScheduler, ctx: JobContext, consumer: StepConsumer, rid: str, patched: bool) -> None:
        self._owner, self._ctx, self._consumer, self._rid, self._patched = owner, ctx, consumer, rid, patched
        self.engine: GuardedBatchEngine | None = None  # the engine the request runs on
        self._open = True

    def close(self) -> None:
        if self._open:
            self._open = False
            self._owner._closed(self._patched)

    def _end(self, item: Any, stop_engine: bool) -> None:
        self.close()
        if stop_engine and self.engine is not None:
            self.engine.cancel(self._rid)  # re-enters this sink with a FinishedEvent: ignored
        self._ctx.emit(item)

    def __call__(self, event: EngineEvent) -> None:  # the engine thread (or a canceller's)
        if not self._open:
            return
        if isinstance(event, TokenEvent):
            if self._ctx.cancelled.is_set():
                self._end(_Done(None), stop_engine=True)
                return
            try:
                over = self._consumer.step(event)
                value = self._consumer.result() if over else None
            except Exception as exc:  # noqa: BLE001 - a guard failure fails its request closed, never the engine
                self._end(_Failure(exc), stop_engine=True)
                return
            if over:
                self._end(_Done(value), stop_engine=not event.finished)
        elif isinstance(event, FinishedEvent):
            if event.reason == "cancelled":  # the client went away (a block ends at its step, above)
                self._end(_Done(None), stop_engine=False)
                return
            try:  # the steps ran out (an unscored request's budget): as the serial decoder's loop ending
                value = self._consumer.result()
            except Exception as exc:  # noqa: BLE001
                self._end(_Failure(exc), stop_engine=False)
                return
            self._end(_Done(value), stop_engine=False)
        elif isinstance(event, ErrorEvent):
            self._end(_Failure(RuntimeError(event.message)), stop_engine=False)
