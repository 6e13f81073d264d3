"""The OpenAI-compatible HTTP API over a ReplicaRouter of AsyncEngines (FastAPI)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import TemplateError
from prometheus_client import CONTENT_TYPE_LATEST

from hawker.engine.async_engine import (
    EngineDeadError,
    Submission,
)
from hawker.loader.chat_templates import tools_template
from hawker.loader.tokenizer import render_chat
from hawker.options import REASONING_PARSERS
from hawker.sampling_params import SamplingParams
from hawker.server.admin import add_admin_routes
from hawker.server.dashboard import INDEX, STATIC_DIR
from hawker.server.delivery import ENGINE_ERRORS, streamed_response, whole_response
from hawker.server.errors import (
    RETRY_AFTER_S,
    APIError,
    error_response,
    error_responses,
    from_engine_error,
    from_value_error,
    install_error_handlers,
)
from hawker.server.formatting import TokenText
from hawker.server.guards import (
    ApiKeyAuth,
    BodySizeLimit,
    ErrorCounter,
    RequestGuard,
)
from hawker.server.message_parsing import THINK_OPEN, MessageSyntax
from hawker.server.metrics import ServerMetrics
from hawker.server.protocol import (
    DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    check_text_fits,
)
from hawker.server.responders import ChatResponder, CompletionResponder
from hawker.server.router import ObserverGroup, ReplicaRouter
from hawker.server.stats import StatsConfig, StatsHistory, points_json, read_snapshot
from hawker.server.text_input import TextCheckedRoute
from hawker.server.tools import TOOL_CALL_PARSERS, ToolPlan
from hawker.server.tracking import FinishedSink, RequestLog, RequestTracker

if TYPE_CHECKING:
    from hawker.server.tracing import RequestTracer

logger = logging.getLogger(__name__)
T = TypeVar("T")

# Paths that stay open without an API key (probes, scrapers and the dashboard,
# which shows counts and request ids, never prompts or outputs).
OPEN_PATHS = frozenset({"/health", "/metrics", "/v1/stats", "/dashboard"})
OPEN_PREFIXES = ("/dashboard/static/",)


@dataclass(frozen=True)
class ServerSettings:
    served_model_name: str
    api_key: str | None = None
    max_request_body_bytes: int = 16 * 1024 * 1024
    shutdown_grace_s: float = 30.0
    # /admin/update_weights loads only from directories under one of these (resolved; none: anywhere).
    allowed_weight_roots: tuple[Path, ...] = ()
    # The max_tokens of a request that sets none (chat's default; completions' when null),
    # lowered to what the prompt leaves of the context (see ServerState.fill_max_tokens).
    max_tokens_default: int = DEFAULT_MAX_TOKENS
    # The level of the one-line log of each finished request ("off": none).
    request_log_level: str = "info"
    stats: StatsConfig = field(default_factory=StatsConfig)
    # The chat template of every chat request (--chat-template), instead of the model's own.
    chat_template: str | None = None
    # Reads Hermes/Qwen <tool_call> blocks of tool_choice "auto" into tool_calls (None: the text stays content).
    tool_call_parser: str | None = "hermes"
    # Moves <think>...</think> into reasoning_content (None: it stays in the content).
    reasoning_parser: str | None = None

    def __post_init__(self) -> None:
        if self.max_tokens_default < 1:
            raise ValueError(f"max_tokens_default must be >= 1, got {self.max_tokens_default}")
        if self.tool_call_parser not in (None, *TOOL_CALL_PARSERS):
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}")
        if self.reasoning_parser not in (None, *REASONING_PARSERS):
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}")


class ServerState:
    """Everything the routes of one app share (kept on ``app.state``, never global)."""

    def __init__(
        self, router: ReplicaRouter, settings: ServerSettings, metrics: ServerMetrics, tracker: RequestTracker
    ) -> None:
        self.router = router
        self.settings = settings
        self.metrics = metrics
        self.tracker = tracker
        self.history = StatsHistory(lambda: read_snapshot(metrics.registry), settings.stats)
        self.token_text = TokenText(router.tokenizer)
        self.draining = False
        self.started_at = int(time.time())  # the model card's "created"

    def check_serving(self, model: str | None) -> None:
        if model is not None and model != self.settings.served_model_name:
            message = f"the model {model!r} does not exist; this server serves {self.settings.served_model_name!r}"
            raise APIError(404, message, param="model", code="model_not_found")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", retry_after=RETRY_AFTER_S)
        try:
            self.router.raise_if_dead()
        except EngineDeadError as error:
            raise from_engine_error(error) from None

    def submit_all(
        self,
        base_id: str,
        prompts: list[tuple[str | None, list[int]]],
        params: SamplingParams,
        headers: dict[str, str] | None = None,
    ) -> list:
        """Queue one request per prompt; a rejection of any queues none.

        ``headers``: the HTTP request's, whose trace context the requests' spans join.
        """
        names = [base_id] if len(prompts) == 1 else [f"{base_id}-{index}" for index in range(len(prompts))]
        try:
            submissions = [
                Submission(name, ids, self.fill_max_tokens(params, ids), text)
                for name, (text, ids) in zip(names, prompts, strict=True)
            ]
            streams = self.router.submit_many(submissions)
        except ValueError as error:
            raise from_value_error(error) from None
        except ENGINE_ERRORS as error:
            raise from_engine_error(error) from None
        if headers:
            self.tracker.attach_trace_context([s.request_id for s in submissions], headers)
        return streams

    async def compile_constraint(self, params: SamplingParams, tools: ToolPlan | None = None) -> None:
        """Compile the request's tools' parameter schemas and output constraint (if any) on a worker thread,
        so that the event loop never waits for them; the engine then finds them compiled. A bad one is a
        400 naming it."""
        for where, schema in tools.parameter_constraints() if tools is not None else []:
            try:
                await asyncio.to_thread(self.router.check_constraint, schema)
            except ValueError as error:
                raise APIError(400, f"{where}: {error}", param="tools") from None
        if params.structured_outputs is None:
            return
        try:
            await asyncio.to_thread(self.router.check_constraint, params.structured_outputs)
        except ValueError as error:
            raise from_value_error(error) from None

    def message_syntax(self, tools: ToolPlan, prompt_text: str, response_id: str) -> MessageSyntax | None:
        """How a chat response's text becomes its message; None: all of it is the content."""
        settings = self.settings
        parse_calls = tools.parses_calls and (settings.tool_call_parser is not None or tools.mode != "auto")
        reasoning = settings.reasoning_parser is not None
        if not parse_calls and not reasoning:
            return None
        return MessageSyntax(
            reasoning=reasoning,
            reasoning_open=reasoning and prompt_text.rstrip().endswith(THINK_OPEN),
            tools=parse_calls,
            call_id_prefix=f"call_{response_id.removeprefix('chatcmpl-')[:24]}",
        )

    def fill_max_tokens(self, params: SamplingParams, prompt_ids: list[int]) -> SamplingParams:
        """``params`` with ``max_tokens`` set when the request left it out: ``max_tokens_default``
        (or ``min_tokens`` if that is more), lowered to the room the prompt leaves in the context."""
        if params.max_tokens is not None:
            return params
        room = self.router.max_model_len - len(prompt_ids)
        if room < 1:
            return params  # the engine says why the prompt does not fit
        return params.replace(max_tokens=min(max(self.settings.max_tokens_default, params.min_tokens), room))

    def stats(self, since: float | None) -> dict[str, Any]:
        """The body of GET /v1/stats: totals read now, chart points newer than ``since``, requests in flight."""
        snapshot = read_snapshot(self.metrics.registry)
        return {
            "time": snapshot.time,
            "model": self.settings.served_model_name,
            "replicas": len(self.router.replicas),
            "healthy": self.router.is_healthy and not self.draining,
            "warming_up": self.router.is_warming_up,
            **asdict(self.settings.stats),  # interval_s, window_s, history_s
            "totals": snapshot.as_json(),
            "series": points_json(self.history.points(since)),
            "requests_in_flight": len(self.tracker),
            "requests": [asdict(row) for row in self.tracker.rows(limit=_MAX_TABLE_ROWS)],
        }


