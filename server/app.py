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

from fastapi import FastAPI, Request

import memory_store as ms

from .chat_service import ChatService
from .errors import error_response, install_error_handlers
from .routers import chat, sessions, status
from .settings import Settings

log = logging.getLogger("deltamem.server")


def create_app(settings: Settings, engine=None, store: ms.SessionStore | None = None
               ) -> FastAPI:
    """The app. `engine`/`store` may be given (tests share one engine); otherwise the
    lifespan builds them from the settings, and closes them at shutdown."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        from transformers import AutoTokenizer

        from .engine.build import build_engine

        eng = engine if engine is not None else build_engine(settings)
        st = store if store is not None else ms.open_store(
            settings.redis_url, settings.data_dir, ttl_seconds=settings.session_ttl_seconds,
            keep_versions=settings.keep_versions)
        tok = AutoTokenizer.from_pretrained(eng.cfg.model_dir)
        name = settings.served_model_name or (
            Path(eng.cfg.model_dir).name + ("" if eng.memory else "-no-memory"))
        app.state.svc = ChatService(settings, eng, st, tok, name)
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

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            resp = error_response(413, f"request body of {length} bytes exceeds the limit of "
                                  f"{settings.max_body_bytes}", code="body_too_large")
        else:
            resp = await call_next(request)
        endpoint = getattr(request.scope.get("route"), "path", "unmatched")
        if hasattr(app.state, "svc"):
            m = app.state.svc.metrics
            m.requests.labels(endpoint, str(resp.status_code)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return resp

    def count_error(kind: str) -> None:
        if hasattr(app.state, "svc"):
            app.state.svc.metrics.errors.labels(kind).inc()

    install_error_handlers(app, count_error)
    for router in (chat.router, sessions.router, status.router):
        app.include_router(router)
    return app
