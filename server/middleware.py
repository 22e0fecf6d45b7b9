"""One ASGI middleware for what every request needs before and after its route.

Before: a request id, the body-size limit (413, also for chunked bodies) and the API key
(401). After: request metrics labelled by route template and one structured access log
line. It wraps `send`, so a stream is timed until its last byte.
"""

from __future__ import annotations

import logging
import re
import time
import uuid
from collections.abc import Sequence

from starlette.datastructures import Headers, MutableHeaders
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from neuronguard.server.auth import authorized, needs_auth
from neuronguard.server.errors import APIError
from neuronguard.server.metrics import Metrics

log = logging.getLogger("neuronguard.server")
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
_QUIET = frozenset({"/health", "/ready", "/metrics"})


class _TooLarge(Exception):
    pass


class RequestMiddleware:
    def __init__(
        self, app: ASGIApp, *, metrics: Metrics, keys: Sequence[bytes], max_body_bytes: int, routes: Sequence[BaseRoute]
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.keys = list(keys)
        self.max_body_bytes = max_body_bytes
        self.routes = list(routes)

    def _endpoint(self, scope: Scope) -> str:
        """The route template (`/v1/models/{model_id:path}`), so label values stay bounded."""
        for route in self.routes:
            if route.matches(scope)[0] != Match.NONE:
                return str(getattr(route, "path", "unmatched"))
        return "unmatched"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        given = headers.get("x-request-id", "")
        request_id = given if _REQUEST_ID.match(given) else uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id
        path = scope["path"]
        endpoint = self._endpoint(scope)
        status = 500
        start = time.perf_counter()

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                MutableHeaders(scope=message)["x-request-id"] = request_id
            await send(message)

        try:
            if needs_auth(path, self.keys) and not authorized(headers.get("authorization"), self.keys):
                error = APIError(401, "missing or invalid API key: send 'Authorization: Bearer <key>'",
                                 code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                await error.response()(scope, receive, send_with_id)
                return
            try:
                receive = await self._buffered(headers, receive)
            except _TooLarge:
                error = APIError(413, f"request body exceeds {self.max_body_bytes} bytes", code="request_too_large")
                await error.response()(scope, receive, send_with_id)
                return
            await self.app(scope, receive, send_with_id)
        finally:
            duration = time.perf_counter() - start
            self.metrics.requests.labels(endpoint, str(status)).inc()
            self.metrics.request_duration.labels(endpoint).observe(duration)
            log.log(
                logging.DEBUG if path in _QUIET else logging.INFO,
                "request",
                extra={"request_id": request_id, "method": scope["method"], "endpoint": endpoint,
                       "status": status, "duration_ms": round(duration * 1000, 2)},
            )

    async def _buffered(self, headers: Headers, receive: Receive) -> Receive:
        """Read the whole body under the size limit, then replay it to the app."""
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            raise _TooLarge
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return _replay([message], receive)
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise _TooLarge
            if not message.get("more_body", False):
                break
        return _replay([{"type": "http.request", "body": b"".join(chunks), "more_body": False}], receive)


def _replay(messages: list[Message], receive: Receive) -> Receive:
    async def replay() -> Message:
        return messages.pop(0) if messages else await receive()

    return replay
