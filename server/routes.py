"""HTTP routes: parse, dispatch to a service, return. No work happens here."""

from __future__ import annotations

from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST

from neuronguard.server.errors import APIError
from neuronguard.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ErrorResponse,
    GuardCheckRequest,
    GuardCheckResponse,
    ModelCard,
    ModelList,
    ModerationRequest,
    ModerationResponse,
)
from neuronguard.server.state import AppState, Services


# Documented so clients (and the schemathesis run) know every status an endpoint answers with.
_ERRORS: dict[int | str, dict] = {
    400: {"model": ErrorResponse, "description": "Invalid or unsupported request (OpenAI error envelope)"},
    401: {"model": ErrorResponse, "description": "Missing or invalid API key"},
    404: {"model": ErrorResponse, "description": "The requested model is not served (model_not_found)"},
    413: {"model": ErrorResponse, "description": "Request body over the size limit"},
    503: {"model": ErrorResponse, "description": "Not ready, overloaded, or the guard failed (fails closed)"},
}
_READY_ERRORS = {503: _ERRORS[503]}
# Generation answers JSON, or server-sent events with "stream": true.
_GENERATION: dict[int | str, dict] = {
    200: {"description": "The completion, or its chunks as server-sent events ending with `data: [DONE]`",
          "content": {"application/json": {"schema": {"type": "object"}}, "text/event-stream": {}}},
    **_ERRORS,
}


def _state(request: Request) -> AppState:
    return request.app.state.neuronguard


def _services(request: Request) -> Services:
    return _state(request).require()


async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    return await _services(request).chat.create(body, request)


async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    return await _services(request).completions.create(body, request)


async def moderations(body: ModerationRequest, request: Request) -> ModerationResponse:
    return await _services(request).moderation.moderate(body, request)


async def guard_check(body: GuardCheckRequest, request: Request) -> GuardCheckResponse:
    return await _services(request).moderation.check(body, request)


async def models(request: Request) -> ModelList:
    return _services(request).models.list()


async def model(model_id: str, request: Request) -> ModelCard:
    return _services(request).models.card(model_id)


async def health(request: Request) -> dict[str, str]:
    """Liveness: the process answers (the model may still be loading), and has not failed since it served."""
    state = _state(request)
    if state.broken:
        raise APIError(503, f"broken: {state.failure}", code="broken")
    return {"status": "ok"}


async def ready(request: Request) -> dict[str, str]:
    """Readiness: 200 once model, bundle and patch source are loaded."""
    state = _state(request)
    if not state.ready:
        message = f"not ready: {state.failure}" if state.failure else "not ready: loading the model"
        raise APIError(503, message, code="not_ready", headers={"Retry-After": "5"})
    return {"status": "ready"}


async def metrics(request: Request) -> Response:
    return Response(_state(request).metrics.render(), media_type=CONTENT_TYPE_LATEST)


def install_routes(app: FastAPI) -> None:
    """Routes live on the app itself, so `app.routes` lists every path (health checks rely on it)."""
    app.add_api_route("/v1/chat/completions", chat_completions, methods=["POST"], response_model=None, responses=_GENERATION)
    app.add_api_route("/v1/completions", completions, methods=["POST"], response_model=None, responses=_GENERATION)
    app.add_api_route("/v1/moderations", moderations, methods=["POST"], responses=_ERRORS)
    app.add_api_route("/v1/guard/check", guard_check, methods=["POST"], responses=_ERRORS)
    app.add_api_route("/v1/models", models, methods=["GET"], responses={s: _ERRORS[s] for s in (401, 503)})
    app.add_api_route("/v1/models/{model_id:path}", model, methods=["GET"], responses={s: _ERRORS[s] for s in (401, 404, 503)})
    app.add_api_route("/health", health, methods=["GET"], responses=_READY_ERRORS)
    app.add_api_route("/ready", ready, methods=["GET"], responses=_READY_ERRORS)
    app.add_api_route("/metrics", metrics, methods=["GET"], include_in_schema=False)
