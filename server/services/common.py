"""Helpers shared by the services: encoding with HTTP errors, scheduling, disconnect watching."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastapi import Request

from neuronguard.models.chat import encode_chat
from neuronguard.errors import UsageError
from neuronguard.server.errors import APIError, guard_error, overloaded
from neuronguard.server.guard import GuardPolicy, PolicyError, resolve_policy
from neuronguard.server.protocol import ChatMessage, GuardOptions
from neuronguard.server.runtime import Runtime
from neuronguard.server.scheduler import JobBody, JobHandle, Overloaded, Scheduler
from neuronguard.server.settings import Settings

log = logging.getLogger("neuronguard.server")
T = TypeVar("T")
_ROLE_ALIASES = {"developer": "system"}


class ClientGone(Exception):
    """The client disconnected before its answer was ready."""


def encode_messages(runtime: Runtime, messages: Sequence[ChatMessage], param: str = "messages") -> list[int]:
    turns = [{"role": _ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in messages]
    try:
        ids = encode_chat(runtime.loaded.tokenizer, turns)
    except UsageError as exc:
        raise APIError(400, str(exc), param=param, code="invalid_request") from None
    check_context(runtime, len(ids), 0, param)
    return ids


async def tokenize_off_loop(encode: Callable[..., T], *args: Any) -> T:
    """Run `encode(*args)` in a thread: at the body limit it takes seconds of CPU, which on the
    event loop would stall every other client (`encode_chat` itself makes encodes thread-safe)."""
    return await asyncio.to_thread(encode, *args)


def check_context(runtime: Runtime, prompt_tokens: int, new_tokens: int, param: str) -> None:
    limit = runtime.context_length
    if prompt_tokens >= limit:
        raise APIError(400, f"the prompt has {prompt_tokens} tokens, the model's context is {limit}",
                       param=param, code="context_length_exceeded")
    if prompt_tokens + new_tokens > limit:
        raise APIError(400, f"{prompt_tokens} prompt tokens + {new_tokens} new tokens exceed the model's context of {limit}",
                       param="max_tokens", code="context_length_exceeded")


def policy_for(runtime: Runtime, settings: Settings, options: GuardOptions | None) -> GuardPolicy:
    try:
        policy = resolve_policy(runtime.policy(settings.guard_mode), options.mode if options else None,
                                options.threshold if options else None, allow_override=settings.allow_guard_override)
    except PolicyError as exc:
        raise APIError(400, str(exc), param=exc.param, code="guard_override_not_allowed") from None
    if policy.patches and runtime.patch_source is None:
        raise APIError(400, f"guard mode '{policy.mode}' needs a patch source, and this server has none",
                       param="guard.mode", code="patch_unavailable")
    return policy


def submit(scheduler: Scheduler, body: JobBody) -> JobHandle:
    try:
        return scheduler.submit(body)
    except Overloaded:
        raise overloaded() from None


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def until_done_or_gone(request: Request, handle: JobHandle, work: Awaitable[T]) -> T:
    """Await `work`; cancel the job if the client disconnects first, or if we are cancelled."""
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
            handle.cancel()
            task.cancel()


def fail_closed(exc: BaseException, request_id: str | None) -> APIError:
    """The probe/hook path raised: block the request (503 guard_error); the worker goes on."""
    if isinstance(exc, APIError):
        return exc
    log.error("guard failure, request blocked", exc_info=exc, extra={"request_id": request_id})
    return guard_error()


def request_id(request: Request) -> str | None:
    return getattr(request.state, "request_id", None)


def log_extra(request: Request, **fields: Any) -> dict[str, Any]:
    return {"request_id": request_id(request), **fields}
