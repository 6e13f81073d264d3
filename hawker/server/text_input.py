"""Text in request bodies must be valid Unicode before any route sees it.

JSON can spell a lone UTF-16 surrogate (``"\\ud800"``), and Python's decoder
accepts it, but such a string cannot be encoded as UTF-8: the tokenizer, a
chat template, or the response that echoes it would fail deep inside the
server. ``TextCheckedRoute`` looks at every string of a JSON body (keys too,
in every field, whether the route reads it or not) and answers 400, naming
the field, before the body is validated or a route runs.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import Response

from hawker.server.errors import APIError

_SURROGATE = re.compile("[\ud800-\udfff]")
# In a UTF-8 body a lone surrogate can only come from a \u escape that is not half of a pair, or
# from the 3-byte encoding of a surrogate (ED A0..BF, never valid UTF-8). Searching the raw bytes
# for these is cheap; walking the parsed body is not (a 16 MB body of tiny lists takes seconds),
# so the walk runs only when the bytes hold one (or an escaped backslash makes it look so).
_HIGH = rb"\\u[dD][89abAB][0-9a-fA-F]{2}"
_LOW = rb"\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_MAYBE_LONE = re.compile(rb"\xed[\xa0-\xbf]|" + _HIGH + rb"(?!" + _LOW + rb")|(?<!" + _HIGH + rb")" + _LOW)


@dataclass(frozen=True)
class BadText:
    path: tuple[str | int, ...]  # where in the body: field names and list indices
    code_point: int
    position: int  # its character index in the string

    @property
    def param(self) -> str | None:
        return str(self.path[0]) if self.path else None

    def message(self) -> str:
        where = ".".join(str(part) for part in self.path) or "body"
        return (
            f"{where}: the text holds an unpaired UTF-16 surrogate (U+{self.code_point:04X}) at character "
            f"{self.position}; send valid Unicode (a surrogate is only valid as half of an escaped pair)"
        )


def find_bad_text(value: Any) -> BadText | None:
    """The first string (in document order) of a parsed JSON value that is not valid Unicode."""
    # An explicit stack: a deeply nested body must not exhaust Python's recursion limit here.
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, str):
            found = _surrogate_in(item)
            if found is not None:
                return BadText(path, ord(item[found]), found)
        elif isinstance(item, dict):
            for key in item:
                found = _surrogate_in(key) if isinstance(key, str) else None
                if found is not None:
                    return BadText(path, ord(key[found]), found)
            stack.extend(((*path, key), child) for key, child in reversed(item.items()))
        elif isinstance(item, list):
            stack.extend(((*path, index), child) for index, child in reversed(list(enumerate(item))))
    return None


def may_hold_bad_text(raw: bytes) -> bool:
    """False when the JSON text ``raw`` surely decodes to valid Unicode (the fast test before the walk)."""
    if json.detect_encoding(raw) not in ("utf-8", "utf-8-sig"):
        return True  # UTF-16 or UTF-32 JSON: rare enough to always walk
    if b"\\u" not in raw and b"\xed" not in raw:  # the usual case, and a much faster search
        return False
    return _MAYBE_LONE.search(raw) is not None


def _surrogate_in(text: str) -> int | None:
    if text.isascii():
        return None
    match = _SURROGATE.search(text)
    return match.start() if match else None


def _is_json(request: Request) -> bool:
    """Whether FastAPI will read this body as JSON (the same test it applies)."""
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    main, _, sub = media_type.partition("/")
    return main == "application" and (sub == "json" or sub.endswith("+json"))


class TextCheckedRoute(APIRoute):
    """An APIRoute whose JSON body is checked for invalid text first (see the module docstring).

    The body is parsed once: Starlette keeps the parsed value on the request,
    and FastAPI's own parsing reuses it.
    """

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        if self.body_field is None:
            return handler

        async def checked(request: Request) -> Response:
            if not _is_json(request):
                return await handler(request)
            try:
                raw = await request.body()
            except Exception:
                # The client left, or BodySizeLimit cut the body off (it answers 413 itself). Reading
                # again would wait for a message that never comes: answer now.
                raise APIError(400, "the request body could not be read") from None
            if not may_hold_bad_text(raw):
                return await handler(request)
            try:
                body = await request.json()  # kept on the request: FastAPI does not parse it again
            except Exception:  # not JSON: FastAPI's own parsing reports it (from the body read above)
                body = None
            bad = find_bad_text(body)
            if bad is not None:
                raise APIError(400, bad.message(), param=bad.param, code="invalid_text")
            return await handler(request)

        return checked
