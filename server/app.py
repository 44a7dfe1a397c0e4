"""The FastAPI app: OpenAI-compatible chat completions with persistent δ-mem sessions."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.exceptions import HTTPException as StarletteHTTPException

import memory_store as ms

from .protocol import (
    AssistantMessage,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    Choice,
    ChunkChoice,
    Delta,
    ErrorDetail,
    ErrorResponse,
    ForkRequest,
    ModelCard,
    ModelList,
    RollbackRequest,
    SessionInfo,
    SessionList,
    SessionView,
    Usage,
    new_completion_id,
)
from .sessions import ChatFormat, SessionBusy, SessionLocks, TurnError, finish_turn, plan_turn
from .settings import Settings

log = logging.getLogger("deltamem.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = (
            status, message, type_, code, param)


def error_response(status: int, message: str, type_: str, code: str | None = None,
                   param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorDetail(message=message, type=type_, code=code, param=param))
    return JSONResponse(body.model_dump(), status_code=status)


STORE_ERRORS: dict[type, tuple[int, str, str]] = {
    ms.SessionNotFound: (404, "invalid_request_error", "session_not_found"),
    ms.InvalidSessionId: (400, "invalid_request_error", "invalid_session_id"),
    ms.VersionConflict: (409, "invalid_request_error", "session_conflict"),
    ms.IdentityMismatch: (409, "invalid_request_error", "session_identity_mismatch"),
    ms.CorruptRecord: (422, "invalid_request_error", "corrupt_record"),
    ms.StoreUnavailable: (503, "service_unavailable", "store_unavailable"),
}


def classify_error(exc: BaseException) -> tuple[int, ErrorDetail]:
    """Status and OpenAI error body of an exception: one mapping for the JSON responses and
    for errors inside an SSE stream."""
    if isinstance(exc, APIError):
        return exc.status, ErrorDetail(message=exc.message, type=exc.type, code=exc.code,
                                       param=exc.param)
    if isinstance(exc, TurnError):
        return exc.status, ErrorDetail(message=str(exc), type="invalid_request_error",
                                       code=exc.code, param=exc.param)
    if isinstance(exc, SessionBusy):
        return 409, ErrorDetail(message=str(exc), type="invalid_request_error",
                                code="session_busy")
    if isinstance(exc, ms.StoreError):
        status, type_, code = next((v for k, v in STORE_ERRORS.items() if isinstance(exc, k)),
                                   (500, "server_error", "store_error"))
        return status, ErrorDetail(message=str(exc), type=type_, code=code)
    return 500, ErrorDetail(message=f"internal error: {type(exc).__name__}",
                            type="server_error", code="internal")


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        self.requests = Counter("deltamem_requests", "HTTP requests", ["endpoint", "status"],
                                registry=r)
        self.errors = Counter("deltamem_errors", "errors by kind", ["kind"], registry=r)
        self.tokens = Counter("deltamem_tokens", "tokens", ["kind"], registry=r)
        self.latency = Histogram("deltamem_request_seconds", "request latency", ["endpoint"],
                                 registry=r)
        self.ttft = Histogram("deltamem_time_to_first_token_seconds", "time to first token",
                              registry=r)
        self.state_load = Histogram("deltamem_state_load_seconds", "session load latency",
                                    buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5),
                                    registry=r)
        self.state_commit = Histogram("deltamem_state_commit_seconds",
                                      "session commit latency",
                                      buckets=(.0005, .001, .002, .005, .01, .02, .05, .1, .5),
                                      registry=r)
        self.sessions = Gauge("deltamem_sessions", "sessions in the store", registry=r)
        self.turns = Counter("deltamem_turns", "committed session turns", registry=r)
        self.in_flight = Gauge("deltamem_requests_in_flight", "chat requests running",
                               registry=r)


@dataclass
class Generated:
    tokens: list[int]
    text: str
    finish_reason: str
    prompt_tokens: int
    final_state: object


class ChatService:
    """Holds the engine, the store and the chat format; runs turns."""

    def __init__(self, settings: Settings, engine, store: ms.SessionStore, tokenizer,
                 model_name: str):
        self.s = settings
        self.engine = engine
        self.store = store
        self.fmt = ChatFormat(tokenizer)
        self.model_name = model_name
        self.locks = SessionLocks()
        self.metrics = Metrics()
        self.keys = settings.keys()
        if engine.memory:
            c = engine.adapter.config
            self.identity = ms.StateIdentity(str(engine.backbone), engine.adapter.fingerprint(),
                                             len(c.layers), c.num_state_heads, c.rank)
        else:
            self.identity = ms.StateIdentity(str(engine.backbone), "none", 1, 1, 1)

    # --- auth ---------------------------------------------------------------------------------
    def tenant_of(self, request: Request) -> str:
        if not self.keys:
            return "default"
        auth = request.headers.get("authorization", "")
        key = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        key = key or request.headers.get("x-api-key")
        if not key or key not in self.keys:
            raise APIError(401, "missing or invalid API key", "authentication_error",
                           "invalid_api_key")
        return self.keys[key]

    # --- sampling -----------------------------------------------------------------------------
    def sampling(self, req: ChatCompletionRequest):
        from vllm import SamplingParams

        max_tokens = req.max_completion_tokens or req.max_tokens or self.s.default_max_tokens
        if max_tokens > self.s.max_tokens_limit:
            raise APIError(400, f"max_tokens {max_tokens} exceeds this server's limit "
                           f"{self.s.max_tokens_limit}", param="max_tokens")
        kw = dict(max_tokens=max_tokens, stop=req.stop, seed=req.seed,
                  temperature=1.0 if req.temperature is None else req.temperature)
        for f in ("top_p", "presence_penalty", "frequency_penalty"):
            if getattr(req, f) is not None:
                kw[f] = getattr(req, f)
        return SamplingParams(**kw), max_tokens

    # --- one turn -----------------------------------------------------------------------------
    async def run_turn(self, req: ChatCompletionRequest, tenant: str, session_id: str | None,
                       stream_cb=None) -> tuple[Generated, ms.SessionRecord | None]:
        """Load, plan, generate, commit. `stream_cb(token_ids, text)` gets each delta."""
        sp, max_tokens = self.sampling(req)
        window = self.s.memory_window_tokens if req.memory_window_tokens is None else \
            req.memory_window_tokens
        messages = [m.normalized() for m in req.messages]
        if session_id is None:
            record = ms.SessionRecord("ephemeral", tenant, self.identity)
            plan = plan_turn(self.fmt, record, messages, -1, self.s.max_model_len, max_tokens)
            gen = await self._generate(plan.prompt, sp, None, 0, stream_cb)
            return gen, None
        ms.validate_session_id(session_id)
        async with self.locks.hold(tenant, session_id, self.s.session_lock_timeout):
            t0 = time.perf_counter()
            try:
                record = await self.store.load(tenant, session_id, self.identity)
            except ms.SessionNotFound:
                record = ms.SessionRecord(session_id, tenant, self.identity)
            self.metrics.state_load.observe(time.perf_counter() - t0)
            plan = plan_turn(self.fmt, record, messages, window, self.s.max_model_len,
                             max_tokens)
            state = plan.initial_state if self.engine.memory else None
            gen = await self._generate(plan.prompt, sp, state, plan.write_start, stream_cb)
            new = finish_turn(plan, gen.tokens, gen.text,
                              gen.final_state if self.engine.memory else None,
                              gen.finish_reason, self.identity)
            t0 = time.perf_counter()
            # The turn finished: commit even if the client goes away now.
            stored = await asyncio.shield(self.store.commit(new, plan.expected_version))
            self.metrics.state_commit.observe(time.perf_counter() - t0)
            self.metrics.turns.inc()
            return gen, stored

    async def _generate(self, prompt, sp, state, write_start, stream_cb) -> Generated:
        if len(prompt) + sp.max_tokens > self.s.max_model_len:
            raise APIError(400, f"prompt of {len(prompt)} tokens + max_tokens {sp.max_tokens} "
                           f"exceeds the context length {self.s.max_model_len}",
                           code="context_length_exceeded")
        tokens: list[int] = []
        text = []
        t0 = time.perf_counter()
        first = True
        final = None
        async for chunk in self.engine.generate(prompt, sp, state, write_start):
            if first and chunk.token_ids:
                self.metrics.ttft.observe(time.perf_counter() - t0)
                first = False
            tokens += chunk.token_ids
            text.append(chunk.text)
            if stream_cb is not None and (chunk.text or chunk.finished):
                await stream_cb(chunk.text)
            if chunk.finished:
                final = chunk
        if final is None or final.finish_reason not in ("stop", "length"):
            raise APIError(503, "generation did not finish", "server_error", "aborted")
        self.metrics.tokens.labels("prompt").inc(len(prompt))
        self.metrics.tokens.labels("completion").inc(len(tokens))
        return Generated(tokens, "".join(text), final.finish_reason, len(prompt),
                         final.final_state)

    def session_info(self, rec: ms.SessionRecord | None) -> SessionInfo | None:
        if rec is None:
            return None
        return SessionInfo(id=rec.session_id, version=rec.version, turns=rec.turns,
                           tokens_absorbed=rec.tokens_absorbed,
                           transcript_tokens=len(rec.transcript))


def _session_id(req: ChatCompletionRequest, request: Request) -> str | None:
    sid = req.session_id or request.headers.get("x-session-id")
    return sid or None


def create_app(settings: Settings, engine=None, store: ms.SessionStore | None = None
               ) -> FastAPI:
    """The app. `engine`/`store` may be given (tests share one engine); otherwise the
    lifespan builds them from the settings."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        eng, own_engine = engine, engine is None
        st, own_store = store, store is None
        if eng is None:
            from .cli import build_engine

            eng = build_engine(settings)
        if st is None:
            st = ms.open_store(settings.redis_url, settings.data_dir,
                               ttl_seconds=settings.session_ttl_seconds,
                               keep_versions=settings.keep_versions)
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(eng.cfg.model_dir)
        name = settings.served_model_name or (
            Path(eng.cfg.model_dir).name + ("" if eng.memory else "-no-memory"))
        app.state.svc = ChatService(settings, eng, st, tok, name)
        log.info("serving %s (memory %s, store %s) on %s:%d", name,
                 "on" if eng.memory else "off", type(st).__name__, settings.host, settings.port)
        try:
            yield
        finally:
            if own_store:
                await st.close()
            if own_engine:
                eng.shutdown()

    app = FastAPI(title="δ-mem server", version="0.1.0", lifespan=lifespan)

    def svc() -> ChatService:
        return app.state.svc

    @app.middleware("http")
    async def limits_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > settings.max_body_bytes:
            resp = error_response(413, f"request body of {length} bytes exceeds the limit of "
                                  f"{settings.max_body_bytes}", "invalid_request_error",
                                  "body_too_large")
        else:
            resp = await call_next(request)
        route = request.scope.get("route")
        endpoint = getattr(route, "path", "unmatched")
        if hasattr(app.state, "svc"):
            m = svc().metrics
            m.requests.labels(endpoint, str(resp.status_code)).inc()
            m.latency.labels(endpoint).observe(time.perf_counter() - t0)
        return resp

    def _known_error(request, exc: Exception):
        status, detail = classify_error(exc)
        if hasattr(app.state, "svc"):
            svc().metrics.errors.labels(detail.code or detail.type).inc()
        return JSONResponse(ErrorResponse(error=detail).model_dump(), status_code=status)

    for kind in (APIError, TurnError, SessionBusy, ms.StoreError):
        app.add_exception_handler(kind, _known_error)

    @app.exception_handler(RequestValidationError)
    async def _validation(request, exc: RequestValidationError):
        errs = exc.errors()
        if errs and errs[0].get("type") == "json_invalid":
            return error_response(400, "request body is not valid JSON",
                                  "invalid_request_error", "invalid_json")
        first = errs[0] if errs else {}
        loc = ".".join(str(x) for x in first.get("loc", ())[1:]) or None
        return error_response(422, f"{loc or 'body'}: {first.get('msg', 'invalid')}",
                              "invalid_request_error", "invalid_value", loc)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error",
                              "not_found" if exc.status_code == 404 else None)

    @app.exception_handler(Exception)
    async def _unhandled(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _known_error(request, exc)

    # --- endpoints ----------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        s = svc()
        tenant = s.tenant_of(request)
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"unsupported field(s): {', '.join(bad)}", param=bad[0],
                           code="unsupported_parameter")
        if len(req.messages) > settings.max_messages:
            raise APIError(400, f"{len(req.messages)} messages exceed the limit of "
                           f"{settings.max_messages}", param="messages")
        session_id = _session_id(req, request)
        if req.n != 1:
            raise APIError(400, "only n = 1 is supported", param="n")
        if req.model and req.model != s.model_name:
            raise APIError(404, f"model {req.model!r} does not exist; this server serves "
                           f"{s.model_name!r}", code="model_not_found", param="model")
        cid = new_completion_id()
        created = int(time.time())
        if not req.stream:
            return await _complete(s, req, tenant, session_id, request, cid, created)
        return StreamingResponse(_stream(s, req, tenant, session_id, cid, created),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})

    async def _complete(s: ChatService, req, tenant, session_id, request, cid, created):
        s.metrics.in_flight.inc()
        task = asyncio.create_task(s.run_turn(req, tenant, session_id))
        try:
            # A client that goes away aborts the turn: nothing is committed.
            while not task.done():
                done, _ = await asyncio.wait({task}, timeout=0.25)
                if not done and await request.is_disconnected():
                    task.cancel()
                    log.info("client disconnected; turn aborted (session %s)", session_id)
                    return Response(status_code=499)
            gen, rec = task.result()
        finally:
            if not task.done():
                task.cancel()
            s.metrics.in_flight.dec()
        return ChatCompletion(
            id=cid, created=created, model=s.model_name,
            choices=[Choice(message=AssistantMessage(content=gen.text),
                            finish_reason=gen.finish_reason)],
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens),
                        total_tokens=gen.prompt_tokens + len(gen.tokens)),
            session=s.session_info(rec))

    async def _stream(s: ChatService, req, tenant, session_id, cid, created
                      ) -> AsyncIterator[str]:
        queue: asyncio.Queue = asyncio.Queue()

        async def on_delta(text: str):
            await queue.put(text)

        def chunk(delta: Delta, finish=None, usage=None, session=None) -> str:
            c = ChatCompletionChunk(id=cid, created=created, model=s.model_name,
                                    choices=[ChunkChoice(delta=delta, finish_reason=finish)]
                                    if delta is not None else [],
                                    usage=usage, session=session)
            return "data: " + c.model_dump_json(exclude_none=False) + "\n\n"

        s.metrics.in_flight.inc()
        task = asyncio.create_task(s.run_turn(req, tenant, session_id, on_delta))
        try:
            yield chunk(Delta(role="assistant", content=""))
            while True:
                getter = asyncio.ensure_future(queue.get())
                done, _ = await asyncio.wait({getter, task}, return_when=asyncio.FIRST_COMPLETED)
                if getter in done:
                    text = getter.result()
                    if text:
                        yield chunk(Delta(content=text))
                    continue
                getter.cancel()
                while not queue.empty():
                    text = queue.get_nowait()
                    if text:
                        yield chunk(Delta(content=text))
                break
            exc = task.exception()
            if exc is not None:
                err = _error_payload(exc)
                yield "data: " + json.dumps(err) + "\n\n"
                yield "data: [DONE]\n\n"
                return
            gen, rec = task.result()
            yield chunk(Delta(), finish=gen.finish_reason, session=s.session_info(rec))
            if req.stream_options and req.stream_options.include_usage:
                yield chunk(None, usage=Usage(
                    prompt_tokens=gen.prompt_tokens, completion_tokens=len(gen.tokens),
                    total_tokens=gen.prompt_tokens + len(gen.tokens)))
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():
                # The client went away mid-stream: abort the turn, commit nothing.
                task.cancel()
                log.info("stream closed before the turn finished; aborted (session %s)",
                         session_id)
            s.metrics.in_flight.dec()

    def _error_payload(exc: BaseException) -> dict:
        status, detail = classify_error(exc)
        if status >= 500:
            log.error("turn failed: %r", exc)
        return ErrorResponse(error=detail).model_dump()

    @app.get("/v1/models")
    async def models(request: Request):
        s = svc()
        s.tenant_of(request)
        mem = None
        if s.engine.memory:
            c = s.engine.adapter.config
            mem = {"adapter": s.identity.adapter, "rank": c.rank, "layers": len(c.layers),
                   "state_heads": c.num_state_heads, "write_granularity": c.write_granularity,
                   "state_bytes": len(c.layers) * c.num_state_heads * c.rank * c.rank * 4,
                   "trained": bool(s.engine.adapter.meta.get("trained", True))}
        return ModelList(data=[ModelCard(id=s.model_name, created=int(time.time()),
                                         memory=mem)])

    def view(rec: ms.SessionRecord, full: bool = False, versions=None) -> SessionView:
        v = SessionView(id=rec.session_id, version=rec.version, turns=rec.turns,
                        tokens_absorbed=rec.tokens_absorbed,
                        transcript_tokens=len(rec.transcript), created_at=rec.created_at,
                        updated_at=rec.updated_at, versions=versions,
                        state_bytes=None if rec.state is None else rec.state.numel() * 4)
        if full:
            v.messages = rec.messages
            v.transcript = rec.transcript
            v.turn_log = rec.meta.get("turn_log", [])
        return v

    @app.get("/v1/sessions")
    async def list_sessions(request: Request, limit: int = 20, after: str | None = None):
        s = svc()
        tenant = s.tenant_of(request)
        if not 1 <= limit <= 100:
            raise APIError(400, "limit must be between 1 and 100", param="limit")
        items, cursor = await s.store.list(tenant, limit=limit, after=after)
        return SessionList(data=[SessionView(id=i.session_id, version=i.version, turns=i.turns,
                                             tokens_absorbed=i.tokens_absorbed,
                                             # after any turn the transcript holds one
                                             # token more than was absorbed (invariant 1)
                                             transcript_tokens=i.tokens_absorbed
                                             + (1 if i.turns else 0),
                                             created_at=i.created_at, updated_at=i.updated_at)
                                 for i in items], next_cursor=cursor)

    @app.get("/v1/sessions/{session_id}")
    async def get_session(session_id: str, request: Request, full: bool = False):
        s = svc()
        tenant = s.tenant_of(request)
        rec = await s.store.load(tenant, session_id)
        return view(rec, full, await s.store.versions(tenant, session_id))

    @app.delete("/v1/sessions/{session_id}")
    async def delete_session(session_id: str, request: Request):
        s = svc()
        tenant = s.tenant_of(request)
        if not await s.store.delete(tenant, session_id):
            raise ms.SessionNotFound(f"session {session_id!r} not found")
        return {"id": session_id, "object": "session.deleted", "deleted": True}

    @app.post("/v1/sessions/{session_id}/rollback")
    async def rollback(session_id: str, body: RollbackRequest, request: Request):
        s = svc()
        tenant = s.tenant_of(request)
        async with s.locks.hold(tenant, session_id, settings.session_lock_timeout):
            rec = await s.store.rollback(tenant, session_id, body.version)
        return view(rec, versions=await s.store.versions(tenant, session_id))

    @app.post("/v1/sessions/{session_id}/fork")
    async def fork(session_id: str, request: Request, body: ForkRequest | None = None):
        import uuid

        s = svc()
        tenant = s.tenant_of(request)
        new_id = (body.new_session_id if body else None) or f"{session_id}.fork-{uuid.uuid4().hex[:8]}"
        rec = await s.store.fork(tenant, session_id, new_id)
        return view(rec)

    @app.get("/v1/sessions/{session_id}/export")
    async def export(session_id: str, request: Request):
        s = svc()
        data = await s.store.export(s.tenant_of(request), session_id)
        return Response(data, media_type="application/octet-stream",
                        headers={"Content-Disposition": f'attachment; filename="{session_id}.dmem"'})

    @app.put("/v1/sessions/{session_id}/import")
    async def import_(session_id: str, request: Request, overwrite: bool = False):
        s = svc()
        tenant = s.tenant_of(request)
        data = await request.body()
        if len(data) > settings.max_body_bytes:
            raise APIError(413, "record exceeds the body size limit", code="body_too_large")
        rec = await s.store.import_(tenant, session_id, data, s.identity, overwrite=overwrite)
        return view(rec)

    @app.get("/health")
    async def health():
        s = svc()
        status = {"engine": "ok", "store": "ok"}
        code = 200
        try:
            await asyncio.wait_for(s.engine.check_health(), 5)
        except Exception as e:  # engine dead or wedged
            status["engine"] = f"error: {type(e).__name__}"
            code = 503
        try:
            await s.store.ping()
        except ms.StoreError as e:
            status["store"] = f"error: {e}"
            code = 503
        return JSONResponse({"status": "ok" if code == 200 else "degraded", **status,
                             "memory": s.engine.memory}, status_code=code)

    @app.get("/metrics")
    async def metrics():
        s = svc()
        try:
            s.metrics.sessions.set(await s.store.count())
        except ms.StoreError:
            pass
        return Response(generate_latest(s.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app
