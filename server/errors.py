"""API errors and the handlers that turn every failure into OpenAI's error envelope.

Clients never see a stack trace: unexpected exceptions are logged with the request id and
answered with a generic message.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from neuronguard.server.protocol import UNSUPPORTED, ErrorBody, ErrorResponse

log = logging.getLogger("neuronguard.server")

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status that reaches the client as an OpenAI error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        code: str | None = None,
        param: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.param = param
        self.type = type or _TYPES.get(status, "server_error")
        self.headers = headers

    def body(self) -> dict:
        return ErrorResponse(error=ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)).model_dump()

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def overloaded(retry_after_s: int = 1) -> APIError:
    return APIError(503, "the server is busy: retry later", code="overloaded", headers={"Retry-After": str(retry_after_s)})


def guard_error() -> APIError:
    """Fail closed: the guard could not run, so the request gets no model output."""
    return APIError(503, "the guard failed on this request, so it was blocked: retry later", code="guard_error")


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request", code="invalid_request")
    first = errors[0]
    # union member tags such as "function-after[_encodable(), str]" are pydantic internals, not fields
    loc = [str(p) for p in first.get("loc", ()) if p != "body" and "[" not in str(p)]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_request")
    if not loc:
        return APIError(400, "the request body must be a JSON object", code="invalid_request")
    param = ".".join(loc)
    code = UNSUPPORTED if first.get("type") == UNSUPPORTED else "invalid_request"
    return APIError(400, f"{param}: {first.get('msg', 'invalid value')}", param=param, code=code)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return APIError(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error(
            "unhandled error",
            exc_info=exc,
            extra={"request_id": getattr(request.state, "request_id", None)},
        )
        return APIError(500, "internal server error", code="internal_error").response()
