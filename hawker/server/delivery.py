"""Delivering a generation's outputs: one JSON body when all are done, or server-sent events as they come.

A client that disconnects aborts its requests (their blocks go back at
once); an engine error mid-stream becomes an error event before ``[DONE]``.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from hawker.engine.async_engine import EngineBusyError, EngineDeadError, RequestFailedError, RequestStream
from hawker.outputs import RequestOutput
from hawker.server.errors import RETRY_AFTER_S, APIError, error_body, from_engine_error
from hawker.server.guards import guarded_sse, request_id_of
from hawker.server.responders import Responder

logger = logging.getLogger(__name__)

ENGINE_ERRORS = (EngineBusyError, EngineDeadError, RequestFailedError)


async def whole_response(request: Request, streams: list[RequestStream], responder: Responder) -> Response:
    """Wait for every stream's last output; a client that leaves aborts them all."""
    work = asyncio.ensure_future(asyncio.gather(*(stream.final() for stream in streams)))
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        racing: set[asyncio.Future[Any]] = {work, watcher}
        done, _ = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
        if work not in done:
            logger.info("client left; aborting %s", ", ".join(s.request_id for s in streams))
            work.cancel()
            return Response(status_code=499)
        finals: list[RequestOutput] = work.result()
    except ENGINE_ERRORS as error:
        raise from_engine_error(error) from None
    finally:
        watcher.cancel()
        _close(streams)
    return JSONResponse(responder.full(finals))


async def streamed_response(
    request: Request, streams: list[RequestStream], responder: Responder, include_usage: bool
) -> Response:
    """Server-sent events. The first output is awaited before the 200 goes out,
    so a request that fails at once still gets its HTTP error status."""
    merged = _merge(streams)
    try:
        first = await anext(merged)
    except ENGINE_ERRORS as error:
        _close(streams)
        raise from_engine_error(error) from None
    except StopAsyncIteration:
        _close(streams)
        raise APIError(503, "the request ended before producing output", retry_after=RETRY_AFTER_S) from None

    async def events() -> AsyncIterator[str]:
        watcher = asyncio.ensure_future(_close_on_disconnect(request, streams))
        finals: dict[int, RequestOutput] = {}
        try:
            for body in responder.begin():
                yield _sse(body)
            item: tuple[int, RequestOutput] | None = first
            while item is not None:
                prompt_index, output = item
                for body in responder.chunks(prompt_index, output):
                    yield _sse(body)
                if output.finished:
                    finals[prompt_index] = output
                item = await anext(merged, None)
            if include_usage and len(finals) == len(streams):
                yield _sse(responder.usage_chunk([finals[i] for i in sorted(finals)]))
        except ENGINE_ERRORS as error:
            api_error = from_engine_error(error)
            yield _sse(error_body(api_error.status, api_error.message, code=api_error.code))
        finally:
            watcher.cancel()
            _close(streams)
        yield "data: [DONE]\n\n"

    # Guarded: whatever fails while streaming, the client gets an error event and [DONE].
    return StreamingResponse(guarded_sse(events(), request_id_of(request)), media_type="text/event-stream")


async def _merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave the outputs of several streams as they come, tagged with the stream's index."""
    if len(streams) == 1:
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for output in stream:
                queue.put_nowait((index, output))
        except Exception as error:
            queue.put_nowait((index, error))
        finally:
            queue.put_nowait((index, None))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
        _close(streams)


async def _disconnected(request: Request) -> None:
    """Return once the client has gone (after the body was read, receive() only reports that)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _close_on_disconnect(request: Request, streams: list[RequestStream]) -> None:
    await _disconnected(request)
    logger.info("client left; aborting %s", ", ".join(s.request_id for s in streams))
    _close(streams)


def _close(streams: list[RequestStream]) -> None:
    for stream in streams:
        stream.close()


def _sse(body: dict[str, Any]) -> str:
    # allow_nan=False: a stray infinity fails here (guarded_sse turns it into an error event)
    # instead of going out as "Infinity", which is not JSON.
    return f"data: {json.dumps(body, ensure_ascii=False, allow_nan=False)}\n\n"
