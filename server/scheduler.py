"""One worker thread owns every forward pass; asyncio handlers submit jobs and await events.

Hooks are global state on a shared model, so jobs run one at a time: a job's hooks exist
only while it runs, and no other request's forward pass can see them. The queue is
bounded: a full queue is an `Overloaded` error (HTTP 503 with Retry-After) instead of
unbounded latency. Each job reports through an asyncio queue (one event per released token
when streaming) and checks its cancel flag every decoding step, so a client that goes away
stops its generation at the next token.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections.abc import AsyncIterator, Callable
from typing import Any

from neuronguard.server.metrics import Metrics

log = logging.getLogger("neuronguard.server")


class Overloaded(Exception):
    """The job queue is full."""


class Cancelled(Exception):
    """Raised inside a job when its request went away."""


class _Done:
    def __init__(self, value: Any) -> None:
        self.value = value


class JobContext:
    """What a job body sees on the worker thread: an event sink and its cancel flag."""

    def __init__(self, loop: asyncio.AbstractEventLoop, events: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._events = events
        self.cancelled = threading.Event()

    def emit(self, event: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, event)
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
        self._ctx.cancelled.set()

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

    def __init__(self, metrics: Metrics, max_queue: int, after_job: Callable[[], None] | None = None) -> None:
        self._metrics = metrics
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
                ctx.emit(_Done(body(ctx)))
            except Cancelled:
                ctx.emit(_Done(None))
            except BaseException as exc:  # noqa: BLE001 - the worker must survive any job
                ctx.emit(_Failure(exc))
            finally:
                self._metrics.running.dec()
                if self._after_job is not None:
                    self._after_job()

    def close(self, timeout_s: float = 10.0) -> None:
        """Let queued jobs finish, then stop the worker."""
        self._queue.put(None)
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            log.warning("model worker did not stop within %.0f s", timeout_s)
