"""The FastAPI app (`create_app`) and the uvicorn runner (`run_server`) of `llmctl serve`.

Routes as vLLM serves them: /v1/completions, /v1/chat/completions, /v1/models,
/tokenize, /detokenize, /health, /version, /metrics.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from llmctl.config import ServeConfig
from llmctl.errors import EngineDeadError, InvalidRequestError
from llmctl.serve.chat_template import check_text
from llmctl.serve.errors import error_response, install_error_handlers
from llmctl.serve.metrics import ServerMetrics
from llmctl.serve.middleware import GuardMiddleware, RequestIdMiddleware
from llmctl.serve.openai_serving_chat import OpenAIServingChat, apply_chat_template
from llmctl.serve.openai_serving_completion import OpenAIServingCompletion
from llmctl.serve.openapi import install_openapi
from llmctl.serve.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    DetokenizeResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from llmctl.serve.serving_common import ServingContext
from llmctl.version import __version__

logger = logging.getLogger("llmctl.serve")


def create_app(ctx: ServingContext, metrics: ServerMetrics, config: ServeConfig,
               shutdown_grace_s: float | None = None) -> FastAPI:
    """The app for one served model. The engine thread starts with the app and stops with it."""

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        ctx.engine.start()
        metrics.record_step(ctx.engine.stats, [])  # KV gauges hold the real numbers from the start
        try:
            yield
        finally:
            await ctx.engine.shutdown(shutdown_grace_s if shutdown_grace_s is not None else config.shutdown_grace_s)
            ctx.close()

    app = FastAPI(title="llmctl", version=__version__, lifespan=lifespan)
    app.state.ctx = ctx
    app.state.metrics = metrics
    install_error_handlers(app)
    _add_openai_routes(app, ctx)
    _add_utility_routes(app, ctx, metrics)
    install_openapi(app, ctx.max_num_seqs, ctx.max_model_len)
    app.add_middleware(GuardMiddleware, api_key=config.api_key, max_request_bytes=config.max_request_bytes,
                       body_timeout_s=config.request_body_timeout_s)
    app.add_middleware(RequestIdMiddleware)  # outermost: guard errors carry the id too
    return app


def _add_openai_routes(app: FastAPI, ctx: ServingContext) -> None:
    completion = OpenAIServingCompletion(ctx)
    chat = OpenAIServingChat(ctx)

    @app.post("/v1/completions")
    async def create_completion(req: CompletionRequest, raw_request: Request):
        return await completion.create_completion(req, raw_request)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(req: ChatCompletionRequest, raw_request: Request):
        return await chat.create_chat_completion(req, raw_request)

    @app.get("/v1/models")
    async def show_models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=ctx.model_path, max_model_len=ctx.max_model_len)
                               for name in ctx.served_model_names])


def _add_utility_routes(app: FastAPI, ctx: ServingContext, metrics: ServerMetrics) -> None:
    @app.get("/health")
    async def health() -> Response:
        if not ctx.engine.is_running:
            reason = ctx.engine.dead_reason() or "the engine loop is not running"
            return error_response(reason, 503)
        return Response(status_code=200)

    @app.get("/version")
    async def version() -> JSONResponse:
        return JSONResponse({"version": __version__})

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> TokenizeResponse:
        ctx.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequestError("prompt: give exactly one of prompt and messages")
        if req.messages is not None:
            ids = await apply_chat_template(ctx, req.messages, req.add_generation_prompt)
        else:
            ids = await ctx.run_tokenizer(ctx.encode, check_text(req.prompt, "prompt"), req.add_special_tokens)
        strs = [ctx.token_text(t) for t in ids] if req.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=ctx.max_model_len, tokens=ids, token_strs=strs)

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> DetokenizeResponse:
        ctx.check_model(req.model)
        ctx.check_token_ids(req.tokens, "tokens")
        return DetokenizeResponse(prompt=ctx.decode(req.tokens, skip_special_tokens=False))


class _Server(uvicorn.Server):
    """uvicorn re-raises SIGINT/SIGTERM after its graceful shutdown, which would end the
    process with a signal status; a server told to stop that stopped cleanly exits 0.

    On shutdown the engine drains first (`AsyncEngine.begin_drain`): no new request, and after
    the grace period each one still running ends with a 503 or a stream error event and
    [DONE]. uvicorn's own deadline comes a few seconds later, so it has nothing left to cancel."""

    drain: Callable[[], None] | None = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self._captured_signals.clear()

    async def shutdown(self, sockets=None) -> None:
        if self.drain is not None:
            self.drain()
        await super().shutdown(sockets)


# Seconds uvicorn waits past the grace period before it cancels handlers (which would cut
# their responses): time for each to send its 503 or its stream's error event.
_CANCEL_MARGIN_S = 5.0


def run_server(app: FastAPI, config: ServeConfig, log_level: str = "info", sock=None) -> None:
    """Serve until SIGINT/SIGTERM: stop accepting, let in-flight requests finish for
    `shutdown_grace_s`, then cancel (aborting them in the engine) and return. `sock`: a
    socket already bound (`listen.bind_socket`), so a taken port failed before the model loaded.
    If the engine dies, stop too and raise EngineDeadError, so the process exits non-zero and a
    supervisor restarts it."""
    uv_config = uvicorn.Config(app, host=config.host, port=config.port, log_level=log_level,
                               timeout_graceful_shutdown=config.shutdown_grace_s + _CANCEL_MARGIN_S,
                               access_log=False)
    server = _Server(uv_config)
    engine = app.state.ctx.engine
    engine.on_dead = lambda err: setattr(server, "should_exit", True)  # uvicorn polls it
    server.drain = lambda: engine.begin_drain(config.shutdown_grace_s)
    server.run(sockets=[sock] if sock is not None else None)
    if engine.dead_error is not None:
        raise EngineDeadError(engine.dead_reason() or "the engine died")