# The dashboard's table shows at most this many requests (the oldest); the count shows them all.
_MAX_TABLE_ROWS = 100

# Completions and chat: their errors, and a 200 that is JSON, or server-sent events when "stream" is true.
_GENERATION_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/event-stream": {"schema": {"type": "string"}}}},
    **error_responses(400, 401, 404, 413, 429, 500, 503),
}


def build_app(router: ReplicaRouter, settings: ServerSettings, tracer: RequestTracer | None = None) -> FastAPI:
    """The HTTP app over ``router``; ``tracer`` (see hawker/server/tracing.py) adds a span per request."""
    metrics = ServerMetrics.of(router)
    sinks: list[FinishedSink] = [RequestLog(settings.request_log_level)]
    if tracer is not None:
        sinks.append(tracer)
    tracker = RequestTracker(router.request_state, sinks, keep_trace_context=tracer is not None)
    router.observer = ObserverGroup([metrics, tracker])
    state = ServerState(router, settings, metrics, tracker)

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        router.start()
        sampler = asyncio.ensure_future(state.history.run())
        yield
        sampler.cancel()
        router.stop()

    app = FastAPI(title="Hawker", description="OpenAI-compatible LLM inference server", lifespan=lifespan)
    app.state.hawker = state
    # Every route's JSON body is checked for text that is not valid Unicode before it is validated.
    app.router.route_class = TextCheckedRoute
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit=settings.max_request_body_bytes)
    if settings.api_key:
        app.add_middleware(ApiKeyAuth, api_key=settings.api_key, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES)
    # Counts the 401s and 413s of the middlewares above, and the catch-all's 500s below.
    app.add_middleware(ErrorCounter, count=metrics.on_error_response)
    # Outermost: a request id for every response, and OpenAI's error shape for any exception.
    app.add_middleware(RequestGuard)
    _add_routes(app, state)
    _add_dashboard(app, state)
    add_admin_routes(app, router.replicas, settings.api_key, settings.allowed_weight_roots)
    return app


