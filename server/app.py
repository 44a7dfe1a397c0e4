"""The FastAPI app: OpenAI-compatible chat completions with persistent δ-mem sessions.

`create_app` wires the parts: the lifespan builds (or takes) the engine and the store and makes
the chat service; a middleware enforces the body limit and records request metrics; the error
module maps every exception; the routers hold the endpoints.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from starlette.exceptions import HTTPException as StarletteHTTPException

import memory_store as ms

from .chat_service import ChatService
from .errors import error_response, install_error_handlers
from .routers import chat, conversations, responses, sessions, status
from .settings import Settings

log = logging.getLogger("deltamem.server")


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body exceeds the limit of {limit} bytes")


class LimitsAndMetrics:
    """The body limit and the request metrics, as plain ASGI (no BaseHTTPMiddleware: that
    one hides a client's disconnect from the handler, which must abort the turn).

    A body larger than `limit` is refused as soon as the limit is passed, whether or not it
    declared its length (a chunked body has none): a declared length over it is answered
    413 at once, and reading an undeclared one raises 413 mid-way, before the rest arrives
    or anything parses it."""

    def __init__(self, app, limit: int, metrics_of):
        self.app, self.limit, self.metrics_of = app, limit, metrics_of

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        status = 500
        seen = 0

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        length = dict(scope["headers"]).get(b"content-length", b"")
        try:
            if length.isdigit() and int(length) > self.limit:
                await error_response(413, f"request body of {int(length)} bytes exceeds the "
                                     f"limit of {self.limit}", code="body_too_large"
                                     )(scope, receive, send_status)
            else:
                await self.app(scope, limited_receive, send_status)
        finally:
            if (m := self.metrics_of()) is not None:
                endpoint = getattr(scope.get("route"), "path", "unmatched")
                m.requests.labels(endpoint, str(status)).inc()
                m.latency.labels(endpoint).observe(time.perf_counter() - t0)


def create_app(settings: Settings, engine=None, store: ms.SessionStore | None = None
               ) -> FastAPI:
    """The app. `engine`/`store` may be given (tests share one engine); otherwise the
    lifespan builds them from the settings, and closes them at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoConfig, AutoTokenizer

        from .engine.build import build_engine

        eng = engine if engine is not None else build_engine(settings)
        st = store if store is not None else ms.open_store(
            settings.redis_url, settings.data_dir, ttl_seconds=settings.session_ttl_seconds,
            keep_versions=settings.keep_versions,
            max_sessions_per_tenant=settings.max_sessions_per_tenant or None)
        tok = AutoTokenizer.from_pretrained(eng.cfg.model_dir)
        name = settings.served_model_name or (
            Path(eng.cfg.model_dir).name + ("" if eng.memory else "-no-memory"))
        app.state.svc = ChatService(settings, eng, st, tok, name)
        # The model's logits width bounds every token id an imported record may hold.
        app.state.svc.vocab_size = AutoConfig.from_pretrained(eng.cfg.model_dir).vocab_size
        log.info("serving %s (memory %s, store %s) on %s:%d", name,
                 "on" if eng.memory else "off", type(st).__name__, settings.host, settings.port)
        try:
            yield
        finally:
            if store is None:
                await st.close()
            if engine is None:
                eng.shutdown()

    app = FastAPI(title="δ-mem server", version="0.1.0", lifespan=lifespan)
    def metrics_of():
        return app.state.svc.metrics if hasattr(app.state, "svc") else None

    app.add_middleware(LimitsAndMetrics, limit=settings.max_body_bytes, metrics_of=metrics_of)

    def count_error(kind: str) -> None:
        if hasattr(app.state, "svc"):
            app.state.svc.metrics.errors.labels(kind).inc()

    install_error_handlers(app, count_error)
    for router in (chat.router, sessions.router, status.router, responses.router,
                   conversations.router):
        app.include_router(router)
    return app
