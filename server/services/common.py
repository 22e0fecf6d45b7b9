"""What the services share: their context, encoding with HTTP errors, the model and guard
checks, scheduling, and the one path by which a job's wait ends (answer, client gone, or
fail closed).
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel

from neuronguard.errors import UsageError
from neuronguard.models.chat import encode_chat
from neuronguard.server.errors import APIError, guard_error, overloaded
from neuronguard.server.guard import GuardPolicy, PolicyError, resolve_policy
from neuronguard.server.metrics import Metrics
from neuronguard.server.protocol import ChatMessage, GuardOptions
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import BatchScheduler, EngineStopped, JobHandle, Overloaded, Scheduler
from neuronguard.server.settings import Settings

log = logging.getLogger("neuronguard.server")
T = TypeVar("T")
_ROLE_ALIASES = {"developer": "system"}
# transformers flips a tokenizer-wide flag on each `split_special_tokens` encode: the server's encodes
# (chat templates and raw prompts, from many threads) take turns, so user text never gets control tokens.
_ENCODE_LOCK = threading.Lock()
_LOGGED_FIELDS = 16  # unknown field names logged per request, each cut to 64 characters


@dataclass(frozen=True)
class ServiceContext:
    """What every service works with; built once when the model is loaded."""

    runtime: Runtime
    scheduler: Scheduler  # the serial worker (prefill-only scoring, and requests the batching engine cannot do)
    settings: Settings
    metrics: Metrics
    batch: BatchScheduler | None = None  # the batching engine, with `--engine batched`

    def serial(self, what: str, param: str | None = None) -> Scheduler:
        """The serial worker for `what`; refused under tensor parallelism, where a forward pass needs every rank."""
        if self.settings.tensor_parallel_size > 1:
            raise APIError(400, f"{what} runs on the serial worker, which tensor-parallel serving does not have "
                                "(fix: drop it, or send it to a replica served without --tensor-parallel-size)",
                           code="unsupported_parameter", param=param)
        return self.scheduler


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def encode_messages(runtime: Runtime, messages: Sequence[ChatMessage], param: str = "messages") -> list[int]:
    turns = [{"role": _ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        with _ENCODE_LOCK:
            ids = encode_chat(runtime.loaded.tokenizer, turns)
    except UsageError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_request") from None
    check_context(runtime, len(ids), 0, param)
    return ids


def encode_text(runtime: Runtime, text: str, param: str = "prompt") -> list[int]:
    """A raw prompt's ids (the tokenizer's own BOS, no chat template); typed special tokens stay text."""
    with _ENCODE_LOCK:
        ids = runtime.loaded.tokenizer.encode(text, add_special_tokens=True, split_special_tokens=True)
    if not ids:
        raise APIError(400, "the prompt is empty (it encodes to no tokens)", param=param, code="invalid_request")
    check_context(runtime, len(ids), 0, param)
    return ids


async def tokenize_off_loop(encode: Callable[..., T], *args: Any) -> T:
    """Run `encode(*args)` in a thread: at the body limit it takes seconds of CPU, which on the
    event loop would stall every other client."""
    return await asyncio.to_thread(encode, *args)


def check_context(runtime: Runtime, prompt_tokens: int, new_tokens: int, param: str) -> None:
    limit = runtime.context_length
    if prompt_tokens >= limit:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, the model's context is {limit}",
                       param=param, code="context_length_exceeded")
    if prompt_tokens + new_tokens > limit:
        raise APIError(400, f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the model's context of {limit}",
                       param="max_tokens", code="context_length_exceeded")


def model_not_found(runtime: Runtime, model: str | None) -> APIError:
    return APIError(404, f"the model '{model}' does not exist: this server serves {', '.join(runtime.names.ids)}",
                    param="model", code="model_not_found", type="invalid_request_error")


def check_model(runtime: Runtime, model: str | None) -> None:
    """With `--served-model-name` configured, a request must name one of those ids (404 otherwise)."""
    if not runtime.names.accepts(model):
        raise model_not_found(runtime, model)


def no_guard(param: str | None) -> APIError:
    return APIError(400, "this server runs without a guard bundle (guard mode 'off'), so it cannot score prompts: "
                         "restart it with --bundle DIR", param=param, code="guard_unavailable")


def policy_for(runtime: Runtime, settings: Settings, options: GuardOptions | None) -> GuardPolicy:
    try:
        policy = resolve_policy(runtime.policy(settings.guard_mode), options.mode if options else None,
                                options.threshold if options else None, allow_override=settings.allow_guard_override)
    except PolicyError as exc:
        raise APIError(400, str(exc), param=exc.param, code="guard_override_not_allowed") from None
    if policy.scores and runtime.bundle is None:
        raise no_guard("guard.mode")
    if policy.patches and runtime.patch_source is None:
        raise APIError(400, f"guard mode '{policy.mode}' needs a patch source, and this server has none",
                       param="guard.mode", code="patch_unavailable")
    return policy


def submit(starts: Sequence[Callable[[], JobHandle]]) -> list[JobHandle]:
    """Queue one job per starter; all or none (a full queue cancels the ones already queued: 503)."""
    handles: list[JobHandle] = []
    try:
        for start in starts:
            handles.append(start())
    except BaseException as exc:
        for handle in handles:
            handle.cancel()
        if isinstance(exc, Overloaded):
            raise overloaded() from None
        if isinstance(exc, EngineStopped):
            raise APIError(503, "the batching engine stopped after a failed step; this server must be restarted",
                           code="engine_unavailable") from None
        raise
    return handles


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_done_or_gone(request: Request, handles: Sequence[JobHandle], work: Awaitable[T]) -> T:
    """Await `work`; cancel the jobs if the client disconnects first, or if we are cancelled."""
    task: asyncio.Future[T] = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise ClientGone
        return task.result()
    finally:
        watcher.cancel()
        if not task.done():
            for handle in handles:
                handle.cancel()
            task.cancel()


def fail_closed(exc: BaseException, request_id: str | None) -> APIError:
    """The probe/hook path raised: block the request (503 guard_error); the worker goes on."""
    if isinstance(exc, APIError):
        return exc
    log.error("guard failure, request blocked", exc_info=exc, extra={"request_id": request_id})
    return guard_error()


async def settle(request: Request, handles: Sequence[JobHandle], work: Awaitable[T]) -> T:
    """Await jobs' work as an HTTP answer: 499 when the client went away, fail closed when they raised."""
    try:
        return await until_done_or_gone(request, handles, work)
    except ClientGone:
        raise APIError(499, "client closed the request", type="client_closed") from None
    except Exception as exc:
        raise fail_closed(exc, request_id(request)) from None


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def log_extra(request: Request, **fields: Any) -> dict[str, Any]:
    return {"request_id": request_id(request), **fields}


def unknown_fields(model: BaseModel, prefix: str = "") -> list[str]:
    """Dotted paths of the fields a request sent that OpenAI's schema does not define."""
    found = [f"{prefix}{name}" for name in (model.model_extra or {})]
    for name in type(model).model_fields:
        value = getattr(model, name)
        for i, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, BaseModel):
                found += unknown_fields(item, f"{prefix}{name}.{i}." if isinstance(value, list) else f"{prefix}{name}.")
    return found


def log_unknown_fields(request: Request, body: BaseModel) -> None:
    """Fields OpenAI does not define are ignored, never silently: their names are logged."""
    names = unknown_fields(body)
    if names:
        log.warning("ignored unknown request fields",
                    extra=log_extra(request, fields=[n[:64] for n in names[:_LOGGED_FIELDS]], count=len(names)))