def _add_routes(app: FastAPI, state: ServerState) -> None:
    router = state.router

    @app.get("/health", responses=error_responses(503))
    async def health() -> Response:
        try:
            router.raise_if_dead()
        except EngineDeadError as error:
            return error_response(APIError(503, str(error), code="engine_dead", retry_after=RETRY_AFTER_S))
        if state.draining:
            return error_response(APIError(503, "the server is shutting down", retry_after=RETRY_AFTER_S))
        return JSONResponse({"status": "warming_up" if router.is_warming_up else "ok"})

    @app.get("/metrics", responses=error_responses())
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", responses=error_responses(401))
    async def models() -> dict[str, Any]:
        card = {
            "id": state.settings.served_model_name,
            "object": "model",
            "created": state.started_at,
            "owned_by": "hawker",
            "max_model_len": router.max_model_len,
        }
        return {"object": "list", "data": [card]}

    @app.post("/tokenize", responses=error_responses(400, 401, 404, 413, 503))
    async def tokenize(body: TokenizeRequest) -> dict[str, Any]:
        state.check_serving(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            _, ids = _chat_prompt(router, body.messages, body.add_generation_prompt, state.settings.chat_template)
        else:
            _check_text_fits(router, body.prompt or "", "prompt")
            ids = router.tokenizer(body.prompt, add_special_tokens=body.add_special_tokens).input_ids
        return {"tokens": ids, "count": len(ids), "max_model_len": router.max_model_len}

    @app.post("/detokenize", responses=error_responses(400, 401, 404, 413, 503))
    async def detokenize(body: DetokenizeRequest) -> dict[str, Any]:
        state.check_serving(body.model)
        vocab = router.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param="tokens")
        return {"prompt": router.tokenizer.decode(body.tokens)}

    @app.post("/v1/completions", responses=_GENERATION_RESPONSES)
    async def completions(body: CompletionRequest, request: Request) -> Response:
        state.check_serving(body.model)
        _log_ignored(body.ignored_fields())
        params = _sampling_params(body.sampling_params)
        prompts = _completion_prompts(router, body)
        response_id = f"cmpl-{uuid.uuid4().hex}"
        await state.compile_constraint(params)
        streams = state.submit_all(response_id, prompts, params, dict(request.headers))
        responder = CompletionResponder(
            response_id=response_id,
            model=state.settings.served_model_name,
            n=body.n,
            token_text=state.token_text,
            keep_best=body.num_candidates > body.n,
            echo=body.echo,
            logprobs=body.logprobs,
            # Only echo shows the prompt's text; token-id prompts are decoded just for it.
            prompt_texts=[text or str(router.tokenizer.decode(ids)) for text, ids in prompts] if body.echo else [],
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return await streamed_response(request, streams, responder, include_usage)
        return await whole_response(request, streams, responder)

    @app.post("/v1/chat/completions", responses=_GENERATION_RESPONSES)
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        state.check_serving(body.model)
        _log_ignored(body.ignored_fields())
        tools = _sampling_params(body.tool_plan)
        params = _sampling_params(lambda: body.sampling_params(tools))
        prompt = _chat_prompt(router, body.messages, body.add_generation_prompt, state.settings.chat_template, tools)
        response_id = f"chatcmpl-{uuid.uuid4().hex}"
        await state.compile_constraint(params, tools)
        streams = state.submit_all(response_id, [prompt], params, dict(request.headers))
        responder = ChatResponder(
            response_id=response_id,
            model=state.settings.served_model_name,
            n=params.n,
            token_text=state.token_text,
            top_logprobs=(body.top_logprobs or 0) if body.logprobs else None,
            syntax=state.message_syntax(tools, prompt[0], response_id),
        )
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        if body.stream:
            return await streamed_response(request, streams, responder, include_usage)
        return await whole_response(request, streams, responder)


def _add_dashboard(app: FastAPI, state: ServerState) -> None:
    @app.get("/v1/stats", responses=error_responses(400))
    async def stats(since: float | None = None) -> dict[str, Any]:
        """What /dashboard shows: the /metrics registry's totals, its last minutes as chart points, and
        the requests in flight. ``since``: only chart points newer than this ``t`` (seconds since the epoch)."""
        return state.stats(since)

    @app.get("/dashboard", include_in_schema=False)
    async def dashboard() -> FileResponse:
        return FileResponse(INDEX, media_type="text/html")

    app.mount("/dashboard/static", StaticFiles(directory=STATIC_DIR), name="dashboard-static")


# --------------------------------------------------------------- prompts
def _sampling_params(build: Callable[[], T]) -> T:
    try:
        return build()
    except ValueError as error:
        raise from_value_error(error) from None


def _completion_prompts(router: ReplicaRouter, body: CompletionRequest) -> list[tuple[str | None, list[int]]]:
    prompts = body.prompts()
    if not prompts:
        raise APIError(400, "prompt is empty: give a string, a list of strings or token ids", param="prompt")
    for prompt in prompts:
        if isinstance(prompt, str):
            _check_text_fits(router, prompt, "prompt")
    # Strings are tokenized exactly as LLM.generate does, so both give the same tokens.
    return [(p, router.tokenizer(p).input_ids) if isinstance(p, str) else (None, list(p)) for p in prompts]


def _chat_prompt(
    router: ReplicaRouter,
    messages: list[ChatMessage],
    add_generation_prompt: bool,
    chat_template: str | None,
    tools: ToolPlan | None = None,
) -> tuple[str, list[int]]:
    listed = tools.template_tools() if tools is not None else None
    if listed:
        chat_template = tools_template(router.tokenizer, chat_template)
        if chat_template is None:
            message = "this model's chat template cannot show tools; start the server with --chat-template"
            raise APIError(400, message, param="tools")
    conversation = [m.as_template_message() for m in messages]
    try:
        text = render_chat(router.tokenizer, conversation, add_generation_prompt, chat_template, listed)
    except (TemplateError, ValueError, RecursionError) as error:
        raise APIError(400, f"the messages do not fit the chat template: {error}", param="messages") from None
    _check_text_fits(router, text, "messages")
    # As LLM.chat: the template already holds the special tokens.
    return text, router.tokenizer(text, add_special_tokens=False).input_ids


def _check_text_fits(router: ReplicaRouter, text: str, param: str) -> None:
    try:
        check_text_fits(text, router.max_model_len, param)
    except ValueError as error:
        raise from_value_error(error) from None


def _log_ignored(fields: list[str]) -> None:
    if fields:
        logger.warning("ignoring unsupported request field(s): %s", ", ".join(fields))
