"""The middlewares between the network and the routes, and the guard on streams.

``RequestGuard`` (request ids and the catch-all 500), ``ErrorCounter``
(``hawker:http_errors_total``), ``ApiKeyAuth`` (one Authorization header,
holding the key) and ``BodySizeLimit`` (413s); ``guarded_sse`` for streams.

Every error that leaves the server has OpenAI's shape, whichever layer it
came from: ``RequestGuard`` is the outermost middleware and turns any
exception that escapes the app (a route, a middleware, a mounted app) into
a 500 in that shape, naming the request's id; ``guarded_sse`` does the same
for a stream whose 200 has already gone out, as a last error event before
``[DONE]``.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request

from hawker.server.errors import APIError, error_body, error_response

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable[[], Awaitable[dict]], Callable[[dict], Awaitable[None]]], Awaitable[None]]

REQUEST_ID_HEADER = "X-Request-Id"
_STATE_KEY = "request_id"
SSE_DONE = b"data: [DONE]\n\n"


def new_request_id() -> str:
    return f"req-{uuid.uuid4().hex}"


def request_id_of(request: Request) -> str:
    """The id ``RequestGuard`` gave this HTTP request (a fresh one outside it, e.g. in unit tests)."""
    return request.scope.get("state", {}).get(_STATE_KEY) or new_request_id()


def internal_error(request_id: str) -> APIError:
    message = f"internal error while handling request {request_id}; the server log has the details"
    return APIError(500, message, code="internal_error")


class RequestGuard:
    """Give each HTTP request an id (``X-Request-Id`` on its response) and answer any escaped exception
    with a 500 in OpenAI's shape (logged with that id) instead of Starlette's plain-text one."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        # In scope["state"] (what request.state reads), so routes and handlers see the same id.
        scope.setdefault("state", {})[_STATE_KEY] = request_id
        header = (REQUEST_ID_HEADER.lower().encode(), request_id.encode())
        started = False

        async def send_with_id(message: MutableMapping[str, Any]) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                message = {**message, "headers": [*message.get("headers", []), header]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except Exception:
            logger.exception("request %s (%s %s) failed", request_id, scope.get("method"), scope.get("path"))
            if started:
                return  # the status is out: the connection closes with the body cut short
            await error_response(internal_error(request_id))(scope, receive, send_with_id)


async def guarded_sse(events: AsyncIterator[str], request_id: str) -> AsyncIterator[bytes]:
    """Encode server-sent events, and end the stream with an error event and ``[DONE]`` if making one fails.

    The events are encoded here, inside the guard, so that an event that cannot
    be encoded fails like any other error instead of cutting the response.
    """
    try:
        async for event in events:
            yield event.encode("utf-8")
    except Exception:
        logger.exception("stream of request %s failed", request_id)
        error = internal_error(request_id)
        body = error_body(error.status, error.message, code=error.code)
        yield f"data: {json.dumps(body)}\n\n".encode()
        yield SSE_DONE


class ApiKeyAuth:
    """Require ``Authorization: Bearer <key>`` on every path but the open ones.

    The request must carry exactly one Authorization header: with several, a
    proxy that checked one and this server that read another could disagree,
    so duplicates are refused, whatever their values.
    """

    def __init__(self, app: ASGIApp, api_key: str, open_paths: frozenset[str], open_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.expected = api_key.encode()
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or self._is_open(scope["path"]):
            await self.app(scope, receive, send)
            return
        problem = self._problem([value for name, value in scope.get("headers") or [] if name == b"authorization"])
        if problem is not None:
            await error_response(APIError(401, problem, code="invalid_api_key"))(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _is_open(self, path: str) -> bool:
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def _problem(self, values: list[bytes]) -> str | None:
        """Why these Authorization header values are refused; None when they hold the key."""
        if len(values) > 1:
            return f"{len(values)} Authorization headers: send exactly one (Authorization: Bearer <key>)"
        scheme, _, token = (values[0] if values else b"").strip().partition(b" ")
        # The scheme is case-insensitive (RFC 9110); the key is compared in constant time.
        if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.expected):
            return "missing or invalid API key (send Authorization: Bearer <key>)"
        return None


class ErrorCounter:
    """Count every response with an error status (``hawker:http_errors_total``), whichever layer sent it."""

    def __init__(self, app: ASGIApp, count: Callable[[int], None]) -> None:
        self.app = app
        self.count = count

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def counting_send(message: dict) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
                # 499: the client left; its requests are counted as aborted instead.
                if message["status"] >= 400 and message["status"] != 499:
                    self.count(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        except Exception:
            if not started:
                self.count(500)  # Starlette's outermost handler turns it into a 500
            raise


class BodySizeLimit:
    """413 for a request body over ``limit`` bytes, declared or streamed."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._reject(scope, receive, send)
            return
        received = 0
        too_large = False

        async def counting_receive() -> dict:
            nonlocal received, too_large
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    too_large = True
                    return {"type": "http.disconnect"}  # the app stops reading
            return message

        async def guarded_send(message: dict) -> None:
            if not too_large:
                await send(message)

        await self.app(scope, counting_receive, guarded_send)
        if too_large:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: dict, receive: Callable, send: Callable) -> None:
        message = f"the request body is larger than the limit of {self.limit} bytes"
        await error_response(APIError(413, message, code="request_too_large"))(scope, receive, send)
