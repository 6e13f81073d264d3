"""Every error leaves the server in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

from __future__ import annotations

import json
import re
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from hawker.engine.async_engine import EngineBusyError, EngineDeadError, RequestFailedError

# Seconds a client is told to wait when the server is busy or not serving.
RETRY_AFTER_S = 1

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "internal_server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error with an HTTP status, raised by route handlers."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.retry_after = retry_after


def error_type(status: int) -> str:
    """OpenAI's error ``type`` for an HTTP status (also the label of ``hawker:http_errors_total``)."""
    return _TYPES.get(status, "error")


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


class ErrorJSONResponse(JSONResponse):
    """JSON with non-ASCII characters escaped: an error message may quote what the client sent,
    and text that is not valid Unicode (a lone UTF-16 surrogate) cannot be encoded as UTF-8."""

    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode("ascii")


def error_response(error: APIError) -> JSONResponse:
    headers = {"Retry-After": str(error.retry_after)} if error.retry_after is not None else None
    return ErrorJSONResponse(error_body(error.status, error.message, error.param, error.code), error.status, headers)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """What every error response holds (OpenAI's shape)."""

    error: ErrorDetail


_WHEN = {
    400: "The request is invalid (malformed JSON, a wrong type, a value out of range, text that is not valid Unicode)",
    401: "The server runs with --api-key and the request has no valid Authorization: Bearer header (or several)",
    403: "Admin routes on a server started without --api-key",
    404: "No such model (or route)",
    413: "The request body is larger than --max-request-body-mb",
    429: "The waiting queue is full; retry after Retry-After seconds",
    500: "The engine failed on this request, or an unexpected error (its message names the request id)",
    503: "The server is shutting down or its engine is not running",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` for a route: the error statuses it sends, each with ``ErrorBody``.

    "default" covers any other error status, also in that shape (and stops
    FastAPI from advertising its 422, which this server never sends).
    """
    declared: dict[int | str, dict[str, Any]] = {
        status: {"model": ErrorBody, "description": _WHEN[status]} for status in sorted({*statuses, 500})
    }
    declared["default"] = {"model": ErrorBody, "description": "Any other error, in the same shape"}
    return declared


def from_value_error(error: ValueError) -> APIError:
    """A ValueError from request validation; its message starts with the field name when it has one."""
    message = str(error)
    match = re.match(r"(\w+) ", message)
    param = match.group(1) if match and match.group(1) in _PARAM_NAMES else None
    code = "context_length_exceeded" if "max_model_len" in message else None
    return APIError(400, message, param=param, code=code)


_PARAM_NAMES = {
    "n",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
    "max_tokens",
    "min_tokens",
    "logprobs",
    "prompt_logprobs",
    "stop",
    "seed",
    "logit_bias",
    "top_logprobs",
    "best_of",
    "max_completion_tokens",
    "stop_token_ids",
    "prompt",
    "messages",
}


def from_engine_error(error: Exception) -> APIError:
    if isinstance(error, EngineBusyError):
        return APIError(429, str(error), code="queue_full", retry_after=RETRY_AFTER_S)
    if isinstance(error, EngineDeadError):
        return APIError(503, str(error), code="engine_dead", retry_after=RETRY_AFTER_S)
    if isinstance(error, RequestFailedError):
        return APIError(500, str(error), code="engine_error")
    raise error


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, error: APIError) -> JSONResponse:
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, error: RequestValidationError) -> JSONResponse:
        first = error.errors()[0] if error.errors() else {}
        # "body" / "query" say where the field was, not which field: the param is the field itself.
        location = [str(part) for part in first.get("loc", ()) if part not in ("body", "query")]
        if first.get("type") == "json_invalid":
            message = f"the request body is not valid JSON: {first.get('msg', '')}"
            return error_response(APIError(400, message, code="invalid_json"))
        param = ".".join(location) or None
        message = f"{param or 'body'}: {first.get('msg', 'invalid value')}"
        return error_response(APIError(400, message, param=location[0] if location else None))

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_: Request, error: StarletteHTTPException) -> JSONResponse:
        message = str(error.detail) if error.detail else HTTPStatus(error.status_code).phrase
        return error_response(APIError(error.status_code, message))
